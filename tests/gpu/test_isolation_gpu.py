"""On a real NVIDIA GPU: no way around MPS (issue 20, items 3 and 4).

- The agent's daemon runs its MPS server before any client connects (``start_server -uid 0``
  after the ceiling), the server holds a context on the GPU, has the ceiling, and a pod's
  client joins that same server.
- A uid-1000 pod that opened ``control_lock`` through its read-only mount while a daemon
  left it readable, and locks it once the daemon dies, does not keep the agent's next
  daemon from starting: the agent replaces the file by a root-only one first, and the
  daemon keeps that mode (so there is no window for a pod to open it at all).

The lent GPU's compute mode is never changed, so what EXCLUSIVE_PROCESS adds (a client
outside MPS can get no context beside the server) is shown by the CPU tests and stated in
docs/security.md, not here. Run with scripts/test-gpu."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Union

import pytest

from vgpu_agent.agent.faults import ApplicationFault, FaultEvent, FaultLog
from vgpu_agent.agent.health import HealthChange, HealthMonitor
from vgpu_agent.config.schema import HealthConfig
from vgpu_agent.model.errors import MpsError
from vgpu_agent.mps.directories import LOCK_FILE, daemon_pid
from vgpu_agent.mps.liveness import process_state

from .conftest import IMAGE_ENV, POD_NAMESPACES, Node

pytestmark = pytest.mark.gpu
NodeFactory = Callable[..., Node]
REPLICAS = 8

#: Opens the lock file read-only (all a read-only mount allows), waits for the daemon to
#: end, then holds both kinds of lock a read-only descriptor can take: flock and a POSIX
#: read lock.
ATTACK = """
import fcntl, sys, time
handle = open(sys.argv[1])
print("opened", flush=True)
fcntl.flock(handle, fcntl.LOCK_EX)
fcntl.lockf(handle, fcntl.LOCK_SH)
print("holding", flush=True)
time.sleep(600)
"""


def _compute_pids() -> list[int]:
    answer = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return [int(word) for word in answer.stdout.split() if word.isdigit()]


def test_the_server_holds_the_gpu_before_any_client(make_node: NodeFactory) -> None:
    """Before any client: one server, holding a context on the GPU, with the ceiling; a
    pod's client then joins that very server."""
    node = make_node(replicas=REPLICAS, max_vgpus_per_container=1)
    servers = node.control(0, "get_server_list").split()
    print("servers before any client:", servers, "compute apps:", _compute_pids())
    assert len(servers) == 1
    server = servers[0]
    assert int(server) in _compute_pids(), "the server holds a context on the GPU"
    threads = node.control(0, f"get_active_thread_percentage {server}")
    print("server thread percentage:", threads)
    assert threads.startswith("12.5")
    client = node.start_client(node.allocate(0, 1), 1000, "joiner", ["--hold-s", "3"])
    node.wait_for_clients(0, 1)
    assert node.control(0, "get_server_list").split() == [server]
    assert node.client_pids(0), "the client is the server's"
    client.result()


def test_a_pod_holding_a_dead_daemons_lock_does_not_keep_it_down(
    make_node: NodeFactory,
) -> None:
    """The lock attack through a read-only mount as uid 1000: the agent's restart answers,
    on a new lock file that is root-only from the start."""
    node = make_node(replicas=REPLICAS, max_vgpus_per_container=1)
    gpu = node.gpus[0]
    pipe_dir = node.state.inventory().gpus[0].pipe_dir
    assert pipe_dir is not None
    lock_path = os.path.join(pipe_dir, LOCK_FILE)
    grant = node.allocate(0, 1)
    mounts = [
        f"{m.host_path}:{m.container_path}:{'ro' if m.read_only else 'rw'}" for m in grant.mounts
    ]
    container_lock = os.path.join(grant.envs["CUDA_MPS_PIPE_DIRECTORY"], LOCK_FILE)
    # As the daemon leaves it until the lockdown: readable by every uid.
    os.chmod(lock_path, 0o666)  # noqa: S103 - the daemon's own mode, for the window
    held_inode = os.stat(lock_path).st_ino
    servers: list[int] = []
    attacker = subprocess.Popen(
        [
            "unshare",
            *POD_NAMESPACES,
            str(node.work_dir / "container.sh"),
            "1000",
            *mounts,
            "--",
            "env",
            "-i",
            *(f"{k}={v}" for k, v in IMAGE_ENV.items()),
            sys.executable,
            "-c",
            ATTACK,
            container_lock,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert attacker.stdout is not None
        assert attacker.stdout.readline().strip() == "opened"
        os.chmod(lock_path, 0o600)  # the lockdown: too late for a descriptor already open
        servers.extend(int(pid) for pid in node.control(0, "get_server_list").split())
        pid = daemon_pid(pipe_dir)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert attacker.stdout.readline().strip() == "holding"
        while process_state(pid) not in (None, "Z", "X"):
            time.sleep(0.01)
        started = time.monotonic()
        info = node.daemons.start(gpu)
        print(f"agent's restart answered after {time.monotonic() - started:.2f} s (pid {info.pid})")
        assert node.control(0, "get_server_list") is not None
        assert os.stat(lock_path).st_ino != held_inode, "a new lock file"
        mode = stat.S_IMODE(os.stat(lock_path).st_mode)
        print(f"the restarted daemon's lock file: mode {mode:o}")
        assert mode == 0o600, "root's from the start: no window for a pod to open it"
    finally:
        os.killpg(attacker.pid, signal.SIGKILL)
        attacker.communicate()
        # The killed daemon's server outlives it (docs/mps.md); it is ours to end.
        for server in servers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server, signal.SIGKILL)


def _report(client: Any) -> dict[str, Any]:
    """A client's JSON report, whether or not it ended in an error."""
    stdout, stderr = client.process.communicate(timeout=120)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"client {client.label} gave no report: {stderr[-500:]}"
    report: dict[str, Any] = json.loads(lines[-1])
    return report


def _wait_for_clients(node: Node, count: int, timeout_s: float = 60.0) -> None:
    """Wait until GPU 0's daemon serves ``count`` clients; a control command the daemon
    drops while clients connect ("Cannot send command") is asked again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(MpsError):
            if len(node.client_pids(0)) >= count:
                return
        time.sleep(0.2)
    pytest.fail(f"fewer than {count} MPS clients after {timeout_s:g} s")


def _labels_of(node: Node) -> list[str]:
    """The --label of every MPS client of GPU 0 (stands in for attribution's pods)."""
    labels = []
    pids: list[str] = []
    for _ in range(20):
        try:
            pids = node.client_pids(0)
            break
        except MpsError:
            time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(OSError):
            words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"--label" in words:
                labels.append(words[words.index(b"--label") + 1].decode())
    return labels


def test_a_fault_under_mps_is_recorded_naming_every_pod_it_hit(make_node: NodeFactory) -> None:
    """Two long-running clients and one that makes an illegal memory access on the agent's
    daemon: the health watcher hands the XID on as an MPS fault of the GPU, the fault log
    names all three clients' pods; what each victim saw and what the daemon logged is
    printed (the blast radius as measured)."""
    from vgpu_agent.gpus.nvml import NvmlBackend

    node = make_node(replicas=REPLICAS, max_vgpus_per_container=1)
    gpu_uuid = node.gpus[0].uuid
    faults: list[ApplicationFault] = []
    arrived = threading.Event()

    def emit(change: Union[HealthChange, ApplicationFault]) -> None:
        if isinstance(change, ApplicationFault):
            faults.append(change)
            arrived.set()

    monitor = HealthMonitor(
        NvmlBackend(), node.daemons, HealthConfig(mps_check_interval_s=0.5), [gpu_uuid], emit=emit
    )
    monitor.start()
    try:
        victims = [
            node.start_client(
                node.allocate(0, 1, first=index), 1000, f"victim-{index}", ["--hold-s", "40"]
            )
            for index in (0, 1)
        ]
        _wait_for_clients(node, 2)
        faulter = node.start_client(
            node.allocate(0, 1, first=2), 1000, "faulter", ["--hold-s", "4", "--illegal-access"]
        )
        _wait_for_clients(node, 3)
        seen = _labels_of(node)
        print("clients before the fault:", seen)
        recorded: list[FaultEvent] = []
        fault_log = FaultLog(lambda uuid: seen, lambda *counted: None)
        assert arrived.wait(60), "no XID reached the health watcher"
        for fault in faults:
            recorded.append(fault_log.record(fault))
        print("faults:", [(f.gpu_uuid, f.xid, f.detail) for f in faults])
        print("recorded:", [event.describe() for event in recorded])
        outcomes = {c.label: _report(c).get("error", "ran to the end") for c in [faulter, *victims]}
        for label, outcome in outcomes.items():
            print(f"{label}: {outcome}")
        assert recorded[0].gpu_uuid == gpu_uuid
        assert recorded[0].xid in (13, 31, 43)
        assert set(recorded[0].pods) == {"victim-0", "victim-1", "faulter"}
        assert "illegal memory access" in outcomes["faulter"]
        log_path = Path(node.config.mps.log_root) / gpu_uuid / "control.log"
        print("daemon log tail:", log_path.read_text(errors="replace")[-3000:])
        after = node.start_client(node.allocate(0, 1, first=3), 1000, "after", ["--hold-s", "1"])
        print("a new client afterwards:", after.result().get("kernels"), "kernel batches")
        print("servers afterwards:", node.control(0, "get_server_list"))
    finally:
        monitor.stop()
