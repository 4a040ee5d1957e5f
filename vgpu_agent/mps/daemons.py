"""Per-GPU CUDA MPS control daemons: the managers that start, stop and watch them.

One ``nvidia-cuda-mps-control`` runs per served GPU, pinned to it with
``CUDA_VISIBLE_DEVICES=<uuid>``, in directories of its own (:mod:`vgpu_agent.mps.directories`).
Three managers implement :class:`~vgpu_agent.model.daemons.MpsDaemons`:

- :class:`DirectMpsDaemons` starts the daemons as child processes (no systemd; the
  real-GPU tests drive this one),
- :class:`SystemdMpsDaemons` starts ``vgpu-mps@<uuid>.service`` units and never stops them,
- :class:`ExternalMpsDaemons` only uses and watches daemons someone else runs.

Each checks its daemons and keeps their ceilings through a
:class:`~vgpu_agent.mps.liveness.LivenessProber`. The systemd unit runs :func:`exec_daemon`
(through ``vgpu-agent mps exec-daemon``) and :func:`secure_pipe_dir`; it starts the daemon
with the same :func:`~vgpu_agent.mps.control.daemon_command` and
:func:`~vgpu_agent.mps.control.daemon_environment` as the direct manager, so both paths start
it the same way. What was measured on a real GPU is in docs/mps.md.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from dataclasses import dataclass
from typing import IO, Optional

from vgpu_agent.config.schema import MpsConfig
from vgpu_agent.model.daemons import MpsDaemonInfo, MpsDaemons, QuickCheck
from vgpu_agent.model.devices import Ceiling
from vgpu_agent.model.errors import MpsError
from vgpu_agent.model.gpu import Gpu
from vgpu_agent.mps.ceilings import CEILING_PREFIX, ceiling_gaps
from vgpu_agent.mps.control import (
    checked_program,
    control_command,
    control_help,
    daemon_command,
    daemon_environment,
    help_supports_multi_user,
    missing_binary_error,
    probe_pipe_dir,
    resolve_multi_user,
    wait_for_answer,
)
from vgpu_agent.mps.directories import (
    daemon_pid,
    log_dir_for,
    prepare_directories,
    restrict_pipe_dir,
)
from vgpu_agent.mps.liveness import LivenessProber, running_multi_user
from vgpu_agent.mps.units import REQUEST_SOCKET, request_socket_available, request_start

_log = logging.getLogger(__name__)

SYSTEMD_UNIT_TEMPLATE = "vgpu-mps@{gpu_uuid}.service"


# -- what the systemd unit runs ------------------------------------------------------


def exec_daemon(config: MpsConfig, gpu_uuid: str) -> None:
    """Become the GPU's control daemon (``vgpu-agent mps exec-daemon <uuid>``, systemd's
    ExecStart): prepare its directories, then exec it in the foreground."""
    # Check the program before creating anything: a bad one must leave nothing behind.
    program = checked_program(config.control_binary)
    multi_user = resolve_multi_user(config)
    prepare_directories(config, gpu_uuid)
    command = [program, *daemon_command(config, multi_user)[1:]]
    environment = dict(os.environ)
    environment.update(daemon_environment(config, gpu_uuid))
    try:
        os.execvpe(command[0], command, environment)  # noqa: S606 - replaces this process on purpose
    except FileNotFoundError as exc:
        raise missing_binary_error(config.control_binary) from exc
    except OSError as exc:
        raise MpsError(f"starting {command[0]} for GPU {gpu_uuid}: {exc.strerror}") from exc


def secure_pipe_dir(config: MpsConfig, gpu_uuid: str, wait_s: float = 15.0) -> bool:
    """Wait until the GPU's daemon answers, then restrict its pipe directory when it runs
    in multi-user mode (vgpu-mps@.service's ExecStartPost, so that the sandboxed agent
    needs no write access there); True when restricted. MpsError if it never answers."""
    pipe_dir = config.pipe_dir(gpu_uuid)
    reason = wait_for_answer(config, pipe_dir, wait_s, lambda: None)
    if reason is not None:
        raise MpsError(f"GPU {gpu_uuid}'s MPS daemon does not answer on {pipe_dir}: {reason}")
    pid = daemon_pid(pipe_dir)
    multi_user = running_multi_user(pid) if pid is not None else None
    if multi_user is None:
        multi_user = config.multi_user != "off"
    if multi_user:
        restrict_pipe_dir(pipe_dir)
    return multi_user


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
            raise missing_binary_error(config.control_binary) from exc
        except OSError as exc:
            log_file.close()
            raise MpsError(f"starting {command[0]} for GPU {gpu.uuid}: {exc.strerror}") from exc

        def exited() -> Optional[str]:
            code = process.poll()
            if code is None:
                return None
            return f"it exited with status {code}: {_tail(log_path)}"

        reason = wait_for_answer(config, pipe_dir, self._start_timeout_s, exited)
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
        reason = wait_for_answer(config, pipe_dir, self._start_timeout_s, lambda: None)
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
