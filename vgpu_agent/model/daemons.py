"""The MPS daemon boundary: what the agent and its health checks ask of the per-GPU MPS
control daemons, whoever runs them.

:mod:`vgpu_agent.mps.daemons` implements it with real ``nvidia-cuda-mps-control`` processes (run
directly, by systemd, or by someone else); :mod:`vgpu_agent.standins.simulated` keeps simulated
daemons in memory. The composition root (:mod:`vgpu_agent.runtime.compose`) picks one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Protocol

from vgpu_agent.model.devices import Ceiling
from vgpu_agent.model.gpu import Gpu


@dataclass(frozen=True)
class MpsDaemonInfo:
    """Where a GPU's MPS daemon lives."""

    gpu_uuid: str
    pipe_dir: str
    log_dir: str
    multi_user: bool
    #: The control daemon's pid when known (read from its pid file).
    pid: Optional[int] = None
    #: Whether an already-running daemon was found and kept rather than started.
    reused: bool = False


#: How often the health monitor gives a daemon that passes its quick check a full check
#: (a real control command): a hung daemon, which the quick check cannot tell from a
#: working one, is seen within this plus ``mps.control_timeout_s``.
FULL_PROBE_INTERVAL_S = 5.0


@dataclass(frozen=True)
class QuickCheck:
    """What a quick liveness check saw: ``problem`` when the daemon is surely down; neither
    that nor ``unsure`` when nothing cheap to see is wrong (a hung daemon still passes)."""

    #: Why the daemon is down (e.g. no control socket, its process stopped or gone).
    problem: Optional[str] = None
    #: The cheap signs cannot tell (the pid file names a process that is gone, yet a daemon
    #: started since may answer): the caller runs a full check now, and it decides.
    unsure: bool = False


class MpsDaemons(Protocol):
    """Runs (or finds) one MPS control daemon per served GPU and checks that each answers.

    Liveness comes in two parts, so one thread can check every GPU often without a hung
    daemon holding it up: :meth:`quick_check` (cheap, never blocks; run every
    ``health.mps_check_interval_s``) and :meth:`full_check` (asks the daemon; may take up to
    ``mps.control_timeout_s``; run every :data:`FULL_PROBE_INTERVAL_S`, on a worker).
    """

    def start(self, gpu: Gpu) -> MpsDaemonInfo:
        """Make sure the GPU's daemon runs and answers; raises MpsError if it cannot."""
        ...

    def apply_defaults(self, gpu: Gpu, ceiling: Ceiling) -> list[str]:
        """Set the daemon's defaults to ``ceiling`` (what every client is held to, see
        :func:`vgpu_agent.config.plan.daemon_ceiling`) and keep them there: the liveness probe
        reads them back and puts them back when they are gone. Returns the commands sent;
        raises MpsError."""
        ...

    def stop(self, gpu_uuid: str) -> None:
        """Quit the GPU's daemon if this object started it (no-op otherwise)."""
        ...

    def quick_check(self, gpu_uuid: str) -> QuickCheck:
        """Liveness without asking the daemon: no process start and no I/O that can block
        (stat calls, /proc reads), so a stopped, killed or missing daemon is seen at once."""
        ...

    def full_check(self, gpu_uuid: str) -> Optional[str]:
        """None if the GPU's daemon answers a control command (and holds the ceiling
        :meth:`apply_defaults` set, putting it back when it is gone); else why not. Blocks up
        to ``mps.control_timeout_s`` when the daemon hangs."""
        ...


def check_now(daemons: MpsDaemons, gpu_uuid: str) -> Optional[str]:
    """One whole liveness check of the GPU's daemon: the quick check, then the full one
    unless the quick one already found the daemon down. None if it answers; else why not.
    For one-off checks; the health monitor schedules the two parts itself."""
    seen = daemons.quick_check(gpu_uuid)
    if seen.problem is not None:
        return seen.problem
    return daemons.full_check(gpu_uuid)


#: What every command says of a simulated GPU's MPS daemon: it is a flag inside the
#: running agent, so there is nothing on disk to start, stop or probe.
SIMULATED_DAEMON_NOTE = (
    "simulated inside `vgpu-agent run` (no daemon process, no pipe directory; "
    "`vgpu-agent status` shows its health)"
)


@dataclass(frozen=True)
class FaultCulprit:
    """What a GPU's MPS daemon output says of one fault: the pid of the client the MPS
    server names as having "encountered a fatal GPU error" (None when no such line came),
    where it was read, and why it is unknown."""

    pid: Optional[int]
    #: Where the line was looked for (a file, a unit's journal).
    source: str
    #: Why ``pid`` is None (empty when it is known).
    why_unknown: str = ""
    #: Every client the server said it tore down for this fault, in the order named (empty:
    #: it said none). The faulting client is one of them: when they are all one pod's, that
    #: pod faulted, whichever client the server named.
    torn_down: tuple[int, ...] = ()


class DaemonLogs(Protocol):
    """The output of each served GPU's MPS control daemon (its own lines and its servers'),
    read for the client that faulted (:mod:`vgpu_agent.mps.daemon_log`)."""

    def follow(self, gpu_uuids: Sequence[str]) -> None:
        """Start reading these GPUs' output from where it ends now (those already followed
        keep their place)."""
        ...

    def culprit(self, gpu_uuid: str, fault_at_epoch_s: float, wait_s: float) -> FaultCulprit:
        """The client the GPU's MPS server names for a fault seen at ``fault_at_epoch_s``
        (wall clock), waiting up to ``wait_s`` for its line; each line names the culprit of
        one fault only. Never raises."""
        ...

    def close(self) -> None:
        """Stop reading (files closed); a culprit still waited for is unknown."""
        ...


class MpsInspector(Protocol):
    """What `vgpu-agent doctor` asks about the MPS daemons of a node, which it did not start."""

    @property
    def in_agent(self) -> Optional[str]:
        """How the daemons live inside the agent (e.g. "simulated"), so that no MPS
        program is needed on the host; None for real daemons."""
        ...

    def probe(self, gpu_uuid: str) -> Optional[str]:
        """None if the GPU's daemon answers a control command; else why it does not."""
        ...

    def multi_user_supported(self) -> bool:
        """Whether the driver's MPS offers multi-user mode; VgpuError when it cannot tell."""
        ...

    def daemon_multi_user(self, gpu_uuid: str) -> Optional[bool]:
        """Whether the GPU's running daemon is in multi-user mode (None: unknown)."""
        ...

    def ceiling_gaps(self, gpu_uuid: str, ceiling: Ceiling) -> list[str]:
        """What of ``ceiling`` the GPU's daemon does not hold, read back (empty: all of it);
        MpsError when it does not answer."""
        ...
