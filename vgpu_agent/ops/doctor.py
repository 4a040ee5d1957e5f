"""`vgpu-agent doctor`: checks a node the way an operator would before trusting it.

Each check prints lines ``[ ok ] ...``, ``[warn] ...`` or ``[FAIL] ...``; a line that is not
ok says what to do. :func:`run_doctor` returns 1 when any line failed, else 0 (warnings
do not fail). Everything the checks read from the node goes through :class:`DoctorProbes`,
so tests run the same checks against temp directories, the simulated backend and fake
MPS probes; :func:`system_probes` builds the probes of the real node. An unexpected
exception inside a check becomes a FAIL line for that check, never a traceback.
"""

from __future__ import annotations

import enum
import glob
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from vgpu_agent.config import parse as config_module
from vgpu_agent.config.plan import confinement_line, gpu_ceiling, plan_gpus, slice_warnings
from vgpu_agent.config.schema import ComputeModeSetting, Config, MultiUser
from vgpu_agent.host import control
from vgpu_agent.host.sockets import socket_state
from vgpu_agent.model.commands import ControlCommand, StatusCommand
from vgpu_agent.model.daemons import SIMULATED_DAEMON_NOTE, MpsInspector
from vgpu_agent.model.devices import Ceiling
from vgpu_agent.model.errors import ConfigError, VgpuError
from vgpu_agent.model.gpu import ComputeMode, Gpu, GpuBackend
from vgpu_agent.mps import confinement
from vgpu_agent.mps.control import MULTI_USER_OFF, MULTI_USER_UNSUPPORTED, checked_program
from vgpu_agent.mps.daemons import SYSTEMD_UNIT_TEMPLATE

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

EXIT_OK = 0
EXIT_FAILED = 1

CONTAINERD_CONFIG = "/etc/containerd/config.toml"
#: Where nvidia-ctk and the GPU operator put containerd drop-ins (99-nvidia.toml).
CONTAINERD_DROPIN_DIRS = ("/etc/containerd/conf.d",)
MPS_SERVER_BINARY = "nvidia-cuda-mps-server"
#: How long a socket check waits for a listener to accept.
SOCKET_CONNECT_TIMEOUT_S = 1.0

_CONFIGURE_NVIDIA_RUNTIME = (
    "nvidia-ctk runtime configure --runtime=containerd --set-as-default, then "
    "systemctl restart containerd"
)
_MPS_PACKAGES = (
    "install the NVIDIA driver's MPS binaries (Ubuntu: nvidia-compute-utils-<branch>; "
    "Amazon Linux and RHEL: nvidia-driver-cuda)"
)


class Status(enum.Enum):
    """How a check came out."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


_TAGS = {Status.OK: "[ ok ]", Status.WARN: "[warn]", Status.FAIL: "[FAIL]"}


@dataclass(frozen=True)
class CheckLine:
    """One printed line: its status, which check, and what it found (and what to do)."""

    status: Status
    check: str
    message: str

    def render(self) -> str:
        """The line as doctor prints it."""
        return f"{_TAGS[self.status]} {self.check}: {self.message}"


def _mps_ceiling_gaps(config: Config, gpu_uuid: str, ceiling: Ceiling) -> list[str]:
    return _inspector(config).ceiling_gaps(gpu_uuid, ceiling)


@dataclass(frozen=True)
class DoctorProbes:
    """Everything doctor reads from the node, so tests can point it elsewhere.

    Paths in the config (plugin directory, state directory, pipe root) are used as they
    are; the probes cover what the config does not name.
    """

    #: Open the GPU backend the config names; raises VgpuError when it cannot.
    open_backend: Callable[[Config], GpuBackend]
    #: The full path of an executable (a name on PATH or an absolute path), else None.
    which: Callable[[str], Optional[str]]
    #: None if the MPS daemon of (config, GPU UUID) answers; else why not.
    mps_probe: Callable[[Config, str], Optional[str]]
    #: Whether the driver's MPS offers multi-user mode; raises VgpuError when it cannot tell.
    mps_multi_user_supported: Callable[[Config], bool]
    #: Whether the running daemon of (config, GPU UUID) was started in multi-user mode.
    mps_daemon_multi_user: Callable[[Config, str], Optional[bool]]
    #: How the MPS daemons live inside the agent (e.g. "simulated"; no MPS program is then
    #: needed on the host), or None for real daemons.
    mps_in_agent: Callable[[Config], Optional[str]]
    #: Send a command to the agent's control socket (path, command) and return its answer.
    agent_request: Callable[[str, ControlCommand], dict[str, Any]]
    containerd_config: str = CONTAINERD_CONFIG
    containerd_dropin_dirs: tuple[str, ...] = CONTAINERD_DROPIN_DIRS
    socket_timeout_s: float = SOCKET_CONNECT_TIMEOUT_S
    #: Why the agent would refuse to run the control program as root (another user could
    #: change it), or None (the default: not checked).
    untrusted_program: Callable[[str], Optional[str]] = lambda _control_binary: None
    #: The NVIDIA container toolkit's config and the CDI spec directories.
    toolkit_config: str = confinement.TOOLKIT_CONFIG
    cdi_spec_dirs: tuple[str, ...] = confinement.CDI_SPEC_DIRS
    #: What of a ceiling the daemon of (config, GPU UUID) no longer holds (MpsError: no
    #: answer).
    mps_ceiling_gaps: Callable[[Config, str, Ceiling], list[str]] = _mps_ceiling_gaps


# -- the probes of the real node ---------------------------------------------------------------


def _open_backend(config: Config) -> GpuBackend:
    from vgpu_agent.runtime.compose import (
        inspected_backend_for,  # the composition root pulls in gRPC
    )

    return inspected_backend_for(config)


def _inspector(config: Config) -> MpsInspector:
    from vgpu_agent.runtime.compose import mps_inspector_for  # the composition root pulls in gRPC

    return mps_inspector_for(config)


def _untrusted_program(control_binary: str) -> Optional[str]:
    try:
        checked_program(control_binary)
    except VgpuError as exc:
        return str(exc)
    return None


def system_probes() -> DoctorProbes:
    """The probes of the node doctor runs on."""
    return DoctorProbes(
        open_backend=_open_backend,
        which=shutil.which,
        mps_probe=lambda config, gpu_uuid: _inspector(config).probe(gpu_uuid),
        mps_multi_user_supported=lambda config: _inspector(config).multi_user_supported(),
        mps_daemon_multi_user=lambda config, gpu_uuid: _inspector(config).daemon_multi_user(
            gpu_uuid
        ),
        mps_in_agent=lambda config: _inspector(config).in_agent,
        agent_request=control.request,
        untrusted_program=_untrusted_program,
    )


# -- judgements (pure) -------------------------------------------------------------------------


def judge_compute_mode(
    setting: ComputeModeSetting, mps_enabled: bool, mode: ComputeMode
) -> tuple[Status, str]:
    """What a served GPU's compute ``mode`` means under the config: status and advice."""
    apply_hint = (
        "run `vgpu-agent gpus apply-compute-mode` as root (the agent also sets it when it starts)"
    )
    if mode is ComputeMode.PROHIBITED:
        return (
            Status.FAIL,
            "prohibited: no process can use the GPU; "
            + (
                apply_hint
                if setting != "unchanged"
                else 'set gpus.compute_mode = "exclusive_process" or run nvidia-smi -c 3'
            ),
        )
    if not mps_enabled:
        if mode is ComputeMode.DEFAULT:
            return Status.OK, "default (MPS is off: pods share the GPU by time slicing)"
        return (
            Status.WARN,
            f"{mode.value} while MPS is off: one process at a time can use the GPU, so pods "
            'beyond the first get no CUDA context; set gpus.compute_mode = "default" and '
            "run `vgpu-agent gpus apply-compute-mode`",
        )
    if setting == "exclusive_process":
        if mode is ComputeMode.EXCLUSIVE_PROCESS:
            return Status.OK, "exclusive_process, as configured"
        return (
            Status.FAIL,
            f'{mode.value}, but gpus.compute_mode = "exclusive_process": processes could use '
            f"the GPU outside MPS and its limits; {apply_hint}",
        )
    if setting == "default":
        if mode is ComputeMode.DEFAULT:
            return Status.OK, "default, as configured"
        return Status.WARN, f'{mode.value}, but gpus.compute_mode = "default"; {apply_hint}'
    # "unchanged": the agent leaves the mode as it finds it.
    if mode is ComputeMode.EXCLUSIVE_PROCESS:
        return Status.OK, 'exclusive_process (gpus.compute_mode = "unchanged" keeps it)'
    return (
        Status.WARN,
        f'{mode.value} and gpus.compute_mode = "unchanged": clients could bypass MPS (a '
        "process that ignores the pipe directory gets its own context, outside MPS's limits); "
        'set gpus.compute_mode = "exclusive_process"',
    )


def judge_multi_user(setting: MultiUser, supported: bool) -> tuple[Status, str]:
    """Whether pods of different users can share a GPU at once: status and advice."""
    if setting == "off":
        return (
            Status.WARN,
            f'{MULTI_USER_OFF}; set mps.multi_user = "auto" unless every GPU pod runs as one user',
        )
    if supported:
        return (
            Status.OK,
            "the driver's MPS offers multi-user mode: pods running as different users share "
            "a GPU at the same time",
        )
    if setting == "on":
        return (
            Status.FAIL,
            'mps.multi_user = "on", but the driver\'s MPS has no multi-user mode (-M), so the '
            'daemons cannot start; upgrade the NVIDIA driver, or set mps.multi_user = "auto" '
            "(pods running as different users will then queue on a GPU)",
        )
    return (
        Status.WARN,
        f"{MULTI_USER_UNSUPPORTED}; run every GPU pod as one user, or upgrade the NVIDIA driver",
    )


# -- the report ----------------------------------------------------------------------------------


class _Report:
    """Prints each line as it is found and remembers them all."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self._echo = echo
        self.lines: list[CheckLine] = []

    def add(self, status: Status, check: str, message: str) -> None:
        line = CheckLine(status, check, message)
        self.lines.append(line)
        self._echo(line.render())

    def ok(self, check: str, message: str) -> None:
        self.add(Status.OK, check, message)

    def warn(self, check: str, message: str) -> None:
        self.add(Status.WARN, check, message)

    def fail(self, check: str, message: str) -> None:
        self.add(Status.FAIL, check, message)

    def count(self, status: Status) -> int:
        return sum(1 for line in self.lines if line.status is status)


def _guarded(report: _Report, check: str, run: Callable[[], None]) -> None:
    """Run one check; whatever it raises becomes a FAIL line for that check."""
    try:
        run()
    except VgpuError as exc:
        report.fail(check, str(exc))
    except Exception as exc:  # doctor must report every check, whatever one of them hits
        report.fail(
            check,
            f"the check itself failed ({type(exc).__name__}: {exc}); please report this "
            "as a vgpu-agent bug",
        )


@dataclass
class _Node:
    """What the GPU check found, for the checks that follow it."""

    backend: Optional[GpuBackend] = None
    served: list[Gpu] = field(default_factory=list)
    replicas: dict[str, int] = field(default_factory=dict)
    #: GPUs whose MPS daemon answered, so their ceiling can be read back.
    answering: set[str] = field(default_factory=set)


# -- the checks --------------------------------------------------------------------------------


def _check_config(report: _Report, option: Optional[str], environ: Mapping[str, str]) -> Config:
    path = config_module.resolve_path(option, environ)
    try:
        config = config_module.load_effective(option, environ)
    except ConfigError as exc:
        report.fail(
            "config",
            f"{exc}; fix it (`vgpu-agent config check` shows the same error); the checks "
            "below use the built-in defaults",
        )
        return Config()
    if config.source == Config().source:
        report.ok("config", f"no file at {path}; the agent runs with the built-in defaults")
    else:
        report.ok("config", f"{path} is valid")
    return config


def _check_gpus(report: _Report, config: Config, probes: DoctorProbes, node: _Node) -> None:

    simulated = config.gpus.backend == "simulated"
    check = "driver"
    try:
        node.backend = probes.open_backend(config)
    except VgpuError as exc:
        # The backend's own error already says what to install or use instead (a simulated
        # backend among them); doctor adds only where to look first.
        hint = "check the [simulated] table" if simulated else "check that `nvidia-smi` works"
        report.fail(check, f"{exc}; {hint}")
        return
    if simulated:
        report.ok(
            check, 'the simulated backend is in use (gpus.backend = "simulated"): no driver needed'
        )
    else:
        version_of = getattr(node.backend, "driver_version", None)
        version = version_of() if callable(version_of) else None
        report.ok(check, f"NVML loaded, NVIDIA driver {version or 'version unknown'}")
    try:
        gpus = node.backend.list_gpus()
    except VgpuError as exc:
        report.fail("gpus", f"{exc}; check `nvidia-smi -L` and the kernel log")
        return
    if not gpus:
        report.fail("gpus", "the backend sees no GPU; check `nvidia-smi -L` and the kernel log")
        return
    plan = plan_gpus(config, gpus)
    replicas_by_uuid = {gpu.uuid: replicas for gpu, replicas in plan.served}
    for gpu in gpus:
        major, minor = gpu.compute_capability
        described = (
            f"GPU {gpu.index} {gpu.uuid} {gpu.model}, {gpu.memory_mib} MiB, "
            f"compute capability {major}.{minor}"
        )
        replicas = replicas_by_uuid.get(gpu.uuid)
        served = f"serves {replicas} vGPUs" if replicas is not None else "not served"
        report.ok("gpus", f"{described}: {served}")
    for refusal in plan.refused:
        report.warn("gpus", refusal)
    node.served = [gpu for gpu, _ in plan.served]
    node.replicas = dict(replicas_by_uuid)
    if not node.served:
        report.fail(
            "gpus",
            "no GPU would be served, so the agent advertises no vGPU; see gpus.serve and "
            "the lines above",
        )
    for gpu in node.served:
        for warning in slice_warnings(config, gpu.model, gpu.memory_mib):
            report.warn("gpus", f"GPU {gpu.index}: {warning}")


def _check_mps_binaries(report: _Report, config: Config, probes: DoctorProbes) -> None:
    check = "mps binaries"
    if not config.mps.enabled:
        report.ok(check, "not needed: MPS is off (mps.enabled = false)")
        return
    in_agent = probes.mps_in_agent(config)
    if in_agent is not None:
        report.ok(check, f"not needed: the MPS daemons are {in_agent} inside the agent")
        return
    control_binary = config.mps.control_binary
    control_path = probes.which(control_binary)
    if control_path is None:
        where = "is not an executable file" if os.path.isabs(control_binary) else "is not on PATH"
        report.fail(
            check,
            f"{control_binary} {where}; {_MPS_PACKAGES}, or set mps.control_binary to its path",
        )
        return
    untrusted = probes.untrusted_program(control_binary)
    if untrusted is not None:
        report.fail(check, untrusted)
        return
    # The control daemon starts the server; it ships next to it.
    beside = os.path.join(os.path.dirname(control_path), MPS_SERVER_BINARY)
    server_path = probes.which(beside) or probes.which(MPS_SERVER_BINARY)
    if server_path is None:
        report.fail(
            check,
            f"{control_path} is there, but {MPS_SERVER_BINARY} is neither beside it nor on "
            f"PATH, so the daemons cannot start a server; {_MPS_PACKAGES}",
        )
        return
    report.ok(check, f"{control_path} and {server_path}")


def _served_backend(report: _Report, check: str, node: _Node) -> Optional[GpuBackend]:
    """The open backend when there are served GPUs to check; else say why not, and None."""
    if node.backend is None:
        report.warn(check, "not checked: the GPU backend did not open (see above)")
        return None
    if not node.served:
        report.warn(check, "not checked: no GPU is served (see above)")
        return None
    return node.backend


def _check_compute_modes(report: _Report, config: Config, node: _Node) -> None:
    check = "compute mode"
    backend = _served_backend(report, check, node)
    if backend is None:
        return
    for gpu in node.served:
        try:
            mode = backend.get_compute_mode(gpu.uuid)
        except VgpuError as exc:
            report.fail(check, f"GPU {gpu.index}: {exc}")
            continue
        status, message = judge_compute_mode(config.gpus.compute_mode, config.mps.enabled, mode)
        report.add(status, check, f"GPU {gpu.index} {gpu.uuid}: {message}")


def _daemon_hint(config: Config, gpu_uuid: str) -> str:
    manager = config.mps.manager
    if manager == "systemd":
        unit = SYSTEMD_UNIT_TEMPLATE.format(gpu_uuid=gpu_uuid)
        return f"see `systemctl status {unit}` and `journalctl -u {unit}`"
    if manager == "direct":
        return 'the agent starts it (mps.manager = "direct"): start the agent and read its log'
    return 'mps.manager = "external": start the daemon the way this node runs it'


def _restart_hint(config: Config, gpu_uuid: str) -> str:
    when = "once no job uses the GPU (restarting it ends the jobs on it)"
    if config.mps.manager == "systemd":
        unit = SYSTEMD_UNIT_TEMPLATE.format(gpu_uuid=gpu_uuid)
        return f"`systemctl restart {unit}` {when}"
    if config.mps.manager == "direct":
        return f"quit it and restart the agent, which starts it in multi-user mode, {when}"
    return f"restart it with -M, {when}"


def _check_mps_daemons(report: _Report, config: Config, probes: DoctorProbes, node: _Node) -> None:
    check = "mps daemon"
    if not config.mps.enabled:
        report.ok(check, "not checked: MPS is off (mps.enabled = false)")
        return
    if _served_backend(report, check, node) is None:
        return
    in_agent = probes.mps_in_agent(config)
    for gpu in node.served:
        pipe_dir = config.mps.pipe_dir(gpu.uuid)
        try:
            why = probes.mps_probe(config, gpu.uuid)
        except VgpuError as exc:
            why = str(exc)
        if why is not None:
            report.fail(
                check,
                f"GPU {gpu.index}: the daemon on {pipe_dir} does not answer ({why}); "
                f"{_daemon_hint(config, gpu.uuid)}",
            )
            continue
        node.answering.add(gpu.uuid)
        running_multi_user = probes.mps_daemon_multi_user(config, gpu.uuid)
        if running_multi_user is False and config.mps.multi_user != "off":
            report.warn(
                check,
                f"GPU {gpu.index}: the daemon on {pipe_dir} answers but runs without "
                "multi-user mode (-M): pods running as different users will queue on a GPU; "
                f"{_restart_hint(config, gpu.uuid)}",
            )
            continue
        if in_agent is not None:
            # As `mps status` says it: there is no daemon on disk to answer.
            report.ok(check, f"GPU {gpu.index}: {SIMULATED_DAEMON_NOTE}")
        else:
            report.ok(check, f"GPU {gpu.index}: the daemon on {pipe_dir} answers")


def _check_confinement(report: _Report, config: Config, probes: DoctorProbes, node: _Node) -> None:
    """Which confinement the node runs, each GPU's ceiling, and whether its daemon holds it."""
    check = "confinement"
    line = confinement_line(config)
    if not config.mps.enabled or config.mps.confinement == "cooperative":
        report.warn(
            check,
            f"{line}; a pod that unsets its variables gets the whole GPU: set "
            'mps.confinement = "enforced" unless every tenant is trusted (docs/security.md)',
        )
        if not config.mps.enabled:
            return
    else:
        report.ok(check, line)
    if config.gpus.allow_unconfined_sharing:
        report.warn(
            check,
            "gpus.allow_unconfined_sharing = true: pre-Volta and MIG GPUs, if served, hold no "
            "ceiling (MPS cannot confine clients there)",
        )
    for gpu in node.served:
        ceiling = gpu_ceiling(config, gpu.memory_mib, node.replicas[gpu.uuid])
        if ceiling.empty:
            report.ok(check, f"GPU {gpu.index}: no daemon ceiling")
            continue
        if gpu.uuid not in node.answering:
            report.warn(
                check,
                f"GPU {gpu.index}: ceiling {ceiling.describe()} not checked: its daemon "
                "does not answer (see the mps daemon line)",
            )
            continue
        try:
            gaps = probes.mps_ceiling_gaps(config, gpu.uuid, ceiling)
        except VgpuError as exc:
            report.warn(check, f"GPU {gpu.index}: ceiling not read back: {exc}")
            continue
        if gaps:
            report.fail(
                check,
                f"GPU {gpu.index}: the daemon does not hold its ceiling ({'; '.join(gaps)}): "
                "clients can take more than their share; the agent sets it at start and puts "
                "it back on every full probe: check `systemctl status vgpu-agent`, or run "
                f"`vgpu-agent mps apply-defaults {gpu.uuid}`",
            )
            continue
        report.ok(check, f"GPU {gpu.index}: the daemon holds every client to {ceiling.describe()}")


def _check_device_list(report: _Report, config: Config, probes: DoctorProbes, node: _Node) -> None:
    """Whether pods get their GPU with the chosen strategy, and whether they can forge it."""
    check = "device list"
    toolkit = confinement.read_toolkit_config(probes.toolkit_config)
    names, _ = confinement.cdi_gpu_names(probes.cdi_spec_dirs)
    verdicts = confinement.judge_device_list(
        config.plugin.device_list_strategy,
        toolkit,
        names,
        [gpu.uuid for gpu in node.served],
        _containerd_cdi(probes.containerd_config),
    )
    for verdict, message in verdicts:
        report.add(Status(verdict), check, message)


def _check_multi_user(report: _Report, config: Config, probes: DoctorProbes) -> None:
    check = "mps multi-user"
    if not config.mps.enabled:
        report.ok(check, "not checked: MPS is off (mps.enabled = false)")
        return
    if config.mps.multi_user == "off":
        status, message = judge_multi_user("off", supported=False)
        report.add(status, check, message)
        return
    try:
        supported = probes.mps_multi_user_supported(config)
    except VgpuError as exc:
        report.warn(
            check,
            f"cannot tell whether the driver's MPS offers multi-user mode ({exc}); without it "
            "pods running as different users will queue on a GPU",
        )
        return
    status, message = judge_multi_user(config.mps.multi_user, supported)
    report.add(status, check, message)


def _check_sockets(report: _Report, config: Config, probes: DoctorProbes) -> None:
    plugin = config.plugin
    if not os.path.isdir(plugin.plugin_dir):
        report.warn(
            "kubelet",
            f"{plugin.plugin_dir} does not exist: the kubelet has not run on this node yet, "
            "or plugin.plugin_dir is wrong; the agent waits for it",
        )
        return
    kubelet_socket = plugin.kubelet_socket_path
    state = socket_state(kubelet_socket, probes.socket_timeout_s)
    if state == "listening":
        report.ok("kubelet", f"{kubelet_socket} answers")
    elif state == "not a socket":
        report.fail("kubelet", f"{kubelet_socket} is not a socket; check plugin.plugin_dir")
    else:
        why = "is missing" if state == "missing" else "is there but nothing answers on it"
        report.warn(
            "kubelet",
            f"{kubelet_socket} {why}: the kubelet is not running yet (the agent registers "
            "once it is); check `systemctl status kubelet`",
        )
    own_socket = plugin.socket_path
    state = socket_state(own_socket, probes.socket_timeout_s)
    if state == "listening":
        report.ok("plugin socket", f"{own_socket} answers")
    elif state == "not a socket":
        report.fail(
            "plugin socket", f"{own_socket} is not a socket; remove it or change plugin.socket_name"
        )
    elif state == "stale":
        report.warn(
            "plugin socket",
            f"{own_socket} is left over: nothing answers on it; the agent replaces it when "
            "it starts (systemctl start vgpu-agent)",
        )
    else:
        report.warn(
            "plugin socket",
            f"{own_socket} is missing: the agent is not serving (not running, or still "
            "waiting for GPUs); see `systemctl status vgpu-agent`",
        )


def _is_gpu_plugin(socket_name: str) -> bool:
    lowered = socket_name.lower()
    return lowered.startswith("nvidia") or "gpu" in lowered


def _check_other_plugins(report: _Report, config: Config, probes: DoctorProbes) -> None:
    check = "other plugins"
    plugin = config.plugin
    if not os.path.isdir(plugin.plugin_dir):
        report.ok(check, f"none: {plugin.plugin_dir} does not exist")
        return
    ours = {plugin.kubelet_socket_name, plugin.socket_name}
    others: list[str] = []
    for name in sorted(os.listdir(plugin.plugin_dir)):
        path = os.path.join(plugin.plugin_dir, name)
        if name in ours or not name.endswith(".sock"):
            continue
        state = socket_state(path, probes.socket_timeout_s)
        if state in ("missing", "not a socket"):
            continue
        if not _is_gpu_plugin(name):
            others.append(name)
        elif state == "stale":
            report.warn(
                check,
                f"{path} is left over from a GPU device plugin that is gone (nothing answers); "
                "remove it",
            )
        else:
            report.fail(
                check,
                f"{path}: another GPU device plugin serves on this node (NVIDIA's uses "
                "nvidia-gpu.sock), so two plugins hand out the same GPUs; keep it off this "
                "node (a nodeSelector or affinity on its DaemonSet that excludes vGPU nodes)",
            )
    if others:
        report.ok(check, f"other device plugins, not for GPUs by name: {', '.join(others)}")
    elif not any(line.check == check for line in report.lines):
        report.ok(check, "no other device plugin serves GPUs on this node")


# -- containerd ----------------------------------------------------------------------------------


@dataclass
class _RuntimeFindings:
    """What containerd's merged config says about runtimes."""

    #: The files read, in containerd's order.
    files: list[str] = field(default_factory=list)
    #: nvidia runtime name -> the file that defines it
    nvidia_runtimes: dict[str, str] = field(default_factory=dict)
    default_runtime: Optional[str] = None
    nvidia_default_runtime: bool = False


def _binary_name(spec: object) -> str:
    if not isinstance(spec, dict):
        return ""
    options = spec.get("options")
    if isinstance(options, dict):
        name = options.get("BinaryName")
        if isinstance(name, str):
            return name
    return ""


def _is_nvidia_runtime(name: str, spec: object) -> bool:
    return "nvidia" in name.lower() or "nvidia-container-runtime" in _binary_name(spec)


def _scan_runtimes(tree: Mapping[str, Any], path: str, findings: _RuntimeFindings) -> None:
    """Collect runtime tables wherever they sit: config versions 1 to 3 nest them differently."""
    for key, value in tree.items():
        if key == "default_runtime_name" and isinstance(value, str):
            findings.default_runtime = value
        elif key == "runtimes" and isinstance(value, dict):
            for name, spec in value.items():
                if _is_nvidia_runtime(name, spec):
                    findings.nvidia_runtimes[name] = path
        elif key == "default_runtime" and isinstance(value, dict):
            # Version 1 configs name the default runtime's binary directly.
            findings.nvidia_default_runtime = "nvidia-container-runtime" in _binary_name(value)
        if isinstance(value, dict):
            _scan_runtimes(value, path, findings)


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise VgpuError(f"{path} is not valid TOML ({exc}); containerd cannot read it") from exc
    except OSError as exc:
        raise VgpuError(f"reading {path}: {exc.strerror or exc}") from exc


def _containerd_files(config_path: str) -> list[tuple[str, dict[str, Any]]]:
    """The config file and what it imports, parsed, in the order containerd merges them:
    breadth first, relative imports against the importing file's directory, globs sorted."""
    loaded: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    pending = [config_path]
    while pending:
        path, pending = pending[0], pending[1:]
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        tree = _read_toml(path)
        loaded.append((path, tree))
        imports = tree.get("imports", [])
        for pattern in imports if isinstance(imports, list) else []:
            if not isinstance(pattern, str):
                continue
            absolute = (
                pattern if os.path.isabs(pattern) else os.path.join(os.path.dirname(path), pattern)
            )
            pending.extend(sorted(glob.glob(absolute)))
    return loaded


def inspect_containerd(config_path: str) -> _RuntimeFindings:
    """What runtimes containerd would have after reading ``config_path`` and its imports.

    containerd replaces a plugin's whole section with the last file's, rather than merging
    keys, so a drop-in that redefines the CRI plugin without the nvidia runtime drops it.
    """
    findings = _RuntimeFindings()
    sections: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for path, tree in _containerd_files(config_path):
        findings.files.append(path)
        plugins = tree.get("plugins", {})
        if isinstance(plugins, dict):
            for name, section in plugins.items():
                if isinstance(section, dict):
                    sections[name] = (path, section)
    for path, section in sections.values():
        _scan_runtimes(section, path, findings)
    return findings


def _containerd_cdi(config_path: str) -> Optional[tuple[bool, str]]:
    """Whether containerd resolves CDI devices, from its config and imports (None: no
    config to tell from, or one that cannot be read)."""
    if not os.path.exists(config_path):
        return None
    try:
        files = _containerd_files(config_path)
    except VgpuError:
        return None
    sections: dict[str, dict[str, object]] = {}
    for _, tree in files:
        plugins = tree.get("plugins", {})
        if isinstance(plugins, dict):
            for name, section in plugins.items():
                if isinstance(section, dict):
                    sections[name] = section
    return confinement.containerd_resolves_cdi(files[0][1].get("version", 2), sections)


def _unimported_dropins(probes: DoctorProbes, loaded: list[str]) -> list[str]:
    """Drop-ins in the usual directories that name an nvidia runtime but are not imported."""
    loaded_real = {os.path.realpath(path) for path in loaded}
    found: list[str] = []
    for directory in probes.containerd_dropin_dirs:
        for path in sorted(glob.glob(os.path.join(directory, "*.toml"))):
            if os.path.realpath(path) in loaded_real:
                continue
            findings = _RuntimeFindings()
            try:
                _scan_runtimes(_read_toml(path), path, findings)
            except VgpuError:
                continue  # containerd does not read it either
            if findings.nvidia_runtimes:
                found.append(path)
    return found


def _check_container_runtime(report: _Report, probes: DoctorProbes) -> None:
    check = "container runtime"
    config_path = probes.containerd_config
    if not os.path.exists(config_path):
        report.warn(
            check,
            f"no containerd config at {config_path}: not a containerd node, or containerd "
            "runs on its built-in defaults, which have no nvidia runtime; on a containerd "
            f"node run {_CONFIGURE_NVIDIA_RUNTIME}",
        )
        return
    findings = inspect_containerd(config_path)
    if not findings.nvidia_runtimes and not findings.nvidia_default_runtime:
        unimported = _unimported_dropins(probes, findings.files)
        if unimported:
            report.fail(
                check,
                f"{', '.join(unimported)} names the nvidia runtime, but {config_path} does "
                "not import it, so containerd never reads it; add its directory to "
                f'`imports` in {config_path} (e.g. imports = ["/etc/containerd/conf.d/*.toml"]) '
                "and restart containerd",
            )
            return
        report.fail(
            check,
            f"containerd's config ({', '.join(findings.files)}) names no nvidia runtime, so "
            "containers cannot see the GPUs; install nvidia-container-toolkit and run "
            f"{_CONFIGURE_NVIDIA_RUNTIME}",
        )
        return
    if findings.nvidia_default_runtime or findings.default_runtime in findings.nvidia_runtimes:
        name = findings.default_runtime if not findings.nvidia_default_runtime else "nvidia"
        report.ok(check, f"containerd's default runtime is {name!r} (NVIDIA's)")
        return
    names = ", ".join(
        f"{name!r} ({where})" for name, where in sorted(findings.nvidia_runtimes.items())
    )
    default = findings.default_runtime or "runc"
    report.warn(
        check,
        f"containerd has the runtime {names}, but its default runtime is {default!r}: GPU "
        "pods need runtimeClassName set to it, or make it the default with "
        f"{_CONFIGURE_NVIDIA_RUNTIME}",
    )


# -- the running agent ---------------------------------------------------------------------------


def _check_agent(report: _Report, config: Config, probes: DoctorProbes) -> None:
    check = "agent"
    socket_path = config.agent.control_socket_path
    try:
        answer = probes.agent_request(socket_path, StatusCommand())
    except VgpuError as exc:
        report.warn(check, str(exc))
        return
    if not answer.get("ok"):
        report.fail(
            check,
            f"the agent on {socket_path} answered with an error: "
            f"{answer.get('error', 'no reason given')}; see `journalctl -u vgpu-agent`",
        )
        return
    line = str(answer.get("status", "no status line"))
    unhealthy: list[str] = []
    gpus = answer.get("gpus", [])
    for gpu in gpus if isinstance(gpus, list) else []:
        if isinstance(gpu, dict) and not gpu.get("healthy", True):
            reasons = gpu.get("reasons", [])
            causes = "; ".join(str(reason) for reason in reasons) if reasons else "no reason"
            unhealthy.append(f"GPU {gpu.get('index', '?')}: {causes}")
    if line.startswith("waiting for the GPU driver"):
        report.warn(check, f"running, but {line}; see the driver check above")
    elif unhealthy:
        report.warn(
            check,
            f"running: {line}; unhealthy {', '.join(unhealthy)}; once fixed, "
            "`vgpu-agent health reset <gpu>` marks an XID-marked GPU healthy again",
        )
    elif not answer.get("registered", False):
        report.warn(
            check,
            f"running but not registered with the kubelet: {line}; see the kubelet checks above",
        )
    else:
        report.ok(check, f"running: {line}")


# -- the entry point -----------------------------------------------------------------------------


def run_doctor(
    config_path_option: Optional[str],
    environ: Mapping[str, str],
    echo: Callable[[str], None],
    *,
    probes: Optional[DoctorProbes] = None,
) -> int:
    """Check the node, print one line per finding through ``echo``; 1 if any failed, else 0."""
    report = _Report(echo)
    config = Config()

    def load_config() -> None:
        nonlocal config
        config = _check_config(report, config_path_option, environ)

    _guarded(report, "config", load_config)
    node_probes = probes if probes is not None else system_probes()
    node = _Node()
    try:
        _guarded(report, "driver", lambda: _check_gpus(report, config, node_probes, node))
        _guarded(report, "mps binaries", lambda: _check_mps_binaries(report, config, node_probes))
        _guarded(report, "compute mode", lambda: _check_compute_modes(report, config, node))
        _guarded(
            report, "mps daemon", lambda: _check_mps_daemons(report, config, node_probes, node)
        )
        _guarded(report, "mps multi-user", lambda: _check_multi_user(report, config, node_probes))
        _guarded(
            report, "confinement", lambda: _check_confinement(report, config, node_probes, node)
        )
        _guarded(
            report, "device list", lambda: _check_device_list(report, config, node_probes, node)
        )
    finally:
        if node.backend is not None:
            backend = node.backend
            _guarded(report, "driver", backend.close)
    _guarded(report, "kubelet", lambda: _check_sockets(report, config, node_probes))
    _guarded(report, "other plugins", lambda: _check_other_plugins(report, config, node_probes))
    _guarded(report, "container runtime", lambda: _check_container_runtime(report, node_probes))
    _guarded(report, "agent", lambda: _check_agent(report, config, node_probes))
    failed, warned = report.count(Status.FAIL), report.count(Status.WARN)
    if failed:
        echo(f"doctor: {failed} failed, {warned} warnings: this node is not ready for vGPU pods")
        return EXIT_FAILED
    if warned:
        echo(f"doctor: no failures, {warned} warnings")
    else:
        echo("doctor: every check passed")
    return EXIT_OK
