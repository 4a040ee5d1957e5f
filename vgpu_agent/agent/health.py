"""Watchers that turn GPU faults and dead MPS daemons into health changes.

They never touch the device list themselves: each finding becomes a :class:`HealthChange`
handed to ``emit`` (the agent's event queue), and the agent's loop applies it. A GPU is
Unhealthy while it has at least one reason; reasons come and go independently:

- a fault (``xid <n>``, ``double-bit ECC error``): a critical NVML event; cleared after
  the quiet period with no new event and a successful query (never, when the period is
  0), or by ``vgpu-agent health reset``.
- ``GPU lost``: the GPU fell off the bus; cleared only when a query succeeds again.
- ``MPS daemon ...``: the GPU's MPS daemon does not answer; cleared when it answers.

Each is a typed :class:`~vgpu_agent.model.devices.HealthReason`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

from vgpu_agent.agent.faults import ApplicationFault
from vgpu_agent.config.schema import HealthConfig
from vgpu_agent.model.daemons import FULL_PROBE_INTERVAL_S, MpsDaemons, QuickCheck
from vgpu_agent.model.devices import HealthReason
from vgpu_agent.model.errors import GpuError, GpuLostError
from vgpu_agent.model.gpu import GpuBackend, GpuEvent, GpuEventKind

log = logging.getLogger(__name__)

#: How long the event thread blocks in one wait; bounds how long stop() takes.
EVENT_WAIT_S = 1.0


@dataclass(frozen=True)
class HealthChange:
    """A reason for a GPU to be Unhealthy appears (``present``) or goes away."""

    gpu_uuid: str
    reason: HealthReason
    present: bool
    detail: str = ""


#: Where findings go: health changes, and application faults under MPS (agent.faults).
Emit = Callable[[Union[HealthChange, ApplicationFault]], None]


def poll_tick_s(config: HealthConfig) -> float:
    """How often the poll thread wakes: recovery needs a finer tick than the poll interval
    when the quiet period is short; with no recovery (quiet period 0) the poll interval is
    all there is to do, so an idle agent wakes rarely."""
    tick = config.poll_interval_s
    if config.recovery_quiet_period_s > 0:
        tick = min(tick, max(config.recovery_quiet_period_s, 0.1))
    return tick


class HealthMonitor:
    """Background watchers for a fixed set of GPUs: NVML events, polling, MPS liveness."""

    def __init__(
        self,
        backend: GpuBackend,
        mps: Optional[MpsDaemons],
        config: HealthConfig,
        gpu_uuids: list[str],
        *,
        emit: Emit,
        clock: Callable[[], float] = time.monotonic,
        mps_down: Optional[dict[str, HealthReason]] = None,
        probe_timeout_s: float = 2.0,
        full_check_interval_s: float = FULL_PROBE_INTERVAL_S,
    ) -> None:
        """``mps_down`` names GPUs whose daemon was already down (reason) when the agent
        started; their reasons are cleared like any other once the daemon answers.
        ``probe_timeout_s`` is how long one MPS full check may take
        (``mps.control_timeout_s``); a daemon that passes its quick checks gets a full check
        every ``full_check_interval_s``."""
        self._backend = backend
        self._mps = mps
        self._config = config
        self._gpu_uuids = list(gpu_uuids)
        self._emit = emit
        self._clock = clock
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Reentrant: changes are emitted under it, and an emit callback may call reset().
        self._lock = threading.RLock()
        #: GPU -> (fault reasons currently raised, time of the last critical event)
        self._faults: dict[str, tuple[set[HealthReason], float]] = {}
        self._lost: set[str] = set()
        self._polled: set[str] = set()
        self._mps_down: dict[str, HealthReason] = dict(mps_down or {})
        self._probe_timeout_s = probe_timeout_s
        self._full_interval_s = full_check_interval_s
        # MPS liveness state, under _mps_lock: when each GPU's daemon last passed a full
        # check (absent: one is due), the full checks running, and how many times a quick
        # check found each daemon down (a full check that started before then is stale).
        self._mps_lock = threading.Lock()
        self._full_passed_at: dict[str, float] = {}
        self._full_running: dict[str, concurrent.futures.Future[None]] = {}
        self._quick_downs: dict[str, int] = dict.fromkeys(self._gpu_uuids, 0)
        self._full_workers: Optional[concurrent.futures.ThreadPoolExecutor] = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the watcher threads the config asks for."""
        if self._config.xid_enabled and self._gpu_uuids:
            try:
                unwatchable = self._backend.watch_events(self._gpu_uuids)
            except GpuError as exc:
                # Nothing is registered, so an event thread would only fail in a loop.
                log.warning(
                    "watching GPU events failed (%s); polling every GPU every %g s instead",
                    exc,
                    self._config.poll_interval_s,
                )
                self._polled = set(self._gpu_uuids)
            else:
                for gpu_uuid in unwatchable:
                    log.warning(
                        "GPU %s does not support NVML event registration; polling it every %g s",
                        gpu_uuid,
                        self._config.poll_interval_s,
                    )
                self._polled = set(unwatchable)
                self._spawn("vgpu-health-events", self._event_loop)
        self._spawn("vgpu-health-poll", self._poll_loop)
        if self._config.mps_liveness_enabled and self._mps is not None and self._gpu_uuids:
            # Workers start as full checks need them and then wait for work without a
            # timeout: idle, they cost nothing. One per GPU at most, so a hung daemon holds
            # up its own GPU's full checks only.
            self._full_workers = concurrent.futures.ThreadPoolExecutor(
                max_workers=len(self._gpu_uuids), thread_name_prefix="vgpu-mps-full-check"
            )
            self._spawn("vgpu-mps-liveness", self._mps_loop)

    def stop(self) -> None:
        """Stop every watcher thread and wait for them (and for running full checks)."""
        self._stop.set()
        self._backend.interrupt_wait()
        for thread in self._threads:
            thread.join(timeout=max(EVENT_WAIT_S * 4, self._probe_timeout_s + 1))
        self._threads.clear()
        workers, self._full_workers = self._full_workers, None
        if workers is not None:
            with self._mps_lock:
                running = list(self._full_running.values())
            # A full check ends within the control timeout; one that outlives it is left
            # to finish on its own (its result is dropped) rather than hang the stop.
            _, late = concurrent.futures.wait(running, timeout=self._probe_timeout_s + 1)
            workers.shutdown(wait=not late)

    def _spawn(self, name: str, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- commands from the agent -----------------------------------------------------------

    def reset(self, gpu_uuid: str) -> list[HealthReason]:
        """Clear the GPU's fault reasons at once (an operator decided); returns them."""
        with self._lock:
            reasons, _ = self._faults.pop(gpu_uuid, (set(), 0.0))
            cleared = sorted(reasons, key=str)
            for reason in cleared:
                self._emit(
                    HealthChange(gpu_uuid, reason, present=False, detail="reset by operator")
                )
        return cleared

    # -- GPU events --------------------------------------------------------------------------

    def _event_loop(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                events = self._backend.wait_events(EVENT_WAIT_S)
            except GpuError as exc:
                # Once per streak: a persistent failure must not flood the journal.
                if not failing:
                    log.warning("waiting for GPU events failed (retrying every 1 s): %s", exc)
                failing = True
                self._stop.wait(1.0)
                continue
            if failing:
                log.info("waiting for GPU events works again")
                failing = False
            for event in events:
                self._on_event(event)

    def _on_event(self, event: GpuEvent) -> None:
        if event.gpu_uuid is None:
            targets = list(self._gpu_uuids)
        elif event.gpu_uuid in self._gpu_uuids:
            targets = [event.gpu_uuid]
        else:
            log.debug("ignoring a %s event of unserved GPU %s", event.kind.value, event.gpu_uuid)
            return
        if event.kind is GpuEventKind.XID:
            xid = event.xid if event.xid is not None else -1
            if xid in self._config.ignored_xids:
                log.info(
                    "GPU %s reported XID %d, an application fault: the GPU stays healthy",
                    ", ".join(targets),
                    xid,
                    extra={"fields": {"GPU_UUID": ",".join(targets), "XID": str(xid)}},
                )
                if self._mps is not None:
                    # Under MPS it may have ended every client of the GPU: recorded as a
                    # fault of each GPU it names (agent.faults).
                    for gpu_uuid in targets:
                        self._emit(ApplicationFault(gpu_uuid, xid, event.detail))
                return
            reason = HealthReason.xid_fault(xid)
        elif event.kind is GpuEventKind.DOUBLE_BIT_ECC:
            reason = HealthReason.ecc_fault()
        else:
            with self._lock:
                self._lost.update(targets)
                for gpu_uuid in targets:
                    self._emit(
                        HealthChange(gpu_uuid, HealthReason.lost(), True, detail=event.detail)
                    )
            return
        now = self._clock()
        # Emitting under the lock keeps a change and a concurrent reset or recovery of the
        # same reason in the order the monitor's own state saw them.
        with self._lock:
            for gpu_uuid in targets:
                reasons, _ = self._faults.get(gpu_uuid, (set(), now))
                reasons.add(reason)
                self._faults[gpu_uuid] = (reasons, now)
                self._emit(HealthChange(gpu_uuid, reason, True, detail=event.detail))

    # -- polling: lost GPUs, unwatchable GPUs, recovery --------------------------------------

    def _poll_loop(self) -> None:
        tick = poll_tick_s(self._config)
        next_poll = 0.0
        while not self._stop.wait(tick if next_poll else 0):
            now = self._clock()
            if now >= next_poll:
                next_poll = now + self._config.poll_interval_s
                self._poll_gpus()
            self._recover_quiet_gpus(now)

    def _poll_gpus(self) -> None:
        with self._lock:
            to_check = sorted(self._polled | self._lost)
        for gpu_uuid in to_check:
            try:
                self._backend.check(gpu_uuid)
            except GpuLostError as exc:
                with self._lock:
                    if gpu_uuid not in self._lost:
                        self._lost.add(gpu_uuid)
                        self._emit(HealthChange(gpu_uuid, HealthReason.lost(), True, str(exc)))
            except GpuError as exc:
                log.debug("polling GPU %s failed: %s", gpu_uuid, exc)
            else:
                with self._lock:
                    if gpu_uuid in self._lost:
                        self._lost.discard(gpu_uuid)
                        self._emit(
                            HealthChange(gpu_uuid, HealthReason.lost(), False, "GPU answers again")
                        )

    def _recover_quiet_gpus(self, now: float) -> None:
        quiet_s = self._config.recovery_quiet_period_s
        if quiet_s <= 0:
            return
        with self._lock:
            due = [
                gpu_uuid
                for gpu_uuid, (reasons, last_event) in self._faults.items()
                if reasons and now - last_event >= quiet_s and gpu_uuid not in self._lost
            ]
        for gpu_uuid in due:
            try:
                self._backend.check(gpu_uuid)
            except GpuError as exc:
                log.info("GPU %s is not recovered yet: %s", gpu_uuid, exc)
                continue
            detail = f"no critical event for {quiet_s:g} s and the GPU answers"
            with self._lock:
                entry = self._faults.get(gpu_uuid)
                # A new event while the GPU was being queried restarts its quiet period.
                if entry is None or now - entry[1] < quiet_s:
                    continue
                del self._faults[gpu_uuid]
                for reason in sorted(entry[0], key=str):
                    self._emit(HealthChange(gpu_uuid, reason, False, detail=detail))

    # -- MPS liveness ---------------------------------------------------------------------------

    def _mps_loop(self) -> None:
        # One thread for every GPU: quick checks are cheap and never block, and full checks,
        # which can, run on the workers.
        interval_s = self._config.mps_check_interval_s
        while not self._stop.is_set():
            started = self._clock()
            for gpu_uuid in self._gpu_uuids:
                self._check_mps_quickly(gpu_uuid, started)
            elapsed = self._clock() - started
            self._stop.wait(max(interval_s - elapsed, 0.0))

    def _check_mps_quickly(self, gpu_uuid: str, now: float) -> None:
        """Quick-check the GPU's daemon: report it down when it surely is, else hand it to a
        worker for a full check when one is due and none is running."""
        assert self._mps is not None  # noqa: S101 - only started with MPS
        error: Optional[Exception] = None
        try:
            seen = self._mps.quick_check(gpu_uuid)
        except Exception as exc:  # a check must never kill its watcher
            seen, error = QuickCheck(f"MPS daemon probe failed: {exc}"), exc
        with self._mps_lock:
            if seen.problem is not None:
                # Surely down, whatever a full check still running will say; once it seems
                # alive again a full check must confirm it before the reason is cleared.
                self._quick_downs[gpu_uuid] += 1
                self._full_passed_at.pop(gpu_uuid, None)
                self._report_mps(gpu_uuid, seen.problem, error)
                return
            if gpu_uuid in self._full_running:
                return
            passed_at = self._full_passed_at.get(gpu_uuid)
            fresh = passed_at is not None and now - passed_at < self._full_interval_s
            if fresh and not seen.unsure:
                return
            workers = self._full_workers
            if workers is None or self._stop.is_set():
                return
            try:
                future = workers.submit(
                    self._check_mps_fully, gpu_uuid, now, self._quick_downs[gpu_uuid]
                )
            except RuntimeError:  # the pool is shut down: the monitor or Python is stopping
                return
            self._full_running[gpu_uuid] = future

    def _check_mps_fully(self, gpu_uuid: str, started: float, quick_downs: int) -> None:
        """Full-check the GPU's daemon (on a worker) and report what it says, unless a quick
        check found the daemon down meanwhile: then this answer is older news."""
        assert self._mps is not None  # noqa: S101 - only started with MPS
        error: Optional[Exception] = None
        problem: Optional[str] = None
        try:
            problem = self._mps.full_check(gpu_uuid)
        except Exception as exc:  # a check must never kill its watcher
            error = exc
        with self._mps_lock:
            del self._full_running[gpu_uuid]
            if self._stop.is_set() or self._quick_downs[gpu_uuid] != quick_downs:
                return
            if problem is None and error is None:
                self._full_passed_at[gpu_uuid] = started
            self._report_mps(gpu_uuid, problem, error)

    def _report_mps(
        self, gpu_uuid: str, problem: Optional[str], error: Optional[Exception]
    ) -> None:
        """Emit the change, if any, from the GPU's last MPS finding to this one (``error``:
        the check raised it). Called under _mps_lock, so findings apply in order."""
        previous = self._mps_down.get(gpu_uuid)
        reason: Optional[HealthReason]
        if error is not None:
            reason = HealthReason.mps_down(f"MPS daemon probe failed: {error}")
            if reason != previous:
                log.error("probing the MPS daemon of GPU %s failed", gpu_uuid, exc_info=error)
        else:
            reason = None if problem is None else HealthReason.mps_down(problem)
        if reason is not None:
            if previous != reason:
                # The new reason first: clearing the old one first would make the GPU
                # look Healthy in between, and ListAndWatch would advertise that.
                self._mps_down[gpu_uuid] = reason
                self._emit(HealthChange(gpu_uuid, reason, True))
                if previous is not None:
                    self._emit(HealthChange(gpu_uuid, previous, False))
        elif previous is not None:
            del self._mps_down[gpu_uuid]
            self._emit(HealthChange(gpu_uuid, previous, False, detail="MPS daemon answers"))
