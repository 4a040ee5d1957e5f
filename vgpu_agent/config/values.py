"""The typed value readers ``parse`` validates a TOML document with.

Each reader takes a ``_Value`` (the raw value plus where it came from) and returns the
typed value or raises a ConfigError that names the file, the key path, the bad value and
what is allowed; ``_Table`` refuses unknown keys and hands its values to the readers. The
underscored names are the config package's own (``parse`` imports them); nothing outside
the package uses them.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import posixpath
import re
from dataclasses import dataclass, fields
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

from vgpu_agent.config.render import _toml_string
from vgpu_agent.config.schema import (
    MAX_GPU_UUID_LENGTH,
    MAX_INTEGER,
    MAX_REPLICAS_PER_GPU,
    MAX_SECONDS,
    PSEUDO_FILESYSTEM_ROOTS,
    SHARED_SYSTEM_DIRECTORIES,
    BackendName,
    ComputeModeSetting,
    Confinement,
    DeviceListStrategy,
    ExcessClients,
    MpsManager,
    MultiUser,
    OffenderAction,
    OffenderEvidence,
)
from vgpu_agent.host.log import LogLevel
from vgpu_agent.model.devices import LimitPolicy
from vgpu_agent.model.errors import ConfigError
from vgpu_agent.model.gpu import MPS_CLIENT_LIMIT_PRE_VOLTA

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_T = TypeVar("_T")

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
_EXCESS_CLIENTS: dict[str, ExcessClients] = {name: name for name in get_args(ExcessClients)}
_LOG_LEVELS: dict[str, LogLevel] = {name: name for name in get_args(LogLevel)}
_OFFENDER_ACTIONS: dict[str, OffenderAction] = {name: name for name in get_args(OffenderAction)}
_OFFENDER_EVIDENCE: dict[str, OffenderEvidence] = {
    name: name for name in get_args(OffenderEvidence)
}
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


def _seconds(
    *, allow_zero: bool, minimum: float = 0.0, why_minimum: str = "", note: str = ""
) -> Callable[[_Value], float]:
    """Seconds from ``minimum`` (exclusive of 0 unless ``allow_zero``) to MAX_SECONDS."""
    low = f"from {minimum:g}" if minimum > 0 else "from 0" if allow_zero else "above 0"
    expected = f"a number of seconds {low} to {MAX_SECONDS} (a week){why_minimum}{note}"

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
        if 0 < seconds < minimum:
            value.fail(expected, "too short")
        if seconds > MAX_SECONDS:
            value.fail(expected, "too long")
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


def _normal_path(path: str) -> str:
    """``path`` with ``.``, ``..`` and repeated slashes resolved (no file system access)."""
    return "/" + posixpath.normpath(path).lstrip("/")


def _under(path: str, roots: Sequence[str]) -> Optional[str]:
    """The first of ``roots`` that ``path`` (normalised) is or lies under, else None."""
    return next((root for root in roots if path == root or path.startswith(root + "/")), None)


def _own_directory(value: _Value) -> str:
    expected = (
        "an absolute path of a directory of its own (not /tmp, /run, /var, ..., nor under "
        + ", ".join(PSEUDO_FILESYSTEM_ROOTS)
        + ")"
    )
    path = _absolute_path(value)
    normal = _normal_path(path)
    if normal in SHARED_SYSTEM_DIRECTORIES:
        value.fail(expected, "a directory the system or every user shares")
    pseudo = _under(normal, PSEUDO_FILESYSTEM_ROOTS)
    if pseudo is not None:
        value.fail(
            expected,
            f"under {pseudo}, a kernel file system"
            + (
                " where every user may write and which share_host_shm mounts into pods"
                if pseudo == "/dev"
                else ""
            ),
        )
    return path


#: Directories a container's own image or the kubelet put there, which a mount of the MPS
#: pipe directory would hide inside the pod (its service account token, its /etc, ...).
_CONTAINER_OWN_DIRECTORIES = ("/run/secrets", "/var/run/secrets")


def _container_directory(value: _Value) -> str:
    expected = (
        "an absolute path of a directory of its own inside the container, such as "
        '"/run/nvidia-mps" (not /, /etc, /run, /tmp, /usr, ..., nor under /dev, /proc, '
        "/sys or the service account's /var/run/secrets), since the pipe directory is "
        "mounted over it"
    )
    path = _absolute_path(value)
    normal = _normal_path(path)
    if normal in SHARED_SYSTEM_DIRECTORIES:
        value.fail(expected, "it would hide that directory of the pod's own image")
    hidden = _under(normal, (*PSEUDO_FILESYSTEM_ROOTS, *_CONTAINER_OWN_DIRECTORIES))
    if hidden is not None:
        value.fail(expected, f"under {hidden}, which the container runtime or kubelet provides")
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
