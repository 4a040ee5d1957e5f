"""Tests of `vgpu-agent doctor`: each check's lines and the exit code, run against temp
directories with real unix sockets, real containerd config files, the simulated backend, a
real control socket, and fake MPS probes."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest

from vgpu_agent.config.plan import simulated_mps
from vgpu_agent.config.schema import ComputeModeSetting, Config, MultiUser, SimulatedConfig
from vgpu_agent.host.control import ControlServer
from vgpu_agent.host.sockets import socket_state
from vgpu_agent.model.commands import ControlCommand, StatusCommand
from vgpu_agent.model.errors import GpuError, MpsError
from vgpu_agent.model.gpu import ComputeMode, GpuBackend
from vgpu_agent.ops.doctor.containerd import inspect_containerd
from vgpu_agent.ops.doctor.gpus import judge_compute_mode
from vgpu_agent.ops.doctor.mps import judge_multi_user
from vgpu_agent.ops.doctor.probes import DoctorProbes, system_probes
from vgpu_agent.ops.doctor.report import CheckLine, Status
from vgpu_agent.ops.doctor.runner import run_doctor
from vgpu_agent.standins.simulated import SimulatedBackend, gpus_from_config, simulated_uuid

NVIDIA_DEFAULT_V2 = """
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
default_runtime_name = "nvidia"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]
runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]
BinaryName = "/usr/bin/nvidia-container-runtime"
"""
RUNC_ONLY_V2 = """
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
runtime_type = "io.containerd.runc.v2"
"""
QUEUE_WARNING = "pods running as different users will queue on a GPU"


# -- building a node in a temp directory -------------------------------------------------------


@dataclasses.dataclass
class Node:
    """A fake node rooted in a short temp directory."""

    root: str

    @property
    def plugin_dir(self) -> str:
        return os.path.join(self.root, "plugins")

    @property
    def state_dir(self) -> str:
        return os.path.join(self.root, "state")

    @property
    def containerd_config(self) -> str:
        return os.path.join(self.root, "containerd", "config.toml")

    @property
    def dropin_dir(self) -> str:
        return os.path.join(self.root, "containerd", "conf.d")

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def write(self, path: str, text: str, mode: int = 0o644) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(path, mode)
        return path

    @property
    def toolkit_config(self) -> str:
        return os.path.join(self.root, "nvidia-container-runtime", "config.toml")

    @property
    def cdi_dir(self) -> str:
        return os.path.join(self.root, "cdi")

    def config(
        self,
        *,
        gpus: str = "",
        mps: str = "",
        simulated: str = "count = 2",
        backend: str = "simulated",
        plugin: str = "",
    ) -> str:
        """A config file for this node: paths inside the node, two simulated GPUs."""
        text = f"""
version = 1
[agent]
state_dir = "{self.state_dir}"
[plugin]
plugin_dir = "{self.plugin_dir}"
{plugin}
[gpus]
backend = "{backend}"
{gpus}
[mps]
pipe_root = "{self.path("mps")}"
log_root = "{self.path("mps-log")}"
{mps}
[simulated]
{simulated}
"""
        return self.write(self.path("config.toml"), text)


@pytest.fixture
def node(short_tmp_dir: str) -> Node:
    """An empty fake node."""
    return Node(short_tmp_dir)


@pytest.fixture
def sockets() -> Iterator[Callable[..., socket.socket]]:
    """Make real unix sockets: listening ones, or stale ones nothing accepts on."""
    made: list[socket.socket] = []

    def make(path: str, *, listening: bool = True) -> socket.socket:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        if listening:
            sock.listen(1)
        else:
            sock.close()  # the file stays behind, as after a crash
        made.append(sock)
        return sock

    yield make
    for sock in made:
        sock.close()


@dataclasses.dataclass
class FakeMps:
    """MPS as the probes see it: which daemons answer, whether -M exists."""

    down: dict[str, str] = dataclasses.field(default_factory=dict)
    supported: Optional[bool] = True
    daemon_multi_user: Optional[bool] = True

    def probe(self, _config: Config, gpu_uuid: str) -> Optional[str]:
        return self.down.get(gpu_uuid)

    def multi_user_supported(self, config: Config) -> bool:
        if self.supported is None:
            raise MpsError(f"running {config.mps.control_binary} -h: no answer within 5 s")
        return self.supported

    def running_multi_user(self, _config: Config, _gpu_uuid: str) -> Optional[bool]:
        return self.daemon_multi_user


def not_running(socket_path: str, _command: ControlCommand) -> dict[str, Any]:
    """The control client's answer when no agent listens."""
    from vgpu_agent.model.errors import AgentError

    raise AgentError(f"the agent is not running (no control socket at {socket_path})")


def backend_with_modes(mode: ComputeMode) -> Callable[[Config], GpuBackend]:
    """A backend factory: the config's simulated GPUs, each in ``mode``."""

    def open_backend(config: Config) -> GpuBackend:
        backend = SimulatedBackend(gpus_from_config(config.simulated))
        for gpu in backend.list_gpus():
            backend.set_compute_mode(gpu.uuid, mode)
        return backend

    return open_backend


def probes_for(node: Node, mps: Optional[FakeMps] = None, **changes: Any) -> DoctorProbes:
    """Probes over the fake node: simulated GPUs in exclusive_process, fake MPS."""
    fake = mps if mps is not None else FakeMps()
    probes = DoctorProbes(
        open_backend=backend_with_modes(ComputeMode.EXCLUSIVE_PROCESS),
        which=lambda name: None,
        mps_probe=fake.probe,
        mps_multi_user_supported=fake.multi_user_supported,
        mps_daemon_multi_user=fake.running_multi_user,
        # As the composition root decides: simulated GPUs with the default MPS program.
        mps_in_agent=lambda config: "simulated" if simulated_mps(config) else None,
        agent_request=not_running,
        containerd_config=node.containerd_config,
        containerd_dropin_dirs=(node.dropin_dir,),
        socket_timeout_s=1.0,
        toolkit_config=node.toolkit_config,
        cdi_spec_dirs=(node.cdi_dir,),
        mps_ceiling_gaps=lambda _config, _uuid, _ceiling: [],
    )
    return dataclasses.replace(probes, **changes)


@dataclasses.dataclass
class Result:
    """What one doctor run printed and returned."""

    exit_code: int
    output: list[str]

    def lines(self, check: str) -> list[str]:
        return [line for line in self.output if line[7:].startswith(f"{check}:")]

    def statuses(self, check: str) -> list[str]:
        return [line[:6] for line in self.lines(check)]

    def text(self, check: str) -> str:
        return "\n".join(self.lines(check))


def doctor(
    config_path: Optional[str], probes: DoctorProbes, environ: Optional[dict[str, str]] = None
) -> Result:
    output: list[str] = []
    code = run_doctor(config_path, environ or {}, output.append, probes=probes)
    return Result(code, output)


#: The container toolkit settings under which pods cannot pick their own GPUs.
SAFE_TOOLKIT = (
    "accept-nvidia-visible-devices-envvar-when-unprivileged = false\n"
    "accept-nvidia-visible-devices-as-volume-mounts = true\n"
)


def healthy(node: Node, sockets: Callable[..., socket.socket]) -> None:
    """Give the node a kubelet, our plugin socket, containerd with the nvidia runtime and a
    toolkit that takes device lists only from volume mounts."""
    sockets(os.path.join(node.plugin_dir, "kubelet.sock"))
    sockets(os.path.join(node.plugin_dir, "vgpu.sock"))
    node.write(node.containerd_config, NVIDIA_DEFAULT_V2)
    node.write(node.toolkit_config, SAFE_TOOLKIT)


OK, WARN, FAIL = "[ ok ]", "[warn]", "[FAIL]"


# -- the whole run -------------------------------------------------------------------------------


def test_healthy_simulated_node_passes_every_check(
    node: Node, sockets: Callable[..., socket.socket]
) -> None:
    """A simulated node with kubelet, containerd and a registered agent: all ok, exit 0."""
    healthy(node, sockets)

    def answer(command: ControlCommand) -> dict[str, Any]:
        assert command == StatusCommand()
        return {
            "ok": True,
            "status": "serving 20 vGPUs on 2 GPUs as eks.amazonaws.com/vgpu; registered",
            "registered": True,
            "gpus": [{"index": 0, "healthy": True, "reasons": []}],
        }

    server = ControlServer(os.path.join(node.state_dir, "control.sock"), answer)
    server.start()
    try:
        probes = dataclasses.replace(
            system_probes(),
            containerd_config=node.containerd_config,
            containerd_dropin_dirs=(node.dropin_dir,),
            toolkit_config=node.toolkit_config,
            cdi_spec_dirs=(node.cdi_dir,),
        )
        result = doctor(node.config(plugin='device_list_strategy = "volume-mounts"'), probes)
    finally:
        server.stop()
    assert result.exit_code == 0, result.output
    checked = [line for line in result.output if line.startswith("[")]
    assert all(line.startswith(OK) for line in checked), result.output
    for check in (
        "config",
        "driver",
        "gpus",
        "mps binaries",
        "compute mode",
        "mps daemon",
        "mps multi-user",
        "kubelet",
        "plugin socket",
        "other plugins",
        "container runtime",
        "confinement",
        "device list",
        "agent",
    ):
        assert result.lines(check), f"no line for {check}: {result.output}"
    assert "simulated backend is in use" in result.text("driver")
    assert len(result.lines("gpus")) == 2
    assert "registered" in result.text("agent")
    assert result.output[-1] == "doctor: every check passed"


def test_warnings_alone_exit_zero(node: Node) -> None:
    """A node without kubelet, containerd or agent only warns, so doctor exits 0."""
    result = doctor(node.config(), probes_for(node))
    assert result.exit_code == 0
    assert result.statuses("kubelet") == [WARN]
    assert result.statuses("container runtime") == [WARN]
    assert result.statuses("agent") == [WARN]
    # The default device list (envvar) is forgeable under the toolkit's defaults.
    assert result.statuses("device list") == [WARN]
    assert result.output[-1].startswith("doctor: no failures, 4 warnings")


def test_lines_render_with_fixed_width_tags() -> None:
    """Every status renders as a six-character tag, so the lines align."""
    rendered = [CheckLine(status, "x", "y").render() for status in Status]
    assert rendered == ["[ ok ] x: y", "[warn] x: y", "[FAIL] x: y"]


# -- 1. config -----------------------------------------------------------------------------------


def test_invalid_config_fails_and_the_other_checks_run_on_defaults(node: Node) -> None:
    """A bad config is one FAIL naming the key; the rest still runs, with the defaults."""
    path = node.write(node.path("bad.toml"), "version = 1\n[gpus]\nreplicas_per_gpu = 0\n")
    result = doctor(path, probes_for(node))
    assert result.exit_code == 1
    assert result.statuses("config") == [FAIL]
    assert "gpus.replicas_per_gpu" in result.text("config")
    assert "built-in defaults" in result.text("config")
    # The defaults' plugin directory and control socket are the ones checked.
    assert "/var/lib/kubelet/device-plugins" in result.text("kubelet")
    assert "/run/vgpu-agent/control.sock" in result.text("agent")


def test_missing_named_config_fails(node: Node) -> None:
    """A config file named through $VGPU_CONFIG that does not exist fails the config check."""
    missing = node.path("nowhere.toml")
    result = doctor(None, probes_for(node), environ={"VGPU_CONFIG": missing})
    assert result.statuses("config") == [FAIL]
    assert missing in result.text("config")
    assert result.exit_code == 1


def test_valid_config_shows_its_path(node: Node) -> None:
    """The config line names the file it checked."""
    path = node.config()
    result = doctor(path, probes_for(node))
    assert result.lines("config") == [f"[ ok ] config: {path} is valid"]


# -- 2. driver and GPUs --------------------------------------------------------------------------


def test_backend_that_cannot_open_fails_and_skips_gpu_checks(node: Node) -> None:
    """NVML not loading is a FAIL; compute mode and daemon checks say they were not run."""

    def no_driver(_config: Config) -> GpuBackend:
        raise GpuError("initialising NVML: NVML error: Driver Not Loaded")

    result = doctor(node.config(), probes_for(node, open_backend=no_driver))
    assert result.exit_code == 1
    assert result.statuses("driver") == [FAIL]
    assert "Driver Not Loaded" in result.text("driver")
    assert result.statuses("compute mode") == [WARN]
    assert result.statuses("mps daemon") == [WARN]
    assert "not checked" in result.text("compute mode")


def test_nvml_backend_line_shows_the_driver_version(node: Node) -> None:
    """With gpus.backend = "nvml", the driver line reports NVML and the driver version."""

    class VersionedBackend(SimulatedBackend):
        def driver_version(self) -> str:
            return "580.159"

    def open_backend(config: Config) -> GpuBackend:
        backend = VersionedBackend(gpus_from_config(config.simulated))
        for gpu in backend.list_gpus():
            backend.set_compute_mode(gpu.uuid, ComputeMode.EXCLUSIVE_PROCESS)
        return backend

    config = node.config(backend="nvml")
    result = doctor(config, probes_for(node, open_backend=open_backend))
    assert result.lines("driver") == ["[ ok ] driver: NVML loaded, NVIDIA driver 580.159"]


def test_no_gpu_fails(node: Node) -> None:
    """A backend that sees no GPU fails the GPU check."""
    result = doctor(
        node.config(),
        probes_for(node, open_backend=lambda _config: SimulatedBackend([])),
    )
    assert result.statuses("gpus") == [FAIL]
    assert result.statuses("compute mode") == [WARN]
    assert result.exit_code == 1


def test_gpu_listing_failure_fails_the_gpu_check(node: Node) -> None:
    """A backend that opens but cannot list GPUs fails the GPU line, not the driver line."""

    def failing(config: Config) -> GpuBackend:
        backend = SimulatedBackend(gpus_from_config(config.simulated))
        backend.fail_calls("NVML error: Unknown Error")
        return backend

    result = doctor(node.config(), probes_for(node, open_backend=failing))
    assert result.statuses("driver") == [OK]
    assert result.statuses("gpus") == [FAIL]
    assert "Unknown Error" in result.text("gpus")
    assert result.statuses("mps daemon") == [WARN]


def test_gpus_not_served_are_listed_with_the_reason(node: Node) -> None:
    """A MIG GPU is listed as not served, with a warning why; the other GPU still serves."""
    gpus = f"""
[[simulated.gpus]]
uuid = "{simulated_uuid(0)}"
[[simulated.gpus]]
uuid = "{simulated_uuid(1)}"
mig_enabled = true
"""
    result = doctor(node.config(simulated=gpus), probes_for(node))
    assert result.statuses("gpus") == [OK, OK, WARN]
    assert "serves 10 vGPUs" in result.lines("gpus")[0]
    assert "not served" in result.lines("gpus")[1]
    assert "MIG" in result.lines("gpus")[2]
    assert len(result.lines("compute mode")) == 1


def test_tiny_memory_slices_warn(node: Node) -> None:
    """A GPU split into slices too small to be useful gets the config's slice warning."""
    path = node.config(gpus="replicas_per_gpu = 48", simulated="count = 2\nmemory_mib = 16384")
    result = doctor(path, probes_for(node))
    assert WARN in result.statuses("gpus")
    assert "replicas_per_gpu" in result.text("gpus")


# -- 3. MPS binaries -----------------------------------------------------------------------------


def nvml_config(node: Node, mps: str = "") -> str:
    """A config for the nvml backend (the tests open simulated GPUs in its place)."""
    return node.config(mps=mps, backend="nvml")


@pytest.mark.parametrize(
    ("files", "expected", "words"),
    [
        (("nvidia-cuda-mps-control", "nvidia-cuda-mps-server"), OK, "nvidia-cuda-mps-server"),
        (("nvidia-cuda-mps-control",), FAIL, "neither beside it nor on PATH"),
        ((), FAIL, "is not an executable file"),
    ],
    ids=["both", "no-server", "no-control"],
)
def test_mps_binaries(node: Node, files: tuple[str, ...], expected: str, words: str) -> None:
    """The control program named by mps.control_binary and the server beside it must exist."""
    import shutil

    bin_dir = node.path("bin")
    os.makedirs(bin_dir)
    for name in files:
        node.write(os.path.join(bin_dir, name), "#!/bin/sh\n", mode=0o755)
    control = os.path.join(bin_dir, "nvidia-cuda-mps-control")
    config = nvml_config(node, mps=f'control_binary = "{control}"')
    result = doctor(config, probes_for(node, which=shutil.which))
    assert result.statuses("mps binaries") == [expected]
    assert words in result.text("mps binaries")


def test_mps_binaries_on_path(node: Node) -> None:
    """A bare control_binary name is looked up on PATH, and so is the server."""
    found = {
        "nvidia-cuda-mps-control": "/usr/bin/nvidia-cuda-mps-control",
        "nvidia-cuda-mps-server": "/usr/bin/nvidia-cuda-mps-server",
    }
    result = doctor(nvml_config(node), probes_for(node, which=found.get))
    assert result.lines("mps binaries") == [
        "[ ok ] mps binaries: /usr/bin/nvidia-cuda-mps-control and /usr/bin/nvidia-cuda-mps-server"
    ]


def test_mps_binaries_missing_from_path_fail(node: Node) -> None:
    """No control program on PATH fails and says which package to install."""
    result = doctor(nvml_config(node), probes_for(node))
    assert result.statuses("mps binaries") == [FAIL]
    assert "is not on PATH" in result.text("mps binaries")
    assert "nvidia-compute-utils" in result.text("mps binaries")


def test_mps_disabled_skips_mps_checks(node: Node) -> None:
    """With mps.enabled = false the MPS checks pass as not needed, even without binaries."""
    result = doctor(nvml_config(node, mps="enabled = false"), probes_for(node))
    assert result.statuses("mps binaries") == [OK]
    assert result.statuses("mps daemon") == [OK]
    assert result.statuses("mps multi-user") == [OK]
    assert "MPS is off" in result.text("mps daemon")


# -- 4. compute mode -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "mps_enabled", "mode", "expected"),
    [
        ("exclusive_process", True, ComputeMode.EXCLUSIVE_PROCESS, Status.OK),
        ("exclusive_process", True, ComputeMode.DEFAULT, Status.FAIL),
        ("exclusive_process", True, ComputeMode.EXCLUSIVE_THREAD, Status.FAIL),
        ("default", True, ComputeMode.DEFAULT, Status.OK),
        ("default", True, ComputeMode.EXCLUSIVE_PROCESS, Status.WARN),
        ("unchanged", True, ComputeMode.DEFAULT, Status.WARN),
        ("unchanged", True, ComputeMode.EXCLUSIVE_PROCESS, Status.OK),
        ("unchanged", True, ComputeMode.PROHIBITED, Status.FAIL),
        ("exclusive_process", True, ComputeMode.PROHIBITED, Status.FAIL),
        ("default", False, ComputeMode.DEFAULT, Status.OK),
        ("exclusive_process", False, ComputeMode.EXCLUSIVE_PROCESS, Status.WARN),
    ],
    ids=[
        "exclusive-ok",
        "exclusive-wanted-default-found",
        "exclusive-wanted-thread-found",
        "default-ok",
        "default-wanted-exclusive-found",
        "unchanged-default-bypassable",
        "unchanged-exclusive",
        "unchanged-prohibited",
        "prohibited",
        "no-mps-default",
        "no-mps-exclusive",
    ],
)
def test_judge_compute_mode(
    setting: ComputeModeSetting, mps_enabled: bool, mode: ComputeMode, expected: Status
) -> None:
    """Each compute mode under each setting gets the status an operator would give it."""
    status, message = judge_compute_mode(setting, mps_enabled, mode)
    assert status is expected
    assert message


def test_gpu_left_in_default_fails_when_exclusive_wanted(node: Node) -> None:
    """GPUs in DEFAULT under exclusive_process fail, each with the command that fixes it."""
    probes = probes_for(node, open_backend=backend_with_modes(ComputeMode.DEFAULT))
    result = doctor(node.config(), probes)
    assert result.statuses("compute mode") == [FAIL, FAIL]
    assert "vgpu-agent gpus apply-compute-mode" in result.text("compute mode")
    assert result.exit_code == 1


def test_unchanged_default_warns_that_clients_could_bypass_mps(node: Node) -> None:
    """compute_mode = "unchanged" on a DEFAULT GPU warns that clients could bypass MPS."""
    probes = probes_for(node, open_backend=backend_with_modes(ComputeMode.DEFAULT))
    result = doctor(node.config(gpus='compute_mode = "unchanged"'), probes)
    assert result.statuses("compute mode") == [WARN, WARN]
    assert "bypass MPS" in result.text("compute mode")


# -- 5. MPS daemons and multi-user mode ----------------------------------------------------------


def test_daemon_not_answering_fails_for_that_gpu(node: Node) -> None:
    """A GPU whose daemon does not answer fails, naming its pipe dir, unit and the reason."""
    down = FakeMps(down={simulated_uuid(1): "MPS daemon not running: no control socket"})
    result = doctor(node.config(), probes_for(node, mps=down))
    assert result.statuses("mps daemon") == [OK, FAIL]
    failed = result.lines("mps daemon")[1]
    assert node.path("mps", simulated_uuid(1)) in failed
    assert "no control socket" in failed
    assert f"systemctl status vgpu-mps@{simulated_uuid(1)}.service" in failed
    assert result.exit_code == 1


def test_daemon_probe_error_is_a_fail_not_a_traceback(node: Node) -> None:
    """An MpsError from the probe becomes the FAIL line's reason."""

    def broken(_config: Config, gpu_uuid: str) -> Optional[str]:
        raise MpsError(f"the MPS control program for {gpu_uuid} was not found")

    result = doctor(node.config(mps='manager = "direct"'), probes_for(node, mps_probe=broken))
    assert result.statuses("mps daemon") == [FAIL, FAIL]
    assert "was not found" in result.text("mps daemon")
    assert "the agent starts it" in result.text("mps daemon")


def test_daemon_running_without_multi_user_mode_warns(node: Node) -> None:
    """A daemon that answers but was started without -M warns that users will queue."""
    result = doctor(node.config(), probes_for(node, mps=FakeMps(daemon_multi_user=False)))
    assert result.statuses("mps daemon") == [WARN, WARN]
    assert QUEUE_WARNING in result.text("mps daemon")


@pytest.mark.parametrize(
    ("setting", "supported", "expected"),
    [
        ("auto", True, Status.OK),
        ("on", True, Status.OK),
        ("auto", False, Status.WARN),
        ("on", False, Status.FAIL),
        ("off", True, Status.WARN),
    ],
    ids=["auto-supported", "on-supported", "auto-unsupported", "on-unsupported", "off"],
)
def test_judge_multi_user(setting: MultiUser, supported: bool, expected: Status) -> None:
    """Multi-user mode: ok where used, a plain warning where pods of different users queue."""
    status, message = judge_multi_user(setting, supported)
    assert status is expected
    if expected is not Status.OK:
        assert "different users" in message


def test_multi_user_unsupported_says_pods_will_queue(node: Node) -> None:
    """A driver without -M: a warning that says plainly that pods of other users queue."""
    result = doctor(node.config(), probes_for(node, mps=FakeMps(supported=False)))
    assert result.statuses("mps multi-user") == [WARN]
    assert QUEUE_WARNING in result.text("mps multi-user")
    assert result.exit_code == 0


def test_multi_user_forced_on_without_support_fails(node: Node) -> None:
    """mps.multi_user = "on" on a driver without -M fails: the daemons cannot start."""
    config = node.config(mps='multi_user = "on"')
    result = doctor(config, probes_for(node, mps=FakeMps(supported=False)))
    assert result.statuses("mps multi-user") == [FAIL]


def test_multi_user_off_warns(node: Node) -> None:
    """mps.multi_user = "off" warns that pods of different users will queue."""
    result = doctor(node.config(mps='multi_user = "off"'), probes_for(node))
    assert result.statuses("mps multi-user") == [WARN]
    assert QUEUE_WARNING in result.text("mps multi-user")


def test_multi_user_detection_failure_warns(node: Node) -> None:
    """When the control program cannot be asked, doctor warns that it cannot tell."""
    result = doctor(node.config(), probes_for(node, mps=FakeMps(supported=None)))
    assert result.statuses("mps multi-user") == [WARN]
    assert "cannot tell" in result.text("mps multi-user")


# -- 6. kubelet and plugin sockets ---------------------------------------------------------------


def test_socket_state_tells_listening_stale_missing_and_files_apart(
    node: Node, sockets: Callable[..., socket.socket]
) -> None:
    """socket_state distinguishes a listening socket, a stale one, a file and nothing."""
    sockets(node.path("live.sock"))
    sockets(node.path("stale.sock"), listening=False)
    node.write(node.path("file.sock"), "")
    assert socket_state(node.path("live.sock")) == "listening"
    assert socket_state(node.path("stale.sock")) == "stale"
    assert socket_state(node.path("file.sock")) == "not a socket"
    assert socket_state(node.path("none.sock")) == "missing"


@pytest.mark.parametrize(
    ("kubelet", "expected", "words"),
    [
        ("listening", OK, "answers"),
        ("stale", WARN, "nothing answers"),
        ("missing", WARN, "is missing"),
        ("file", FAIL, "is not a socket"),
    ],
    ids=["listening", "stale", "missing", "regular-file"],
)
def test_kubelet_socket(
    node: Node, sockets: Callable[..., socket.socket], kubelet: str, expected: str, words: str
) -> None:
    """The kubelet socket: ok when it answers, a warning while the kubelet is not up."""
    path = os.path.join(node.plugin_dir, "kubelet.sock")
    os.makedirs(node.plugin_dir)
    if kubelet in ("listening", "stale"):
        sockets(path, listening=kubelet == "listening")
    elif kubelet == "file":
        node.write(path, "")
    result = doctor(node.config(), probes_for(node))
    assert result.statuses("kubelet") == [expected]
    assert words in result.text("kubelet")


def test_missing_plugin_dir_warns(node: Node) -> None:
    """No plugin directory at all: the kubelet has not run yet, a warning."""
    result = doctor(node.config(), probes_for(node))
    assert result.statuses("kubelet") == [WARN]
    assert "does not exist" in result.text("kubelet")
    assert result.statuses("other plugins") == [OK]


@pytest.mark.parametrize(
    ("ours", "expected", "words"),
    [
        ("listening", OK, "answers"),
        ("stale", WARN, "left over"),
        ("missing", WARN, "not serving"),
    ],
    ids=["listening", "stale", "missing"],
)
def test_own_plugin_socket(
    node: Node, sockets: Callable[..., socket.socket], ours: str, expected: str, words: str
) -> None:
    """Our own plugin socket: ok when it answers, else a warning saying why."""
    sockets(os.path.join(node.plugin_dir, "kubelet.sock"))
    if ours != "missing":
        sockets(os.path.join(node.plugin_dir, "vgpu.sock"), listening=ours == "listening")
    result = doctor(node.config(), probes_for(node))
    assert result.statuses("plugin socket") == [expected]
    assert words in result.text("plugin socket")


def dra_config(node: Node) -> str:
    """The node's config in DRA mode, every DRA path inside the node."""
    path = node.config()
    with open(path, "a", encoding="utf-8") as config:
        config.write(
            "[dra]\nenabled = true\n"
            f'registry_dir = "{node.path("reg")}"\n'
            f'plugins_dir = "{node.path("dra")}"\n'
            f'cdi_dir = "{node.path("run-cdi")}"\n'
            f'kubeconfig = "{node.path("kubeconfig")}"\n'
        )
    return path


def test_dra_mode_checks_its_own_sockets_cdi_dir_and_credentials(
    node: Node, sockets: Callable[..., socket.socket]
) -> None:
    """In DRA mode the device plugin's sockets are not checked; the registry directory,
    both DRA sockets, the CDI directory and the kubeconfig are."""
    config = dra_config(node)
    missing = doctor(config, probes_for(node))
    assert missing.statuses("kubelet") == []
    assert missing.statuses("dra") == [WARN, OK, FAIL]
    assert "the kubelet has not run on this node yet" in missing.text("dra")
    assert "cannot be read: the agent cannot reach the API server" in missing.text("dra")
    driver = "vgpu.eks.amazonaws.com"
    sockets(node.path("reg", f"{driver}-reg.sock"))
    sockets(node.path("dra", driver, "dra.sock"))
    node.write(node.path("kubeconfig"), "apiVersion: v1\n")
    serving = doctor(config, probes_for(node))
    assert serving.statuses("dra") == [OK, OK, OK, OK]
    os.unlink(node.path("dra", driver, "dra.sock"))
    node.write(node.path("dra", driver, "dra.sock"), "a file")
    in_the_way = doctor(config, probes_for(node))
    assert in_the_way.statuses("dra") == [OK, FAIL, OK, OK]
    assert "is not a socket; remove it" in in_the_way.text("dra")


# -- 7. other device plugins ---------------------------------------------------------------------


def test_nvidia_device_plugin_socket_fails(
    node: Node, sockets: Callable[..., socket.socket]
) -> None:
    """NVIDIA's plugin serving nvidia-gpu.sock beside ours fails: two plugins, same GPUs."""
    healthy(node, sockets)
    sockets(os.path.join(node.plugin_dir, "nvidia-gpu.sock"))
    result = doctor(node.config(), probes_for(node))
    assert result.statuses("other plugins") == [FAIL]
    assert "nvidia-gpu.sock" in result.text("other plugins")
    assert "same GPUs" in result.text("other plugins")
    assert result.exit_code == 1


def test_stale_nvidia_socket_only_warns(node: Node, sockets: Callable[..., socket.socket]) -> None:
    """A left-over nvidia-*.sock nothing answers on is a warning to remove it, not a fail."""
    healthy(node, sockets)
    sockets(os.path.join(node.plugin_dir, "nvidia-mig.sock"), listening=False)
    result = doctor(node.config(), probes_for(node))
    assert result.statuses("other plugins") == [WARN]
    assert "remove it" in result.text("other plugins")


def test_non_gpu_plugins_and_other_files_are_fine(
    node: Node, sockets: Callable[..., socket.socket]
) -> None:
    """Other plugins (EFA) and non-socket files (the kubelet's checkpoint) do not fail."""
    healthy(node, sockets)
    sockets(os.path.join(node.plugin_dir, "aws-efa.sock"))
    node.write(os.path.join(node.plugin_dir, "kubelet_internal_checkpoint"), "{}")
    node.write(os.path.join(node.plugin_dir, "nvidia.sock.bak"), "")
    result = doctor(node.config(), probes_for(node))
    assert result.statuses("other plugins") == [OK]
    assert "aws-efa.sock" in result.text("other plugins")


# -- 8. containerd -------------------------------------------------------------------------------


NVIDIA_DEFAULT_V3 = """
version = 3
[plugins.'io.containerd.cri.v1.runtime'.containerd]
default_runtime_name = "nvidia"
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.nvidia]
runtime_type = "io.containerd.runc.v2"
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.nvidia.options]
BinaryName = "/usr/bin/nvidia-container-runtime"
"""
NVIDIA_NOT_DEFAULT = """
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]
runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]
BinaryName = "/usr/bin/nvidia-container-runtime"
"""
V1_DEFAULT_RUNTIME = """
[plugins.cri.containerd.default_runtime]
runtime_type = "io.containerd.runtime.v1.linux"
[plugins.cri.containerd.default_runtime.options]
BinaryName = "/usr/bin/nvidia-container-runtime"
"""
IMPORTS_DROPINS = 'imports = ["{dropins}/*.toml"]\n'
RENAMED_RUNTIME = NVIDIA_DEFAULT_V2.replace("runtimes.nvidia", "runtimes.gpu").replace(
    '"nvidia"', '"gpu"'
)


@pytest.mark.parametrize(
    ("main", "dropin", "expected", "words"),
    [
        (None, None, WARN, "no containerd config"),
        (NVIDIA_DEFAULT_V2, None, OK, "default runtime is 'nvidia'"),
        (NVIDIA_DEFAULT_V3, None, OK, "default runtime is 'nvidia'"),
        (V1_DEFAULT_RUNTIME, None, OK, "default runtime"),
        (RENAMED_RUNTIME, None, OK, "default runtime is 'gpu'"),
        (NVIDIA_NOT_DEFAULT, None, WARN, "runtimeClassName"),
        (RUNC_ONLY_V2, None, FAIL, "names no nvidia runtime"),
        ("version = [", None, FAIL, "not valid TOML"),
        (IMPORTS_DROPINS + RUNC_ONLY_V2, NVIDIA_DEFAULT_V2, OK, "default runtime is 'nvidia'"),
        (RUNC_ONLY_V2, NVIDIA_DEFAULT_V2, FAIL, "does not import it"),
        (IMPORTS_DROPINS + NVIDIA_DEFAULT_V2, RUNC_ONLY_V2, FAIL, "names no nvidia runtime"),
    ],
    ids=[
        "absent",
        "v2-default",
        "v3-default",
        "v1-default-runtime",
        "runtime-by-binary-name",
        "not-default",
        "runc-only",
        "bad-toml",
        "imported-dropin",
        "dropin-not-imported",
        "dropin-replaces-cri-section",
    ],
)
def test_container_runtime(
    node: Node, main: Optional[str], dropin: Optional[str], expected: str, words: str
) -> None:
    """containerd's merged config must name the nvidia runtime, ideally as the default."""
    if main is not None:
        node.write(node.containerd_config, main.replace("{dropins}", node.dropin_dir))
    if dropin is not None:
        node.write(os.path.join(node.dropin_dir, "99-nvidia.toml"), dropin)
    result = doctor(node.config(), probes_for(node))
    assert result.statuses("container runtime") == [expected], result.text("container runtime")
    assert words in result.text("container runtime")


def test_relative_imports_resolve_against_the_importing_file(node: Node) -> None:
    """An import without a leading / is found beside config.toml, as containerd does it."""
    node.write(node.containerd_config, 'imports = ["conf.d/*.toml"]\n' + RUNC_ONLY_V2)
    node.write(os.path.join(node.dropin_dir, "99-nvidia.toml"), NVIDIA_DEFAULT_V2)
    findings = inspect_containerd(node.containerd_config)
    assert findings.files == [
        node.containerd_config,
        os.path.join(node.dropin_dir, "99-nvidia.toml"),
    ]
    assert findings.default_runtime == "nvidia"
    assert set(findings.nvidia_runtimes) == {"nvidia"}


# -- 9. the running agent ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected", "words"),
    [
        ({"ok": True, "status": "serving 20 vGPUs", "registered": True, "gpus": []}, OK, "20"),
        (
            {"ok": True, "status": "serving; waiting for kubelet", "registered": False},
            WARN,
            "not registered",
        ),
        (
            {
                "ok": True,
                "status": "serving",
                "registered": True,
                "gpus": [{"index": 1, "healthy": False, "reasons": ["XID 79"]}],
            },
            WARN,
            "GPU 1: XID 79",
        ),
        ({"ok": False, "error": "internal error: boom"}, FAIL, "boom"),
    ],
    ids=["registered", "not-registered", "unhealthy-gpu", "error-answer"],
)
def test_agent_control_socket(
    node: Node, answer: dict[str, Any], expected: str, words: str
) -> None:
    """The agent's status over its real control socket becomes one line."""
    server = ControlServer(os.path.join(node.state_dir, "control.sock"), lambda _cmd: answer)
    server.start()
    try:
        result = doctor(
            node.config(), probes_for(node, agent_request=system_probes().agent_request)
        )
    finally:
        server.stop()
    assert result.statuses("agent") == [expected]
    assert words in result.text("agent")


def test_agent_not_running_warns(node: Node) -> None:
    """No agent on the control socket is a warning that says how to start it."""
    probes = probes_for(node, agent_request=system_probes().agent_request)
    result = doctor(node.config(), probes)
    assert result.statuses("agent") == [WARN]
    assert "systemctl start vgpu-agent" in result.text("agent")


# -- never a traceback ---------------------------------------------------------------------------


def test_unexpected_exception_in_a_check_is_one_fail_line(node: Node) -> None:
    """A bug inside one check becomes a FAIL line for that check; the others still run."""

    def explode(_name: str) -> Optional[str]:
        raise RuntimeError("disk on fire")

    result = doctor(nvml_config(node), probes_for(node, which=explode))
    assert result.statuses("mps binaries") == [FAIL]
    assert "RuntimeError: disk on fire" in result.text("mps binaries")
    assert result.lines("compute mode")
    assert result.lines("agent")
    assert result.exit_code == 1


def test_backend_closed_after_the_gpu_checks(node: Node) -> None:
    """doctor closes the GPU backend it opened."""
    opened: list[SimulatedBackend] = []

    def open_backend(config: Config) -> GpuBackend:
        backend = SimulatedBackend(gpus_from_config(SimulatedConfig(count=1)))
        backend.set_compute_mode(backend.list_gpus()[0].uuid, ComputeMode.EXCLUSIVE_PROCESS)
        opened.append(backend)
        return backend

    doctor(node.config(), probes_for(node, open_backend=open_backend))
    assert len(opened) == 1
    assert opened[0].closed


# -- confinement and the device list ---------------------------------------------------------------


def test_enforced_confinement_is_reported_with_each_ceiling(node: Node) -> None:
    """Default config: doctor says enforced, and each GPU's ceiling held by its daemon."""
    result = doctor(node.config(gpus="replicas_per_gpu = 8"), probes_for(node))
    assert result.statuses("confinement") == [OK, OK, OK]
    text = result.text("confinement")
    assert "enforced: each MPS daemon holds every client to at most 1 vGPU's share" in text
    assert "GPU 0: the daemon holds every client to 12.5% of the SMs, 10194 MiB" in text


def test_a_daemon_without_its_ceiling_fails(node: Node) -> None:
    """A daemon whose read-back ceiling is gone is a FAIL saying what to run."""
    gaps = ["thread percentage 100, not 10"]
    result = doctor(
        node.config(),
        probes_for(node, mps_ceiling_gaps=lambda _config, _uuid, _ceiling: gaps),
    )
    assert result.exit_code == 1
    assert result.statuses("confinement") == [OK, FAIL, FAIL]
    assert "thread percentage 100, not 10" in result.text("confinement")
    assert "vgpu-agent mps apply-defaults GPU-" in result.text("confinement")


def test_cooperative_confinement_warns(node: Node) -> None:
    """Cooperative mode is a warning naming the key that enforces; no ceiling per GPU."""
    result = doctor(node.config(mps='confinement = "cooperative"'), probes_for(node))
    assert result.statuses("confinement") == [WARN, OK, OK]
    assert 'set mps.confinement = "enforced"' in result.text("confinement")
    assert "GPU 0: no daemon ceiling" in result.text("confinement")


CDI_SPEC_YAML = """---
cdiVersion: 0.5.0
kind: nvidia.com/gpu
devices:
- name: "0"
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
- name: {uuid}
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
- name: all
containerEdits:
  env:
  - NVIDIA_VISIBLE_DEVICES=void
"""


@pytest.mark.parametrize(
    ("strategy", "toolkit", "cdi", "statuses", "words"),
    [
        ("envvar", None, False, [WARN], "NVIDIA_VISIBLE_DEVICES=all"),
        ("envvar", SAFE_TOOLKIT, False, [FAIL], "so pods get no GPU"),
        ("volume-mounts", None, False, [FAIL], "as-volume-mounts = true in"),
        (
            "volume-mounts",
            "accept-nvidia-visible-devices-as-volume-mounts = true\n",
            False,
            [OK, WARN],
            "when-unprivileged = false",
        ),
        ("volume-mounts", SAFE_TOOLKIT, False, [OK, OK], "pods cannot pick GPUs themselves"),
        ("cdi", SAFE_TOOLKIT, False, [FAIL], "nvidia-ctk cdi generate"),
        ("cdi", SAFE_TOOLKIT, True, [OK, OK], "names every served GPU"),
        ("cdi", None, True, [OK, WARN], "NVIDIA_VISIBLE_DEVICES=all"),
    ],
    ids=[
        "envvar-forgeable",
        "envvar-ignored-by-toolkit",
        "volume-mounts-not-read",
        "volume-mounts-but-envvar-open",
        "volume-mounts-safe",
        "cdi-without-spec",
        "cdi-safe",
        "cdi-but-envvar-open",
    ],
)
def test_device_list_strategy_is_judged_against_the_toolkit(  # noqa: PLR0917 - table columns
    node: Node,
    strategy: str,
    toolkit: Optional[str],
    cdi: bool,
    statuses: list[str],
    words: str,
) -> None:
    """doctor reads the toolkit config and the CDI specs and says whether the strategy gives
    pods their GPU and whether a pod could pick GPUs itself, with what to change."""
    if toolkit is not None:
        node.write(node.toolkit_config, toolkit)
    if cdi:
        for gpu in gpus_from_config(SimulatedConfig(count=2)):
            node.write(
                os.path.join(node.cdi_dir, f"nvidia-{gpu.index}.yaml"),
                CDI_SPEC_YAML.format(uuid=gpu.uuid),
            )
    result = doctor(node.config(plugin=f'device_list_strategy = "{strategy}"'), probes_for(node))
    assert result.statuses("device list") == statuses, result.output
    assert words in result.text("device list")


def test_unreadable_toolkit_config_is_one_failed_line(node: Node) -> None:
    """A toolkit config that is not TOML is one FAIL naming the file, not a traceback."""
    node.write(node.toolkit_config, "accept = [\n")
    result = doctor(node.config(), probes_for(node))
    assert result.statuses("device list") == [FAIL]
    assert node.toolkit_config in result.text("device list")


@pytest.mark.parametrize(
    ("containerd", "statuses", "words"),
    [
        ("version = 2\n", [FAIL], 'enable_cdi in [plugins."io.containerd.grpc.v1.cri"] (default'),
        (
            'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\nenable_cdi = true\n',
            [OK, OK],
            "names every served GPU",
        ),
        ("version = 3\n", [OK, OK], "names every served GPU"),
        (
            'version = 3\n[plugins."io.containerd.cri.v1.runtime"]\nenable_cdi = false\n',
            [FAIL],
            "(set: false)",
        ),
    ],
    ids=["containerd-1.7-default-off", "containerd-1.7-on", "containerd-2-default-on", "2-off"],
)
def test_cdi_strategy_needs_cdi_in_containerd(
    node: Node, containerd: str, statuses: list[str], words: str
) -> None:
    """With the cdi strategy, doctor reads containerd's config: CDI is off by default on
    containerd 1.7 (config version 2) and on by default on 2.x (version 3)."""
    node.write(node.toolkit_config, SAFE_TOOLKIT)
    node.write(node.containerd_config, containerd)
    for gpu in gpus_from_config(SimulatedConfig(count=2)):
        spec = os.path.join(node.cdi_dir, f"nvidia-{gpu.index}.yaml")
        node.write(spec, CDI_SPEC_YAML.format(uuid=gpu.uuid))
    result = doctor(node.config(plugin='device_list_strategy = "cdi"'), probes_for(node))
    assert result.statuses("device list") == statuses, result.output
    assert words in result.text("device list")
