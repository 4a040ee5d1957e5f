"""Whether a GPU's MPS daemon is alive, in the two parts
:class:`~vgpu_agent.model.daemons.MpsDaemons` asks for.

The quick check starts no process: the pipe directory and control socket are there, and the
daemon named in the pid file runs and is not stopped (:func:`quick_check`). The full check
has the daemon answer a control command; where a ceiling is held, reading it back is that
command, and a lost ceiling is put back (:class:`LivenessProber`, which every manager of
:mod:`vgpu_agent.mps.daemons` checks its daemons through).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Optional

from vgpu_agent.config.schema import MpsConfig
from vgpu_agent.model.daemons import QuickCheck
from vgpu_agent.model.devices import Ceiling
from vgpu_agent.model.errors import MpsError
from vgpu_agent.mps.ceilings import CEILING_PREFIX, apply_ceiling, ceiling_gaps, send_ceiling
from vgpu_agent.mps.control import probe_pipe_dir
from vgpu_agent.mps.directories import CONTROL_SOCKET, daemon_pid

_log = logging.getLogger(__name__)

_PID_GONE = " is not running"


def process_state(pid: int) -> Optional[str]:
    """The state letter of process ``pid`` from /proc (R, S, T, Z, ...); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat_file:
            return stat_file.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def running_multi_user(pid: int) -> Optional[bool]:
    """Whether the running control daemon ``pid`` was started with ``-M`` (None: unknown)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            arguments = cmdline.read().split(b"\0")[1:]
    except OSError:
        return None
    return any(argument in (b"-M", b"--multiuser-server") for argument in arguments)


def quick_check(pipe_dir: str) -> Optional[str]:
    """Liveness without starting a process: the pipe directory and control socket exist,
    and the daemon named in the pid file runs and is not stopped. None when all is well."""
    if not os.path.isdir(pipe_dir):
        return f"MPS pipe directory {pipe_dir} is missing"
    if not os.path.exists(os.path.join(pipe_dir, CONTROL_SOCKET)):
        return f"MPS daemon not running: no control socket in {pipe_dir}"
    pid = daemon_pid(pipe_dir)
    if pid is None:
        return None  # no pid file to go by: the periodic control command decides
    state = process_state(pid)
    if state is None or state in ("Z", "X"):
        return f"MPS daemon of {pipe_dir} (pid {pid}){_PID_GONE}"
    if state in ("T", "t"):
        return f"MPS daemon of {pipe_dir} (pid {pid}) is stopped and cannot answer"
    return None


class LivenessProber:
    """The two parts of a daemon liveness check on a pipe directory (see
    :class:`~vgpu_agent.model.daemons.MpsDaemons`), and the ceiling each full check keeps."""

    def __init__(self, config: MpsConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._ceilings: dict[str, Ceiling] = {}
        #: One per pipe directory: a hung daemon's read-back holds up no other GPU's.
        self._ceiling_locks: dict[str, threading.Lock] = {}

    def hold(self, pipe_dir: str, ceiling: Ceiling, wait_s: float = 15.0) -> list[str]:
        """Set ``ceiling`` on the daemon of ``pipe_dir`` (waiting until it answers) and keep
        it there: every full check reads it back and puts it back when it is gone.
        Returns the commands sent; raises MpsError when it cannot be set."""
        # Setting and checking never interleave: a check between the new ceiling being
        # recorded and being sent would report the old one as a lost ceiling.
        with self._ceiling_lock(pipe_dir):
            with self._lock:
                if ceiling.empty:
                    self._ceilings.pop(pipe_dir, None)
                else:
                    self._ceilings[pipe_dir] = ceiling
            return apply_ceiling(self._config, pipe_dir, ceiling, wait_s)

    def _ceiling_lock(self, pipe_dir: str) -> threading.Lock:
        with self._lock:
            return self._ceiling_locks.setdefault(pipe_dir, threading.Lock())

    def _check_ceiling(self, pipe_dir: str) -> Optional[str]:
        with self._ceiling_lock(pipe_dir):
            return self._check_ceiling_locked(pipe_dir)

    def _check_ceiling_locked(self, pipe_dir: str) -> Optional[str]:
        with self._lock:
            ceiling = self._ceilings.get(pipe_dir)
        if ceiling is None:
            return None
        try:
            gaps = ceiling_gaps(self._config, pipe_dir, ceiling)
        except MpsError as exc:
            return str(exc)  # the daemon does not answer: a liveness problem, not the ceiling
        if not gaps:
            return None
        lost = f"{CEILING_PREFIX} lost ({'; '.join(gaps)})"
        try:
            send_ceiling(self._config, pipe_dir, ceiling)
        except MpsError as exc:
            return f"{lost}; putting it back failed: {exc}"
        _log.warning("%s on %s: re-applied %s", lost, pipe_dir, ceiling.describe())
        # Reported once, so the loss is seen; the next full check reads it back and heals.
        return f"{lost}; re-applied, checking again"

    def quick(self, pipe_dir: str) -> QuickCheck:
        """:func:`quick_check` of ``pipe_dir``; unsure when the pid file names a process
        that is gone (the daemon died, or a daemon started since did not rewrite the file:
        only asking tells, and a dead daemon refuses at once)."""
        problem = quick_check(pipe_dir)
        if problem is not None and problem.endswith(_PID_GONE):
            return QuickCheck(unsure=True)
        return QuickCheck(problem)

    def full(self, pipe_dir: str) -> Optional[str]:
        """None if the daemon of ``pipe_dir`` answers a control command and holds its
        ceiling (put back when gone, and reported once); else why not."""
        with self._lock:
            holds_ceiling = pipe_dir in self._ceilings
        # Reading the ceiling back is itself a control command the daemon must answer, so
        # it stands in for get_server_list: one process start fewer every interval.
        if holds_ceiling:
            return self._check_ceiling(pipe_dir)
        return probe_pipe_dir(self._config, pipe_dir)
