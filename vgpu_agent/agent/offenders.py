"""Repeat offenders: pods named as the culprit of too many MPS faults, and which are held.

Under MPS one client's fatal fault ends every client of its GPU, so a pod that keeps faulting
(a crash-looping container faults again at every restart) keeps ending its neighbours' work.
:class:`OffenderPolicy` counts the faults each pod is the culprit of
(:mod:`vgpu_agent.agent.faults` names it from the MPS daemon's output and hands on only the
faults ``faults.offender_evidence`` counts: by default those where every client the server
tore down was the pod's; a fault whose culprit is unknown counts for nobody, and the pods it
merely hit never count). A pod counted ``faults.repeat_limit`` times within
``faults.window_s`` becomes an offender; with
``faults.offender_action = "hold"`` it is held until ``faults.hold_s`` after its last fault
(0: until the pod is gone), and released early when it is gone.

:meth:`OffenderPolicy.held` is what the per-pod client enforcement consumes: a held pod is
allowed no MPS clients, and the clients it has are ended. Pods are identified by UID: a
crash-looping container keeps its pod's UID, a new pod is a new tenant.

Pure: no I/O, the clock is handed in; thread safe (the enforcement may ask from its own
thread). What it decides is logged and counted by :class:`~vgpu_agent.agent.faults.FaultLog`.
Offenders live in memory: an agent restart releases them.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from vgpu_agent.config.schema import FaultsConfig
from vgpu_agent.model.pods import PodRef, PodsPresent


@dataclass(frozen=True)
class Offender:
    """A pod named as the culprit of ``faults`` MPS faults within ``window_s``."""

    pod: PodRef
    #: The GPU of its last fault.
    gpu_uuid: str
    #: Faults named on it: those that made it an offender, and any since.
    faults: int
    window_s: float
    #: Whether it is held (False: ``offender_action = "report"``).
    held: bool
    #: When it became an offender, and its last fault (the policy's clock).
    since: float
    last_fault: float

    def until(self, hold_s: float) -> Optional[float]:
        """When a hold of ``hold_s`` ends (the policy's clock); None: when the pod is gone."""
        return self.last_fault + hold_s if hold_s > 0 else None


@dataclass(frozen=True)
class Release:
    """An offender that is no longer one, and why."""

    offender: Offender
    why: str


class OffenderPolicy:
    """Counts the faults each pod is the counted culprit of and holds repeat offenders."""

    def __init__(
        self,
        config: FaultsConfig,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        #: Pod UID -> when each of its recent faults came (the policy's clock).
        self._faults: dict[str, collections.deque[float]] = {}
        self._offenders: dict[str, Offender] = {}

    @property
    def config(self) -> FaultsConfig:
        """The ``[faults]`` settings it applies."""
        return self._config

    def configure(self, config: FaultsConfig) -> list[Release]:
        """Apply new settings: counting and hold times follow them from now on; with
        ``offender_action = "report"`` every hold ends (returned)."""
        with self._lock:
            self._config = config
            if config.offender_action == "hold":
                return []
            released = [
                Release(offender, 'faults.offender_action is now "report"')
                for offender in self._offenders.values()
                if offender.held
            ]
            for release in released:
                self._offenders[release.offender.pod.uid] = replace(release.offender, held=False)
            return released

    def fault(self, pod: PodRef, gpu_uuid: str) -> Optional[Offender]:
        """Count a fault named on ``pod`` (by UID; one without is not counted); the
        offender when this fault makes it one."""
        if not pod.uid:
            return None
        now = self._clock()
        config = self._config
        with self._lock:
            known = self._offenders.get(pod.uid)
            if known is not None:
                # Still faulting: its hold runs from this fault.
                self._offenders[pod.uid] = replace(
                    known, faults=known.faults + 1, gpu_uuid=gpu_uuid, last_fault=now
                )
                return None
            recent = self._faults.setdefault(pod.uid, collections.deque())
            recent.append(now)
            self._forget_old(now)
            if len(recent) < config.repeat_limit:
                return None
            del self._faults[pod.uid]
            offender = Offender(
                pod=pod,
                gpu_uuid=gpu_uuid,
                faults=len(recent),
                window_s=config.window_s,
                held=config.offender_action == "hold",
                since=now,
                last_fault=now,
            )
            self._offenders[pod.uid] = offender
            return offender

    def expire(self, present: Optional[PodsPresent]) -> list[Release]:
        """End the holds that are over: ``hold_s`` after the last fault, or the pod gone
        from ``present`` (the pods holding vGPUs, as an attribution taken after the pod
        became an offender saw them; None: unknown, nobody is taken for gone)."""
        now = self._clock()
        with self._lock:
            self._forget_old(now)
            seen_at = now - present.age_s if present is not None else None
            released: list[Release] = []
            for uid, offender in list(self._offenders.items()):
                until = offender.until(self._config.hold_s)
                if until is not None and now >= until:
                    why = f"{self._config.hold_s:g} s passed since its last fault (faults.hold_s)"
                elif (
                    present is not None
                    and seen_at is not None
                    and seen_at > offender.since
                    and uid not in present.pod_uids
                ):
                    why = "the pod is gone"
                else:
                    continue
                del self._offenders[uid]
                released.append(Release(offender, why))
            return released

    def held(self) -> Mapping[str, str]:
        """The pods held now: pod UID -> why (what the enforcement says when it ends their
        clients)."""
        with self._lock:
            return {
                uid: self._reason(offender)
                for uid, offender in self._offenders.items()
                if offender.held
            }

    def offenders(self) -> list[Offender]:
        """Every offender, held or only reported, the earliest first."""
        with self._lock:
            return sorted(self._offenders.values(), key=lambda offender: offender.since)

    def describe(self) -> list[dict[str, Any]]:
        """The offenders as `vgpu-agent status --json` shows them (``mps_offenders``)."""
        return [self._describe(offender) for offender in self.offenders()]

    def _describe(self, offender: Offender) -> dict[str, Any]:
        until = offender.until(self._config.hold_s)
        return {
            "pod": offender.pod.shown,
            "pod_uid": offender.pod.uid,
            "gpu_uuid": offender.gpu_uuid,
            "faults": offender.faults,
            "window_s": offender.window_s,
            "held": offender.held,
            "since": self._wall_text(offender.since),
            "until": self._wall_text(until) if until is not None else "the pod is gone",
            "reason": self._reason(offender),
        }

    def _reason(self, offender: Offender) -> str:
        named = (
            f"the culprit of {offender.faults} MPS faults counted within "
            f"{offender.window_s:g} s (the last on GPU {offender.gpu_uuid})"
        )
        if not offender.held:
            return f'{named}; not held (faults.offender_action = "report")'
        until = offender.until(self._config.hold_s)
        ends = f"until {self._wall_text(until)}" if until is not None else "until the pod is gone"
        return f"{named}; held {ends}"

    def _wall_text(self, at: float) -> str:
        wall = self._wall_clock() + (at - self._clock())
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))

    def _forget_old(self, now: float) -> None:
        oldest = now - self._config.window_s
        for uid in list(self._faults):
            recent = self._faults[uid]
            while recent and recent[0] <= oldest:
                recent.popleft()
            if not recent:
                del self._faults[uid]
