"""The MPS control program, ``nvidia-cuda-mps-control``: the daemon's command line and the
control commands sent to it.

The agent runs the control program as root, so it first makes sure nobody but root could
have put it where it is (:func:`checked_program`). The daemon's command line and
environment (:func:`daemon_command`, :func:`daemon_environment`) are the same whoever starts
it; whether it runs in multi-user mode (``-M``) is read from the program's usage text
(:func:`resolve_multi_user`). Every other exchange is one command written to the program's
stdin, with ``CUDA_MPS_PIPE_DIRECTORY`` naming the daemon, and its answer read back
(:func:`control_command`): is it answering, which servers it runs, quit. The commands that
set and read back the ceilings are in :mod:`vgpu_agent.mps.ceilings`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from typing import Callable, Optional

from vgpu_agent.config.schema import MpsConfig
from vgpu_agent.model.errors import MpsError
from vgpu_agent.mps.directories import CONTROL_SOCKET, log_dir_for, why_unsafe

_log = logging.getLogger(__name__)

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


# -- the daemon's command line -------------------------------------------------------


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
        raise missing_binary_error(control_binary) from exc
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


# -- the program ---------------------------------------------------------------------


def _ancestors(path: str) -> list[str]:
    """The directories above ``path`` (absolute), nearest first, "/" last."""
    found = []
    parent = os.path.dirname(path)
    while True:
        found.append(parent)
        if parent == "/":
            return found
        parent = os.path.dirname(parent)


def checked_program(control_binary: str) -> str:
    """The absolute path of the MPS control program, once nobody but root could have put
    something else there: we run it as root. Symlinks are resolved; the file and every
    directory above it (and above the link) must be root's and writable by nobody else.
    MpsError naming the path and what to do otherwise."""
    found = shutil.which(control_binary) if "/" not in control_binary else control_binary
    if found is None or not os.path.isfile(found):
        raise missing_binary_error(control_binary)
    found = os.path.abspath(found)
    real = os.path.realpath(found)
    try:
        directories = _ancestors(real) + _ancestors(found)
        problem = why_unsafe(real) or next(
            (why for why in (why_unsafe(path, allow_sticky=True) for path in directories) if why),
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


def missing_binary_error(control_binary: str) -> MpsError:
    """The error for a control program that is not there, saying what to install."""
    return MpsError(
        f"the MPS control program {control_binary!r} was not found: install the NVIDIA "
        "driver's MPS binaries (nvidia-cuda-mps-control, nvidia-cuda-mps-server) or set "
        "mps.control_binary to its path"
    )


# -- talking to a daemon -------------------------------------------------------------


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
        raise missing_binary_error(config.control_binary) from exc
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


def wait_for_answer(
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


def wait_until_answers(config: MpsConfig, pipe_dir: str, wait_s: float = 15.0) -> None:
    """Wait until the daemon of ``pipe_dir`` answers; MpsError saying why not after
    ``wait_s``."""
    reason = wait_for_answer(config, pipe_dir, wait_s, lambda: None)
    if reason is not None:
        raise MpsError(f"waiting for the MPS daemon of {pipe_dir}: {reason}")


def server_pids(config: MpsConfig, pipe_dir: str) -> list[int]:
    """The pids of the MPS servers the daemon of ``pipe_dir`` runs (``get_server_list``)."""
    answer = control_command(config, pipe_dir, "get_server_list")
    return [int(word) for word in answer.split() if word.isdigit()]


def quit_daemon(config: MpsConfig, gpu_uuid: str) -> None:
    """Ask the GPU's daemon to quit (what ``vgpu-agent mps quit`` and ExecStop do)."""
    control_command(config, config.pipe_dir(gpu_uuid), "quit")
