"""The commands the running agent takes on its control socket, as typed values.

`vgpu-agent status`, `health reset` and `simulate` send one JSON object each; the control
server turns it into a :data:`ControlCommand` with :func:`parse_command` (refusing a bad one
with a message that says what is wrong) and the agent's loop runs it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Union

from vgpu_agent.model.errors import VgpuError


class SimulateAction(enum.Enum):
    """A fault `vgpu-agent simulate` injects into simulated GPUs."""

    XID = "xid"
    ECC = "ecc"
    LOSE = "lose"
    RECOVER = "recover"
    MPS_DOWN = "mps-down"
    MPS_UP = "mps-up"
    #: A process becomes an MPS client of the GPU using some memory (for attribution).
    MPS_CLIENT = "mps-client"


@dataclass(frozen=True)
class StatusCommand:
    """Report the agent, each served GPU and its health."""


@dataclass(frozen=True)
class HealthResetCommand:
    """Clear the fault reasons of a GPU (UUID or index) at once."""

    gpu: str


@dataclass(frozen=True)
class SimulateCommand:
    """Inject a fault into a simulated GPU (UUID or index); ``xid`` for XID, ``pid`` and
    ``memory_mib`` for an MPS client."""

    action: SimulateAction
    gpu: str
    xid: Optional[int] = None
    pid: Optional[int] = None
    memory_mib: Optional[int] = None


ControlCommand = Union[StatusCommand, HealthResetCommand, SimulateCommand]


class FaultInjector(Protocol):
    """Injects simulated faults; only a simulated node has one."""

    def inject(self, command: SimulateCommand, gpu_uuid: str) -> None:
        """Inject ``command``'s fault into the GPU; raises VgpuError when it cannot."""
        ...


def _gpu_ref(request: dict[str, Any]) -> str:
    ref = request.get("gpu")
    if isinstance(ref, bool) or not isinstance(ref, (str, int)):
        raise VgpuError(f"the command needs a GPU (UUID or index), got {ref!r}")
    return str(ref)


def parse_command(request: dict[str, Any]) -> ControlCommand:
    """The command a decoded JSON request names; VgpuError saying what is wrong."""
    name = request.get("command")
    if name == "status":
        return StatusCommand()
    if name == "health-reset":
        return HealthResetCommand(_gpu_ref(request))
    if name == "simulate":
        action_name = request.get("action")
        try:
            action = SimulateAction(action_name)
        except ValueError:
            raise VgpuError(f"unknown simulate action {action_name!r}") from None
        xid = request.get("xid")
        if action is SimulateAction.XID and (isinstance(xid, bool) or not isinstance(xid, int)):
            raise VgpuError("simulate xid needs an XID number")
        pid, memory_mib = request.get("pid"), request.get("memory_mib")
        if action is SimulateAction.MPS_CLIENT:
            for name, value in (("pid", pid), ("memory_mib", memory_mib)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise VgpuError(f"simulate mps-client needs a {name} (an integer >= 0)")
        return SimulateCommand(
            action,
            _gpu_ref(request),
            xid if isinstance(xid, int) else None,
            pid if isinstance(pid, int) and action is SimulateAction.MPS_CLIENT else None,
            memory_mib
            if isinstance(memory_mib, int) and action is SimulateAction.MPS_CLIENT
            else None,
        )
    raise VgpuError(f"unknown control command {name!r}")


def to_request(command: ControlCommand) -> dict[str, Any]:
    """The JSON object that sends ``command`` (what :func:`parse_command` reads back)."""
    if isinstance(command, StatusCommand):
        return {"command": "status"}
    if isinstance(command, HealthResetCommand):
        return {"command": "health-reset", "gpu": command.gpu}
    request: dict[str, Any] = {
        "command": "simulate",
        "action": command.action.value,
        "gpu": command.gpu,
    }
    if command.xid is not None:
        request["xid"] = command.xid
    if command.pid is not None:
        request["pid"] = command.pid
    if command.memory_mib is not None:
        request["memory_mib"] = command.memory_mib
    return request
