"""The ceilings that hold each MPS client to its share: setting them and reading them back.

A ceiling (:class:`~vgpu_agent.model.devices.Ceiling`: an active thread percentage and a
pinned memory limit) is set through the daemon's control pipe as its defaults, and on each
server it already runs, since a server keeps the defaults it was spawned with
(bench/RESULTS.md, driver 580). :func:`ceiling_gaps` reads it back and says what of it is no
longer in force: that is how a lost ceiling is found (the liveness checks of
:mod:`vgpu_agent.mps.liveness` put it back).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Optional

from vgpu_agent.config.plan import daemon_ceiling
from vgpu_agent.config.schema import MpsConfig
from vgpu_agent.model.devices import CEILING_TEXT, Ceiling, percentage_text
from vgpu_agent.model.errors import MpsError
from vgpu_agent.mps.control import control_command, server_pids, wait_for_answer

#: How every liveness reason about a daemon's ceiling begins (the daemon itself answers).
CEILING_PREFIX = CEILING_TEXT


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
    reason = wait_for_answer(config, pipe_dir, wait_s, lambda: None)
    if reason is not None:
        raise MpsError(f"setting the MPS daemon ceiling on {pipe_dir}: {reason}")
    return send_ceiling(config, pipe_dir, ceiling)


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
