"""Per-GPU CUDA MPS control daemons: directories, start/stop, control commands, liveness.

One ``nvidia-cuda-mps-control`` runs per served GPU, pinned to it with
``CUDA_VISIBLE_DEVICES=<uuid>``, with its own pipe directory ``<pipe_root>/<uuid>`` and
log directory ``<log_root>/<uuid>``. Three managers implement
:class:`~vgpu_agent.model.daemons.MpsDaemons`:

- :class:`DirectMpsDaemons` starts the daemons as child processes (no systemd; the
  real-GPU tests drive this one),
- :class:`SystemdMpsDaemons` starts ``vgpu-mps@<uuid>.service`` units and never stops them,
- :class:`ExternalMpsDaemons` only uses and watches daemons someone else runs.

:func:`daemon_command` and :func:`daemon_environment` are what the systemd unit runs too
(through ``vgpu-agent mps exec-daemon``, which calls :func:`exec_daemon`), so both paths
start the daemon the same way. What was measured on a real GPU is in docs/mps.md.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import IO, Callable, Optional

from vgpu_agent.config.plan import daemon_ceiling
from vgpu_agent.config.schema import MpsConfig
from vgpu_agent.model.daemons import MpsDaemonInfo, MpsDaemons, QuickCheck
from vgpu_agent.model.devices import Ceiling, percentage_text
from vgpu_agent.model.errors import MpsError
from vgpu_agent.model.gpu import Gpu
from vgpu_agent.mps.units import REQUEST_SOCKET, request_socket_available, request_start

_log = logging.getLogger(__name__)

#: The daemon's control socket inside the pipe directory; clients connect to it too.
CONTROL_SOCKET = "control"
#: The daemon writes its pid here (driver 580).
PID_FILE = "nvidia-cuda-mps-control.pid"
#: The daemon's lock file (a POSIX lock): anyone who can open it can lock it and block a restart.
LOCK_FILE = "control_lock"
#: How every liveness reason about a daemon's ceiling begins (the daemon itself answers).
CEILING_PREFIX = "MPS daemon ceiling"
#: A FIFO the daemon creates world-writable; a read-only bind mount does not stop FIFO
#: writes, so only the lockdown's mode keeps pods from writing into the daemon's log.
LOG_FIFO = "log"
#: Directories any container uid can traverse and read, only root can change.
DIRECTORY_MODE = 0o755
SYSTEMD_UNIT_TEMPLATE = "vgpu-mps@{gpu_uuid}.service"
MULTI_USER_UNSUPPORTED = (
    "this driver's nvidia-cuda-mps-control has no multi-user option (-M): pods running as "
    "different users will queue on a GPU, each waiting until every pod of another user on "
    "that GPU has exited"
)
MULTI_USER_OFF = (
    "MPS multi-user mode is off (mps.multi_user = off): pods running as different users "
    "will queue on a GPU"
)

_MULTI_USER_OPTION = re.compile(r"(?m)^\s*-M\b|--multiuser-server\b|--multi-?user\b")


# -- paths and the daemon's command line ----------------------------------------------


def log_dir_for(log_root: str, gpu_uuid: str) -> str:
    """The host log directory of a GPU's MPS daemon."""
    return os.path.join(log_root, gpu_uuid)


def daemon_command(config: MpsConfig, multi_user: bool) -> list[str]:
    """The control daemon's command line: in the foreground, so its supervisor (the agent
    or systemd) owns the real process; ``-M`` for multi-user mode."""
    command = [config.control_binary, "-f"]
    if multi_user:
        command.append("-M")
    return command


def daemon_environment(config: MpsConfig, gpu_uuid: str) -> dict[str, str]:
    """The variables that pin a daemon to its GPU and give it its directories."""
    return {
        "CUDA_VISIBLE_DEVICES": gpu_uuid,
        "CUDA_MPS_PIPE_DIRECTORY": config.pipe_dir(gpu_uuid),
        "CUDA_MPS_LOG_DIRECTORY": log_dir_for(config.log_root, gpu_uuid),
    }


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
                problem = _unsafe(path)
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


#: What the lockdown leaves of each entry a daemon creates, by name and file type. Clients
#: only connect to ``control`` (which must stay 0666, docs/mps.md); the rest is root's.
LOCKDOWN_MODES: dict[str, tuple[int, int]] = {
    LOCK_FILE: (stat.S_IFREG, 0o600),
    PID_FILE: (stat.S_IFREG, 0o644),
    LOG_FIFO: (stat.S_IFIFO, 0o600),
}


def restrict_pipe_dir(pipe_dir: str) -> None:
    """Take away from other users what clients do not need in a multi-user daemon's pipe dir.

    The daemon creates its lock file 0666: anyone who can open it can lock it and
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


# -- multi-user mode -----------------------------------------------------------------


def help_supports_multi_user(help_text: str) -> bool:
    """Whether the control program's usage text offers multi-user mode (``-M``)."""
    return _MULTI_USER_OPTION.search(help_text) is not None


def control_help(control_binary: str, timeout_s: float = 5.0) -> str:
    """The control program's usage text (``-h``), stdout and stderr together."""
    program = checked_program(control_binary)
    try:
        completed = subprocess.run(
            [program, "-h"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except FileNotFoundError as exc:
        raise _missing_binary(control_binary) from exc
    except PermissionError as exc:
        raise MpsError(f"running {control_binary} -h: permission denied") from exc
    except subprocess.TimeoutExpired as exc:
        raise MpsError(f"running {control_binary} -h: no answer within {timeout_s:g} s") from exc
    return (completed.stdout + completed.stderr).decode("utf-8", "replace")


def resolve_multi_user(config: MpsConfig) -> bool:
    """Whether to start daemons in multi-user mode, from ``mps.multi_user`` and the driver.

    "auto" uses it where the control program offers it; "on" insists (MpsError if the
    driver lacks it); "off" never uses it. Whenever pods of different users will queue,
    this logs a warning saying so.
    """
    if config.multi_user == "off":
        _log.warning("%s", MULTI_USER_OFF)
        return False
    supported = help_supports_multi_user(control_help(config.control_binary))
    if supported:
        return True
    if config.multi_user == "on":
        raise MpsError(
            f"mps.multi_user = on, but {config.control_binary} offers no multi-user option "
            "(-M); upgrade the NVIDIA driver or set mps.multi_user = auto"
        )
    _log.warning("%s", MULTI_USER_UNSUPPORTED)
    return False


# -- talking to a daemon -------------------------------------------------------------


def _ancestors(path: str) -> list[str]:
    """The directories above ``path`` (absolute), nearest first, "/" last."""
    found = []
    parent = os.path.dirname(path)
    while True:
        found.append(parent)
        if parent == "/":
            return found
        parent = os.path.dirname(parent)


def _unsafe(path: str, *, allow_sticky: bool = False) -> Optional[str]:
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


def checked_program(control_binary: str) -> str:
    """The absolute path of the MPS control program, once nobody but root could have put
    something else there: we run it as root. Symlinks are resolved; the file and every
    directory above it (and above the link) must be root's and writable by nobody else.
    MpsError naming the path and what to do otherwise."""
    found = shutil.which(control_binary) if "/" not in control_binary else control_binary
    if found is None or not os.path.isfile(found):
        raise _missing_binary(control_binary)
    found = os.path.abspath(found)
    real = os.path.realpath(found)
    try:
        directories = _ancestors(real) + _ancestors(found)
        problem = _unsafe(real) or next(
            (why for why in (_unsafe(path, allow_sticky=True) for path in directories) if why),
            None,
        )
    except OSError as exc:
        raise MpsError(f"checking the MPS control program {found}: {exc.strerror}") from exc
    if problem is not None:
        shown = found if real == found else f"{found} (-> {real})"
        raise MpsError(
            f"refusing to run the MPS control program {shown} as root: {problem}; "
            "make it and its directories root's and not writable by others (chmod go-w), "
            "or set mps.control_binary to one that is"
        )
    # Run it by the checked name: the daemon finds nvidia-cuda-mps-server beside it.
    return found


def _missing_binary(control_binary: str) -> MpsError:
    return MpsError(
        f"the MPS control program {control_binary!r} was not found: install the NVIDIA "
        "driver's MPS binaries (nvidia-cuda-mps-control, nvidia-cuda-mps-server) or set "
        "mps.control_binary to its path"
    )


def control_command(config: MpsConfig, pipe_dir: str, command: str) -> str:
    """Send one control command to the daemon of ``pipe_dir``; return its answer.

    Raises MpsError when the control program is missing, the daemon does not answer
    within ``config.control_timeout_s`` (stopped or hung) or is not running.
    """
    environment = dict(os.environ)
    environment["CUDA_MPS_PIPE_DIRECTORY"] = pipe_dir
    timeout_s = config.control_timeout_s
    program = checked_program(config.control_binary)
    try:
        completed = subprocess.run(
            [program],
            input=(command + "\n").encode(),
            capture_output=True,
            env=environment,
            timeout=timeout_s,
            check=False,
        )
    except FileNotFoundError as exc:
        raise _missing_binary(config.control_binary) from exc
    except subprocess.TimeoutExpired as exc:
        raise MpsError(
            f"MPS daemon of {pipe_dir} not answering within {timeout_s:g} s (stopped or hung?)"
        ) from exc
    output = (completed.stdout + completed.stderr).decode("utf-8", "replace").strip()
    if completed.returncode != 0:
        raise MpsError(
            f"MPS daemon of {pipe_dir} is not running ({output or f'exit {completed.returncode}'})"
        )
    return output


def probe_pipe_dir(config: MpsConfig, pipe_dir: str) -> Optional[str]:
    """None if a daemon answers ``get_server_list`` on ``pipe_dir``; else why not."""
    if not os.path.isdir(pipe_dir):
        return f"MPS pipe directory {pipe_dir} is missing"
    if not os.path.exists(os.path.join(pipe_dir, CONTROL_SOCKET)):
        return f"MPS daemon not running: no control socket in {pipe_dir}"
    try:
        control_command(config, pipe_dir, "get_server_list")
    except MpsError as exc:
        return str(exc)
    return None


_PID_GONE = " is not running"


def process_state(pid: int) -> Optional[str]:
    """The state letter of process ``pid`` from /proc (R, S, T, Z, ...); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat_file:
            return stat_file.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


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
        from vgpu_agent.mps import holding

        with self._ceiling_lock(pipe_dir):
            with self._lock:
                if ceiling.empty:
                    self._ceilings.pop(pipe_dir, None)
                else:
                    self._ceilings[pipe_dir] = ceiling
            sent = apply_ceiling(self._config, pipe_dir, ceiling, wait_s)
            # The server after the ceiling: a server takes the daemon's defaults as it starts.
            wait_until_answers(self._config, pipe_dir, wait_s)
            started = holding.hold_gpu(self._config, pipe_dir)
            return sent if started is None else [*sent, started]

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
        from vgpu_agent.mps import holding

        with self._lock:
            holds_ceiling = pipe_dir in self._ceilings
        # Reading the ceiling back is itself a control command the daemon must answer, so
        # it stands in for get_server_list: one process start fewer every interval.
        if holds_ceiling:
            problem = self._check_ceiling(pipe_dir)
        else:
            problem = probe_pipe_dir(self._config, pipe_dir)
        if problem is not None:
            return problem
        # A server gone (killed, or ended by a fault) leaves the GPU to whoever comes first.
        with self._ceiling_lock(pipe_dir):
            try:
                holding.hold_gpu(self._config, pipe_dir)
            except MpsError as exc:
                return str(exc)
        return None


def daemon_pid(pipe_dir: str) -> Optional[int]:
    """The pid the daemon of ``pipe_dir`` wrote to its pid file, if readable."""
    try:
        with open(os.path.join(pipe_dir, PID_FILE), encoding="ascii") as pid_file:
            return int(pid_file.read().strip())
    except (OSError, ValueError):
        return None


def running_multi_user(pid: int) -> Optional[bool]:
    """Whether the running control daemon ``pid`` was started with ``-M`` (None: unknown)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            arguments = cmdline.read().split(b"\0")[1:]
    except OSError:
        return None
    return any(argument in (b"-M", b"--multiuser-server") for argument in arguments)


def quit_daemon(config: MpsConfig, gpu_uuid: str) -> None:
    """Ask the GPU's daemon to quit (what ``vgpu-agent mps quit`` and ExecStop do)."""
    control_command(config, config.pipe_dir(gpu_uuid), "quit")


def exec_daemon(config: MpsConfig, gpu_uuid: str) -> None:
    """Become the GPU's control daemon (``vgpu-agent mps run-daemon <uuid>``, systemd's
    ExecStart): prepare its directories, then exec it in the foreground."""
    # Check the program before creating anything: a bad one must leave nothing behind.
    program = checked_program(config.control_binary)
    multi_user = resolve_multi_user(config)
    pipe_dir, _ = prepare_directories(config, gpu_uuid)
    from vgpu_agent.mps import holding

    holding.prepare_lock(pipe_dir)
    command = [program, *daemon_command(config, multi_user)[1:]]
    environment = dict(os.environ)
    environment.update(daemon_environment(config, gpu_uuid))
    try:
        os.execvpe(command[0], command, environment)  # noqa: S606 - replaces this process on purpose
    except FileNotFoundError as exc:
        raise _missing_binary(config.control_binary) from exc
    except OSError as exc:
        raise MpsError(f"starting {command[0]} for GPU {gpu_uuid}: {exc.strerror}") from exc


def _wait_until_answers(
    config: MpsConfig,
    pipe_dir: str,
    timeout_s: float,
    exited: Callable[[], Optional[str]],
) -> Optional[str]:
    """Poll until the daemon answers (None) or ``timeout_s`` passes (the last reason).

    ``exited`` says why the daemon can no longer come up (it exited), else None.
    """
    deadline = time.monotonic() + timeout_s
    reason: Optional[str] = "not checked"
    while True:
        reason = probe_pipe_dir(config, pipe_dir)
        if reason is None:
            return None
        gone = exited()
        if gone is not None:
            return gone
        if time.monotonic() >= deadline:
            return reason
        time.sleep(0.05)


def secure_pipe_dir(config: MpsConfig, gpu_uuid: str, wait_s: float = 15.0) -> bool:
    """Wait until the GPU's daemon answers, then restrict its pipe directory when it runs
    in multi-user mode (vgpu-mps@.service's ExecStartPost, so that the sandboxed agent
    needs no write access there); True when restricted. MpsError if it never answers."""
    pipe_dir = config.pipe_dir(gpu_uuid)
    reason = _wait_until_answers(config, pipe_dir, wait_s, lambda: None)
    if reason is not None:
        raise MpsError(f"GPU {gpu_uuid}'s MPS daemon does not answer on {pipe_dir}: {reason}")
    pid = daemon_pid(pipe_dir)
    multi_user = running_multi_user(pid) if pid is not None else None
    if multi_user is None:
        multi_user = config.multi_user != "off"
    if multi_user:
        restrict_pipe_dir(pipe_dir)
    return multi_user


def ceiling_commands(ceiling: Ceiling) -> list[str]:
    """The control commands that set ``ceiling`` as the daemon's defaults."""
    commands = []
    if ceiling.thread_percentage is not None:
        commands.append(
            f"set_default_active_thread_percentage {percentage_text(ceiling.thread_percentage)}"
        )
    if ceiling.memory_mib is not None:
        # The daemon sees only its GPU (CUDA_VISIBLE_DEVICES), so it is device 0 there.
        commands.append(f"set_default_device_pinned_mem_limit 0 {ceiling.memory_mib}M")
    return commands


def daemon_default_commands(config: MpsConfig, memory_mib: int, replicas: int) -> list[str]:
    """The control commands that set the daemon's ceiling (:func:`daemon_ceiling`)."""
    return ceiling_commands(daemon_ceiling(config, memory_mib, replicas))


def server_ceiling_commands(ceiling: Ceiling, server_pid: int) -> list[str]:
    """The control commands that hold the running server ``server_pid`` to ``ceiling``: a
    server keeps the defaults it was spawned with (bench/RESULTS.md, driver 580)."""
    commands = []
    if ceiling.thread_percentage is not None:
        percentage = percentage_text(ceiling.thread_percentage)
        commands.append(f"set_active_thread_percentage {server_pid} {percentage}")
    if ceiling.memory_mib is not None:
        commands.append(f"set_device_pinned_mem_limit {server_pid} 0 {ceiling.memory_mib}M")
    return commands


def server_pids(config: MpsConfig, pipe_dir: str) -> list[int]:
    """The pids of the MPS servers the daemon of ``pipe_dir`` runs (``get_server_list``)."""
    answer = control_command(config, pipe_dir, "get_server_list")
    return [int(word) for word in answer.split() if word.isdigit()]


def send_ceiling(config: MpsConfig, pipe_dir: str, ceiling: Ceiling) -> list[str]:
    """Send the commands that set ``ceiling`` to a daemon that answers, as its defaults and
    on each server it already runs (new clients of those servers are held to it too);
    returns them. Raises MpsError naming the command that failed."""
    commands = ceiling_commands(ceiling)
    if not ceiling.empty:
        for pid in server_pids(config, pipe_dir):
            commands.extend(server_ceiling_commands(ceiling, pid))
    for command in commands:
        answer = control_command(config, pipe_dir, command)
        if any(word in answer.lower() for word in ("unrecognized", "error", "invalid")):
            raise MpsError(f"MPS daemon of {pipe_dir} refused {command!r}: {answer}")
    return commands


def apply_ceiling(
    config: MpsConfig, pipe_dir: str, ceiling: Ceiling, wait_s: float = 15.0
) -> list[str]:
    """Wait until the daemon of ``pipe_dir`` answers, then set ``ceiling``; returns the
    commands sent. Raises MpsError naming what failed."""
    if ceiling.empty:
        return []
    reason = _wait_until_answers(config, pipe_dir, wait_s, lambda: None)
    if reason is not None:
        raise MpsError(f"setting the MPS daemon ceiling on {pipe_dir}: {reason}")
    return send_ceiling(config, pipe_dir, ceiling)


def wait_until_answers(config: MpsConfig, pipe_dir: str, wait_s: float = 15.0) -> None:
    """Wait until the daemon of ``pipe_dir`` answers; MpsError saying why not after
    ``wait_s``."""
    reason = _wait_until_answers(config, pipe_dir, wait_s, lambda: None)
    if reason is not None:
        raise MpsError(f"waiting for the MPS daemon of {pipe_dir}: {reason}")


def apply_daemon_defaults(
    config: MpsConfig, pipe_dir: str, memory_mib: int, replicas: int, wait_s: float = 15.0
) -> list[str]:
    """Wait until the daemon of ``pipe_dir`` answers, then set the ceiling the config asks
    for (:func:`daemon_ceiling`); returns the commands. Raises MpsError on failure."""
    return apply_ceiling(config, pipe_dir, daemon_ceiling(config, memory_mib, replicas), wait_s)


_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_MEMORY = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)", re.IGNORECASE)
_MIB_PER_UNIT = {"": Decimal(1) / (1024 * 1024), "K": Decimal(1) / 1024, "M": Decimal(1)}
_MIB_PER_UNIT.update({"G": Decimal(1024), "T": Decimal(1024 * 1024)})
_LARGEST_MIB = Decimal(2**24)
#: get_default_active_thread_percentage may print fewer decimals than were set.
_THREAD_READBACK_TOLERANCE = Decimal("0.1")


def read_thread_default(
    config: MpsConfig, pipe_dir: str, server_pid: Optional[int] = None
) -> Optional[Decimal]:
    """The daemon's default active thread percentage (or server ``server_pid``'s); None when
    the answer has no number."""
    command = (
        "get_default_active_thread_percentage"
        if server_pid is None
        else f"get_active_thread_percentage {server_pid}"
    )
    answer = control_command(config, pipe_dir, command)
    match = _NUMBER.search(answer)
    return Decimal(match.group(0)) if match else None


@dataclass(frozen=True)
class MemoryReading:
    """A pinned memory limit as the daemon prints it: the value in MiB and the step it is
    printed in (driver 580 prints whole GiB, rounded down: 17971 MiB reads ``17G``)."""

    mib: Decimal
    step_mib: Decimal

    def shows(self, limit_mib: int) -> bool:
        """Whether this reading is what the daemon prints for a limit of ``limit_mib``."""
        if self.step_mib <= 1:
            return abs(self.mib - limit_mib) <= 1
        return self.mib == (Decimal(limit_mib) // self.step_mib) * self.step_mib

    def describe(self) -> str:
        """The reading as a number of MiB, for messages."""
        return f"{int(self.mib)} MiB"


def parse_memory_answer(answer: str) -> Optional[MemoryReading]:
    """The limit in the answer of ``get_default_device_pinned_mem_limit``; None when it
    names none (the daemon answers nothing when no default is set).

    The unit is read when the answer names one (``17G``, ``10194M``); a bare number is MiB,
    the unit the agent sets it in, unless too large to be MiB of any GPU (then bytes).
    """
    # A device prefix ("0=10194M") is not the value.
    text = answer.split("=", 1)[1] if "=" in answer else answer
    match = _MEMORY.search(text)
    if match is None:
        return None
    try:
        value = Decimal(match.group(1))
    except InvalidOperation:
        return None
    unit = match.group(2).upper()
    if not unit:
        unit = "" if value > _LARGEST_MIB else "M"
    step = _MIB_PER_UNIT[unit]
    return MemoryReading(value * step, step)


def read_memory_default(
    config: MpsConfig, pipe_dir: str, server_pid: Optional[int] = None
) -> Optional[MemoryReading]:
    """The daemon's default pinned memory limit on device 0 (or server ``server_pid``'s);
    None when it has none."""
    command = (
        "get_default_device_pinned_mem_limit 0"
        if server_pid is None
        else f"get_device_pinned_mem_limit {server_pid} 0"
    )
    answer = control_command(config, pipe_dir, command)
    return parse_memory_answer(answer)


def ceiling_gaps(config: MpsConfig, pipe_dir: str, ceiling: Ceiling) -> list[str]:
    """What of ``ceiling`` the daemon of ``pipe_dir`` and the servers it runs no longer
    hold, read back through its control pipe; empty when all of it is in force. Raises
    MpsError if it does not answer."""
    gaps = _gaps(config, pipe_dir, ceiling, None)
    for pid in server_pids(config, pipe_dir):
        gaps.extend(f"server {pid}: {gap}" for gap in _gaps(config, pipe_dir, ceiling, pid))
    return gaps


def _gaps(
    config: MpsConfig, pipe_dir: str, ceiling: Ceiling, server_pid: Optional[int]
) -> list[str]:
    """The gaps in the daemon's defaults (``server_pid`` None) or in one server's limits."""
    gaps = []
    if ceiling.thread_percentage is not None:
        threads = read_thread_default(config, pipe_dir, server_pid)
        if threads is None or abs(threads - ceiling.thread_percentage) > (
            _THREAD_READBACK_TOLERANCE
        ):
            shown = "none" if threads is None else f"{threads.normalize():f}"
            gaps.append(
                f"thread percentage {shown}, not {percentage_text(ceiling.thread_percentage)}"
            )
    if ceiling.memory_mib is not None:
        memory = read_memory_default(config, pipe_dir, server_pid)
        if memory is None or not memory.shows(ceiling.memory_mib):
            shown = "none" if memory is None else memory.describe()
            gaps.append(f"pinned memory limit {shown}, not {ceiling.memory_mib} MiB")
    return gaps


def _reuse_info(config: MpsConfig, gpu_uuid: str, pipe_dir: str, log_dir: str) -> MpsDaemonInfo:
    pid = daemon_pid(pipe_dir)
    multi_user = running_multi_user(pid) if pid is not None else None
    if multi_user is None:
        multi_user = config.multi_user != "off"
    if not multi_user:
        _log.warning(
            "the MPS daemon of GPU %s runs without multi-user mode (-M): pods running as "
            "different users will queue on this GPU",
            gpu_uuid,
        )
    return MpsDaemonInfo(gpu_uuid, pipe_dir, log_dir, multi_user, pid=pid, reused=True)


# -- the managers --------------------------------------------------------------------


@dataclass
class _Started:
    process: subprocess.Popen[bytes]
    log_file: IO[bytes]


class DirectMpsDaemons:
    """Starts each GPU's control daemon as a child process of the agent.

    A daemon that already answers on the GPU's pipe directory is reused and never
    stopped by this object, so restarting the agent never kills running jobs. Daemons
    get their own session, so a signal to the agent's process group does not reach them;
    their output goes to ``<log_dir>/control.log``.
    """

    def __init__(
        self,
        config: MpsConfig,
        *,
        multi_user: Optional[bool] = None,
        start_timeout_s: float = 15.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self._config = config
        self._multi_user = multi_user
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._lock = threading.Lock()
        self._started: dict[str, _Started] = {}
        self._prober = LivenessProber(config)

    def _resolved_multi_user(self) -> bool:
        if self._multi_user is None:
            self._multi_user = resolve_multi_user(self._config)
        return self._multi_user

    def start(self, gpu: Gpu) -> MpsDaemonInfo:
        """Make sure the GPU's daemon runs and answers, starting it if needed."""
        config = self._config
        pipe_dir, log_dir = prepare_directories(config, gpu.uuid)
        with self._lock:
            previous = self._started.get(gpu.uuid)
            if previous is not None:
                if previous.process.poll() is None:
                    return self._info(gpu.uuid, pipe_dir, log_dir)
                # It died (killed, crashed): forget it and start a new one below.
                del self._started[gpu.uuid]
                previous.log_file.close()
        if probe_pipe_dir(config, pipe_dir) is None:
            info = _reuse_info(config, gpu.uuid, pipe_dir, log_dir)
            _log.info("reusing the MPS daemon (pid %s) already answering on %s", info.pid, pipe_dir)
            if info.multi_user:
                restrict_pipe_dir(pipe_dir)
            return info
        multi_user = self._resolved_multi_user()
        command = [checked_program(config.control_binary), *daemon_command(config, multi_user)[1:]]
        from vgpu_agent.mps import holding

        holding.prepare_lock(pipe_dir)
        environment = dict(os.environ)
        environment.update(daemon_environment(config, gpu.uuid))
        log_path = os.path.join(log_dir, "control.log")
        try:
            log_file = open(log_path, "ab")  # noqa: SIM115 - kept open for the daemon's life
        except OSError as exc:
            raise MpsError(f"opening the MPS log {log_path}: {exc.strerror}") from exc
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            log_file.close()
            raise _missing_binary(config.control_binary) from exc
        except OSError as exc:
            log_file.close()
            raise MpsError(f"starting {command[0]} for GPU {gpu.uuid}: {exc.strerror}") from exc

        def exited() -> Optional[str]:
            code = process.poll()
            if code is None:
                return None
            return f"it exited with status {code}: {_tail(log_path)}"

        reason = _wait_until_answers(config, pipe_dir, self._start_timeout_s, exited)
        if reason is not None:
            if process.poll() is None:
                process.kill()
                process.wait()
            log_file.close()
            raise MpsError(
                f"starting the MPS daemon of GPU {gpu.uuid} ({' '.join(command)}): {reason}; "
                f"see {log_path}"
            )
        if multi_user:
            restrict_pipe_dir(pipe_dir)
        with self._lock:
            self._started[gpu.uuid] = _Started(process, log_file)
        _log.info(
            "started the MPS daemon of GPU %s (pid %d, %s)",
            gpu.uuid,
            process.pid,
            "multi-user" if multi_user else "single-user",
        )
        return self._info(gpu.uuid, pipe_dir, log_dir)

    def _info(self, gpu_uuid: str, pipe_dir: str, log_dir: str) -> MpsDaemonInfo:
        started = self._started[gpu_uuid]
        return MpsDaemonInfo(
            gpu_uuid, pipe_dir, log_dir, self._resolved_multi_user(), pid=started.process.pid
        )

    def apply_defaults(self, gpu: Gpu, ceiling: Ceiling) -> list[str]:
        """Set ``ceiling`` as the GPU's daemon defaults and have every full probe read it
        back and put it back; returns the commands sent."""
        return self._prober.hold(self._config.pipe_dir(gpu.uuid), ceiling)

    def stop(self, gpu_uuid: str) -> None:
        """Quit the daemon this object started (``quit``, then kill after a timeout)."""
        with self._lock:
            started = self._started.pop(gpu_uuid, None)
        if started is None:
            return
        process = started.process
        try:
            if process.poll() is None:
                try:
                    control_command(self._config, self._config.pipe_dir(gpu_uuid), "quit")
                except MpsError as exc:
                    _log.warning("asking the MPS daemon of GPU %s to quit: %s", gpu_uuid, exc)
                try:
                    process.wait(self._stop_timeout_s)
                except subprocess.TimeoutExpired:
                    _log.warning(
                        "the MPS daemon of GPU %s did not quit within %g s; killing it",
                        gpu_uuid,
                        self._stop_timeout_s,
                    )
                    process.kill()
                    process.wait()
        finally:
            started.log_file.close()

    def stop_all(self) -> None:
        """Quit every daemon this object started."""
        with self._lock:
            gpu_uuids = list(self._started)
        for gpu_uuid in gpu_uuids:
            self.stop(gpu_uuid)

    def _exited(self, gpu_uuid: str) -> Optional[tuple[_Started, int]]:
        """The daemon this object started for the GPU and its exit status, if it exited."""
        with self._lock:
            started = self._started.get(gpu_uuid)
        if started is None:
            return None
        code = started.process.poll()
        return None if code is None else (started, code)

    def quick_check(self, gpu_uuid: str) -> QuickCheck:
        """The pipe directory, control socket and pid-file process checks, and whether the
        daemon this object started has exited (a wait without blocking)."""
        seen = self._prober.quick(self._config.pipe_dir(gpu_uuid))
        exited = self._exited(gpu_uuid)
        if exited is None:
            return seen
        if seen.problem is not None:
            return QuickCheck(f"MPS daemon exited with status {exited[1]}")
        # Ours exited, yet the signs look alive: another daemon may serve the pipe
        # directory now; the full check asks it.
        return QuickCheck(unsure=True)

    def full_check(self, gpu_uuid: str) -> Optional[str]:
        """A control command (or the ceiling read back); when the daemon this object started
        has exited and another one answers (an operator or systemd brought it back), that
        one serves the GPU from here on."""
        problem = self._prober.full(self._config.pipe_dir(gpu_uuid))
        exited = self._exited(gpu_uuid)
        if exited is None:
            return problem
        started, code = exited
        if problem is None or problem.startswith(CEILING_PREFIX):
            with self._lock:
                adopted = self._started.pop(gpu_uuid, None) is started
            if adopted:
                started.log_file.close()
            return problem
        return f"MPS daemon exited with status {code}"


class SystemdMpsDaemons:
    """Starts ``vgpu-mps@<uuid>.service`` for each GPU; never stops the units, so an agent
    stop or upgrade never kills MPS jobs."""

    def __init__(
        self,
        config: MpsConfig,
        *,
        systemctl: str = "systemctl",
        start_timeout_s: float = 30.0,
        request_socket: Optional[str] = REQUEST_SOCKET,
    ) -> None:
        self._config = config
        self._systemctl = systemctl
        self._request_socket = request_socket
        self._start_timeout_s = start_timeout_s
        self._prober = LivenessProber(config)

    def start(self, gpu: Gpu) -> MpsDaemonInfo:
        """Start the GPU's unit (a no-op when it runs) and wait until the daemon answers.

        Through ``vgpu-mps-units.socket`` when it is there (the agent's sandbox cannot
        reach systemd; see mps_units), else with ``systemctl start`` (root, no sandbox)."""
        config = self._config
        unit = SYSTEMD_UNIT_TEMPLATE.format(gpu_uuid=gpu.uuid)
        if request_socket_available(self._request_socket):
            # The unit makes the GPU's directories itself (exec_daemon) and restricts the
            # pipe directory (ExecStartPost): the sandboxed agent writes neither root.
            assert self._request_socket is not None  # noqa: S101 - checked just above
            pipe_dir = config.pipe_dir(gpu.uuid)
            log_dir = log_dir_for(config.log_root, gpu.uuid)
            request_start(gpu.uuid, self._request_socket, self._start_timeout_s)
            restrict = False  # the unit's ExecStartPost did (secure_pipe_dir)
        else:
            pipe_dir, log_dir = prepare_directories(config, gpu.uuid)
            self._systemctl_start(unit)
            restrict = True
        reason = _wait_until_answers(config, pipe_dir, self._start_timeout_s, lambda: None)
        if reason is not None:
            raise MpsError(f"{unit} started but its MPS daemon does not answer: {reason}")
        info = _reuse_info(config, gpu.uuid, pipe_dir, log_dir)
        if info.multi_user and restrict:
            restrict_pipe_dir(pipe_dir)
        return info

    def _systemctl_start(self, unit: str) -> None:
        try:
            completed = subprocess.run(
                [self._systemctl, "start", unit],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self._start_timeout_s,
                check=False,
            )
        except FileNotFoundError as exc:
            raise MpsError(
                f"starting {unit}: {self._systemctl} not found; without systemd set "
                "mps.manager = direct"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise MpsError(
                f"starting {unit}: systemctl did not return within {self._start_timeout_s:g} s"
            ) from exc
        if completed.returncode != 0:
            output = (completed.stderr or completed.stdout).decode("utf-8", "replace").strip()
            raise MpsError(
                f"starting {unit}: {output or f'systemctl exit {completed.returncode}'} "
                f"(see systemctl status {unit} and journalctl -u {unit})"
            )

    def apply_defaults(self, gpu: Gpu, ceiling: Ceiling) -> list[str]:
        """Set ``ceiling`` as the GPU's daemon defaults and have every full probe read it
        back and put it back; returns the commands sent."""
        return self._prober.hold(self._config.pipe_dir(gpu.uuid), ceiling)

    def stop(self, gpu_uuid: str) -> None:
        """Leave the unit running: an agent stop or upgrade must not kill MPS jobs."""

    def quick_check(self, gpu_uuid: str) -> QuickCheck:
        """The pipe directory, control socket and pid-file process checks."""
        return self._prober.quick(self._config.pipe_dir(gpu_uuid))

    def full_check(self, gpu_uuid: str) -> Optional[str]:
        """A control command (or the ceiling read back, and put back when gone)."""
        return self._prober.full(self._config.pipe_dir(gpu_uuid))


class ExternalMpsDaemons:
    """Uses daemons someone else runs on ``<pipe_root>/<uuid>``; only checks them."""

    def __init__(self, config: MpsConfig) -> None:
        self._config = config
        self._prober = LivenessProber(config)

    def start(self, gpu: Gpu) -> MpsDaemonInfo:
        """Check that the GPU's daemon answers; MpsError naming what is wrong if not."""
        pipe_dir = self._config.pipe_dir(gpu.uuid)
        log_dir = log_dir_for(self._config.log_root, gpu.uuid)
        reason = probe_pipe_dir(self._config, pipe_dir)
        if reason is not None:
            raise MpsError(
                f"mps.manager = external, but GPU {gpu.uuid}'s MPS daemon does not answer: {reason}"
            )
        return _reuse_info(self._config, gpu.uuid, pipe_dir, log_dir)

    def apply_defaults(self, gpu: Gpu, ceiling: Ceiling) -> list[str]:
        """Set ``ceiling`` as the GPU's daemon defaults and have every full probe read it
        back and put it back; returns the commands sent."""
        return self._prober.hold(self._config.pipe_dir(gpu.uuid), ceiling)

    def stop(self, gpu_uuid: str) -> None:
        """Never stops a daemon it did not start."""

    def quick_check(self, gpu_uuid: str) -> QuickCheck:
        """The pipe directory, control socket and pid-file process checks."""
        return self._prober.quick(self._config.pipe_dir(gpu_uuid))

    def full_check(self, gpu_uuid: str) -> Optional[str]:
        """A control command (or the ceiling read back, and put back when gone)."""
        return self._prober.full(self._config.pipe_dir(gpu_uuid))


class HostMpsInspector:
    """The MPS daemons on this host, as `vgpu-agent doctor` inspects them."""

    in_agent: Optional[str] = None

    def __init__(self, config: MpsConfig) -> None:
        self._config = config

    def probe(self, gpu_uuid: str) -> Optional[str]:
        """None if the GPU's daemon answers; else why not."""
        return probe_pipe_dir(self._config, self._config.pipe_dir(gpu_uuid))

    def multi_user_supported(self) -> bool:
        """Whether this driver's nvidia-cuda-mps-control offers -M."""
        return help_supports_multi_user(control_help(self._config.control_binary))

    def daemon_multi_user(self, gpu_uuid: str) -> Optional[bool]:
        """Whether the GPU's running daemon was started with -M (None: no daemon or unknown)."""
        pid = daemon_pid(self._config.pipe_dir(gpu_uuid))
        return running_multi_user(pid) if pid is not None else None

    def ceiling_gaps(self, gpu_uuid: str, ceiling: Ceiling) -> list[str]:
        """What of ``ceiling`` the GPU's daemon does not hold, read back through its pipe."""
        return ceiling_gaps(self._config, self._config.pipe_dir(gpu_uuid), ceiling)


def build_mps_daemons(config: MpsConfig) -> MpsDaemons:
    """The MPS manager ``mps.manager`` names."""
    if config.manager == "direct":
        return DirectMpsDaemons(config)
    if config.manager == "systemd":
        return SystemdMpsDaemons(config)
    return ExternalMpsDaemons(config)


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, "rb") as log_file:
            log_file.seek(0, os.SEEK_END)
            log_file.seek(max(0, log_file.tell() - 4096))
            text = log_file.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"
