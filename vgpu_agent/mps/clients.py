"""A daemon's MPS clients: which server serves each, and ending one.

MPS (driver 580) applies its thread and memory limits to each client process, so the agent
ends a pod's clients beyond its allowance (docs/security.md, "Per pod, not per process")
with the control command ``terminate_client <server pid> <client pid>``, which only root
may send. It names the server, so the client is first looked up among the daemon's servers
(``get_server_list``) and their clients (``get_client_list <server pid>``); all pids are
host pids, as NVML's.

Measured on an H100 (driver 580, tests/gpu/investigate_tenants.sh, step T): the command was
answered in 11 ms; the ended client's next CUDA call failed ("the MPS client has been
terminated by the server") and so did every later one, while the process itself was not
killed; the two other clients of the same server ran on without an error, and NVML stopped
listing the ended one.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from vgpu_agent.config.schema import MpsConfig
from vgpu_agent.model.errors import MpsError
from vgpu_agent.mps.control import control_command, server_pids

#: How long an ended client may stay in its server's list before the end counts as failed.
END_SETTLE_S = 1.0
#: How often the server's list is read again meanwhile.
END_POLL_S = 0.05


def _pids(answer: str, command: str, pipe_dir: str) -> list[int]:
    """The pids of an answer that lists them (one a line); MpsError for anything else."""
    words = answer.split()
    if not all(word.isdigit() for word in words):
        raise MpsError(
            f"MPS daemon of {pipe_dir}: {command} answered {answer!r}, not a list of pids"
        )
    return [int(word) for word in words]


def client_pids(config: MpsConfig, pipe_dir: str, server_pid: int) -> list[int]:
    """The client pids of one MPS server of the daemon of ``pipe_dir``
    (``get_client_list``); MpsError when the daemon does not answer with pids."""
    command = f"get_client_list {server_pid}"
    return _pids(control_command(config, pipe_dir, command), command, pipe_dir)


def server_of(config: MpsConfig, pipe_dir: str, client_pid: int) -> Optional[int]:
    """The pid of the MPS server whose clients include ``client_pid``; None when no server
    of the daemon lists it."""
    for server_pid in server_pids(config, pipe_dir):
        if client_pid in client_pids(config, pipe_dir, server_pid):
            return server_pid
    return None


def terminate_client(config: MpsConfig, pipe_dir: str, server_pid: int, client_pid: int) -> str:
    """Send ``terminate_client <server> <client>``; the daemon's answer."""
    return control_command(config, pipe_dir, f"terminate_client {server_pid} {client_pid}")


def _wait_until_gone(
    config: MpsConfig,
    pipe_dir: str,
    *,
    server_pid: int,
    client_pid: int,
    answer: str,
    settle: tuple[float, Callable[[], float], Callable[[float], None]],
) -> None:
    """Read the server's clients until ``client_pid`` is gone; MpsError after the settle
    time (``settle``: seconds, clock, sleep)."""
    settle_s, clock, sleep = settle
    deadline = clock() + settle_s
    unread = ""
    while True:
        try:
            if client_pid not in client_pids(config, pipe_dir, server_pid):
                return
            unread = ""
        except MpsError as exc:
            # A command the daemon drops while clients connect: ask again until the deadline.
            unread = f" (reading the list back: {exc})"
        if clock() >= deadline:
            said = f"answered {answer!r}" if answer else "gave no answer"
            after = (
                f"the server's clients could not be read back within {settle_s:g} s{unread}"
                if unread
                else f"the server still lists the client after {settle_s:g} s"
            )
            raise MpsError(f"terminate_client {server_pid} {client_pid} {said}, and {after}")
        sleep(END_POLL_S)


def end_client(
    config: MpsConfig,
    gpu_uuid: str,
    client_pid: int,
    *,
    settle_s: float = END_SETTLE_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Optional[str]:
    """End the MPS client ``client_pid`` of the GPU's daemon: find its server, terminate
    it there, and read the server's clients back until it is gone.

    Returns where it was ended (``"MPS server <pid>"``); None when no server of the daemon
    lists the client (it exited, or is no client of this GPU's daemon). MpsError naming the
    client, the GPU and the daemon's answer when the daemon does not answer, or still lists
    the client ``settle_s`` after being told to end it.
    """
    pipe_dir = config.pipe_dir(gpu_uuid)
    try:
        server_pid = server_of(config, pipe_dir, client_pid)
        if server_pid is None:
            return None
        answer = terminate_client(config, pipe_dir, server_pid, client_pid)
        _wait_until_gone(
            config,
            pipe_dir,
            server_pid=server_pid,
            client_pid=client_pid,
            answer=answer,
            settle=(settle_s, clock, sleep),
        )
    except MpsError as exc:
        raise MpsError(f"ending MPS client {client_pid} on GPU {gpu_uuid}: {exc}") from exc
    return f"MPS server {server_pid}"
