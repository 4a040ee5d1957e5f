"""Application faults under MPS, recorded as events of their GPU, naming their culprit.

Under MPS one client's fatal fault is every client's: measured on an H100 (driver 580,
issue 20), a client's illegal memory access (XID 31, an MMU fault) ended both other
clients of its GPU's MPS server ("an illegal memory access was encountered" in each), while
the server stayed up and new clients ran. NVML reports such a fault as an XID that means an
application fault (``health.ignored_xids``: it does not make the GPU Unhealthy). The kernel's
XID line may name an innocent client's pid, so it is never used; the "culprit" here is the
client the MPS server names as having "encountered a fatal GPU error" in its daemon's output
(:class:`~vgpu_agent.model.daemons.DaemonLogs`). Beside other pods' clients that name is a
lead, not proof: on an H100 (driver 580) it was an innocent neighbour. The faulting client
is always among the clients the server says it tore down, so when those are all the named
pod's the culprit is sure (:data:`SOLE_CLIENT`), and by default
(``faults.offender_evidence = "sole-client"``) only such faults count against a pod.

Each such XID on a served GPU is recorded here as an MPS fault of that GPU in three steps:

1. :meth:`FaultLog.seen` (on the loop, as the fault arrives): the pods with MPS clients on
   the GPU then, from the latest attribution (its blast radius), with their client pids;
2. :meth:`FaultLog.name` (on a worker, :meth:`FaultLog.arrive`: the loop never waits): the
   culprit's pid from the daemon's output, waiting briefly for its line, and its pod: the
   one that had that client in the attribution, else the process's cgroup if it still runs;
3. :meth:`FaultLog.record` (on the loop): one journal entry (``VGPU_EVENT=mps-fault``,
   ``GPU_UUID``, ``XID``, ``VGPU_PODS`` = every pod hit, ``VGPU_CULPRIT_POD``, and the
   culprit's pod UID and pid when known), the metrics counters, the most recent faults in
   `vgpu-agent status`, and the culprit's fault counted by the
   :class:`~vgpu_agent.agent.offenders.OffenderPolicy`, whose holds and releases are logged
   here too (``VGPU_EVENT=mps-offender-held``, ``-reported``, ``-released``).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

from vgpu_agent.agent.offenders import Offender, OffenderPolicy, Release
from vgpu_agent.config.schema import FaultsConfig
from vgpu_agent.host.log import log_event
from vgpu_agent.model.daemons import DaemonLogs
from vgpu_agent.model.pods import PodRef, PodsPresent

log = logging.getLogger(__name__)

#: How many faults `vgpu-agent status` shows (the journal keeps every one).
RECENT_FAULTS = 20
#: How long the culprit's line may take to appear in the daemon's output after the fault.
CULPRIT_WAIT_S = 3.0
#: ``VGPU_CULPRIT_POD`` and status when no culprit is known.
UNKNOWN = "unknown"
#: A culprit's evidence: every client the server tore down for the fault was its pod's,
#: so that pod faulted (``faults.offender_evidence = "sole-client"`` counts only these).
SOLE_CLIENT = "sole-client"
#: A culprit's evidence: the server named its client first, beside other pods' clients (or
#: listed none it tore down): a lead, measured to be an innocent neighbour on an H100.
NAMED = "named"


@dataclass(frozen=True)
class ApplicationFault:
    """An XID that means an application fault, seen on a served GPU (from the health
    watcher, through the agent's event queue)."""

    gpu_uuid: str
    xid: int
    detail: str = ""


@dataclass(frozen=True)
class SeenFault:
    """A fault as it arrived: its wall-clock time, and the MPS clients on its GPU then."""

    fault: ApplicationFault
    at_epoch_s: float
    #: Client pid -> its pod, from the latest attribution.
    clients: Mapping[int, PodRef]


@dataclass(frozen=True)
class Culprit:
    """The client the MPS server named for a fault and its pod, or why they are unknown."""

    #: The client's pid, as the daemon's output names it (None: no line named one).
    pid: Optional[int]
    #: Its pod (None: unknown).
    pod: Optional[PodRef]
    #: Where it was found, or why it is unknown.
    note: str
    #: :data:`SOLE_CLIENT` or :data:`NAMED` ("" when no pod is known).
    evidence: str = ""
    #: The pods of the clients the server said it tore down (the fault's blast radius as
    #: the server saw it).
    torn_down: tuple[PodRef, ...] = ()


@dataclass(frozen=True)
class NamedFault:
    """A fault and its culprit, handed back to the loop to record."""

    seen: SeenFault
    culprit: Culprit


@dataclass(frozen=True)
class FaultEvent:
    """One recorded fault: its GPU, XID, wall-clock time, the pods (``namespace/pod``) that
    had MPS clients on that GPU when it came, and its culprit."""

    gpu_uuid: str
    xid: int
    at_epoch_s: float
    pods: tuple[str, ...]
    culprit: Culprit

    def describe(self) -> dict[str, Any]:
        """The event as `vgpu-agent status --json` shows it."""
        pod = self.culprit.pod
        return {
            "gpu_uuid": self.gpu_uuid,
            "xid": self.xid,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at_epoch_s)),
            "pods": list(self.pods),
            "culprit": pod.shown if pod is not None else UNKNOWN,
            "culprit_pod_uid": pod.uid if pod is not None else "",
            "culprit_pid": self.culprit.pid,
            "culprit_evidence": self.culprit.evidence,
            "culprit_note": self.culprit.note,
        }


class FaultObserver(Protocol):
    """What the fault log reads from the attribution and tells the metrics
    (:class:`vgpu_agent.observability.service.Observability`)."""

    def clients_on(self, gpu_uuid: str) -> dict[int, PodRef]:
        """The MPS client pids on the GPU and their pods, as last seen."""
        ...

    def pod_of_process(self, pid: int) -> Optional[PodRef]:
        """The pod of a running process, from its cgroup (None: in no pod, or gone)."""
        ...

    def pods_present(self) -> Optional[PodsPresent]:
        """The pods holding vGPUs as last seen (None: the attribution cannot tell)."""
        ...

    def record_fault(self, gpu_uuid: str, xid: int, pods: tuple[str, ...]) -> None:
        """Count an application fault under MPS on the GPU, for each pod it may have hit."""
        ...

    def record_culprit(self, gpu_uuid: str, pod: str) -> None:
        """Count a fault's culprit (``""``: unknown)."""
        ...

    def record_offender(self, pod_uid: str, pod: str, held: bool) -> None:
        """A pod became an offender (held, or only reported)."""
        ...

    def release_offender(self, pod_uid: str) -> None:
        """A pod is no longer an offender."""
        ...


class NoObserver:
    """The observer of an agent that runs without one: no attribution, no metrics."""

    def clients_on(self, gpu_uuid: str) -> dict[int, PodRef]:
        """Nobody is known."""
        return {}

    def pod_of_process(self, pid: int) -> Optional[PodRef]:
        """Nobody is known."""
        return None

    def pods_present(self) -> Optional[PodsPresent]:
        """Unknown."""
        return None

    def record_fault(self, gpu_uuid: str, xid: int, pods: tuple[str, ...]) -> None:
        """Nothing counts."""

    def record_culprit(self, gpu_uuid: str, pod: str) -> None:
        """Nothing counts."""

    def record_offender(self, pod_uid: str, pod: str, held: bool) -> None:
        """Nothing counts."""

    def release_offender(self, pod_uid: str) -> None:
        """Nothing counts."""


class FaultLog:
    """The MPS faults of the served GPUs, each recorded once with its culprit; the latest
    kept for status; repeat offenders held through :attr:`offenders`."""

    def __init__(
        self,
        observer: FaultObserver,
        offenders: OffenderPolicy,
        daemon_logs: Optional[DaemonLogs],
        *,
        no_daemon_logs: str = "the MPS daemons' output is not read",
        wall_clock: Callable[[], float] = time.time,
        wait_s: float = CULPRIT_WAIT_S,
    ) -> None:
        self._observer = observer
        #: The offender policy; its ``held()`` is what the per-pod client enforcement uses.
        self.offenders = offenders
        self._daemon_logs = daemon_logs
        self._no_daemon_logs = no_daemon_logs
        self._wall_clock = wall_clock
        self._wait_s = wait_s
        self._recent: collections.deque[FaultEvent] = collections.deque(maxlen=RECENT_FAULTS)
        self._worker: Optional[ThreadPoolExecutor] = None

    # -- the three steps ------------------------------------------------------------------

    def seen(self, fault: ApplicationFault) -> SeenFault:
        """The fault as it arrives: now, and who had MPS clients on its GPU."""
        try:
            clients = dict(self._observer.clients_on(fault.gpu_uuid))
        except Exception as exc:  # a fault is recorded even when attribution fails
            log.warning("finding the pods on GPU %s for its fault: %s", fault.gpu_uuid, exc)
            clients = {}
        return SeenFault(fault, self._wall_clock(), clients)

    def name(self, seen: SeenFault) -> Culprit:
        """The fault's culprit from its GPU's daemon output (waits up to ``wait_s`` for the
        line); never raises."""
        if self._daemon_logs is None:
            return Culprit(None, None, self._no_daemon_logs)
        gpu_uuid = seen.fault.gpu_uuid
        try:
            found = self._daemon_logs.culprit(gpu_uuid, seen.at_epoch_s, self._wait_s)
        except Exception as exc:  # naming is best effort: the fault is recorded anyway
            log.exception("reading the MPS daemon output of GPU %s", gpu_uuid)
            return Culprit(None, None, f"reading the MPS daemon's output failed: {exc}")
        if found.pid is None:
            return Culprit(None, None, found.why_unknown)
        named = f"named by {found.source}"
        # Each pid's pod once: a lookup may read the process's cgroup.
        down = {pid: self._pod_of(pid, seen) for pid in found.torn_down}
        pod = down[found.pid] if found.pid in down else self._pod_of(found.pid, seen)
        if pod is None:
            return Culprit(
                found.pid,
                None,
                f"pid {found.pid} ({named}) is in no pod the agent knows: no MPS client of "
                "the latest attribution, and not running in a pod's cgroup",
            )
        torn_down = tuple({p.uid or p.shown: p for p in down.values() if p is not None}.values())
        others = sum(1 for other in down.values() if other is None or other.uid != pod.uid)
        if not found.torn_down:
            why = "a lead: the server listed no clients it tore down"
        elif found.pid not in down:
            why = "a lead: the server did not list it among the clients it tore down"
        elif others:
            why = (
                f"a lead: the server also tore down {others} client(s) of other or unknown "
                "pods, and may name any of them"
            )
        else:
            return Culprit(
                found.pid,
                pod,
                f"{named}; every client the server tore down ({len(down)}) was this pod's",
                SOLE_CLIENT,
                torn_down,
            )
        return Culprit(found.pid, pod, f"{named}; {why}", NAMED, torn_down)

    def _pod_of(self, pid: int, seen: SeenFault) -> Optional[PodRef]:
        """A client's pod: from the attribution taken as the fault arrived, with its UID
        from the process's cgroup if the attribution lacks one and it still runs."""
        pod = seen.clients.get(pid)
        if pod is None or not pod.uid:
            try:
                running = self._observer.pod_of_process(pid)
            except Exception as exc:
                log.warning("finding the pod of process %d: %s", pid, exc)
                running = None
            if running is not None:
                pod = PodRef(
                    running.uid, pod.name if pod is not None and pod.name else running.name
                )
        return pod

    def record(self, seen: SeenFault, culprit: Culprit) -> FaultEvent:
        """Record the fault: the journal entry, the counters, the recent list, and the
        culprit's fault for the offender policy."""
        fault = seen.fault
        hit = {pod.shown for pod in (*seen.clients.values(), *culprit.torn_down)}
        if culprit.pod is not None:
            hit.add(culprit.pod.shown)
        pods = tuple(sorted(hit))
        event = FaultEvent(fault.gpu_uuid, fault.xid, seen.at_epoch_s, pods, culprit)
        self._recent.append(event)
        self._observer.record_fault(fault.gpu_uuid, fault.xid, pods)
        shown = ", ".join(pods) if pods else "no pod with MPS clients known"
        detail = f" ({fault.detail})" if fault.detail else ""
        if culprit.pod is not None:
            self._observer.record_culprit(fault.gpu_uuid, culprit.pod.shown)
            who = f"culprit {culprit.pod.shown} (pid {culprit.pid}, {culprit.note})"
        else:
            self._observer.record_culprit(fault.gpu_uuid, "")
            who = f"culprit unknown ({culprit.note})"
        log_event(
            log,
            logging.WARNING,
            f"GPU {fault.gpu_uuid}: XID {fault.xid}, an application fault under MPS{detail}: "
            f"{who}; it may have ended the CUDA work of every pod with clients on this GPU: "
            f"{shown}",
            GPU_UUID=fault.gpu_uuid,
            XID=str(fault.xid),
            VGPU_EVENT="mps-fault",
            VGPU_PODS=",".join(pods),
            VGPU_CULPRIT_POD=culprit.pod.shown if culprit.pod is not None else UNKNOWN,
            VGPU_CULPRIT_POD_UID=culprit.pod.uid if culprit.pod is not None else None,
            VGPU_CULPRIT_PID=str(culprit.pid) if culprit.pid is not None else None,
            VGPU_CULPRIT_EVIDENCE=culprit.evidence or None,
        )
        counts = culprit.evidence == SOLE_CLIENT or (
            culprit.evidence == NAMED and self.offenders.config.offender_evidence == "named"
        )
        if culprit.pod is not None and counts:
            offender = self.offenders.fault(culprit.pod, fault.gpu_uuid)
            if offender is not None:
                self._became(offender)
        return event

    # -- on the loop ----------------------------------------------------------------------

    def arrive(self, fault: ApplicationFault, emit: Callable[[NamedFault], None]) -> None:
        """A fault arrived: see it now, name its culprit on a worker, and hand both to
        ``emit`` (the loop's queue), which calls :meth:`record`."""
        seen = self.seen(fault)
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vgpu-culprit")

        def name_and_emit() -> None:
            emit(NamedFault(seen, self.name(seen)))

        self._worker.submit(name_and_emit)

    def use_daemon_logs(self, daemon_logs: Optional[DaemonLogs], unread: str) -> None:
        """Read culprits from ``daemon_logs`` from now on (None: ``unread`` says why not)."""
        if self._daemon_logs is not None and self._daemon_logs is not daemon_logs:
            self._daemon_logs.close()
        self._daemon_logs = daemon_logs
        self._no_daemon_logs = unread

    def follow(self, gpu_uuids: Sequence[str]) -> None:
        """Read these GPUs' daemon output from where it ends now (the served GPUs)."""
        if self._daemon_logs is None:
            return
        try:
            self._daemon_logs.follow(gpu_uuids)
        except Exception as exc:
            log.warning("following the MPS daemons' output: %s", exc)

    def tick(self) -> None:
        """End the holds that are over (time, or the pod gone)."""
        try:
            present = self._observer.pods_present()
        except Exception as exc:
            log.warning("finding the pods present, to release held ones: %s", exc)
            present = None
        for release in self.offenders.expire(present):
            self._released(release)

    def configure(self, config: FaultsConfig) -> None:
        """Apply reloaded ``[faults]`` settings."""
        for release in self.offenders.configure(config):
            self._released(release)

    def close(self) -> None:
        """Stop naming culprits (a fault still being named is not recorded)."""
        if self._worker is not None:
            self._worker.shutdown(wait=False)
        if self._daemon_logs is not None:
            self._daemon_logs.close()

    def recent(self) -> list[dict[str, Any]]:
        """The latest faults, oldest first, as status shows them."""
        return [event.describe() for event in self._recent]

    # -- offenders ------------------------------------------------------------------------

    def _became(self, offender: Offender) -> None:
        pod = offender.pod
        config = self.offenders.config
        held = offender.held
        self._observer.record_offender(pod.uid, pod.shown, held)
        action = (
            "held: it is allowed no MPS clients, and those it has are ended"
            if held
            else 'only reported (faults.offender_action = "report")'
        )
        if not held:
            lasting = ""
        elif offender.until(config.hold_s) is not None:
            lasting = f", for {config.hold_s:g} s after its last fault (faults.hold_s)"
        else:
            lasting = ", until the pod is gone (faults.hold_s = 0)"
        log_event(
            log,
            logging.WARNING,
            f"pod {pod.shown} ({pod.uid}) was the culprit of {offender.faults} MPS faults counted "
            f"within {offender.window_s:g} s (faults.repeat_limit = {config.repeat_limit}), the "
            f"last on GPU {offender.gpu_uuid}: {action}{lasting}",
            GPU_UUID=offender.gpu_uuid,
            VGPU_EVENT="mps-offender-held" if held else "mps-offender-reported",
            VGPU_POD=pod.shown,
            VGPU_POD_UID=pod.uid,
            VGPU_FAULTS=str(offender.faults),
            VGPU_WINDOW_S=f"{offender.window_s:g}",
        )

    def _released(self, release: Release) -> None:
        offender = release.offender
        pod = offender.pod
        self._observer.release_offender(pod.uid)
        if not offender.held:
            return
        log_event(
            log,
            logging.WARNING,
            f"pod {pod.shown} ({pod.uid}) is no longer held: {release.why}",
            GPU_UUID=offender.gpu_uuid,
            VGPU_EVENT="mps-offender-released",
            VGPU_POD=pod.shown,
            VGPU_POD_UID=pod.uid,
            VGPU_FAULTS=str(offender.faults),
            VGPU_WINDOW_S=f"{offender.window_s:g}",
        )
