"""What the loop does with the content of an event: a control command's answer, a health
change applied to the node; and the control socket those commands come through.

Answers and health changes are made on the loop's thread only; the loop hands in what they
need.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from vgpu_agent.agent.health import HealthChange
from vgpu_agent.agent.parts import ControlFactory, Observer, Service
from vgpu_agent.host.log import log_event
from vgpu_agent.model.commands import (
    ControlCommand,
    FaultInjector,
    HealthResetCommand,
    SimulateCommand,
    StatusCommand,
)
from vgpu_agent.model.devices import HealthReason
from vgpu_agent.model.errors import VgpuError
from vgpu_agent.model.node import Node

log = logging.getLogger(__name__)


def start_control(
    make_control: ControlFactory, path: str, handler: Callable[[ControlCommand], dict[str, Any]]
) -> Optional[Service]:
    """The control socket at ``path``, started, passing commands to ``handler``; None (with
    a warning) when it cannot start: the agent runs on without it."""
    control = make_control(path, handler)
    try:
        control.start()
    except VgpuError as exc:
        log.warning("%s; `vgpu-agent status` will not reach this agent", exc)
        return None
    return control


class ControlDispatch:
    """Answers the control socket's commands: `status`, `health reset` and `simulate`."""

    def __init__(
        self,
        node: Node,
        *,
        describe: Callable[[], dict[str, Any]],
        status_line: Callable[[], str],
        reset_health: Callable[[str], list[HealthReason]],
        faults: Optional[FaultInjector],
    ) -> None:
        """``describe`` is what `status` shows, ``status_line`` the agent's one-line state;
        ``reset_health(gpu_uuid)`` clears a GPU's fault reasons and applies the changes
        before it returns them; ``faults`` injects `simulate` faults (None on a real node)."""
        self._node = node
        self._describe = describe
        self._status_line = status_line
        self._reset_health = reset_health
        self._faults = faults

    def answer(self, command: ControlCommand) -> dict[str, Any]:
        """The answer to ``command``; a failure is an answer too, never an exception."""
        try:
            return self._answer(command)
        except VgpuError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bad request must not stop the agent
            log.exception("control command %r failed", command)
            return {"ok": False, "error": f"internal error: {exc}"}

    def answer_while_waiting(self, command: ControlCommand) -> dict[str, Any]:
        """A control answer before the GPU backend opened: the truth, no GPU yet."""
        if isinstance(command, StatusCommand):
            return {"ok": True, **self._describe()}
        return {
            "ok": False,
            "error": f"no GPU is served yet: {self._status_line()}; "
            "install or load the NVIDIA driver (the agent retries on its own)",
        }

    def _answer(self, command: ControlCommand) -> dict[str, Any]:
        if isinstance(command, StatusCommand):
            return {"ok": True, **self._describe()}
        gpu = self._node.find_gpu(command.gpu).gpu
        if isinstance(command, HealthResetCommand):
            cleared = self._reset_health(gpu.uuid)
            return {"ok": True, "gpu": gpu.uuid, "cleared": [reason.text for reason in cleared]}
        return self._simulate(command, gpu.uuid)

    def _simulate(self, command: SimulateCommand, gpu_uuid: str) -> dict[str, Any]:
        if self._faults is None:
            raise VgpuError("simulate works only with the simulated backend (gpus.backend)")
        self._faults.inject(command, gpu_uuid)
        return {"ok": True, "gpu": gpu_uuid, "action": command.action.value}


def apply_health_change(node: Node, observer: Optional[Observer], change: HealthChange) -> bool:
    """Apply a watcher's finding to the node, tell the observer and log it; whether the
    node changed (False when it already knew)."""
    if observer is not None and change.present and change.reason.xid is not None:
        observer.record_xid(change.gpu_uuid, change.reason.xid)
    transition = node.set_health(change.gpu_uuid, change.reason, change.present)
    if transition is None:
        return False
    flipped = (
        transition.healthy
        if not change.present
        else (transition.gpu.unhealthy_reasons == (change.reason,))
    )
    if observer is not None and flipped:
        observer.record_health(change.gpu_uuid, transition.healthy)
    health = transition.gpu.health
    verb = "" if change.present else "cleared "
    fields = {
        "GPU_UUID": change.gpu_uuid,
        "VGPU_EVENT": "health",
        "VGPU_HEALTH": health,
        "VGPU_REASON": change.reason.text,
    }
    if change.reason.xid is not None:
        fields["XID"] = str(change.reason.xid)
    detail = f" ({change.detail})" if change.detail else ""
    log_event(
        log,
        logging.WARNING if change.present else logging.INFO,
        f"GPU {change.gpu_uuid}: {verb}{change.reason}{detail}; its vGPUs are now {health}",
        **fields,
    )
    return True
