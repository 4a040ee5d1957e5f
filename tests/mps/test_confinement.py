"""Confinement a pod cannot talk its way out of (docs/security.md), without a GPU.

The agent runs on a simulated GPU with the stand-in MPS control program
(tests/fakes/fake_mps_control.py) as its daemon: the stand-in records every control
command it receives and answers the get commands, so these tests see the ceiling set at
start, after a daemon restart and after a reload, and the GPU marked Unhealthy while the
ceiling is gone. The pipe directory lockdown is checked as an unprivileged uid through a
read-only bind mount in a new mount namespace.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Callable, Optional

import pytest
from click.testing import CliRunner

from tests.builders import standin_mps_config
from vgpu_agent.agent.loop import Agent
from vgpu_agent.config.render import to_toml
from vgpu_agent.config.schema import (
    AgentConfig,
    Config,
    GpusConfig,
    HealthConfig,
    MpsConfig,
    PluginConfig,
    SimulatedConfig,
)
from vgpu_agent.frontends.deviceplugin.server import AdvertisedDevice
from vgpu_agent.host.systemd import Notifier
from vgpu_agent.model.daemons import QuickCheck
from vgpu_agent.model.devices import Ceiling
from vgpu_agent.model.gpu import Gpu
from vgpu_agent.mps.ceilings import ceiling_gaps, parse_memory_answer
from vgpu_agent.mps.control import control_command, wait_until_answers
from vgpu_agent.mps.daemons import DirectMpsDaemons
from vgpu_agent.mps.directories import daemon_pid, restrict_pipe_dir
from vgpu_agent.mps.liveness import LivenessProber
from vgpu_agent.ops.cli.root import cli
from vgpu_agent.runtime.compose import build_agent
from vgpu_agent.standins.kubelet import KubeletStandin
from vgpu_agent.standins.simulated import gpus_from_config

RESOURCE = "eks.amazonaws.com/vgpu"
WAIT_S = 15.0
#: One H100 80 GB split 8 ways: 12.5% of the SMs and 81559 // 8 MiB per vGPU.
MEMORY_MIB = 81559
REPLICAS = 8
SLICE_MIB = MEMORY_MIB // REPLICAS
#: How the daemon prints that slice: whole GiB, rounded down (driver 580).
SLICE_READBACK = f"{SLICE_MIB // 1024}G"


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@dataclass
class Node:
    """A running agent on one simulated GPU, its stand-in daemon and the kubelet stand-in."""

    agent: Agent
    standin: KubeletStandin
    config: Config
    thread: threading.Thread
    command_log: Path
    managers: list[DirectMpsDaemons]

    @property
    def gpu_uuid(self) -> str:
        """The one GPU's UUID."""
        uuid: str = self.agent.describe()["gpus"][0]["uuid"]
        return uuid

    @property
    def pipe_dir(self) -> str:
        """The GPU's pipe directory on the host."""
        return os.path.join(self.config.mps.pipe_root, self.gpu_uuid)

    def control(self, command: str) -> str:
        """Ask the GPU's daemon one control command."""
        return control_command(self.config.mps, self.pipe_dir, command)

    def commands(self) -> list[str]:
        """Every command the daemon(s) received so far, in order."""
        if not self.command_log.exists():
            return []
        return self.command_log.read_text(encoding="utf-8").splitlines()

    def devices(self, predicate: Callable[[tuple[AdvertisedDevice, ...]], bool]) -> None:
        """Wait until the kubelet stand-in's device list satisfies ``predicate``."""
        self.standin.wait_for_devices(predicate, WAIT_S, RESOURCE)


def all_healthy(devices: tuple[AdvertisedDevice, ...]) -> bool:
    """Every vGPU of the one GPU is listed Healthy."""
    return len(devices) == REPLICAS and all(d.health == "Healthy" for d in devices)


def node_config(root: Path, **mps_changes: object) -> Config:
    """One simulated H100 as 8 vGPUs, MPS through the stand-in, fast probes."""
    return Config(
        agent=AgentConfig(state_dir=str(root / "state")),
        plugin=PluginConfig(plugin_dir=str(root / "dp")),
        gpus=GpusConfig(backend="simulated", replicas_per_gpu=REPLICAS),
        mps=replace(standin_mps_config(root), **mps_changes),  # type: ignore[arg-type]
        health=HealthConfig(mps_check_interval_s=0.05, poll_interval_s=0.2),
        simulated=SimulatedConfig(count=1, memory_mib=MEMORY_MIB),
    )


@pytest.fixture
def start_node(
    short_tmp_dir: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Node]]:
    """Start an agent and a kubelet stand-in; everything is stopped afterwards."""
    root = Path(short_tmp_dir)
    command_log = root / "commands"
    # The stand-in daemons inherit the agent's environment and record into this file.
    monkeypatch.setenv("FAKE_MPS_COMMAND_LOG", str(command_log))
    nodes: list[Node] = []

    def start(config: Optional[Config] = None, **kwargs: object) -> Node:
        config = config or node_config(root)
        managers: list[DirectMpsDaemons] = []

        def direct(config: Config) -> DirectMpsDaemons:
            built = DirectMpsDaemons(config.mps)
            managers.append(built)
            return built

        standin = KubeletStandin(config.plugin.plugin_dir)
        standin.start()
        agent = build_agent(
            config,
            notifier=Notifier(None, use_libsystemd=False),
            make_mps=direct,
            **kwargs,  # type: ignore[arg-type]
        )
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        node = Node(agent, standin, config, thread, command_log, managers)
        nodes.append(node)
        node.devices(all_healthy)
        return node

    yield start
    for node in nodes:
        node.agent.request_stop("test finished")
        node.thread.join(WAIT_S)
        node.standin.stop()
        for manager in node.managers:
            manager.stop_all()
    for pid_file in (root / "mps").glob("*/nvidia-cuda-mps-control.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def start_bare_daemon(node: Node) -> None:
    """Start a new stand-in daemon on the GPU's pipe directory, as systemd's Restart=always
    would: with none of the defaults the old one had."""
    started = subprocess.run(
        [node.config.mps.control_binary, "-d", "-M"],
        env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": node.pipe_dir},
        check=False,
        timeout=WAIT_S,
    )
    assert started.returncode == 0
    wait_until_answers(node.config.mps, node.pipe_dir)


# -- the ceiling, end to end through the agent ------------------------------------------------


def test_ceiling_is_set_when_the_agent_starts_the_daemon(start_node: Callable[..., Node]) -> None:
    """Default config (enforced, 1 vGPU per container): the daemon's defaults are one
    share, 12.5% of the SMs and 1/8 of the memory, and read back so."""
    node = start_node()
    assert "set_default_active_thread_percentage 12.5" in node.commands()
    assert f"set_default_device_pinned_mem_limit 0 {SLICE_MIB}M" in node.commands()
    assert node.control("get_default_active_thread_percentage") == "12.5"
    assert node.control("get_default_device_pinned_mem_limit 0") == SLICE_READBACK


def test_cooperative_mode_sets_no_ceiling(
    start_node: Callable[..., Node], short_tmp_dir: str
) -> None:
    """mps.confinement = "cooperative" with no daemon_*_limit: the daemon keeps its own
    defaults (all SMs, no memory limit) and nothing is set."""
    node = start_node(node_config(Path(short_tmp_dir), confinement="cooperative"))
    assert not [command for command in node.commands() if command.startswith("set_default")]
    assert node.control("get_default_active_thread_percentage") == "100.0"


def test_ceiling_is_put_back_after_a_daemon_restart(
    start_node: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    """A daemon killed and restarted bare (as systemd does) gets its ceiling back from the
    agent's probe; the GPU is reported while it is gone and Healthy once it is back."""
    caplog.set_level(logging.INFO, logger="vgpu_agent")
    node = start_node()
    pid = daemon_pid(node.pipe_dir)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    start_bare_daemon(node)
    wait_until(
        lambda: (
            node.control("get_default_active_thread_percentage") == "12.5"
            and node.control("get_default_device_pinned_mem_limit 0") == SLICE_READBACK
        ),
        "the ceiling to be re-applied",
    )
    node.devices(all_healthy)
    assert node.commands().count("set_default_active_thread_percentage 12.5") == 2

    # The new daemon had neither default; what one probe reads depends on when it reads.
    # The prober puts the ceiling back before the loop has logged the report it queued,
    # so on a loaded machine the record can come after the ceiling: wait for it.
    def reported() -> list[str]:
        return [r.getMessage() for r in caplog.records if "now Unhealthy" in r.getMessage()]

    wait_until(
        lambda: any("MPS daemon ceiling lost (" in message for message in reported()),
        "the lost ceiling to be reported",
    )


@pytest.mark.slow
def test_lost_ceiling_marks_the_gpu_unhealthy_until_it_is_back(
    start_node: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    """Someone (a root pod, an operator) raises the daemon's thread default: the next full
    probe reads that back, marks the GPU Unhealthy with a reason that says the ceiling is
    lost, puts it back and, reading it back, heals the GPU."""
    caplog.set_level(logging.INFO, logger="vgpu_agent")
    node = start_node()
    node.control("set_default_active_thread_percentage 100")

    def reported(words: str) -> bool:
        return any(words in record.getMessage() for record in caplog.records)

    wait_until(lambda: reported("vGPUs are now Unhealthy"), "the GPU to be marked")
    marked = [r.getMessage() for r in caplog.records if "now Unhealthy" in r.getMessage()]
    assert any("MPS daemon ceiling lost (thread percentage 100, not 12.5)" in m for m in marked), (
        marked
    )
    wait_until(lambda: reported("cleared MPS daemon ceiling lost"), "the GPU to heal")
    node.devices(all_healthy)
    assert node.control("get_default_active_thread_percentage") == "12.5"
    assert node.control("get_default_device_pinned_mem_limit 0") == SLICE_READBACK


def test_reload_applies_the_new_ceiling(
    start_node: Callable[..., Node], short_tmp_dir: str
) -> None:
    """A reload that raises mps.max_vgpus_per_container to 2 sets the running daemon's
    ceiling to two shares (25%), without a restart."""
    root = Path(short_tmp_dir)
    new = node_config(root, max_vgpus_per_container=2)
    node = start_node(node_config(root), config_loader=lambda: new)
    node.agent.request_reload()
    # Two commands, one after the other: wait for both.
    wait_until(
        lambda: (
            node.control("get_default_active_thread_percentage") == "25.0"
            and node.control("get_default_device_pinned_mem_limit 0")
            == f"{MEMORY_MIB * 2 // 8 // 1024}G"
        ),
        "the reloaded ceiling",
    )
    assert [c for c in node.commands() if c.startswith("set_default_")][-2:] == [
        "set_default_active_thread_percentage 25",
        f"set_default_device_pinned_mem_limit 0 {MEMORY_MIB * 2 // 8}M",
    ]


def test_status_says_the_mode_and_each_ceiling(
    start_node: Callable[..., Node], short_tmp_dir: str
) -> None:
    """`vgpu-agent status` shows the confinement mode, the device list strategy and each
    GPU's ceiling."""
    node = start_node()
    path = Path(short_tmp_dir) / "config.toml"
    path.write_text(to_toml(node.config), encoding="utf-8")
    result = CliRunner(mix_stderr=False).invoke(cli, ["--config", str(path), "status"])
    assert result.exit_code == 0, result.stderr
    assert (
        "confinement: enforced: each MPS daemon holds every client to at most 1 vGPU's share"
        in result.stdout
    )
    assert "device list: envvar" in result.stdout
    assert "8 vGPUs, Healthy, ceiling 12.5% of the SMs, 10194 MiB" in result.stdout


# -- the ceiling probe on its own -------------------------------------------------------------


@pytest.fixture
def direct(short_tmp_dir: str) -> Iterator[tuple[DirectMpsDaemons, MpsConfig]]:
    """A direct manager on the stand-in, its daemons quit afterwards."""
    config = standin_mps_config(Path(short_tmp_dir))
    daemons = DirectMpsDaemons(config, start_timeout_s=10.0)
    yield daemons, config
    daemons.stop_all()


def test_prober_reads_the_ceiling_back_only_on_full_checks(
    direct: tuple[DirectMpsDaemons, MpsConfig],
    short_tmp_dir: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Quick checks do not ask the daemon, so a lost ceiling passes them; the full check
    finds it, re-applies it, and the full check after that passes."""
    command_log = Path(short_tmp_dir) / "probe-commands"
    monkeypatch.setenv("FAKE_MPS_COMMAND_LOG", str(command_log))
    daemons, config = direct
    gpu = node_gpu()
    info = daemons.start(gpu)
    prober = LivenessProber(config)
    ceiling = Ceiling(Decimal("6.25"), 4096)
    assert prober.hold(info.pipe_dir, ceiling) == [
        "set_default_active_thread_percentage 6.25",
        "set_default_device_pinned_mem_limit 0 4096M",
        "start_server -uid 0",
    ]
    assert prober.full(info.pipe_dir) is None
    control_command(config, info.pipe_dir, "set_default_active_thread_percentage 50")
    before = command_log.read_text(encoding="utf-8").splitlines()
    assert prober.quick(info.pipe_dir) == QuickCheck(), "the quick check does not see it"
    assert command_log.read_text(encoding="utf-8").splitlines() == before, "nor ask"
    problem = prober.full(info.pipe_dir)
    assert problem is not None
    assert problem.startswith("MPS daemon ceiling lost (thread percentage 50, not 6.25)")
    assert prober.full(info.pipe_dir) is None
    assert ceiling_gaps(config, info.pipe_dir, ceiling) == []


def test_a_hung_daemon_holds_up_no_other_gpus_ceiling_check(
    direct: tuple[DirectMpsDaemons, MpsConfig],
) -> None:
    """While the full check of a stopped daemon waits for its answer, the full check of
    another GPU's daemon reads that one's ceiling back and answers."""
    daemons, config = direct
    config = replace(config, control_timeout_s=20.0)
    hung_gpu, other_gpu = gpus_from_config(SimulatedConfig(count=2, memory_mib=MEMORY_MIB))
    hung, other = daemons.start(hung_gpu), daemons.start(other_gpu)
    assert hung.pid is not None
    prober = LivenessProber(config)
    for info in (hung, other):
        prober.hold(info.pipe_dir, Ceiling(Decimal("12.5"), 4096))
    results: dict[str, Optional[str]] = {}

    def check(pipe_dir: str) -> None:
        results[pipe_dir] = prober.full(pipe_dir)

    os.kill(hung.pid, signal.SIGSTOP)
    hung_check = threading.Thread(target=check, args=(hung.pipe_dir,), daemon=True)
    try:
        hung_check.start()
        wait_until(
            lambda: prober._ceiling_lock(hung.pipe_dir).locked(),
            what="the hung daemon's read-back to begin",
        )
        other_check = threading.Thread(target=check, args=(other.pipe_dir,), daemon=True)
        other_check.start()
        other_check.join(timeout=15.0)
        assert results == {other.pipe_dir: None}, "answered while the other still waits"
        assert hung_check.is_alive()
    finally:
        os.kill(hung.pid, signal.SIGCONT)
    hung_check.join(timeout=30.0)
    assert results[hung.pipe_dir] is None


def node_gpu() -> Gpu:
    """The one simulated GPU of :func:`node_config`."""
    return gpus_from_config(SimulatedConfig(count=1, memory_mib=MEMORY_MIB))[0]


def test_full_probe_with_a_ceiling_reads_it_back_instead_of_a_bare_liveness_command(
    direct: tuple[DirectMpsDaemons, MpsConfig],
    short_tmp_dir: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full probe of a daemon that holds a ceiling reads back its defaults and the list of
    its servers (which prove it answers too), with no separate liveness command, then
    whether a server still holds the GPU."""
    command_log = Path(short_tmp_dir) / "probe-commands"
    monkeypatch.setenv("FAKE_MPS_COMMAND_LOG", str(command_log))
    daemons, config = direct
    info = daemons.start(node_gpu())
    prober = LivenessProber(config)
    prober.hold(info.pipe_dir, Ceiling(Decimal("12.5"), 10194))
    before = len(command_log.read_text(encoding="utf-8").splitlines())
    assert prober.full(info.pipe_dir) is None
    asked = command_log.read_text(encoding="utf-8").splitlines()[before:]
    (server,) = control_command(config, info.pipe_dir, "get_server_list").split()
    assert asked == [
        "get_default_active_thread_percentage",
        "get_default_device_pinned_mem_limit 0",
        "get_server_list",
        f"get_active_thread_percentage {server}",
        f"get_device_pinned_mem_limit {server} 0",
        "get_server_list",
    ]


def test_a_running_server_gets_the_ceiling_and_is_checked(
    direct: tuple[DirectMpsDaemons, MpsConfig],
) -> None:
    """A server spawned before the ceiling keeps the daemon's old defaults (driver 580): the
    ceiling is also sent to each running server, and the probe reads each server back,
    reports one that lost it and puts it back."""
    daemons, config = direct
    info = daemons.start(node_gpu())
    control_command(config, info.pipe_dir, "fake_start_server 4242")
    prober = LivenessProber(config)
    sent = prober.hold(info.pipe_dir, Ceiling(Decimal("12.5"), 17971))
    assert sent[2:] == [
        "set_active_thread_percentage 4242 12.5",
        "set_device_pinned_mem_limit 4242 0 17971M",
    ]
    assert control_command(config, info.pipe_dir, "get_active_thread_percentage 4242") == "12.5"
    assert prober.full(info.pipe_dir) is None
    control_command(config, info.pipe_dir, "set_active_thread_percentage 4242 100")
    problem = prober.full(info.pipe_dir)
    assert problem is not None
    assert "server 4242: thread percentage 100, not 12.5" in problem
    assert prober.full(info.pipe_dir) is None
    assert control_command(config, info.pipe_dir, "get_active_thread_percentage 4242") == "12.5"


@pytest.mark.parametrize(
    ("answer", "limit_mib", "held"),
    [
        ("17G", 17971, True),
        ("17G", 18432, False),
        ("8G", 8985, True),
        ("10194M", 10194, True),
        ("10195M", 10194, True),
        ("10300M", 10194, False),
        ("0=10194M", 10194, True),
        (str(10194 * 1024 * 1024), 10194, True),
        ("", 10194, False),
        ("no limit", 10194, False),
    ],
    ids=[
        "gib-rounded-down",
        "gib-other",
        "gib-6.25-share",
        "mib",
        "mib-within-1",
        "mib-other",
        "device-prefix",
        "bytes",
        "empty",
        "words",
    ],
)
def test_memory_readback_understands_what_the_daemon_prints(
    answer: str, limit_mib: int, held: bool
) -> None:
    """The read-back pinned memory default counts as the ceiling when it is what the
    daemon prints for it: whole GiB rounded down on driver 580 (17971 MiB reads 17G), MiB,
    or bytes; an empty answer is no limit."""
    reading = parse_memory_answer(answer)
    assert (reading is not None and reading.shows(limit_mib)) is held


def test_prober_reads_back_the_memory_ceiling_as_the_daemon_prints_it(
    direct: tuple[DirectMpsDaemons, MpsConfig],
) -> None:
    """Through the stand-in daemon, which prints whole GiB like driver 580: the ceiling it
    holds reads back as held, a raised one as a gap naming both values."""
    daemons, config = direct
    info = daemons.start(node_gpu())
    ceiling = Ceiling(None, 17971)
    control_command(config, info.pipe_dir, "set_default_device_pinned_mem_limit 0 17971M")
    assert control_command(config, info.pipe_dir, "get_default_device_pinned_mem_limit 0") == "17G"
    assert ceiling_gaps(config, info.pipe_dir, ceiling) == []
    control_command(config, info.pipe_dir, "set_default_device_pinned_mem_limit 0 80G")
    assert ceiling_gaps(config, info.pipe_dir, ceiling) == [
        "pinned memory limit 81920 MiB, not 17971 MiB"
    ]


# -- nothing a pod can write through its read-only mount --------------------------------------

#: An unprivileged uid and gid with no entry in /etc/passwd, like a pod's.
POD_UID = 65533
#: The system interpreter: the pod's uid may not be able to read the test's venv.
POD_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable


def _as_pod_through_read_only_mount(pipe_dir: str) -> dict[str, str]:
    """In a new mount namespace, bind-mount ``pipe_dir`` read-only at a container path and,
    as an unprivileged uid, try to write every entry; returns entry -> what happened."""
    script = """
import errno, json, os, socket, stat, sys
root = "/mnt/pod-view"
results = {}
for name in sorted(os.listdir(root)):
    path = os.path.join(root, name)
    kind = stat.S_IFMT(os.lstat(path).st_mode)
    try:
        if kind == stat.S_IFSOCK:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.settimeout(1)
            client.connect(path)
            client.close()
        elif kind == stat.S_IFIFO:
            # Non-blocking: with no reader the kernel says ENXIO, after the permission check.
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        results[name] = "writable"
    except OSError as exc:
        results[name] = "writable" if exc.errno == errno.ENXIO else errno.errorcode[exc.errno]
for name in ("new-file",):
    try:
        os.close(os.open(os.path.join(root, name), os.O_WRONLY | os.O_CREAT, 0o600))
        results[name] = "writable"
    except OSError as exc:
        results[name] = errno.errorcode[exc.errno]
try:
    os.unlink(os.path.join(root, "control"))
    results["unlink control"] = "writable"
except OSError as exc:
    results["unlink control"] = errno.errorcode[exc.errno]
print(json.dumps(results))
"""
    # A private tmpfs holds the mount point, so nothing is left on the host.
    shell = (
        "set -e; mount -t tmpfs -o mode=0755 vgpu-test /mnt; mkdir /mnt/pod-view; "
        f'mount --bind "{pipe_dir}" /mnt/pod-view; '
        "mount -o remount,bind,ro /mnt/pod-view; "
        f"exec setpriv --reuid={POD_UID} --regid={POD_UID} --clear-groups "
        f'"{POD_PYTHON}" -c "$0"'
    )
    completed = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, script],
        capture_output=True,
        text=True,
        check=False,
        timeout=WAIT_S,
    )
    assert completed.returncode == 0, completed.stderr
    results: dict[str, str] = json.loads(completed.stdout)
    return results


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("setpriv") is None,
    reason="needs root, unshare and setpriv (a mount namespace and another uid)",
)


@needs_root
def test_pod_can_write_nothing_but_the_control_socket_after_the_lockdown(
    direct: tuple[DirectMpsDaemons, MpsConfig],
) -> None:
    """Through a read-only bind mount, as a non-root uid, after the agent's lockdown: only
    the control socket can be written (connected to); the log FIFO, the lock and pid files,
    the privileged socket, new files and unlinking are all refused."""
    daemons, _ = direct
    info = daemons.start(node_gpu())
    assert info.multi_user
    results = _as_pod_through_read_only_mount(info.pipe_dir)
    assert results == {
        "control": "writable",
        "control_lock": "EACCES",
        "control_privileged": "EACCES",
        "log": "EACCES",
        "nvidia-cuda-mps-control.pid": "EACCES",
        "new-file": "EROFS",
        "unlink control": "EROFS",
    }


@needs_root
def test_without_the_lockdown_a_pod_could_write_the_log_fifo(
    direct: tuple[DirectMpsDaemons, MpsConfig],
) -> None:
    """The check can fail: with the modes the daemon creates (log FIFO 0777), a read-only
    mount does not stop a pod from writing into the FIFO; the regular files are EROFS."""
    _, config = direct
    pipe_dir = Path(config.pipe_root) / node_gpu().uuid
    pipe_dir.mkdir(parents=True, mode=0o755)
    # The stand-in daemon on its own, started as the real one is, never locked down.
    subprocess.run(
        [config.control_binary, "-d", "-M"],
        env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir)},
        check=True,
        timeout=WAIT_S,
    )
    try:
        wait_until_answers(config, str(pipe_dir))
        assert stat.S_IMODE((pipe_dir / "log").stat().st_mode) == 0o777
        results = _as_pod_through_read_only_mount(str(pipe_dir))
        assert results["log"] == "writable"
        assert results["control_lock"] == "EROFS"
        assert results["control"] == "writable"
        restrict_pipe_dir(str(pipe_dir))
        assert _as_pod_through_read_only_mount(str(pipe_dir))["log"] == "EACCES"
    finally:
        control_command(config, str(pipe_dir), "quit")


def test_lockdown_leaves_the_control_socket_alone(short_tmp_dir: str) -> None:
    """restrict_pipe_dir changes only the entries it names, of the type it expects: a
    directory named like the log FIFO keeps its mode, and the control socket stays 0666."""
    pipe_dir = Path(short_tmp_dir)
    (pipe_dir / "log").mkdir(mode=0o755)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(str(pipe_dir / "control"))
    try:
        os.chmod(pipe_dir / "control", 0o666)  # noqa: S103 - the real daemon's mode
        restrict_pipe_dir(str(pipe_dir))
        assert stat.S_IMODE((pipe_dir / "log").stat().st_mode) == 0o755
        assert stat.S_IMODE((pipe_dir / "control").stat().st_mode) == 0o666
    finally:
        control.close()
