"""Reliability (issue 7): the agent under kubelet restarts and outages, SIGKILL, MPS daemon
and NVML faults, and reloads under load. Real unix sockets, real gRPC servers, real
processes; the only fakes are the simulated GPUs and the stand-in MPS control program.

Figures these tests produce (restarts survived, fd and thread counts) are printed with
``-s`` and summarised in docs/reliability.md.
"""

from __future__ import annotations

import gc
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, cast

import grpc
import pytest

from tests.builders import standin_mps_config
from tests.harness import RESOURCE, WAIT_S, AgentRun, make_config, wait_until
from vgpu_agent.agent.loop import EXIT_OK
from vgpu_agent.config.parse import parse
from vgpu_agent.config.schema import Config, HealthConfig, MpsConfig
from vgpu_agent.frontends._proto import deviceplugin_pb2 as pb
from vgpu_agent.frontends._proto import deviceplugin_pb2_grpc as pb_grpc
from vgpu_agent.frontends.deviceplugin import kubelet
from vgpu_agent.frontends.deviceplugin.server import AdvertisedDevice
from vgpu_agent.frontends.serving import unix_target
from vgpu_agent.host import control
from vgpu_agent.model.commands import parse_command
from vgpu_agent.model.errors import ConfigError, GpuError, RegistrationError
from vgpu_agent.model.gpu import GpuBackend
from vgpu_agent.mps.control import control_command
from vgpu_agent.mps.daemons import DirectMpsDaemons
from vgpu_agent.mps.liveness import process_state
from vgpu_agent.runtime.compose import open_backend_for
from vgpu_agent.standins.kubelet import KubeletStandin
from vgpu_agent.standins.simulated import SimulatedBackend, gpus_from_config

#: Generous bounds for a loaded 2-core CI machine; bench/ has the real numbers.
PROMPT_S = 3.0
#: A waiting agent may use at most this share of one core (a busy loop uses all of it).
MAX_IDLE_CPU_SHARE = 0.5
#: Slack for fds and threads that come and go (gRPC's pollers, a probe in flight).
FD_SLACK = 6
THREAD_SLACK = 3


# -- helpers -------------------------------------------------------------------------------------


def fd_count() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def settled_counts(baseline: tuple[int, int], timeout_s: float = WAIT_S) -> tuple[int, int]:
    """(fds, threads) once they are back within the slack of ``baseline``, or the last
    values seen after ``timeout_s`` (closed channels and stopped servers free lazily)."""
    deadline = time.monotonic() + timeout_s
    while True:
        gc.collect()
        counts = (fd_count(), threading.active_count())
        within = counts[0] <= baseline[0] + FD_SLACK and counts[1] <= baseline[1] + THREAD_SLACK
        if within or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def cpu_seconds_over(wall_s: float) -> float:
    """CPU time this whole process uses while the test sleeps ``wall_s``."""
    start = time.process_time()
    time.sleep(wall_s)
    return time.process_time() - start


def healthy_count(devices: tuple[AdvertisedDevice, ...]) -> int:
    """How many devices of a list are Healthy."""
    return sum(device.health == "Healthy" for device in devices)


def with_plugin(config: Config, **changes: Any) -> Config:
    """``config`` with some plugin settings changed."""
    return replace(config, plugin=replace(config.plugin, **changes))


# -- 1. kubelet restarts ---------------------------------------------------------------------------


RESTARTS = 50
#: Every BACK_TO_BACK_EVERY-th restart is followed by the next one at once, while the
#: agent's registration with the previous kubelet is in flight.
BACK_TO_BACK_EVERY = 5


@pytest.mark.slow
def test_fifty_kubelet_restarts_no_leaks(
    short_tmp_dir: str, run_agent: Callable[..., AgentRun]
) -> None:
    """50 kubelet restarts, some back to back: re-registered after each, the same answers
    to Allocate, and no file descriptors or threads left behind."""
    # Production timeouts: 5 s for Register, 5 s for the kubelet to dial us back. A restart
    # during a registration must not cost them: the agent abandons that registration.
    config = make_config(short_tmp_dir)
    assert config.plugin.register_timeout_s == 5.0
    run = run_agent(config)
    run.standin.wait_for_registration(1, WAIT_S)
    devices = run.devices(lambda devs: len(devs) == 8)
    held = [devices[0].device_id]
    before_answer = run.standin.allocate(RESOURCE, held).container_responses[0]
    time.sleep(0.5)
    baseline = settled_counts((fd_count(), threading.active_count()), timeout_s=0)

    back_to_back = 0
    slowest_after_back_to_back_s = 0.0
    for restart in range(1, RESTARTS + 1):
        run.standin.restart()
        restarted = time.monotonic()
        if restart % BACK_TO_BACK_EVERY == 0 and restart < RESTARTS:
            back_to_back += 1
            continue  # the next restart hits the registration this one started
        expected = len(run.standin.registrations) + 1
        run.standin.wait_for_registration(expected, WAIT_S)
        if restart % BACK_TO_BACK_EVERY == 1 and restart > 1:
            waited_s = time.monotonic() - restarted
            slowest_after_back_to_back_s = max(slowest_after_back_to_back_s, waited_s)
    # An abandoned registration costs nothing like the 5 s Register timeout.
    assert slowest_after_back_to_back_s < config.plugin.register_timeout_s
    run.devices(lambda devs: len(devs) == 8 and healthy_count(devs) == 8)
    wait_until(lambda: run.standin.stream_open(RESOURCE), what="the ListAndWatch stream")

    registrations = len(run.standin.registrations)
    assert registrations >= RESTARTS - back_to_back + 1
    wait_until(lambda: run.agent.registered, what="the agent to count itself registered")
    # The kubelet may have accepted a registration the agent abandoned when the next
    # restart came: never fewer on the kubelet's side.
    assert run.agent.registrations <= len(run.standin.registrations)
    after_answer = run.standin.allocate(RESOURCE, held).container_responses[0]
    assert after_answer == before_answer
    # No socket files left behind either (stale sockets, sockets moved aside while stopping).
    assert sorted(os.listdir(config.plugin.plugin_dir)) == [
        "kubelet.sock",
        "kubelet_internal_checkpoint",
        "vgpu.sock",
    ]
    after = settled_counts(baseline)
    print(
        f"\nkubelet restarts: {RESTARTS} ({back_to_back} back to back), "
        f"{registrations} registrations, slowest after a back-to-back restart "
        f"{slowest_after_back_to_back_s:.2f} s; fds {baseline[0]} -> {after[0]}, "
        f"threads {baseline[1]} -> {after[1]}"
    )
    assert after[0] <= baseline[0] + FD_SLACK, f"fds leaked: {baseline[0]} -> {after[0]}"
    assert after[1] <= baseline[1] + THREAD_SLACK, f"threads leaked: {baseline[1]} -> {after[1]}"
    assert run.thread.is_alive()


# -- 2. kubelet slow or broken --------------------------------------------------------------------


# The generated gRPC module has no type stubs.
add_registration_servicer = cast(
    Callable[[Any, Any], None], pb_grpc.add_RegistrationServicer_to_server
)


class ScriptedKubelet:
    """A Registration server on kubelet.sock that hangs or refuses every Register, and
    counts the calls (the real kubelet's misbehaviour, on demand)."""

    def __init__(self, socket_path: str, behaviour: str, hang_s: float = 30.0) -> None:
        self.socket_path = socket_path
        self.behaviour = behaviour
        self.calls = 0
        self._hang_s = hang_s
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._server: Any = None

    def Register(self, request: pb.RegisterRequest, context: Any) -> pb.Empty:  # noqa: N802 - gRPC name
        with self._lock:
            self.calls += 1
        if self.behaviour == "hang":
            self._release.wait(self._hang_s)
            return pb.Empty()
        context.abort(grpc.StatusCode.UNKNOWN, "the kubelet is not ready to accept plugins")
        raise AssertionError("abort returns never")  # pragma: no cover

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.socket_path), exist_ok=True)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        add_registration_servicer(self, server)
        assert server.add_insecure_port(unix_target(self.socket_path)) != 0
        server.start()
        self._server = server

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.stop(0).wait()
            self._server = None
        if os.path.lexists(self.socket_path):
            os.unlink(self.socket_path)


#: Four attempts with backoff 0.5, 1, 2 s between them take at least 3.5 s; a loop that
#: does not back off makes them within a few hundred milliseconds.
ATTEMPTS = 4
MIN_S_FOR_ATTEMPTS = 3.0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("behaviour", "status_words"),
    [("hang", "timed out after 0.3 s"), ("refuse", "the kubelet refused")],
    ids=["register-hangs", "register-refused"],
)
def test_broken_register_backs_off_then_registers(
    short_tmp_dir: str, run_agent: Callable[..., AgentRun], behaviour: str, status_words: str
) -> None:
    """A kubelet whose Register hangs or refuses: bounded timeouts, retries with backoff
    (few calls, little CPU), a STATUS naming the problem, never a crash; a new kubelet
    is registered with at once, whatever backoff the broken one earned."""
    config = with_plugin(make_config(short_tmp_dir), register_timeout_s=0.3)
    kubelet_path = os.path.join(config.plugin.plugin_dir, "kubelet.sock")
    scripted = ScriptedKubelet(kubelet_path, behaviour)
    scripted.start()
    try:
        started = time.monotonic()
        cpu_started = time.process_time()
        run = run_agent(config, kubelet=False)
        status = run.status_seen(status_words)
        assert f"waiting for registration (registering {RESOURCE}" in status
        assert "retrying in" in status
        wait_until(lambda: scripted.calls >= ATTEMPTS, what=f"{ATTEMPTS} Register calls")
        elapsed_s = time.monotonic() - started
        cpu_s = time.process_time() - cpu_started
        assert elapsed_s >= MIN_S_FOR_ATTEMPTS, f"{ATTEMPTS} calls in {elapsed_s:.2f} s"
        assert cpu_s < elapsed_s * MAX_IDLE_CPU_SHARE, f"{cpu_s:.2f} s CPU in {elapsed_s:.1f} s"
        assert run.thread.is_alive()
        assert not run.agent.registered
    finally:
        scripted.stop()
    print(
        f"\n{behaviour}: {scripted.calls} Register calls in {elapsed_s:.1f} s, "
        f"{cpu_s:.2f} s CPU for the whole process"
    )
    fine = time.monotonic()
    run.standin.start()  # the kubelet is fine again: a new kubelet.sock
    run.standin.wait_for_registration(1, WAIT_S)
    # The next backoff step is 4 s or more by now; a new kubelet must not wait for it.
    assert time.monotonic() - fine < 2.0
    run.status_seen("registered with kubelet")
    run.devices(lambda devs: len(devs) == 8)


def test_register_in_flight_abandoned_on_demand(short_tmp_dir: str) -> None:
    """A Register call in flight is cancelled as soon as ``abandon`` says so (the kubelet
    restarted again), instead of waiting out its timeout."""
    scripted = ScriptedKubelet(os.path.join(short_tmp_dir, "kubelet.sock"), "hang")
    scripted.start()
    give_up = threading.Event()
    try:
        threading.Timer(0.3, give_up.set).start()
        started = time.monotonic()
        with pytest.raises(RegistrationError, match="abandoned"):
            kubelet.register(
                short_tmp_dir, "kubelet.sock", "vgpu.sock", RESOURCE, 30.0, abandon=give_up.is_set
            )
        assert time.monotonic() - started < PROMPT_S
        assert scripted.calls == 1
    finally:
        scripted.stop()


def _bound_not_listening(path: str) -> Optional[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    return sock  # kept open: bound, but never listening


def _stale_socket_file(path: str) -> Optional[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()  # the file stays: a kubelet that died without cleaning up
    return None


@pytest.mark.parametrize(
    "make_dead_socket",
    [_bound_not_listening, _stale_socket_file],
    ids=["bound-not-listening", "stale-socket-file"],
)
def test_kubelet_socket_nobody_listens(
    short_tmp_dir: str,
    run_agent: Callable[..., AgentRun],
    make_dead_socket: Callable[[str], Optional[socket.socket]],
) -> None:
    """kubelet.sock exists but nothing answers: the agent says so, backs off, never
    crashes, and registers when a kubelet listens there."""
    config = make_config(short_tmp_dir)
    os.makedirs(config.plugin.plugin_dir)
    kubelet_path = os.path.join(config.plugin.plugin_dir, "kubelet.sock")
    held = make_dead_socket(kubelet_path)
    try:
        run = run_agent(config, kubelet=False)
        run.status_seen("nobody answers on the socket")
        cpu_s = cpu_seconds_over(1.0)
        assert cpu_s < MAX_IDLE_CPU_SHARE, f"{cpu_s:.2f} s of CPU in 1 s"
        assert run.thread.is_alive()
        run.standin.start()  # replaces the dead socket file
        run.standin.wait_for_registration(1, WAIT_S)
        run.status_seen("registered with kubelet")
    finally:
        if held is not None:
            held.close()


def test_plugin_dir_disappears_and_returns(
    short_tmp_dir: str, run_agent: Callable[..., AgentRun]
) -> None:
    """The whole plugin directory goes away and comes back: the agent waits for the
    kubelet (STATUS says so) without spinning, then serves and registers again."""
    run = run_agent()
    run.standin.wait_for_registration(1, WAIT_S)
    plugin_dir = run.agent.config.plugin.plugin_dir
    run.standin.stop()
    shutil.rmtree(plugin_dir)
    run.status_seen("waiting for kubelet")
    cpu_s = cpu_seconds_over(1.0)
    assert cpu_s < MAX_IDLE_CPU_SHARE, f"{cpu_s:.2f} s of CPU in 1 s"
    assert run.thread.is_alive()
    run.standin.start()  # recreates the directory and kubelet.sock
    run.standin.wait_for_registration(2, WAIT_S)
    run.devices(lambda devs: len(devs) == 8)
    assert os.path.exists(os.path.join(plugin_dir, "vgpu.sock"))


def test_second_agent_never_takes_over(
    short_tmp_dir: str, run_agent: Callable[..., AgentRun]
) -> None:
    """A second agent started by mistake on the same node neither takes the first one's
    socket nor its control socket; it waits, saying why, and the first keeps serving."""
    first = run_agent()
    first.standin.wait_for_registration(1, WAIT_S)
    first.devices(lambda devs: len(devs) == 8)
    second = run_agent(make_config(short_tmp_dir), kubelet=False)
    second.status_seen("another process is serving on that socket")
    # Its second attempt (after the first backoff) is refused the same way.
    second.status_seen("retrying in 1.0 s")
    assert len(first.standin.registrations) == 1
    assert first.standin.stream_open(RESOURCE)
    answer = control.request(
        f"{short_tmp_dir}/state/control.sock", parse_command({"command": "status"})
    )
    assert answer["registrations"] == 1  # the first agent answers, not the second
    assert second.stop() == EXIT_OK
    assert first.standin.stream_open(RESOURCE)
    ids = [device.device_id for device in first.standin.latest_devices(RESOURCE) or ()][:1]
    assert first.standin.allocate(RESOURCE, ids).container_responses


# -- 3. agent killed with SIGKILL ---------------------------------------------------------------


def _daemon_pids(mps: MpsConfig) -> dict[str, int]:
    """GPU UUID -> pid of the MPS daemon serving its pipe directory (from its pid file)."""
    pids = {}
    for pid_file in Path(mps.pipe_root).glob("*/nvidia-cuda-mps-control.pid"):
        pids[pid_file.parent.name] = int(pid_file.read_text())
    return pids


def _alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z")


def _kill_daemons(mps: MpsConfig, extra: tuple[int, ...] = ()) -> None:
    """Kill every stand-in MPS daemon of the test (they outlive agents on purpose)."""
    for pid in {*_daemon_pids(mps).values(), *extra}:
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


#: The agent as a separate process with the direct MPS manager (the CLI's `run` picks the
#: simulated MPS daemons for simulated GPUs); SIGTERM stops it like `vgpu-agent run`.
DIRECT_MPS_AGENT = """
import os, signal, sys
from vgpu_agent.runtime.compose import build_agent
from vgpu_agent.config.parse import load
from vgpu_agent.host.log import setup_logging
from vgpu_agent.mps.daemons import DirectMpsDaemons
from vgpu_agent.host.systemd import Notifier
config = load(sys.argv[1])
setup_logging("info", os.environ)
agent = build_agent(config, notifier=Notifier.from_environ(os.environ),
                    make_mps=lambda c: DirectMpsDaemons(c.mps))
signal.signal(signal.SIGTERM, lambda *_: agent.request_stop("SIGTERM"))
sys.exit(agent.run())
"""


def _config_text(root: str, mps: Optional[MpsConfig] = None) -> str:
    text = (
        f'[agent]\nstate_dir = "{root}/state"\n'
        f'[plugin]\nplugin_dir = "{root}/dp"\n'
        '[gpus]\nbackend = "simulated"\nreplicas_per_gpu = 3\n'
        "[health]\nmps_check_interval_s = 0.1\npoll_interval_s = 0.2\n"
        "[simulated]\ncount = 2\n"
    )
    if mps is None:
        return text + f'[mps]\npipe_root = "{root}/mps"\nlog_root = "{root}/mpslog"\n'
    return text + (
        f'[mps]\nmanager = "direct"\npipe_root = "{mps.pipe_root}"\n'
        f'log_root = "{mps.log_root}"\ncontrol_binary = "{mps.control_binary}"\n'
        f"control_timeout_s = {mps.control_timeout_s}\n"
    )


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            argv,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": ""},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def _end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def test_sigkill_cli_agent_restarts_cleanly(short_tmp_dir: str) -> None:
    """`vgpu-agent run` killed with SIGKILL: its socket is left behind; the next start
    removes it, registers again, the kubelet's view recovers, and `status` answers."""
    root = short_tmp_dir
    config_path = Path(root) / "config.toml"
    config_path.write_text(_config_text(root))
    log_path = Path(root) / "agent.log"
    argv = [sys.executable, "-m", "vgpu_agent", "--config", str(config_path), "run"]
    plugin_socket = f"{root}/dp/vgpu.sock"
    standin = KubeletStandin(f"{root}/dp")
    standin.start()
    first = _spawn(argv, log_path)
    second: Optional[subprocess.Popen[bytes]] = None
    try:
        standin.wait_for_devices(lambda devs: healthy_count(devs) == 6, WAIT_S, RESOURCE)
        first.send_signal(signal.SIGKILL)
        first.wait(WAIT_S)
        assert os.path.exists(plugin_socket), "SIGKILL leaves the socket behind"
        wait_until(lambda: not standin.stream_open(RESOURCE), what="the stream to end")
        second = _spawn(argv, log_path)
        standin.wait_for_registration(2, WAIT_S)
        standin.wait_for_devices(lambda devs: healthy_count(devs) == 6, WAIT_S, RESOURCE)
        answer = control.request(f"{root}/state/control.sock", parse_command({"command": "status"}))
        assert answer["ok"]
        assert answer["registered"]
        second.send_signal(signal.SIGTERM)
        assert second.wait(WAIT_S) == EXIT_OK
    finally:
        _end(first)
        if second is not None:
            _end(second)
        standin.stop()
    output = log_path.read_text()
    assert "removing stale socket" in output
    assert "Traceback" not in output
    assert not os.path.exists(plugin_socket)


def test_sigkill_leaves_mps_daemons_untouched(short_tmp_dir: str) -> None:
    """An agent process (direct MPS manager) killed with SIGKILL: its MPS daemons keep
    running with the same pids and state; the next agent reuses them and serves again."""
    root = short_tmp_dir
    mps = standin_mps_config(Path(root), control_timeout_s=1.0)
    config_path = Path(root) / "config.toml"
    config_path.write_text(_config_text(root, mps))
    log_path = Path(root) / "agent.log"
    argv = [sys.executable, "-c", DIRECT_MPS_AGENT, str(config_path)]
    standin = KubeletStandin(f"{root}/dp")
    standin.start()
    first = _spawn(argv, log_path)
    second: Optional[subprocess.Popen[bytes]] = None
    try:
        standin.wait_for_devices(lambda devs: healthy_count(devs) == 6, WAIT_S, RESOURCE)
        pids = _daemon_pids(mps)
        assert len(pids) == 2
        some_gpu = sorted(pids)[0]
        pipe_dir = f"{mps.pipe_root}/{some_gpu}"
        # State a running job would depend on: it must survive the agent's death. (Device
        # 1's default, which the agent never sets: device 0's is its enforced ceiling.)
        control_command(mps, pipe_dir, "set_default_device_pinned_mem_limit 1 3700M")

        first.send_signal(signal.SIGKILL)
        first.wait(WAIT_S)
        assert _daemon_pids(mps) == pids
        assert all(_alive(pid) for pid in pids.values())
        assert control_command(mps, pipe_dir, "get_default_device_pinned_mem_limit 1") == "3G"

        second = _spawn(argv, log_path)
        standin.wait_for_registration(2, WAIT_S)
        standin.wait_for_devices(lambda devs: healthy_count(devs) == 6, WAIT_S, RESOURCE)
        assert _daemon_pids(mps) == pids
        assert control_command(mps, pipe_dir, "get_default_device_pinned_mem_limit 1") == "3G"
        second.send_signal(signal.SIGTERM)
        assert second.wait(WAIT_S) == EXIT_OK
        assert all(_alive(pid) for pid in pids.values()), "stopping the agent kept the daemons"
    finally:
        _end(first)
        if second is not None:
            _end(second)
        standin.stop()
        _kill_daemons(mps)
    output = log_path.read_text()
    assert output.count("reusing the MPS daemon") == 2
    assert "removing stale socket" in output
    assert "Traceback" not in output


# -- 4. MPS daemon faults -------------------------------------------------------------------------


@dataclass
class BrokenDaemon:
    """The daemon a test breaks, and the managers it starts to bring it back."""

    mps: MpsConfig
    gpu_uuid: str
    pid: int
    managers: list[DirectMpsDaemons]


@dataclass
class MpsFault:
    """How a test breaks a GPU's MPS daemon and how it brings it back (as systemd would)."""

    name: str
    reason_words: str
    inflict: Callable[[BrokenDaemon], None]
    repair: Callable[[BrokenDaemon], None]


def _restart_daemon(broken: BrokenDaemon) -> None:
    """Bring a daemon back the way an operator without systemd would (`mps start`)."""
    gpus = gpus_from_config(make_config("/unused").simulated)
    gpu = next(gpu for gpu in gpus if gpu.uuid == broken.gpu_uuid)
    broken.managers.append(DirectMpsDaemons(broken.mps))
    broken.managers[-1].start(gpu)


def _kill(broken: BrokenDaemon) -> None:
    os.kill(broken.pid, signal.SIGKILL)


def _stop(broken: BrokenDaemon) -> None:
    os.kill(broken.pid, signal.SIGSTOP)


def _cont(broken: BrokenDaemon) -> None:
    os.kill(broken.pid, signal.SIGCONT)


def _delete_pipe_dir(broken: BrokenDaemon) -> None:
    shutil.rmtree(os.path.join(broken.mps.pipe_root, broken.gpu_uuid))


def _replace_daemon(broken: BrokenDaemon) -> None:
    os.kill(broken.pid, signal.SIGKILL)
    _restart_daemon(broken)


MPS_FAULTS = [
    MpsFault("killed", "MPS daemon", _kill, _restart_daemon),
    MpsFault("hung-sigstop", "stopped", _stop, _cont),
    MpsFault("pipe-dir-deleted", "missing", _delete_pipe_dir, _replace_daemon),
]


@pytest.mark.parametrize("fault", MPS_FAULTS, ids=[fault.name for fault in MPS_FAULTS])
def test_mps_daemon_fault_marks_gpu_then_heals(
    short_tmp_dir: str, run_agent: Callable[..., AgentRun], fault: MpsFault
) -> None:
    """A killed, stopped, or pipe-dir-less MPS daemon makes only its GPU's vGPUs
    Unhealthy, promptly; when the daemon is back they are Healthy again."""
    mps = standin_mps_config(Path(short_tmp_dir), control_timeout_s=1.0)
    config = replace(
        make_config(short_tmp_dir),
        mps=mps,
        health=HealthConfig(
            recovery_quiet_period_s=0.5, poll_interval_s=0.2, mps_check_interval_s=0.1
        ),
    )
    managers: list[DirectMpsDaemons] = []

    def direct(config: Config) -> DirectMpsDaemons:
        managers.append(DirectMpsDaemons(config.mps))
        return managers[-1]

    run = run_agent(config, make_mps=direct)
    broken: Optional[BrokenDaemon] = None
    try:
        run.devices(lambda devs: len(devs) == 8 and healthy_count(devs) == 8)
        gpu_uuid = run.agent.describe()["gpus"][1]["uuid"]
        broken = BrokenDaemon(mps, gpu_uuid, _daemon_pids(mps)[gpu_uuid], managers)
        fault.inflict(broken)
        broken_at = time.monotonic()
        devices = run.devices(lambda devs: healthy_count(devs) == 4)
        assert time.monotonic() - broken_at < PROMPT_S
        unhealthy_gpus = {d.device_id.split("::")[0] for d in devices if d.health == "Unhealthy"}
        assert unhealthy_gpus == {gpu_uuid}

        def reasons() -> list[str]:
            found: list[str] = run.agent.describe()["gpus"][1]["reasons"]
            return found

        def settled() -> bool:
            found = reasons()
            return len(found) == 1 and fault.reason_words in found[0]

        # The first probe after the fault may see it another way (a command that fails
        # before the cheap check sees the cause); the reason settles on the cause, the new
        # one raised before the old one is withdrawn.
        wait_until(settled, what=f"one reason naming {fault.reason_words!r}")
        run.status_seen("4 unhealthy (GPU 1: MPS daemon")
        fault.repair(broken)
        run.devices(lambda devs: healthy_count(devs) == 8)
        assert run.thread.is_alive()
    finally:
        run.stop()
        _kill_daemons(mps, (broken.pid,) if broken is not None else ())
        for manager in managers:
            manager.stop_all()  # reaps the killed daemons, closes their logs


# -- 5. NVML faults ------------------------------------------------------------------------------


def test_driver_missing_at_boot_waits(run_agent: Callable[..., AgentRun]) -> None:
    """NVML fails at boot a few times: STATUS says it waits for the driver, the agent
    answers control requests truthfully (status: waiting for the driver; health reset:
    nothing served yet) and does not exit; it serves once NVML works."""
    driver_loaded = threading.Event()
    attempts: list[float] = []

    def booting(config: Config) -> GpuBackend:
        attempts.append(time.monotonic())
        if not driver_loaded.is_set():
            raise GpuError("initialising NVML: Driver Not Loaded (is the NVIDIA driver loaded?)")
        return open_backend_for(config)

    # Shorter retries than production (1 s doubling to 30 s) keep the test quick.
    run = run_agent(open_backend=booting, backend_retry_initial_s=0.05, backend_retry_max_s=0.2)
    status = run.status_seen("waiting for the GPU driver")
    assert "Driver Not Loaded" in status
    wait_until(lambda: len(attempts) >= 4, what="four attempts to open NVML")
    answer = run.agent.submit(parse_command({"command": "status"}))
    assert answer["ok"] is True
    assert answer["status"].startswith("waiting for the GPU driver: initialising NVML: Driver")
    assert answer["gpus"] == []
    reset = run.agent.submit(parse_command({"command": "health-reset", "gpu": "0"}))
    assert reset["ok"] is False
    assert reset["error"].startswith("no GPU is served yet: waiting for the GPU driver")
    cpu_s = cpu_seconds_over(1.0)
    assert cpu_s < MAX_IDLE_CPU_SHARE, f"{cpu_s:.2f} s of CPU in 1 s while waiting"
    assert run.thread.is_alive()
    assert not run.exit_code
    driver_loaded.set()
    run.standin.wait_for_registration(1, WAIT_S)
    run.devices(lambda devs: healthy_count(devs) == 8)
    run.notify.wait_for(lambda m: "READY=1" in m)


def test_ready_and_prompt_reload_while_waiting_for_driver(
    short_tmp_dir: str, run_agent: Callable[..., AgentRun]
) -> None:
    """Without the driver the agent tells systemd READY=1 with the waiting STATUS (so
    systemctl start returns instead of timing out into a restart loop), answers a reload
    with RELOADING=1 and READY=1 without waiting for the driver, and serves the reloaded
    config once the driver is there."""
    driver_loaded = threading.Event()

    def booting(config: Config) -> GpuBackend:
        if not driver_loaded.is_set():
            raise GpuError("initialising NVML: Driver Not Loaded")
        return open_backend_for(config)

    first = make_config(short_tmp_dir)
    reloaded = replace(first, gpus=replace(first.gpus, replicas_per_gpu=3))
    loads: list[Config] = []

    def load() -> Config:
        loads.append(reloaded)
        return reloaded

    run = run_agent(
        first,
        open_backend=booting,
        config_loader=load,
        backend_retry_initial_s=60.0,
        backend_retry_max_s=60.0,
    )
    ready = run.notify.wait_for(lambda m: "READY=1" in m)
    assert "STATUS=waiting for the GPU driver: initialising NVML: Driver Not Loaded" in ready
    run.agent.request_reload()
    run.notify.wait_for(lambda m: "RELOADING=1" in m)
    run.notify.wait_for_count(lambda m: "READY=1" in m, 2)
    assert loads == [reloaded]
    assert run.thread.is_alive()
    driver_loaded.set()
    run.agent.request_reload()  # ends the 60 s pause: the next try opens the backend
    run.standin.wait_for_registration(1, WAIT_S)
    run.devices(lambda devs: len(devs) == 2 * 3)


def test_stop_while_waiting_for_driver(run_agent: Callable[..., AgentRun]) -> None:
    """A stop request while NVML keeps failing ends the agent with exit 0 at once."""

    def never(config: Config) -> GpuBackend:
        raise GpuError("initialising NVML: Driver Not Loaded")

    run = run_agent(open_backend=never)
    run.status_seen("waiting for the GPU driver")
    stopped = time.monotonic()
    assert run.stop() == EXIT_OK
    assert time.monotonic() - stopped < PROMPT_S


def test_nvml_calls_fail_mid_run(short_tmp_dir: str, run_agent: Callable[..., AgentRun]) -> None:
    """Every NVML call failing for a while: the agent keeps serving Allocate and status,
    the watchers survive, and after it passes an XID and a lost GPU are still seen."""
    config = replace(
        make_config(short_tmp_dir),
        health=HealthConfig(
            recovery_quiet_period_s=0, poll_interval_s=0.05, mps_check_interval_s=0.05
        ),
    )
    backend = SimulatedBackend(gpus_from_config(config.simulated))
    gpus = backend.list_gpus()
    backend.set_unwatchable(gpus[1].uuid)  # GPU 1 is polled: the poll loop meets failures too
    run = run_agent(config, open_backend=lambda _config: backend)
    devices = run.devices(lambda devs: healthy_count(devs) == 8)
    backend.fail_calls("NVML_ERROR_UNKNOWN (simulated)")
    failed_before = backend.failed_calls
    # Several event waits and polls fail meanwhile.
    wait_until(lambda: backend.failed_calls >= failed_before + 6, what="failing NVML calls")
    assert run.thread.is_alive()
    response = run.standin.allocate(RESOURCE, [devices[0].device_id])
    assert response.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == gpus[0].uuid
    assert run.agent.submit(parse_command({"command": "status"}))["ok"]
    names = {thread.name for thread in threading.enumerate()}
    assert {"vgpu-health-events", "vgpu-health-poll"} <= names
    assert healthy_count(run.standin.latest_devices(RESOURCE) or ()) == 8
    backend.fail_calls(None)
    backend.inject_xid(gpus[0].uuid, 79)
    run.devices(lambda devs: healthy_count(devs) == 4)
    backend.lose(gpus[1].uuid)
    run.devices(lambda devs: healthy_count(devs) == 0)


def test_gpu_disappears_and_returns(run_agent: Callable[..., AgentRun]) -> None:
    """A lost GPU: its vGPUs go Unhealthy and Allocate refuses them with the reason, the
    other GPU keeps serving; when NVML sees it again it serves again."""
    run = run_agent()
    devices = run.devices(lambda devs: healthy_count(devs) == 8)
    by_gpu: dict[str, list[str]] = {}
    for device in devices:
        by_gpu.setdefault(device.device_id.split("::")[0], []).append(device.device_id)
    first_gpu, lost_gpu = sorted(by_gpu, key=lambda uuid: by_gpu[uuid][0])
    gpu_refs = {g["uuid"]: str(g["index"]) for g in run.agent.describe()["gpus"]}
    run.agent.submit(
        parse_command({"command": "simulate", "action": "lose", "gpu": gpu_refs[lost_gpu]})
    )
    run.devices(lambda devs: healthy_count(devs) == 4)
    with pytest.raises(grpc.RpcError) as refused:
        run.standin.allocate(RESOURCE, by_gpu[lost_gpu][:1])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "GPU lost" in refused.value.details()
    assert run.standin.allocate(RESOURCE, by_gpu[first_gpu][:1]).container_responses
    run.agent.submit(
        parse_command({"command": "simulate", "action": "recover", "gpu": gpu_refs[lost_gpu]})
    )
    run.devices(lambda devs: healthy_count(devs) == 8)
    assert run.standin.allocate(RESOURCE, by_gpu[lost_gpu][:1]).container_responses


# -- 6. reload under load -------------------------------------------------------------------------


class AllocateLoad:
    """Threads calling Allocate through the kubelet stand-in until stopped; records what
    each call got. Ids are drawn from ``ids`` (some may not exist at times)."""

    def __init__(self, standin: KubeletStandin, ids: list[str], threads: int = 4) -> None:
        self._standin = standin
        self._ids = ids
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.ok: list[str] = []
        self.refused: list[tuple[str, Any, str]] = []
        self.failed: list[str] = []
        self._threads = [
            threading.Thread(target=self._work, args=(seed,), daemon=True)
            for seed in range(threads)
        ]

    def __enter__(self) -> AllocateLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(WAIT_S)

    def _work(self, seed: int) -> None:
        chooser = random.Random(seed)  # noqa: S311 - not for security
        while not self._stop.is_set():
            vgpu_id = chooser.choice(self._ids)
            try:
                self._standin.allocate(RESOURCE, [vgpu_id], timeout_s=WAIT_S)
            except grpc.RpcError as exc:
                with self._lock:
                    self.refused.append((vgpu_id, exc.code(), exc.details() or ""))
            except Exception as exc:  # recorded and asserted on: any other error fails
                with self._lock:
                    self.failed.append(f"{vgpu_id}: {type(exc).__name__}: {exc}")
            else:
                with self._lock:
                    self.ok.append(vgpu_id)


def _latest(loaders: list[Callable[[], Config]]) -> Callable[[], Config]:
    """A config loader that loads with whatever loader the test appended last."""

    def load() -> Config:
        return loaders[-1]()

    return load


def _count_is(count: int) -> Callable[[tuple[AdvertisedDevice, ...]], bool]:
    return lambda devices: len(devices) == count


def test_reload_under_allocate_load(short_tmp_dir: str, run_agent: Callable[..., AgentRun]) -> None:
    """Reloads that grow and shrink the vGPU count while 4 threads call Allocate: each new
    list is advertised, calls never fail except for ids a shrink removed, ids that stay
    keep their answers, and a bad config in between changes nothing."""
    base = make_config(short_tmp_dir)
    loaders: list[Callable[[], Config]] = []
    run = run_agent(base, config_loader=_latest(loaders))
    devices = run.devices(lambda devs: len(devs) == 8)
    gpu_uuids = sorted({device.device_id.split("::")[0] for device in devices})
    every_id = [f"{uuid}::{replica}" for uuid in gpu_uuids for replica in range(6)]
    kept = [f"{gpu_uuids[0]}::0", f"{gpu_uuids[0]}::1"]  # present at every count below
    held_answer = run.standin.allocate(RESOURCE, kept[:1]).container_responses[0]

    def replicas(count: int) -> Callable[[], Config]:
        return lambda: replace(base, gpus=replace(base.gpus, replicas_per_gpu=count))

    def invalid() -> Config:
        return parse("[gpus]\nreplicas_per_gpu = 0\n", "bad.toml")

    with AllocateLoad(run.standin, every_id) as load:
        for reloads, count in enumerate((6, 2, 5, None, 3, 4), start=2):
            loaders.append(replicas(count) if count is not None else invalid)
            run.agent.request_reload()
            if count is None:
                # Every reload, refused or not, ends with READY=1 (the first one: the start).
                run.notify.wait_for_count(lambda m: m.startswith("READY=1"), reloads)
                assert run.agent.config.gpus.replicas_per_gpu == 5  # the last good one
                continue
            run.devices(_count_is(2 * count))
            time.sleep(0.2)  # let Allocate calls run against this list

    assert not load.failed, load.failed[:3]
    assert len(load.ok) > 20
    assert load.ok.count(kept[0]) > 0
    unexpected = [
        (vgpu_id, code, details)
        for vgpu_id, code, details in load.refused
        if code != grpc.StatusCode.INVALID_ARGUMENT
        or "unknown vGPU id" not in details
        or int(vgpu_id.rsplit("::", 1)[1]) < 2
    ]
    assert not unexpected, unexpected[:3]
    print(
        f"\nreload under load: {len(load.ok)} Allocates ok, "
        f"{len(load.refused)} refused (ids a shrink removed)"
    )
    assert run.agent.config.gpus.replicas_per_gpu == 4
    run.devices(lambda devs: len(devs) == 8 and healthy_count(devs) == 8)
    # Same count of vGPUs as when it was first allocated: the same answer.
    assert run.standin.allocate(RESOURCE, kept[:1]).container_responses[0] == held_answer


def test_reload_keeps_health_and_allocations(
    short_tmp_dir: str, run_agent: Callable[..., AgentRun]
) -> None:
    """A reload keeps each GPU's unhealthy reasons and every id that still exists."""
    base = make_config(short_tmp_dir)
    loaders: list[Callable[[], Config]] = []
    run = run_agent(base, config_loader=_latest(loaders))
    devices = run.devices(lambda devs: len(devs) == 8)
    run.agent.submit(parse_command({"command": "simulate", "action": "mps-down", "gpu": "1"}))
    run.devices(lambda devs: healthy_count(devs) == 4)
    loaders.append(lambda: replace(base, gpus=replace(base.gpus, replicas_per_gpu=6)))
    run.agent.request_reload()
    grown = run.devices(lambda devs: len(devs) == 12)
    assert healthy_count(grown) == 6
    assert {d.device_id for d in devices} <= {d.device_id for d in grown}
    assert run.agent.describe()["gpus"][1]["reasons"] == ["MPS daemon down (simulated)"]


@pytest.mark.parametrize(
    "bad_config",
    [
        lambda base: parse("[gpus]\nreplicas_per_gpu = 0\n", "bad.toml"),
        lambda base: replace(base, gpus=replace(base.gpus, serve=("GPU-not-on-this-node",))),
    ],
    ids=["invalid-file", "serves-no-gpu"],
)
def test_bad_reload_keeps_old_config(
    short_tmp_dir: str,
    run_agent: Callable[..., AgentRun],
    bad_config: Callable[[Config], Config],
) -> None:
    """A reload to a config that is invalid, or that would serve no GPU at all, keeps the
    running config and its device list, as at start such a config is refused."""
    base = make_config(short_tmp_dir)
    run = run_agent(base, config_loader=lambda: bad_config(base))
    run.devices(lambda devs: len(devs) == 8)
    run.agent.request_reload()
    # The refused reload ends with READY=1 like the start.
    run.notify.wait_for_count(lambda m: m.startswith("READY=1"), 2)
    assert run.agent.config == base
    assert run.agent.node.inventory().vgpu_count == 8
    assert len(run.standin.latest_devices(RESOURCE) or ()) == 8
    ids = [d.device_id for d in run.standin.latest_devices(RESOURCE) or ()][:1]
    assert run.standin.allocate(RESOURCE, ids).container_responses


def test_config_errors_are_config_errors() -> None:
    """The invalid reload above really is our ConfigError (what the agent catches)."""
    with pytest.raises(ConfigError):
        parse("[gpus]\nreplicas_per_gpu = 0\n", "bad.toml")
