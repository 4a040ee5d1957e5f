"""Where a GPU's MPS control daemon keeps its files, and who may change them.

Each served GPU's daemon gets a pipe directory ``<pipe_root>/<uuid>`` (its control socket,
which clients connect to, its pid file, lock file and log FIFO) and a log directory
``<log_root>/<uuid>``. Both are made here before the daemon starts, root's and writable by
nobody else (:func:`prepare_directories`), and what a multi-user daemon creates in its pipe
directory is then locked down (:func:`restrict_pipe_dir`). What was measured on a real GPU
is in docs/mps.md.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Optional

from vgpu_agent.config.schema import MpsConfig
from vgpu_agent.model.errors import MpsError

_log = logging.getLogger(__name__)

#: The daemon's control socket inside the pipe directory; clients connect to it too.
CONTROL_SOCKET = "control"
#: The daemon writes its pid here (driver 580).
PID_FILE = "nvidia-cuda-mps-control.pid"
#: The daemon's flock; anyone who can open it can hold it and block a daemon restart.
LOCK_FILE = "control_lock"
#: A FIFO the daemon creates world-writable; a read-only bind mount does not stop FIFO
#: writes, so only the lockdown's mode keeps pods from writing into the daemon's log.
LOG_FIFO = "log"
#: Directories any container uid can traverse and read, only root can change.
DIRECTORY_MODE = 0o755


def log_dir_for(log_root: str, gpu_uuid: str) -> str:
    """The host log directory of a GPU's MPS daemon."""
    return os.path.join(log_root, gpu_uuid)


def prepare_directories(config: MpsConfig, gpu_uuid: str) -> tuple[str, str]:
    """Create the GPU's pipe and log directories (mode 0755, whatever the umask).

    The daemon would create a missing pipe directory itself with mode 0777, which lets
    any pod replace its sockets; so we create it first. Only directories created here are
    chmod-ed: one that exists already is used only when it is root's and writable by
    nobody else (never /tmp-like shared directories). Returns (pipe_dir, log_dir).
    """
    pipe_dir = config.pipe_dir(gpu_uuid)
    log_dir = log_dir_for(config.log_root, gpu_uuid)
    for root, directory, key in (
        (config.pipe_root, pipe_dir, "mps.pipe_root"),
        (config.log_root, log_dir, "mps.log_root"),
    ):
        try:
            os.makedirs(os.path.dirname(root), mode=DIRECTORY_MODE, exist_ok=True)
            for path in (root, directory):
                if _make_directory(path):
                    os.chmod(path, DIRECTORY_MODE)
                    continue
                problem = why_unsafe(path)
                if problem is not None:
                    raise MpsError(
                        f"using MPS directory {path} for GPU {gpu_uuid}: {problem}, so other "
                        f"users could replace what the daemon keeps there; set {key} to a "
                        "directory of its own (e.g. /run/nvidia-mps) or chmod go-w it"
                    )
                if not os.stat(path).st_mode & stat.S_IXOTH:
                    # Left as it is (not ours to chmod), but pods must pass through it.
                    _log.warning(
                        "MPS directory %s is not searchable by other users: pods running as "
                        "other users cannot reach the daemon; chmod o+x it (or 0755)",
                        path,
                    )
        except OSError as exc:
            raise MpsError(
                f"creating MPS directory {directory} for GPU {gpu_uuid}: {exc.strerror} "
                f"(run the agent as root, or set {key} to a writable directory)"
            ) from exc
    return pipe_dir, log_dir


def _make_directory(path: str) -> bool:
    """Create ``path``; False when a directory is there already (OSError otherwise)."""
    try:
        os.mkdir(path, DIRECTORY_MODE)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return False
    return True


def why_unsafe(path: str, *, allow_sticky: bool = False) -> Optional[str]:
    """Why another user could change what ``path`` is, or None: it must be owned by root
    (or by us) and writable by nobody else. With ``allow_sticky`` (a directory above a
    program), a root-owned sticky directory (/tmp) is fine: no one else can rename or
    replace what is in it."""
    info = os.stat(path)
    if info.st_uid not in (0, os.geteuid()):
        return f"{path} is owned by uid {info.st_uid}, not root"
    sticky_root_dir = (
        allow_sticky
        and stat.S_ISDIR(info.st_mode)
        and bool(info.st_mode & stat.S_ISVTX)
        and info.st_uid == 0
    )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_root_dir:
        return f"{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


#: What the lockdown leaves of each entry a daemon creates, by name and file type. Clients
#: only connect to ``control`` (which must stay 0666, docs/mps.md); the rest is root's.
LOCKDOWN_MODES: dict[str, tuple[int, int]] = {
    LOCK_FILE: (stat.S_IFREG, 0o600),
    PID_FILE: (stat.S_IFREG, 0o644),
    LOG_FIFO: (stat.S_IFIFO, 0o600),
}


def restrict_pipe_dir(pipe_dir: str) -> None:
    """Take away from other users what clients do not need in a multi-user daemon's pipe dir.

    The daemon creates its lock file 0666: anyone who can open it can take the flock and
    keep a restarted daemon from starting. Its ``log`` FIFO is 0777, and a read-only bind
    mount does not stop writes to a FIFO. Clients never open either (checked on the GPU,
    docs/mps.md), so they become root-only. Only in multi-user mode: there the servers run
    as root, while in single-user mode they run as the client's uid. The control socket
    must stay 0666: a client that cannot connect silently runs outside MPS, unconfined.
    """
    for name, (file_type, mode) in LOCKDOWN_MODES.items():
        path = os.path.join(pipe_dir, name)
        try:
            if stat.S_IFMT(os.lstat(path).st_mode) == file_type:
                os.chmod(path, mode)
        except FileNotFoundError:
            continue
        except OSError as exc:
            _log.warning("restricting %s: %s", path, exc.strerror)


def daemon_pid(pipe_dir: str) -> Optional[int]:
    """The pid the daemon of ``pipe_dir`` wrote to its pid file, if readable."""
    try:
        with open(os.path.join(pipe_dir, PID_FILE), encoding="ascii") as pid_file:
            return int(pid_file.read().strip())
    except (OSError, ValueError):
        return None
