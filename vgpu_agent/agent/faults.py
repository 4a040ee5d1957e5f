"""Application faults under MPS, recorded as events of their GPU.

Under MPS one client's fatal fault is every client's: measured on an H100 (driver 580,
issue 20), a client's illegal memory access (XID 31, an MMU fault) ended both other
clients of its GPU's MPS server ("an illegal memory access was encountered" in each), while
the server stayed up and new clients ran. NVML reports such a fault as an XID that means an
application fault (``health.ignored_xids``: it does not make the GPU Unhealthy), and the
kernel's XID line may name an innocent client's pid. So each such XID on a served GPU is
recorded here as an MPS fault of that GPU, naming every pod that had MPS clients on it when
the fault came (its blast radius, from the latest attribution: the culprit is among them):
one journal entry (``VGPU_EVENT=mps-fault``, ``GPU_UUID``, ``XID``, ``VGPU_PODS``), a
metrics counter per GPU and pod, and the most recent faults in `vgpu-agent status`.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from vgpu_agent.host.log import log_event

log = logging.getLogger(__name__)

#: How many faults `vgpu-agent status` shows (the journal keeps every one).
RECENT_FAULTS = 20


@dataclass(frozen=True)
class ApplicationFault:
    """An XID that means an application fault, seen on a served GPU (from the health
    watcher, through the agent's event queue)."""

    gpu_uuid: str
    xid: int
    detail: str = ""


@dataclass(frozen=True)
class FaultEvent:
    """One recorded fault: its GPU, XID, wall-clock time, and the pods (``namespace/pod``)
    that had MPS clients on that GPU when it came."""

    gpu_uuid: str
    xid: int
    at_epoch_s: float
    pods: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        """The event as `vgpu-agent status --json` shows it."""
        return {
            "gpu_uuid": self.gpu_uuid,
            "xid": self.xid,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at_epoch_s)),
            "pods": list(self.pods),
        }


#: GPU UUID -> the pods (``namespace/pod``) with MPS clients on it, as last seen.
PodsOn = Callable[[str], list[str]]
#: Told (GPU UUID, XID, pods) of each recorded fault: the metrics counter.
CountFault = Callable[[str, int, tuple[str, ...]], None]


class FaultLog:
    """The MPS faults of the served GPUs: each recorded once, the latest kept for status."""

    def __init__(
        self,
        pods_on: PodsOn,
        count: CountFault,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._pods_on = pods_on
        self._count = count
        self._wall_clock = wall_clock
        self._recent: collections.deque[FaultEvent] = collections.deque(maxlen=RECENT_FAULTS)

    def record(self, fault: ApplicationFault) -> FaultEvent:
        """Record ``fault``: the journal entry, the counter, the recent list."""
        try:
            pods = tuple(sorted(set(self._pods_on(fault.gpu_uuid))))
        except Exception as exc:  # a fault is recorded even when attribution fails
            log.warning("finding the pods on GPU %s for its fault: %s", fault.gpu_uuid, exc)
            pods = ()
        event = FaultEvent(fault.gpu_uuid, fault.xid, self._wall_clock(), pods)
        self._recent.append(event)
        self._count(fault.gpu_uuid, fault.xid, pods)
        shown = ", ".join(pods) if pods else "no pod with MPS clients known"
        detail = f" ({fault.detail})" if fault.detail else ""
        log_event(
            log,
            logging.WARNING,
            f"GPU {fault.gpu_uuid}: XID {fault.xid}, an application fault under MPS{detail}: it "
            f"may have ended the CUDA work of every pod with clients on this GPU: {shown}",
            GPU_UUID=fault.gpu_uuid,
            XID=str(fault.xid),
            VGPU_EVENT="mps-fault",
            VGPU_PODS=",".join(pods),
        )
        return event

    def recent(self) -> list[dict[str, Any]]:
        """The latest faults, oldest first, as status shows them."""
        return [event.describe() for event in self._recent]
