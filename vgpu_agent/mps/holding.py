"""Keeping pods inside MPS: a server holds each GPU before any client, and a daemon's stale
lock cannot keep the next daemon from starting.

**A server before the first client.** A control daemon starts its MPS server only when the
first client connects. Until then nothing holds the GPU: with compute mode
EXCLUSIVE_PROCESS a process that does not go through MPS (a pod that points
``CUDA_MPS_PIPE_DIRECTORY`` elsewhere) takes the GPU's one context and locks every pod out;
with compute mode Default it runs beside the server, time-sliced against it. So once a
multi-user daemon answers (and holds its ceiling: a server takes the daemon's defaults when
it starts) it is asked to start its server at once (``start_server -uid 0``: a multi-user
server runs as root for every user), and every full liveness check starts it again if it is
gone. A server that cannot start means something else holds the GPU, and the GPU is
reported down. Single-user daemons are left alone: their server runs as the first client's
uid, which is not known before it comes.

**The lock file.** A daemon creates ``control_lock`` world-readable (0666) and locks it; the
pipe-directory lockdown makes it root-only once the daemon answers. A pod that opened the
file before the lockdown (through its read-only mount: opening needs no write access) keeps
that descriptor, and once the daemon dies it can hold the lock itself, so that every later
daemon exits with "An instance of this daemon is already running". :func:`prepare_lock`
runs before each daemon start: when no daemon runs on that pipe directory it replaces the
lock file by a new root-only one, which the daemon keeps as it finds it. No pod can open
the new file, and a lock held on the old one holds nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Optional

from vgpu_agent.config.schema import MpsConfig
from vgpu_agent.model.errors import MpsError
from vgpu_agent.mps.control import control_command, server_pids
from vgpu_agent.mps.directories import LOCK_FILE, daemon_pid
from vgpu_agent.mps.liveness import process_state, running_multi_user

_log = logging.getLogger(__name__)

#: The user a multi-user daemon's server runs as (it serves every user).
SERVER_UID = 0
#: How long a started server may take to appear in ``get_server_list`` (it creates the
#: GPU's context first: about a second on an H100).
SERVER_START_WAIT_S = 10.0
#: How every liveness reason about the server begins.
SERVER_PREFIX = "MPS server"


def start_server_command(uid: int = SERVER_UID) -> str:
    """The control command that makes the daemon start its server for ``uid`` now."""
    return f"start_server -uid {uid}"


def daemon_multi_user(config: MpsConfig, pipe_dir: str) -> bool:
    """Whether the daemon of ``pipe_dir`` runs in multi-user mode: from its command line
    when its pid file names a live process, else from the config."""
    pid = daemon_pid(pipe_dir)
    running = running_multi_user(pid) if pid is not None else None
    if running is not None:
        return running
    return config.multi_user != "off"


def hold_gpu(
    config: MpsConfig, pipe_dir: str, wait_s: float = SERVER_START_WAIT_S
) -> Optional[str]:
    """Make sure the multi-user daemon of ``pipe_dir`` runs a server; returns the command
    sent when it had to start one (None: a server was there, or the daemon is single-user).

    Raises MpsError when the daemon does not answer or no server appears within ``wait_s``
    (then something outside MPS may hold the GPU)."""
    if server_pids(config, pipe_dir) or not daemon_multi_user(config, pipe_dir):
        return None
    command = start_server_command()
    answer = control_command(config, pipe_dir, command)
    if any(word in answer.lower() for word in ("unrecognized", "error", "invalid", "fail")):
        raise MpsError(
            f"{SERVER_PREFIX} not started: the daemon of {pipe_dir} refused {command!r}: {answer}"
        )
    deadline = time.monotonic() + wait_s
    while not server_pids(config, pipe_dir):
        if time.monotonic() >= deadline:
            raise MpsError(
                f"{SERVER_PREFIX} not started: the daemon of {pipe_dir} ran {command!r} but "
                f"no server appeared within {wait_s:g} s; if a process outside MPS holds the "
                "GPU (nvidia-smi lists it), it keeps MPS off this GPU: end it"
            )
        time.sleep(0.05)
    _log.info("started the MPS server of %s before any client (%s)", pipe_dir, command)
    return command


def prepare_lock(pipe_dir: str) -> bool:
    """Before a daemon starts on ``pipe_dir``: unless the daemon named in the pid file still
    runs, replace ``control_lock`` by a new, empty file that only root can open (0600);
    True when it did.

    The daemon keeps the mode of a lock file it finds (driver 580, measured on an H100), so
    no pod can ever open this one; and whoever holds a lock on the old file (a pod that
    opened it while an older daemon left it readable) holds nothing the new daemon needs.
    """
    path = os.path.join(pipe_dir, LOCK_FILE)
    pid = daemon_pid(pipe_dir)
    if pid is not None and _alive(pid):
        return False
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
        os.fchmod(descriptor, 0o600)  # whatever the umask
        os.close(descriptor)
    except OSError as exc:
        raise MpsError(
            f"preparing the MPS lock file {path}: {exc.strerror}; a pod holding a lock on an "
            "old one could keep the daemon from starting (run the agent as root, or remove "
            "the file)"
        ) from exc
    return True


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not). A pid file naming a live process
    is taken to be the daemon's: a stale pid reused within the second systemd waits before
    a restart is unlikely, and leaving the lock costs only that one start."""
    state = process_state(pid)
    return state is not None and state not in ("Z", "X")
