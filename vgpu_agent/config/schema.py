"""The versioned config schema (``version = 1``) as frozen dataclasses.

``parse(text, source)`` turns TOML text into a :class:`Config`; ``load(path)`` reads a
file and parses it; ``to_toml(config)`` renders a Config back to TOML that parses to the
same Config. Every error is a :class:`ConfigError` naming the file, the key path and the
bad value, and saying what is allowed. Unknown keys are errors.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import math
import os
import posixpath
import re
import stat
import sys
from dataclasses import dataclass, field, fields
from typing import (
    TYPE_CHECKING,
    Callable,
    Literal,
    Mapping,
    NoReturn,
    Optional,
    Sequence,
    TypeVar,
    Union,
    get_args,
)

from vgpu_agent.config.dra import DraConfig, dra_toml_pairs, parse_dra
from vgpu_agent.host.log import LogLevel
from vgpu_agent.host.sockets import MAX_UNIX_SOCKET_PATH_BYTES
from vgpu_agent.model.devices import LimitPolicy, pipe_dir_for, proportional_memory_mib
from vgpu_agent.model.errors import ConfigError
from vgpu_agent.model.gpu import MPS_CLIENT_LIMIT_PRE_VOLTA, MPS_CLIENT_LIMIT_VOLTA

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

DEFAULT_CONFIG_PATH = "/etc/vgpu/config.toml"
CONFIG_ENV_VAR = "VGPU_CONFIG"
SCHEMA_VERSION = 1
#: The agent's control socket, in agent.state_dir.
CONTROL_SOCKET_NAME = "control.sock"

ComputeModeSetting = Literal["exclusive_process", "default", "unchanged"]
BackendName = Literal["nvml", "simulated"]
MpsManager = Literal["direct", "systemd", "external"]
MultiUser = Literal["auto", "on", "off"]
#: "enforced": the daemon's defaults hold every client to a ceiling; "cooperative": only the
#: container's own environment limits it (docs/security.md).
Confinement = Literal["enforced", "cooperative"]
#: How Allocate names a container's GPU to the NVIDIA container toolkit.
DeviceListStrategy = Literal["envvar", "volume-mounts", "cdi"]


@dataclass(frozen=True)
class PluginConfig:
    """How the agent talks to the kubelet. ``[plugin]``"""

    resource_name: str = "eks.amazonaws.com/vgpu"
    plugin_dir: str = "/var/lib/kubelet/device-plugins"
    socket_name: str = "vgpu.sock"
    kubelet_socket_name: str = "kubelet.sock"
    #: Seconds a Register call may take before we retry.
    register_timeout_s: float = 5.0
    #: "envvar" (NVIDIA_VISIBLE_DEVICES), "volume-mounts" (/var/run/nvidia-container-devices)
    #: or "cdi" (cdi_devices); only the last two are beyond a pod's reach (docs/security.md).
    device_list_strategy: DeviceListStrategy = "envvar"

    @property
    def socket_path(self) -> str:
        """Our plugin socket, where the kubelet dials us."""
        return os.path.join(self.plugin_dir, self.socket_name)

    @property
    def kubelet_socket_path(self) -> str:
        """The kubelet's registration socket."""
        return os.path.join(self.plugin_dir, self.kubelet_socket_name)


@dataclass(frozen=True)
class SimulatedGpu:
    """One simulated GPU. ``[[simulated.gpus]]``"""

    uuid: str
    model: str = "NVIDIA H100 80GB HBM3"
    memory_mib: int = 81559
    compute_capability: tuple[int, int] = (9, 0)
    numa_node: Optional[int] = None
    mig_enabled: bool = False


@dataclass(frozen=True)
class SimulatedConfig:
    """The simulated backend. ``[simulated]``: either ``count`` GPUs of one model or a list."""

    count: int = 2
    model: str = "NVIDIA H100 80GB HBM3"
    memory_mib: int = 81559
    compute_capability: tuple[int, int] = (9, 0)
    #: Explicit GPUs; when non-empty, ``count``/``model``/``memory_mib`` are ignored.
    gpus: tuple[SimulatedGpu, ...] = ()


@dataclass(frozen=True)
class GpusConfig:
    """Which GPUs to serve and how to split them. ``[gpus]``"""

    backend: BackendName = "nvml"
    #: vGPUs advertised per physical GPU, unless a model override applies.
    replicas_per_gpu: int = 10
    #: Per-model overrides: case-insensitive substring of the GPU model name -> replicas.
    #: The longest matching key wins, e.g. {"A10G": 7, "H100": 20}.
    replicas_by_model: tuple[tuple[str, int], ...] = ()
    #: "all", or GPUs by UUID (str) or index (int).
    serve: Union[Literal["all"], tuple[Union[str, int], ...]] = "all"
    compute_mode: ComputeModeSetting = "exclusive_process"
    #: Put back the compute mode we found, on stop, for the GPUs we changed.
    restore_compute_mode: bool = False
    #: Serve GPUs where MPS cannot confine clients (pre-Volta, MIG) anyway.
    allow_unconfined_sharing: bool = False


@dataclass(frozen=True)
class MpsConfig:
    """The per-GPU MPS control daemons and what Allocate hands out. ``[mps]``"""

    enabled: bool = True
    #: "direct": the agent starts the daemons itself; "systemd": it starts vgpu-mps@<uuid>
    #: units; "external": someone else runs them, the agent only uses and watches them.
    manager: MpsManager = "systemd"
    pipe_root: str = "/run/nvidia-mps"
    log_root: str = "/var/log/nvidia-mps"
    control_binary: str = "nvidia-cuda-mps-control"
    multi_user: MultiUser = "auto"
    #: Where the GPU's pipe directory is mounted inside containers.
    container_pipe_dir: str = "/run/nvidia-mps"
    thread_limit: LimitPolicy = "proportional"
    memory_limit: LimitPolicy = "proportional"
    #: MiB kept back from each GPU before it is split into proportional memory slices.
    memory_headroom_mib: int = 0
    #: Mount the daemon's /dev/shm into containers (only for drivers that need it).
    share_host_shm: bool = False
    #: Seconds to wait for a daemon to answer a control command.
    control_timeout_s: float = 2.0
    #: The daemon's own default thread percentage for clients that set none ("proportional":
    #: one vGPU's share), set through its control pipe after it starts.
    daemon_thread_limit: LimitPolicy = "none"
    #: The daemon's default pinned memory limit for clients that set none ("proportional":
    #: one vGPU's slice; or MiB), set through its control pipe after it starts.
    daemon_memory_limit: LimitPolicy = "none"
    #: "enforced": the daemon's defaults are a ceiling of ``max_vgpus_per_container`` shares
    #: and larger requests are refused; "cooperative": no refusal, the ceiling comes from
    #: ``daemon_*_limit`` (none by default) and limits only from the container's environment.
    confinement: Confinement = "enforced"
    #: The most vGPUs one container may hold in enforced mode; also the ceiling's size.
    max_vgpus_per_container: int = 1

    def pipe_dir(self, gpu_uuid: str) -> str:
        """The host pipe directory of a GPU's MPS daemon."""
        return pipe_dir_for(self.pipe_root, gpu_uuid)


@dataclass(frozen=True)
class HealthConfig:
    """Health checks. ``[health]``"""

    xid_enabled: bool = True
    #: XIDs that mean an application fault, not a sick GPU: logged and ignored.
    ignored_xids: tuple[int, ...] = (13, 31, 43, 45, 68, 109)
    mps_liveness_enabled: bool = True
    mps_check_interval_s: float = 0.5
    #: Seconds without a new critical event before an XID-marked GPU is healthy again; 0 = never.
    recovery_quiet_period_s: float = 300.0
    #: Seconds between polls of GPUs whose events cannot be watched.
    poll_interval_s: float = 5.0


@dataclass(frozen=True)
class AgentConfig:
    """The agent process itself. ``[agent]``"""

    log_level: LogLevel = "info"
    #: Where the agent keeps its control socket and state.
    state_dir: str = "/run/vgpu-agent"

    @property
    def control_socket_path(self) -> str:
        """The agent's control socket (`vgpu-agent status`, `health reset`, `simulate`)."""
        return os.path.join(self.state_dir, CONTROL_SOCKET_NAME)


@dataclass(frozen=True)
class AttributionConfig:
    """Finding which pods use which vGPUs. ``[attribution]``"""

    #: The kubelet's PodResources API socket.
    pod_resources_socket: str = "/var/lib/kubelet/pod-resources/kubelet.sock"
    #: Seconds between refreshes of the attribution that metrics and the textfile show.
    refresh_interval_s: float = 10.0


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics. ``[metrics]``"""

    enabled: bool = False
    #: "<host>:<port>" for the HTTP endpoint (/metrics); "" serves none (textfile only).
    listen_address: str = "127.0.0.1:9402"
    #: node-exporter textfile collector output ("" for none), rewritten atomically.
    textfile_path: str = ""


@dataclass(frozen=True)
class LabelsConfig:
    """Node labels through node-feature-discovery's local feature files. ``[labels]``"""

    enabled: bool = False
    features_dir: str = "/etc/kubernetes/node-feature-discovery/features.d"


@dataclass(frozen=True)
class Config:
    """The whole config file."""

    version: int = SCHEMA_VERSION
    agent: AgentConfig = field(default_factory=AgentConfig)
    plugin: PluginConfig = field(default_factory=PluginConfig)
    gpus: GpusConfig = field(default_factory=GpusConfig)
    mps: MpsConfig = field(default_factory=MpsConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    simulated: SimulatedConfig = field(default_factory=SimulatedConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    dra: DraConfig = field(default_factory=DraConfig)
    #: Where this config came from (a path, or "<defaults>"); not a key in the file.
    source: str = "<defaults>"

    def replicas_for_model(self, model: str) -> int:
        """vGPUs per GPU for a GPU of this model name (model overrides, else the default)."""
        lowered = model.lower()
        best: Optional[tuple[str, int]] = None
        for key, replicas in self.gpus.replicas_by_model:
            if key.lower() in lowered and (best is None or len(key) > len(best[0])):
                best = (key, replicas)
        return best[1] if best is not None else self.gpus.replicas_per_gpu


# --------------------------------------------------------------------------------------
# Parsing: untyped TOML -> the typed dataclasses above. Each validator takes a _Value
# (the raw value plus where it came from) and returns the typed value or raises a
# ConfigError that names the file, the key path, the bad value and what is allowed.
# The first error found wins; tables are checked for unknown keys before their values
# and values in the order of the dataclass fields, so the same document always gives the
# same message.
# --------------------------------------------------------------------------------------

_T = TypeVar("_T")

#: Replicas above this fail on every GPU; pre-Volta GPUs (16) are checked per GPU at start.
MAX_REPLICAS_PER_GPU = MPS_CLIENT_LIMIT_VOLTA
#: The most GPUs the simulated backend will invent.
MAX_SIMULATED_GPUS = 64
#: A proportional memory slice below this leaves an MPS client almost nothing once its own
#: CUDA context is counted against the limit (measured: a 1 GiB limit left 0.39 GiB free).
MIN_USEFUL_SLICE_MIB = 640
#: TOML's integers are signed 64-bit; larger ones are refused as out of range.
MAX_INTEGER = 2**63 - 1
#: vGPU ids are "<uuid>::<replica>" and at most 63 characters; replicas need up to 2 digits.
MAX_GPU_UUID_LENGTH = 63 - len("::") - len(str(MAX_REPLICAS_PER_GPU - 1))

_REPLICAS_ALLOWED = (
    f"an integer from 1 to {MAX_REPLICAS_PER_GPU} (the MPS client limit on Volta and newer "
    f"GPUs; pre-Volta GPUs allow {MPS_CLIENT_LIMIT_PRE_VOLTA}, which is checked per GPU "
    "when the agent starts)"
)
_UUID_ALLOWED = (
    "a GPU UUID as nvidia-smi -L prints it, 'GPU-' followed by letters, digits and '-' "
    f"(at most {MAX_GPU_UUID_LENGTH} characters)"
)
_GPU_UUID_RE = re.compile(r"GPU-[A-Za-z0-9-]+")
_DNS_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME_RE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_COMPUTE_CAPABILITY_RE = re.compile(r"([0-9]{1,2})\.([0-9]{1,2})")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_SHOW_LIMIT = 60

_BACKENDS: dict[str, BackendName] = {"nvml": "nvml", "simulated": "simulated"}
_COMPUTE_MODES: dict[str, ComputeModeSetting] = {
    "exclusive_process": "exclusive_process",
    "default": "default",
    "unchanged": "unchanged",
}
_MPS_MANAGERS: dict[str, MpsManager] = {
    "direct": "direct",
    "systemd": "systemd",
    "external": "external",
}
_MULTI_USER: dict[str, MultiUser] = {"auto": "auto", "on": "on", "off": "off"}
_CONFINEMENTS: dict[str, Confinement] = {name: name for name in get_args(Confinement)}
_DEVICE_LIST_STRATEGIES: dict[str, DeviceListStrategy] = {
    name: name for name in get_args(DeviceListStrategy)
}
_LOG_LEVELS: dict[str, LogLevel] = {name: name for name in get_args(LogLevel)}
_POLICIES: dict[str, Literal["proportional", "none"]] = {
    "proportional": "proportional",
    "none": "none",
}


def _show(value: object) -> str:
    """The bad value as the message shows it: TOML spelling for booleans, else repr."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    text = repr(value)
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 3] + "..."


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.datetime):
        return "a date-time"
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, datetime.time):
        return "a time"
    return f"a {type(value).__name__}"


def _quote_key(key: str) -> str:
    """A key as TOML spells it: bare when it can be, else a basic string."""
    return key if _BARE_KEY_RE.fullmatch(key) else _toml_string(key)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@dataclass(frozen=True)
class _Value:
    """A raw TOML value and where it came from."""

    source: str
    path: str
    raw: object

    def fail(
        self, expected: str, reason: Optional[str] = None, *, wrong_type: bool = False
    ) -> NoReturn:
        """Raise the ConfigError for this value."""
        shown = _show(self.raw)
        if wrong_type:
            shown += f" ({_type_name(self.raw)})"
        because = f": {reason}" if reason else ""
        raise ConfigError(
            f"{self.source}: {self.path}: invalid value {shown}{because}; expected {expected}"
        )


class _Table:
    """One TOML table of the schema: refuses unknown keys, hands out typed values."""

    def __init__(
        self, source: str, path: str, title: str, data: Mapping[str, object], allowed: Sequence[str]
    ) -> None:
        self.source = source
        self.path = path
        self._data = data
        for key in data:
            if key not in allowed:
                raise ConfigError(
                    f"{source}: {_join(path, _quote_key(key))}: unknown key; "
                    f"the keys allowed in {title} are: {', '.join(allowed)}"
                )

    def value(self, key: str) -> _Value:
        """The raw value of a key known to be present."""
        return _Value(self.source, _join(self.path, key), self._data[key])

    def value_of(self, key: str, converted: object) -> _Value:
        """A checked value of this table, for errors that involve more than one key."""
        return _Value(self.source, _join(self.path, key), converted)

    def has(self, key: str) -> bool:
        """Whether the document sets this key."""
        return key in self._data

    def get(self, key: str, default: _T, convert: Callable[[_Value], _T]) -> _T:
        """The converted value of ``key``, or ``default`` when the document omits it."""
        if key not in self._data:
            return default
        return convert(self.value(key))

    def table(self, key: str, title: str, allowed: Sequence[str]) -> _Table:
        """The sub-table ``key`` (empty when omitted)."""
        if key not in self._data:
            return _Table(self.source, _join(self.path, key), title, {}, allowed)
        value = self.value(key)
        return _Table(self.source, value.path, title, _as_table(value), allowed)


def _keys(cls: type[DataclassInstance]) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.name != "source")


def _as_table(value: _Value) -> dict[str, object]:
    if not isinstance(value.raw, dict):
        value.fail("a table", wrong_type=True)
    return {str(key): item for key, item in value.raw.items()}


def _as_list(value: _Value, expected: str) -> list[object]:
    if not isinstance(value.raw, list):
        value.fail(expected, wrong_type=True)
    items: list[object] = list(value.raw)
    return items


def _item(value: _Value, index: int, raw: object) -> _Value:
    return _Value(value.source, f"{value.path}[{index}]", raw)


def _bool(value: _Value) -> bool:
    if not isinstance(value.raw, bool):
        value.fail("true or false", wrong_type=True)
    return value.raw


def _int(value: _Value, expected: str, low: int, high: Optional[int] = None) -> int:
    raw = value.raw
    # bool is an int subclass in Python; TOML's true is not a number.
    if isinstance(raw, bool) or not isinstance(raw, int):
        value.fail(expected, wrong_type=True)
    if raw < low or (high is not None and raw > high):
        value.fail(expected, "out of range")
    if raw > MAX_INTEGER:
        # TOML integers are 64-bit; Python would take any size and pass it on to NVML or MPS.
        value.fail(expected, f"out of range (more than {MAX_INTEGER}, the largest 64-bit integer)")
    return raw


def _int_range(low: int, high: Optional[int], expected: str) -> Callable[[_Value], int]:
    def convert(value: _Value) -> int:
        return _int(value, expected, low, high)

    return convert


def _seconds(*, allow_zero: bool, note: str = "") -> Callable[[_Value], float]:
    expected = ("a number of seconds >= 0" if allow_zero else "a number of seconds > 0") + note

    def convert(value: _Value) -> float:
        raw = value.raw
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            value.fail(expected, wrong_type=True)
        if isinstance(raw, int) and abs(raw) > MAX_INTEGER:
            value.fail(expected, f"out of range (beyond {MAX_INTEGER}, the 64-bit limit)")
        seconds = float(raw)
        if not math.isfinite(seconds):
            value.fail(expected, "not a finite number")
        if seconds < 0 or (seconds == 0 and not allow_zero):
            value.fail(expected, "out of range")
        return seconds

    return convert


def _string(value: _Value, expected: str) -> str:
    if not isinstance(value.raw, str):
        value.fail(expected, wrong_type=True)
    if "\x00" in value.raw:
        value.fail(expected, "contains a NUL character")
    return value.raw


def _text(value: _Value) -> str:
    expected = "a non-empty string"
    text = _string(value, expected)
    if not text.strip():
        value.fail(expected, "empty")
    return text


def _choice(choices: Mapping[str, _T]) -> Callable[[_Value], _T]:
    expected = "one of " + ", ".join(_toml_string(name) for name in choices)

    def convert(value: _Value) -> _T:
        text = _string(value, expected)
        if text not in choices:
            value.fail(expected)
        return choices[text]

    return convert


def _absolute_path(value: _Value) -> str:
    expected = "an absolute path (starting with '/')"
    path = _string(value, expected)
    if not path.startswith("/"):
        value.fail(expected, "not absolute")
    return path


#: Directories the system or every user shares: the agent makes and chmods its MPS
#: directories in mps.pipe_root and mps.log_root, so neither may be one of these.
SHARED_SYSTEM_DIRECTORIES = frozenset(
    {
        "/", "/bin", "/boot", "/dev", "/dev/shm", "/etc", "/home", "/lib", "/lib64",
        "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/run/lock", "/run/user",
        "/sbin", "/srv", "/sys", "/tmp", "/usr", "/usr/bin", "/usr/lib", "/usr/local",
        "/usr/sbin", "/var", "/var/lib", "/var/lib/kubelet", "/var/log", "/var/run",
        "/var/tmp",
    }
)  # fmt: skip


def _own_directory(value: _Value) -> str:
    expected = "an absolute path of a directory of its own (not /tmp, /run, /var, ...)"
    path = _absolute_path(value)
    normal = "/" + posixpath.normpath(path).lstrip("/")
    if normal in SHARED_SYSTEM_DIRECTORIES:
        value.fail(expected, "a directory the system or every user shares")
    return path


def _program(value: _Value) -> str:
    expected = "a program name looked up in PATH, or an absolute path to it"
    program = _string(value, expected)
    if not program.strip():
        value.fail(expected, "empty")
    if "/" in program and not program.startswith("/"):
        value.fail(expected, "a relative path")
    return program


def _socket_file_name(value: _Value) -> str:
    expected = "a plain file name ending in '.sock' (no '/')"
    name = _string(value, expected)
    if "/" in name or name == ".sock" or not name.endswith(".sock"):
        value.fail(expected)
    return name


def _resource_name(value: _Value) -> str:
    expected = (
        "an extended resource name '<domain>/<name>': the domain a lowercase DNS subdomain "
        "outside kubernetes.io, the name at most 63 letters, digits, '-', '_' or '.' that "
        "starts and ends with a letter or digit"
    )
    name = _string(value, expected)
    domain, slash, short = name.partition("/")
    if not slash:
        value.fail(expected, "no '/'")
    if len(domain) > 253 or not all(
        _DNS_LABEL_RE.fullmatch(label) and len(label) <= 63 for label in domain.split(".")
    ):
        value.fail(expected, f"{domain!r} is not a DNS subdomain")
    # The kubelet treats anything under kubernetes.io/ as a native resource and refuses it.
    if "kubernetes.io/" in name:
        value.fail(expected, "kubernetes.io is reserved for Kubernetes' own resources")
    if len(short) > 63 or not _QUALIFIED_NAME_RE.fullmatch(short):
        value.fail(expected, f"{short!r} is not a valid name")
    return name


def _gpu_uuid(value: _Value) -> str:
    uuid = _string(value, _UUID_ALLOWED)
    if not _GPU_UUID_RE.fullmatch(uuid) or len(uuid) > MAX_GPU_UUID_LENGTH:
        value.fail(_UUID_ALLOWED)
    return uuid


def _serve(value: _Value) -> Union[Literal["all"], tuple[Union[str, int], ...]]:
    expected = (
        f'"all", or a non-empty array of GPU indices (integers >= 0) and UUIDs ({_UUID_ALLOWED})'
    )
    if isinstance(value.raw, str):
        if value.raw != "all":
            value.fail(expected)
        return "all"
    items = _as_list(value, expected)
    if not items:
        value.fail(expected, "empty: that serves no GPU")
    serve: list[Union[str, int]] = []
    for index, raw in enumerate(items):
        item = _item(value, index, raw)
        chosen: Union[str, int]
        if isinstance(raw, str):
            chosen = _gpu_uuid(item)
        elif isinstance(raw, int) and not isinstance(raw, bool):
            chosen = _int(item, "a GPU index (an integer >= 0) or a GPU UUID string", 0)
        else:
            item.fail("a GPU index (an integer >= 0) or a GPU UUID string", wrong_type=True)
        if chosen in serve:
            item.fail(expected, "listed twice")
        serve.append(chosen)
    return tuple(serve)


def _replicas_by_model(value: _Value) -> tuple[tuple[str, int], ...]:
    table = _as_table(value)
    pairs: list[tuple[str, int]] = []
    seen: dict[str, str] = {}
    for model, raw in table.items():
        item = _Value(value.source, f"{value.path}.{_toml_string(model)}", raw)
        if not model.strip():
            item.fail(_REPLICAS_ALLOWED, "the model name is empty and would match every GPU")
        lowered = model.lower()
        if lowered in seen:
            item.fail(
                _REPLICAS_ALLOWED,
                f"the model {model!r} is also given as {seen[lowered]!r} (names match "
                "case-insensitively)",
            )
        seen[lowered] = model
        pairs.append((model, _int(item, _REPLICAS_ALLOWED, 1, MAX_REPLICAS_PER_GPU)))
    return tuple(pairs)


def _limit(*, unit: str, high: Optional[int]) -> Callable[[_Value], LimitPolicy]:
    bound = f"from 1 to {high}" if high is not None else ">= 1"
    expected = f'"proportional", "none", or a fixed {unit} (an integer {bound})'

    def convert(value: _Value) -> LimitPolicy:
        if isinstance(value.raw, str):
            if value.raw not in _POLICIES:
                value.fail(expected)
            return _POLICIES[value.raw]
        return _int(value, expected, 1, high)

    return convert


def _multi_user(value: _Value) -> MultiUser:
    if value.raw is True:
        return "on"
    if value.raw is False:
        return "off"
    return _choice(_MULTI_USER)(value)


def _xids(value: _Value) -> tuple[int, ...]:
    expected = "an array of XID numbers (integers from 0 to 65535)"
    xids: list[int] = []
    for index, raw in enumerate(_as_list(value, expected)):
        item = _item(value, index, raw)
        xid = _int(item, "an XID number (an integer from 0 to 65535)", 0, 65535)
        if xid in xids:
            item.fail(expected, "listed twice")
        xids.append(xid)
    return tuple(xids)


def _compute_capability(value: _Value) -> tuple[int, int]:
    expected = 'a CUDA compute capability "<major>.<minor>" such as "9.0" or "8.6"'
    text = _string(value, expected)
    match = _COMPUTE_CAPABILITY_RE.fullmatch(text)
    if match is None or int(match.group(1)) < 1:
        value.fail(expected)
    return int(match.group(1)), int(match.group(2))


_MEMORY_ALLOWED = "the GPU's memory in MiB (an integer >= 1)"


def _simulated_gpu(value: _Value) -> SimulatedGpu:
    table = _Table(
        value.source, value.path, "[[simulated.gpus]]", _as_table(value), _keys(SimulatedGpu)
    )
    if not table.has("uuid"):
        raise ConfigError(
            f"{value.source}: {_join(value.path, 'uuid')}: missing; every [[simulated.gpus]] "
            f"entry needs a uuid, {_UUID_ALLOWED}"
        )
    return SimulatedGpu(
        uuid=_gpu_uuid(table.value("uuid")),
        model=table.get("model", SimulatedGpu.model, _text),
        memory_mib=table.get(
            "memory_mib", SimulatedGpu.memory_mib, _int_range(1, None, _MEMORY_ALLOWED)
        ),
        compute_capability=table.get(
            "compute_capability", SimulatedGpu.compute_capability, _compute_capability
        ),
        numa_node=table.get(
            "numa_node", None, _int_range(0, None, "a NUMA node number (an integer >= 0)")
        ),
        mig_enabled=table.get("mig_enabled", False, _bool),
    )


def _simulated_gpus(value: _Value) -> tuple[SimulatedGpu, ...]:
    expected = f"an array of tables ([[simulated.gpus]]), at most {MAX_SIMULATED_GPUS}"
    items = _as_list(value, expected)
    if len(items) > MAX_SIMULATED_GPUS:
        value.fail(expected, f"{len(items)} GPUs")
    gpus: list[SimulatedGpu] = []
    for index, raw in enumerate(items):
        gpu = _simulated_gpu(_item(value, index, raw))
        if any(other.uuid == gpu.uuid for other in gpus):
            _item(value, index, raw).fail(
                "GPUs with distinct uuids", f"uuid {gpu.uuid!r} is used twice"
            )
        gpus.append(gpu)
    return tuple(gpus)


def _parse_agent(table: _Table) -> AgentConfig:
    defaults = AgentConfig()
    return AgentConfig(
        log_level=table.get("log_level", defaults.log_level, _choice(_LOG_LEVELS)),
        state_dir=table.get("state_dir", defaults.state_dir, _absolute_path),
    )


def _parse_plugin(table: _Table) -> PluginConfig:
    defaults = PluginConfig()
    plugin = PluginConfig(
        resource_name=table.get("resource_name", defaults.resource_name, _resource_name),
        plugin_dir=table.get("plugin_dir", defaults.plugin_dir, _absolute_path),
        socket_name=table.get("socket_name", defaults.socket_name, _socket_file_name),
        kubelet_socket_name=table.get(
            "kubelet_socket_name", defaults.kubelet_socket_name, _socket_file_name
        ),
        register_timeout_s=table.get(
            "register_timeout_s", defaults.register_timeout_s, _seconds(allow_zero=False)
        ),
        device_list_strategy=table.get(
            "device_list_strategy",
            defaults.device_list_strategy,
            _choice(_DEVICE_LIST_STRATEGIES),
        ),
    )
    if plugin.socket_name in (plugin.kubelet_socket_name, "kubelet.sock"):
        table.value_of("socket_name", plugin.socket_name).fail(
            "a socket name of our own", "that is the kubelet's socket"
        )
    for key, name in (
        ("socket_name", plugin.socket_name),
        ("kubelet_socket_name", plugin.kubelet_socket_name),
    ):
        path = os.path.join(plugin.plugin_dir, name)
        if len(path.encode("utf-8", "surrogatepass")) > MAX_UNIX_SOCKET_PATH_BYTES:
            # Blame the directory when the file sets it: that is the long part.
            blamed = (
                table.value_of("plugin_dir", plugin.plugin_dir)
                if table.has("plugin_dir")
                else table.value_of(key, name)
            )
            blamed.fail(
                "a plugin_dir and socket name whose joined path fits a unix socket "
                f"(at most {MAX_UNIX_SOCKET_PATH_BYTES} bytes)",
                f"{path!r} is too long",
            )
    return plugin


def _parse_gpus(table: _Table) -> GpusConfig:
    defaults = GpusConfig()
    return GpusConfig(
        backend=table.get("backend", defaults.backend, _choice(_BACKENDS)),
        replicas_per_gpu=table.get(
            "replicas_per_gpu",
            defaults.replicas_per_gpu,
            _int_range(1, MAX_REPLICAS_PER_GPU, _REPLICAS_ALLOWED),
        ),
        replicas_by_model=table.get(
            "replicas_by_model", defaults.replicas_by_model, _replicas_by_model
        ),
        serve=table.get("serve", defaults.serve, _serve),
        compute_mode=table.get("compute_mode", defaults.compute_mode, _choice(_COMPUTE_MODES)),
        restore_compute_mode=table.get(
            "restore_compute_mode", defaults.restore_compute_mode, _bool
        ),
        allow_unconfined_sharing=table.get(
            "allow_unconfined_sharing", defaults.allow_unconfined_sharing, _bool
        ),
    )


def _parse_mps(table: _Table) -> MpsConfig:
    mps = _parse_mps_keys(table)
    _check_confinement(table, mps)
    return mps


def _check_confinement(table: _Table, mps: MpsConfig) -> None:
    """The combinations of mps.confinement with the keys it decides over."""
    if mps.confinement == "cooperative":
        if mps.max_vgpus_per_container != 1:
            table.value_of("max_vgpus_per_container", mps.max_vgpus_per_container).fail(
                'the default 1 with mps.confinement = "cooperative"',
                "it applies only in enforced mode, where it sets the daemon's ceiling "
                '(remove it, or set mps.confinement = "enforced")',
            )
        return
    for key, policy in (
        ("daemon_thread_limit", mps.daemon_thread_limit),
        ("daemon_memory_limit", mps.daemon_memory_limit),
    ):
        # "proportional" names one vGPU's share: exactly the enforced ceiling of 1 vGPU.
        if policy == "none" or (policy == "proportional" and mps.max_vgpus_per_container == 1):
            continue
        table.value_of(key, policy).fail(
            '"none" with mps.confinement = "enforced" (the default)',
            "in enforced mode the daemon's ceiling is mps.max_vgpus_per_container vGPUs' "
            'share (remove this key, or set mps.confinement = "cooperative" to choose '
            "the daemon defaults yourself)",
        )


def _parse_mps_keys(table: _Table) -> MpsConfig:
    defaults = MpsConfig()
    return MpsConfig(
        enabled=table.get("enabled", defaults.enabled, _bool),
        manager=table.get("manager", defaults.manager, _choice(_MPS_MANAGERS)),
        pipe_root=table.get("pipe_root", defaults.pipe_root, _own_directory),
        log_root=table.get("log_root", defaults.log_root, _own_directory),
        control_binary=table.get("control_binary", defaults.control_binary, _program),
        multi_user=table.get("multi_user", defaults.multi_user, _multi_user),
        container_pipe_dir=table.get(
            "container_pipe_dir", defaults.container_pipe_dir, _absolute_path
        ),
        thread_limit=table.get(
            "thread_limit", defaults.thread_limit, _limit(unit="percentage", high=100)
        ),
        memory_limit=table.get(
            "memory_limit", defaults.memory_limit, _limit(unit="number of MiB", high=None)
        ),
        memory_headroom_mib=table.get(
            "memory_headroom_mib",
            defaults.memory_headroom_mib,
            _int_range(0, None, "a number of MiB (an integer >= 0)"),
        ),
        share_host_shm=table.get("share_host_shm", defaults.share_host_shm, _bool),
        control_timeout_s=table.get(
            "control_timeout_s", defaults.control_timeout_s, _seconds(allow_zero=False)
        ),
        daemon_thread_limit=table.get(
            "daemon_thread_limit",
            defaults.daemon_thread_limit,
            _limit(unit="percentage", high=100),
        ),
        daemon_memory_limit=table.get(
            "daemon_memory_limit",
            defaults.daemon_memory_limit,
            _limit(unit="number of MiB", high=None),
        ),
        confinement=table.get("confinement", defaults.confinement, _choice(_CONFINEMENTS)),
        max_vgpus_per_container=table.get(
            "max_vgpus_per_container",
            defaults.max_vgpus_per_container,
            _int_range(
                1,
                MAX_REPLICAS_PER_GPU,
                f"an integer from 1 to {MAX_REPLICAS_PER_GPU} (vGPUs one container may hold)",
            ),
        ),
    )


def _parse_health(table: _Table) -> HealthConfig:
    defaults = HealthConfig()
    return HealthConfig(
        xid_enabled=table.get("xid_enabled", defaults.xid_enabled, _bool),
        ignored_xids=table.get("ignored_xids", defaults.ignored_xids, _xids),
        mps_liveness_enabled=table.get(
            "mps_liveness_enabled", defaults.mps_liveness_enabled, _bool
        ),
        mps_check_interval_s=table.get(
            "mps_check_interval_s", defaults.mps_check_interval_s, _seconds(allow_zero=False)
        ),
        recovery_quiet_period_s=table.get(
            "recovery_quiet_period_s",
            defaults.recovery_quiet_period_s,
            _seconds(allow_zero=True, note=" (0 means never: only 'vgpu-agent health reset')"),
        ),
        poll_interval_s=table.get(
            "poll_interval_s", defaults.poll_interval_s, _seconds(allow_zero=False)
        ),
    )


_LISTEN_ALLOWED = (
    '"<host>:<port>" such as "127.0.0.1:9402", "[::1]:9402" or "0.0.0.0:9402" (port 0 to '
    '65535, 0 picks a free one), or "" for no HTTP endpoint'
)
_HOST_RE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?")


def split_listen_address(address: str) -> tuple[str, int]:
    """(host, port) of a checked ``metrics.listen_address`` (IPv6 without brackets)."""
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _listen_address(value: _Value) -> str:
    address = _string(value, _LISTEN_ALLOWED)
    if address == "":
        return address
    host, colon, port = address.rpartition(":")
    if not colon or not host:
        value.fail(_LISTEN_ALLOWED, "no host and port")
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        value.fail(_LISTEN_ALLOWED, f"bad port {port!r}")
    if host.startswith("["):
        inner = host[1:-1] if host.endswith("]") else ""
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            value.fail(_LISTEN_ALLOWED, f"bad IPv6 address {host!r}")
    elif ":" in host:
        value.fail(_LISTEN_ALLOWED, "an IPv6 address needs [brackets]")
    elif not _HOST_RE.fullmatch(host):
        value.fail(_LISTEN_ALLOWED, f"bad host {host!r}")
    return address


def _textfile_path(value: _Value) -> str:
    expected = (
        "an absolute path ending in '.prom' (node-exporter's textfile collector reads only "
        'those), or "" for none'
    )
    path = _string(value, expected)
    if path == "":
        return path
    if not path.startswith("/"):
        value.fail(expected, "not absolute")
    if not path.endswith(".prom") or path.endswith("/.prom"):
        value.fail(expected, "node-exporter ignores files not named *.prom")
    return path


def _parse_attribution(table: _Table) -> AttributionConfig:
    defaults = AttributionConfig()
    return AttributionConfig(
        pod_resources_socket=table.get(
            "pod_resources_socket", defaults.pod_resources_socket, _absolute_path
        ),
        refresh_interval_s=table.get(
            "refresh_interval_s", defaults.refresh_interval_s, _seconds(allow_zero=False)
        ),
    )


def _parse_metrics(table: _Table) -> MetricsConfig:
    defaults = MetricsConfig()
    return MetricsConfig(
        enabled=table.get("enabled", defaults.enabled, _bool),
        listen_address=table.get("listen_address", defaults.listen_address, _listen_address),
        textfile_path=table.get("textfile_path", defaults.textfile_path, _textfile_path),
    )


def _parse_labels(table: _Table) -> LabelsConfig:
    defaults = LabelsConfig()
    return LabelsConfig(
        enabled=table.get("enabled", defaults.enabled, _bool),
        features_dir=table.get("features_dir", defaults.features_dir, _absolute_path),
    )


_SINGLE_MODEL_KEYS = ("count", "model", "memory_mib", "compute_capability")


def _parse_simulated(table: _Table) -> SimulatedConfig:
    defaults = SimulatedConfig()
    gpus = table.get("gpus", defaults.gpus, _simulated_gpus)
    if gpus:
        # Both forms at once would leave some keys silently unused.
        for key in _SINGLE_MODEL_KEYS:
            if table.has(key):
                value = table.value(key)
                raise ConfigError(
                    f"{table.source}: {value.path}: invalid value {_show(value.raw)}: "
                    f"[[simulated.gpus]] lists the GPUs, so {key} would be ignored; "
                    f"expected either {', '.join(_SINGLE_MODEL_KEYS)} or [[simulated.gpus]], "
                    "not both"
                )
    return SimulatedConfig(
        count=table.get(
            "count",
            defaults.count,
            _int_range(1, MAX_SIMULATED_GPUS, f"an integer from 1 to {MAX_SIMULATED_GPUS}"),
        ),
        model=table.get("model", defaults.model, _text),
        memory_mib=table.get(
            "memory_mib", defaults.memory_mib, _int_range(1, None, _MEMORY_ALLOWED)
        ),
        compute_capability=table.get(
            "compute_capability", defaults.compute_capability, _compute_capability
        ),
        gpus=gpus,
    )


def _version(value: _Value) -> int:
    expected = f"{SCHEMA_VERSION} (the only schema version this agent understands)"
    version = _int(value, expected, 0)
    if version != SCHEMA_VERSION:
        value.fail(expected, "this agent does not understand that schema version")
    return version


def parse(text: str, source: str = "<string>") -> Config:
    """Parse config TOML ``text`` read from ``source`` (used in messages) into a Config."""
    try:
        document: dict[str, object] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    except ValueError as exc:  # an integer with more digits than Python converts
        reason = str(exc).split(";")[0]
        raise ConfigError(f"{source}: not valid TOML: a value cannot be read: {reason}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{source}: not valid TOML: arrays or tables nested too deeply") from exc
    # The version decides what the rest means, so it is checked before anything else.
    version = SCHEMA_VERSION
    if "version" in document:
        version = _version(_Value(source, "version", document["version"]))
    root = _Table(source, "", "the top level", document, _keys(Config))
    return Config(
        version=version,
        agent=_parse_agent(root.table("agent", "[agent]", _keys(AgentConfig))),
        plugin=_parse_plugin(root.table("plugin", "[plugin]", _keys(PluginConfig))),
        gpus=_parse_gpus(root.table("gpus", "[gpus]", _keys(GpusConfig))),
        mps=_parse_mps(root.table("mps", "[mps]", _keys(MpsConfig))),
        health=_parse_health(root.table("health", "[health]", _keys(HealthConfig))),
        simulated=_parse_simulated(root.table("simulated", "[simulated]", _keys(SimulatedConfig))),
        attribution=_parse_attribution(
            root.table("attribution", "[attribution]", _keys(AttributionConfig))
        ),
        metrics=_parse_metrics(root.table("metrics", "[metrics]", _keys(MetricsConfig))),
        labels=_parse_labels(root.table("labels", "[labels]", _keys(LabelsConfig))),
        dra=parse_dra(document.get("dra"), source),
        source=source,
    )


# --------------------------------------------------------------------------------------
# Rendering: Config -> TOML that parse() reads back to an equal Config.
# --------------------------------------------------------------------------------------

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_string(text: str) -> str:
    """``text`` as a TOML basic string."""
    out = ['"']
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


def _compute_capability_text(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


def to_toml(config: Config) -> str:
    """The config as TOML, every key spelled out, that ``parse`` reads back unchanged."""
    lines = [f"# vgpu-agent effective configuration (from {_toml_string(config.source)})", ""]
    lines.append(f"version = {config.version}")

    def table(name: str, pairs: Sequence[tuple[str, object]]) -> None:
        lines.extend(["", f"[{name}]"])
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in pairs)

    agent, plugin, gpus, mps = config.agent, config.plugin, config.gpus, config.mps
    table("agent", [("log_level", agent.log_level), ("state_dir", agent.state_dir)])
    table(
        "plugin",
        [
            ("resource_name", plugin.resource_name),
            ("plugin_dir", plugin.plugin_dir),
            ("socket_name", plugin.socket_name),
            ("kubelet_socket_name", plugin.kubelet_socket_name),
            ("register_timeout_s", plugin.register_timeout_s),
            ("device_list_strategy", plugin.device_list_strategy),
        ],
    )
    table(
        "gpus",
        [
            ("backend", gpus.backend),
            ("replicas_per_gpu", gpus.replicas_per_gpu),
            ("serve", gpus.serve),
            ("compute_mode", gpus.compute_mode),
            ("restore_compute_mode", gpus.restore_compute_mode),
            ("allow_unconfined_sharing", gpus.allow_unconfined_sharing),
        ],
    )
    table(
        "gpus.replicas_by_model", [(_toml_string(model), n) for model, n in gpus.replicas_by_model]
    )
    table(
        "mps",
        [
            ("enabled", mps.enabled),
            ("manager", mps.manager),
            ("pipe_root", mps.pipe_root),
            ("log_root", mps.log_root),
            ("control_binary", mps.control_binary),
            ("multi_user", mps.multi_user),
            ("container_pipe_dir", mps.container_pipe_dir),
            ("thread_limit", mps.thread_limit),
            ("memory_limit", mps.memory_limit),
            ("memory_headroom_mib", mps.memory_headroom_mib),
            ("share_host_shm", mps.share_host_shm),
            ("control_timeout_s", mps.control_timeout_s),
            ("daemon_thread_limit", mps.daemon_thread_limit),
            ("daemon_memory_limit", mps.daemon_memory_limit),
            ("confinement", mps.confinement),
            ("max_vgpus_per_container", mps.max_vgpus_per_container),
        ],
    )
    health = config.health
    table(
        "health",
        [
            ("xid_enabled", health.xid_enabled),
            ("ignored_xids", health.ignored_xids),
            ("mps_liveness_enabled", health.mps_liveness_enabled),
            ("mps_check_interval_s", health.mps_check_interval_s),
            ("recovery_quiet_period_s", health.recovery_quiet_period_s),
            ("poll_interval_s", health.poll_interval_s),
        ],
    )
    table(
        "attribution",
        [
            ("pod_resources_socket", config.attribution.pod_resources_socket),
            ("refresh_interval_s", config.attribution.refresh_interval_s),
        ],
    )
    table(
        "metrics",
        [
            ("enabled", config.metrics.enabled),
            ("listen_address", config.metrics.listen_address),
            ("textfile_path", config.metrics.textfile_path),
        ],
    )
    table(
        "labels",
        [("enabled", config.labels.enabled), ("features_dir", config.labels.features_dir)],
    )
    table("dra", dra_toml_pairs(config.dra))
    simulated = config.simulated
    if simulated.gpus:
        # parse() refuses the single-model keys next to an explicit list.
        table("simulated", [])
        for gpu in simulated.gpus:
            lines.extend(["", "[[simulated.gpus]]"])
            pairs: list[tuple[str, object]] = [
                ("uuid", gpu.uuid),
                ("model", gpu.model),
                ("memory_mib", gpu.memory_mib),
                ("compute_capability", _compute_capability_text(gpu.compute_capability)),
            ]
            if gpu.numa_node is not None:
                pairs.append(("numa_node", gpu.numa_node))
            pairs.append(("mig_enabled", gpu.mig_enabled))
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in pairs)
    else:
        table(
            "simulated",
            [
                ("count", simulated.count),
                ("model", simulated.model),
                ("memory_mib", simulated.memory_mib),
                ("compute_capability", _compute_capability_text(simulated.compute_capability)),
            ],
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Files and paths: the only I/O in this module.
# --------------------------------------------------------------------------------------


def resolve_path(cli_value: Optional[str], environ: Mapping[str, str]) -> str:
    """The config path to use: ``--config``, else ``$VGPU_CONFIG``, else the default."""
    if cli_value is not None:
        return cli_value
    from_env = environ.get(CONFIG_ENV_VAR, "")
    return from_env if from_env else DEFAULT_CONFIG_PATH


def _read_text(path: str, *, missing_ok: bool) -> Optional[str]:
    """The file's text; None when it is missing and ``missing_ok``; else a ConfigError."""
    action = f"reading config file {path}"
    if not path:
        raise ConfigError("reading config file: the path is empty; give a file name")
    try:
        data = _read_regular_file(path, action)
    except FileNotFoundError as exc:
        if missing_ok:
            return None
        raise ConfigError(
            f"{action}: {exc.strerror or 'no such file'}; create it (see the commented "
            f"example shipped as {DEFAULT_CONFIG_PATH}) or point --config or "
            f"${CONFIG_ENV_VAR} at an existing file"
        ) from exc
    except IsADirectoryError as exc:
        raise ConfigError(
            f"{action}: it is a directory; give the path of the TOML file inside it"
        ) from exc
    except PermissionError as exc:
        raise ConfigError(
            f"{action}: {exc.strerror or 'permission denied'}; run as root or make the "
            "file readable by the agent's user"
        ) from exc
    except OSError as exc:
        raise ConfigError(
            f"{action}: {exc.strerror or exc}; check that the path names a readable file"
        ) from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{action}: not UTF-8 text (byte {exc.start}); TOML files must be UTF-8"
        ) from exc


def _read_regular_file(path: str, action: str) -> bytes:
    """The bytes of ``path``; OSError as open() raises it, ConfigError for a FIFO, device
    or socket (which a read could block on or never end)."""
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):
            raise ConfigError(
                f"{action}: not a regular file ({_file_kind(mode)}); give the path of a TOML file"
            )
        return handle.read()


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def load(path: str) -> Config:
    """Read and parse the config file at ``path``; its path becomes ``Config.source``."""
    text = _read_text(path, missing_ok=False)
    assert text is not None  # noqa: S101 - missing_ok=False never returns None
    return parse(text, source=path)


def load_or_default(path: str, required: bool) -> Config:
    """Like ``load``, but a missing file gives the defaults unless ``required``.

    The agent runs without a config file at the default path; a file someone named
    (``--config``, ``$VGPU_CONFIG``) must exist.
    """
    text = _read_text(path, missing_ok=not required)
    if text is None:
        return Config()
    return parse(text, source=path)


def load_effective(cli_value: Optional[str], environ: Mapping[str, str]) -> Config:
    """The config the agent runs with: resolve the path, then load it (required when named)."""
    path = resolve_path(cli_value, environ)
    explicit = cli_value is not None or bool(environ.get(CONFIG_ENV_VAR, ""))
    return load_or_default(path, required=explicit)


# --------------------------------------------------------------------------------------
# Advice that depends on the GPU, so it cannot be an error at parse time.
# --------------------------------------------------------------------------------------


def slice_warnings(config: Config, model: str, memory_mib: int) -> list[str]:
    """Warnings about the MPS memory slices a GPU of ``model`` with ``memory_mib`` would get."""
    mps = config.mps
    if not mps.enabled:
        return []
    replicas = config.replicas_for_model(model)
    if mps.memory_limit == "none":
        return []
    if mps.memory_limit == "proportional":
        slice_mib = proportional_memory_mib(memory_mib, mps.memory_headroom_mib, 1, replicas)
        if slice_mib >= MIN_USEFUL_SLICE_MIB:
            return []
        return [
            f"{model} ({memory_mib} MiB, {mps.memory_headroom_mib} MiB headroom) split into "
            f"{replicas} vGPUs gives each {slice_mib} MiB of memory; below "
            f"{MIN_USEFUL_SLICE_MIB} MiB a client has almost nothing left after its CUDA "
            "context: lower gpus.replicas_per_gpu or add a gpus.replicas_by_model entry "
            "for this model, or lower mps.memory_headroom_mib"
        ]
    warnings: list[str] = []
    if mps.memory_limit < MIN_USEFUL_SLICE_MIB:
        warnings.append(
            f"mps.memory_limit = {mps.memory_limit} MiB per vGPU leaves a client almost "
            f"nothing after its CUDA context (below {MIN_USEFUL_SLICE_MIB} MiB)"
        )
    if mps.memory_limit > memory_mib:
        warnings.append(
            f"mps.memory_limit = {mps.memory_limit} MiB per vGPU is more than the "
            f"{memory_mib} MiB of {model}: the limit confines nothing"
        )
    return warnings


def simulated_mps(config: Config) -> bool:
    """Whether the MPS daemons are simulated: with simulated GPUs, unless the config names a
    control program (a stand-in, as the fault and system tests use), which the configured
    manager then runs or watches."""
    return (
        config.gpus.backend == "simulated" and config.mps.control_binary == MpsConfig.control_binary
    )
