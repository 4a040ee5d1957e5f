"""One agent per state directory, and where the CLI finds the agent a config file started.

`vgpu-agent run` takes an exclusive lock on ``<state_dir>/agent.lock`` before it touches
anything (compute modes, sockets, MPS daemons): a second agent exits at once, naming the
first one's pid. It then records, under a fixed directory keyed by the config file's path,
where its control socket is. The CLI reads that record when the config file no longer
tells it (the file was broken or changed after the agent started), so `status` and
`health reset` still reach the agent that runs, with the config it loaded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
from typing import Optional

from vgpu_agent.model.errors import AgentError

log = logging.getLogger(__name__)

LOCK_NAME = "agent.lock"
#: Where running agents record their control socket, one file per config file path.
RECORD_DIR = "/run/vgpu-agent/by-config"


class InstanceLock:
    """The exclusive lock of one state directory, held while the agent runs."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock; AgentError naming the holder's pid when another agent has it."""
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise AgentError(
                f"creating the agent's lock file {self.path}: {exc.strerror}; run as root or "
                "set agent.state_dir to a writable directory"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise AgentError(f"locking {self.path}: {exc.strerror}") from exc
            who = f" (pid {holder})" if holder is not None else ""
            raise AgentError(
                f"another vgpu-agent{who} already runs with state directory "
                f"{os.path.dirname(self.path)}; stop it first (systemctl stop vgpu-agent), "
                "or give this one another agent.state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (the file stays; it is only ever locked, never trusted)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _read_pid(fd: int) -> Optional[int]:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def record_path(config_path: str, record_dir: str = RECORD_DIR) -> str:
    """Where the agent started with ``config_path`` records its control socket."""
    key = hashlib.sha256(os.path.realpath(config_path).encode()).hexdigest()[:24]
    return os.path.join(record_dir, f"{key}.json")


def write_record(config_path: str, control_socket: str, record_dir: str = RECORD_DIR) -> None:
    """Record this process's control socket for ``config_path`` (best effort: a CLI that
    cannot read it falls back to what the config file says)."""
    path = record_path(config_path, record_dir)
    record = {
        "config": os.path.realpath(config_path),
        "control_socket": os.path.abspath(control_socket),
        "pid": os.getpid(),
    }
    prune_records(record_dir)
    temporary = f"{path}.{os.getpid()}.tmp"
    # Another process may remove the directory (empty) between makedirs and open: retry.
    for attempt in range(3):
        try:
            os.makedirs(record_dir, mode=0o755, exist_ok=True)
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(record, handle)
            os.replace(temporary, path)
            return
        except FileNotFoundError as exc:
            if attempt == 2:
                log.debug("recording the control socket in %s: %s", path, exc)
        except OSError as exc:
            log.debug("recording the control socket in %s: %s", path, exc)
            return


def remove_record(config_path: str, record_dir: str = RECORD_DIR) -> None:
    """Remove this process's record for ``config_path`` (not one a newer agent wrote)."""
    path = record_path(config_path, record_dir)
    if _recorded(path, alive_only=False).get("pid") == os.getpid():
        with contextlib.suppress(OSError):
            os.unlink(path)
    prune_records(record_dir)


def prune_records(record_dir: str = RECORD_DIR) -> None:
    """Remove the records of agents that are gone (killed before they could remove their
    own), then the directory itself when nothing is left in it, so a host where no agent
    runs keeps nothing of them."""
    try:
        names = os.listdir(record_dir)
    except OSError:
        return
    for name in names:
        path = os.path.join(record_dir, name)
        # A record is written whole (os.replace), so an unreadable one is no record.
        if name.endswith(".json") and not _recorded(path, alive_only=True):
            with contextlib.suppress(OSError):
                os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(record_dir)


def recorded_socket(config_path: str, record_dir: str = RECORD_DIR) -> Optional[str]:
    """The control socket a live agent started with ``config_path`` recorded, or None."""
    socket_path = _recorded(record_path(config_path, record_dir), alive_only=True).get(
        "control_socket"
    )
    return socket_path if isinstance(socket_path, str) else None


def live_records(record_dir: str = RECORD_DIR) -> list[tuple[str, str, int]]:
    """``(config path, control socket, pid)`` of every running agent that left a record,
    so a CLI that finds no agent where its config says can name the ones that run."""
    try:
        names = sorted(os.listdir(record_dir))
    except OSError:
        return []
    found: list[tuple[str, str, int]] = []
    for name in names:
        if not name.endswith(".json"):
            continue
        record = _recorded(os.path.join(record_dir, name), alive_only=True)
        config, socket_path, pid = (
            record.get("config"),
            record.get("control_socket"),
            record.get("pid"),
        )
        if isinstance(config, str) and isinstance(socket_path, str) and isinstance(pid, int):
            found.append((config, socket_path, pid))
    return found


def _recorded(path: str, *, alive_only: bool) -> dict[str, object]:
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    pid = record.get("pid")
    if alive_only and not (isinstance(pid, int) and pid > 0 and _alive(pid)):
        return {}
    return record


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: it exists
    return True
