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
import os
import signal
import stat
import subprocess
import sys
import time
from typing import Callable

import pytest

from vgpu_agent.mps.daemons import LOCK_FILE, daemon_pid, process_state

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
