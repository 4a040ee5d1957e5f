"""The health watchers driven by the simulated backend and MPS daemons: XID and ECC events,
ignored XIDs, lost GPUs and polling, quiet-period recovery, reset, MPS liveness, switches
and shutdown. Changes are collected from ``emit`` and waited for with generous bounds."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import pytest

from vgpu_agent.agent.faults import ApplicationFault
from vgpu_agent.agent.health import HealthChange, HealthMonitor, poll_tick_s
from vgpu_agent.config.schema import HealthConfig, SimulatedConfig
from vgpu_agent.model.daemons import FULL_PROBE_INTERVAL_S, MpsDaemonInfo, MpsDaemons, QuickCheck
from vgpu_agent.model.devices import Ceiling, HealthReason
from vgpu_agent.model.gpu import Gpu
from vgpu_agent.standins.simulated import SimulatedBackend, SimulatedMpsDaemons, gpus_from_config

#: Generous bound for anything that should happen "at once" (a busy 2-core machine).
PROMPTLY_S = 10.0
#: A quiet period no test reaches on the real clock.
NEVER_S = 3600.0
FAST = HealthConfig(
    poll_interval_s=0.05, mps_check_interval_s=0.05, recovery_quiet_period_s=NEVER_S
)
MPS_DOWN = "MPS daemon down (simulated)"
LIVENESS = "vgpu-mps-liveness"
FULL_WORKER = "vgpu-mps-full-check"
REASON_DBE = HealthReason.ecc_fault().text
REASON_LOST = HealthReason.lost().text

Summary = tuple[str, str, bool]


class Recorder:
    """A thread-safe ``emit`` that keeps every change and lets a test wait for some."""

    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._changes: list[HealthChange] = []
        #: The application faults under MPS emitted, in order.
        self.faults: list[ApplicationFault] = []

    def __call__(self, change: Union[HealthChange, ApplicationFault]) -> None:
        with self._ready:
            if isinstance(change, ApplicationFault):
                self.faults.append(change)
            else:
                self._changes.append(change)
            self._ready.notify_all()

    @property
    def changes(self) -> list[HealthChange]:
        """Every change so far, in emit order."""
        with self._ready:
            return list(self._changes)

    def summary(self) -> list[Summary]:
        """(GPU, reason, present) of every change so far."""
        return [(change.gpu_uuid, change.reason.text, change.present) for change in self.changes]

    def wait_for(self, *expected: Summary) -> list[HealthChange]:
        """Wait until every expected (GPU, reason, present) has been emitted; return those."""

        def found() -> bool:
            seen = {(c.gpu_uuid, c.reason.text, c.present) for c in self._changes}
            return all(item in seen for item in expected)

        with self._ready:
            arrived = self._ready.wait_for(found, PROMPTLY_S)
            assert arrived, f"waited for {expected}, got {self._changes}"
            return [
                change
                for change in self._changes
                if (change.gpu_uuid, change.reason.text, change.present) in expected
            ]


class FakeClock:
    """A monotonic clock the test moves by hand; counts reads so a test can wait for the
    poll loop to have looked at the time."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self._ready = threading.Condition()
        self._now_s = start_s
        self._reads = 0

    def __call__(self) -> float:
        with self._ready:
            self._reads += 1
            self._ready.notify_all()
            return self._now_s

    @property
    def reads(self) -> int:
        """How many times the clock was read."""
        with self._ready:
            return self._reads

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        with self._ready:
            self._now_s += seconds

    def wait_for_reads(self, count: int = 2) -> None:
        """Wait until the clock has been read ``count`` more times (with one poll thread
        reading it once per tick, two reads mean a whole tick saw the current time)."""
        with self._ready:
            target = self._reads + count
            assert self._ready.wait_for(lambda: self._reads >= target, PROMPTLY_S)


@dataclass
class Node:
    """Simulated GPUs, their MPS daemons and a monitor over them."""

    gpus: list[Gpu]
    backend: SimulatedBackend
    daemons: SimulatedMpsDaemons
    changes: Recorder
    monitor: HealthMonitor
    clock: Optional[FakeClock] = None
    threads_before: set[threading.Thread] = field(default_factory=set)

    def uuid(self, index: int) -> str:
        """The UUID of GPU ``index``."""
        return self.gpus[index].uuid

    def start(self) -> None:
        """Start the monitor, remembering which threads existed before."""
        self.threads_before = set(threading.enumerate())
        self.monitor.start()

    def new_thread_names(self) -> list[str]:
        """Names of the live threads the monitor started."""
        return sorted(
            thread.name
            for thread in threading.enumerate()
            if thread not in self.threads_before and thread.is_alive()
        )

    def watcher_names(self) -> list[str]:
        """:meth:`new_thread_names` without the full-check workers (started on demand)."""
        return [name for name in self.new_thread_names() if not name.startswith(FULL_WORKER)]

    def full_workers(self) -> int:
        """How many full-check worker threads are alive."""
        return len([name for name in self.new_thread_names() if name.startswith(FULL_WORKER)])


NodeFactory = Callable[..., Node]


@pytest.fixture
def make_node() -> Iterator[NodeFactory]:
    """Builds nodes (not started); every monitor is stopped at the end of the test."""
    nodes: list[Node] = []

    def build(
        config: HealthConfig = FAST,
        *,
        count: int = 2,
        with_mps: bool = True,
        daemons_running: bool = True,
        clock: Optional[FakeClock] = None,
        served: Optional[list[int]] = None,
        mps: Optional[MpsDaemons] = None,
        full_check_interval_s: float = FULL_PROBE_INTERVAL_S,
    ) -> Node:
        gpus = gpus_from_config(SimulatedConfig(count=count))
        backend = SimulatedBackend(gpus)
        daemons = SimulatedMpsDaemons("/run/test-mps", "/var/log/test-mps")
        if daemons_running:
            for gpu in gpus:
                daemons.start(gpu)
        changes = Recorder()
        indices = served if served is not None else list(range(count))
        monitor = HealthMonitor(
            backend,
            mps if mps is not None else (daemons if with_mps else None),
            config,
            [gpus[index].uuid for index in indices],
            emit=changes,
            clock=clock if clock is not None else time.monotonic,
            full_check_interval_s=full_check_interval_s,
        )
        node = Node(gpus, backend, daemons, changes, monitor, clock)
        nodes.append(node)
        return node

    yield build
    for node in nodes:
        stop_promptly(node)


def stop_promptly(node: Node) -> None:
    """Stop the monitor, waking its event thread by closing the backend (as the agent does
    after stopping) so the suite does not wait out every half-second event wait."""
    stopper = threading.Thread(target=node.monitor.stop)
    stopper.start()
    while stopper.is_alive():
        node.backend.close()
        stopper.join(0.01)


def config_with(**changes: Any) -> HealthConfig:
    """The fast test config with some fields changed."""
    return dataclasses.replace(FAST, **changes)


# -- reasons ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "is_fault", "text"),
    [
        (HealthReason.xid_fault(79), True, "xid 79"),
        (HealthReason.ecc_fault(), True, "double-bit ECC error"),
        (HealthReason.lost(), False, "GPU lost"),
        (HealthReason.mps_down(MPS_DOWN), False, MPS_DOWN),
        (HealthReason.mps_down("xid 79 look-alike"), False, "MPS daemon: xid 79 look-alike"),
    ],
    ids=["xid", "dbe", "lost", "mps", "look-alike"],
)
def test_reason_kinds(reason: HealthReason, is_fault: bool, text: str) -> None:
    """Only XID and double-bit ECC reasons are faults cleared by quiet period or reset,
    whatever a reason's text says; MPS reasons always read "MPS daemon ..."."""
    assert (reason.is_fault, reason.text) == (is_fault, text)


# -- GPU events -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inject", "expected"),
    [
        (lambda node: node.backend.inject_xid(node.uuid(1), 79), [(1, "xid 79")]),
        (lambda node: node.backend.inject_xid(node.uuid(0), 48), [(0, "xid 48")]),
        (lambda node: node.backend.inject_xid(node.uuid(0), 94), [(0, "xid 94")]),
        (lambda node: node.backend.inject_double_bit_ecc(node.uuid(1)), [(1, REASON_DBE)]),
        (lambda node: node.backend.inject_xid(None, 79), [(0, "xid 79"), (1, "xid 79")]),
    ],
    ids=["xid-79", "xid-48", "xid-94", "double-bit-ecc", "no-device-marks-every-gpu"],
)
def test_critical_event_marks_the_gpu(
    make_node: NodeFactory,
    inject: Callable[[Node], None],
    expected: list[tuple[int, str]],
) -> None:
    """A critical event emits its reason for its GPU (every GPU when it has no device)."""
    node = make_node()
    node.start()
    inject(node)
    wanted = [(node.uuid(index), reason, True) for index, reason in expected]
    node.changes.wait_for(*wanted)
    assert sorted(node.changes.summary()) == sorted(wanted)


def test_xid_change_carries_the_xid_and_detail(make_node: NodeFactory) -> None:
    """An XID change carries the XID number and the backend's detail for the journal."""
    node = make_node()
    node.start()
    node.backend.inject_xid(node.uuid(0), 79)
    (change,) = node.changes.wait_for((node.uuid(0), "xid 79", True))
    assert (change.reason.xid, change.detail) == (79, "simulated XID 79")


@pytest.mark.parametrize(
    ("ignored_xids", "xid"),
    [
        (HealthConfig().ignored_xids, 13),
        (HealthConfig().ignored_xids, 31),
        (HealthConfig().ignored_xids, 43),
        (HealthConfig().ignored_xids, 45),
        (HealthConfig().ignored_xids, 68),
        (HealthConfig().ignored_xids, 109),
        ((79, 13), 79),
    ],
    ids=["13", "31", "43", "45", "68", "109", "configured-79"],
)
def test_ignored_xid_changes_nothing(
    make_node: NodeFactory, ignored_xids: tuple[int, ...], xid: int
) -> None:
    """An application-fault XID changes no health (the next critical event is the only
    change); under MPS it is handed on as a fault of each GPU it names (agent.faults)."""
    node = make_node(config_with(ignored_xids=ignored_xids))
    node.start()
    node.backend.inject_xid(node.uuid(0), xid)
    node.backend.inject_xid(None, xid)
    # Events are handled in order, so once this marker arrives the ignored ones were seen.
    node.backend.inject_double_bit_ecc(node.uuid(1))
    node.changes.wait_for((node.uuid(1), REASON_DBE, True))
    assert node.changes.summary() == [(node.uuid(1), REASON_DBE, True)]
    faults = [(fault.gpu_uuid, fault.xid) for fault in node.changes.faults]
    assert faults == [(node.uuid(0), xid), (node.uuid(0), xid), (node.uuid(1), xid)]


def test_an_application_fault_without_mps_is_only_logged(make_node: NodeFactory) -> None:
    """Without MPS a fault ends only its own process: no fault of the GPU is recorded."""
    node = make_node(with_mps=False)
    node.start()
    node.backend.inject_xid(node.uuid(0), 31)
    node.backend.inject_double_bit_ecc(node.uuid(1))
    node.changes.wait_for((node.uuid(1), REASON_DBE, True))
    assert node.changes.faults == []


def test_xid_outside_a_custom_ignore_list_is_critical(make_node: NodeFactory) -> None:
    """With a custom ignore list, a default-ignored XID such as 13 marks the GPU."""
    node = make_node(config_with(ignored_xids=(79,)))
    node.start()
    node.backend.inject_xid(node.uuid(0), 13)
    node.changes.wait_for((node.uuid(0), "xid 13", True))


@pytest.mark.parametrize(
    "inject",
    [
        lambda node: node.backend.inject_xid(node.uuid(1), 79),
        lambda node: node.backend.lose(node.uuid(1)),
    ],
    ids=["xid", "lost"],
)
def test_event_of_an_unserved_gpu_is_ignored(
    make_node: NodeFactory, inject: Callable[[Node], None]
) -> None:
    """Events of a GPU the monitor does not serve (someone else watches it) change nothing."""
    node = make_node(served=[0])
    node.backend.watch_events([node.uuid(1)])
    node.start()
    inject(node)
    node.backend.inject_xid(node.uuid(0), 79)
    node.changes.wait_for((node.uuid(0), "xid 79", True))
    assert node.changes.summary() == [(node.uuid(0), "xid 79", True)]


# -- lost GPUs and polling --------------------------------------------------------------------


def test_lost_gpu_is_marked_and_cleared_by_polling(make_node: NodeFactory) -> None:
    """A lost GPU gets "GPU lost"; once it answers again polling clears it."""
    node = make_node()
    node.start()
    node.backend.lose(node.uuid(1))
    node.changes.wait_for((node.uuid(1), REASON_LOST, True))
    node.backend.recover(node.uuid(1))
    (cleared,) = node.changes.wait_for((node.uuid(1), REASON_LOST, False))
    assert cleared.detail == "GPU answers again"
    assert all(change.gpu_uuid == node.uuid(1) for change in node.changes.changes)


def test_unwatchable_gpu_loss_is_found_by_polling(make_node: NodeFactory) -> None:
    """A GPU without event support is polled: its loss and return are still seen."""
    node = make_node()
    node.backend.set_unwatchable(node.uuid(0))
    node.start()
    node.backend.lose(node.uuid(0))
    (lost,) = node.changes.wait_for((node.uuid(0), REASON_LOST, True))
    assert "lost" in lost.detail
    node.backend.recover(node.uuid(0))
    node.changes.wait_for((node.uuid(0), REASON_LOST, False))


def test_unwatchable_gpu_is_reported_once(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A GPU without event support is logged once as polled, never a crash."""
    node = make_node()
    node.backend.set_unwatchable(node.uuid(1))
    with caplog.at_level(logging.WARNING, logger="vgpu_agent.agent.health"):
        node.start()
    messages = [r.getMessage() for r in caplog.records if "event registration" in r.getMessage()]
    expected = f"GPU {node.uuid(1)} does not support NVML event registration; polling it"
    assert messages == [f"{expected} every 0.05 s"]


def test_failed_event_registration_falls_back_to_polling(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """If registering for events fails, every GPU is polled and no event thread runs."""
    node = make_node(with_mps=False)
    node.backend.fail_calls("NVML is unhappy")
    with caplog.at_level(logging.WARNING, logger="vgpu_agent.agent.health"):
        node.start()
    node.backend.fail_calls(None)
    assert node.new_thread_names() == ["vgpu-health-poll"]
    assert any("polling every GPU" in record.getMessage() for record in caplog.records)
    node.backend.lose(node.uuid(0))
    node.changes.wait_for((node.uuid(0), REASON_LOST, True))


def test_failing_event_wait_does_not_stop_the_watcher(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """When waiting for events fails the watcher warns once, retries, and works again."""
    node = make_node(with_mps=False)
    node.start()
    with caplog.at_level(logging.INFO, logger="vgpu_agent.agent.health"):
        node.backend.fail_calls("driver busy")
        deadline = time.monotonic() + PROMPTLY_S
        while not any("driver busy" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "no warning about the failing wait"
            time.sleep(0.02)
        node.backend.fail_calls(None)
        node.backend.inject_xid(node.uuid(0), 79)
        node.changes.wait_for((node.uuid(0), "xid 79", True))
    failures = [r for r in caplog.records if "waiting for GPU events failed" in r.getMessage()]
    assert len(failures) == 1
    assert any("works again" in record.getMessage() for record in caplog.records)


# -- recovery after a quiet period ------------------------------------------------------------


def test_quiet_period_recovery_on_the_real_clock(make_node: NodeFactory) -> None:
    """With a short quiet period an XID-marked GPU comes back by itself."""
    node = make_node(config_with(recovery_quiet_period_s=0.2), with_mps=False)
    node.start()
    node.backend.inject_xid(node.uuid(0), 79)
    node.changes.wait_for((node.uuid(0), "xid 79", True))
    (cleared,) = node.changes.wait_for((node.uuid(0), "xid 79", False))
    assert "0.2 s" in cleared.detail


def test_quiet_period_recovery(make_node: NodeFactory) -> None:
    """Fault reasons clear once the quiet period has passed with no new event, not before."""
    clock = FakeClock()
    node = make_node(config_with(recovery_quiet_period_s=300), with_mps=False, clock=clock)
    node.start()
    node.backend.inject_xid(node.uuid(0), 79)
    node.backend.inject_double_bit_ecc(node.uuid(0))
    node.changes.wait_for((node.uuid(0), "xid 79", True), (node.uuid(0), REASON_DBE, True))
    clock.advance(299)
    clock.wait_for_reads()
    assert all(change.present for change in node.changes.changes)
    clock.advance(1)
    cleared = node.changes.wait_for(
        (node.uuid(0), "xid 79", False), (node.uuid(0), REASON_DBE, False)
    )
    assert all("300 s" in change.detail for change in cleared)


def test_new_event_restarts_the_quiet_period(make_node: NodeFactory) -> None:
    """A new critical event during the quiet period starts it again for every reason."""
    clock = FakeClock()
    node = make_node(config_with(recovery_quiet_period_s=300), with_mps=False, clock=clock)
    node.start()
    node.backend.inject_xid(node.uuid(0), 79)
    node.changes.wait_for((node.uuid(0), "xid 79", True))
    clock.advance(200)
    node.backend.inject_double_bit_ecc(node.uuid(0))
    node.changes.wait_for((node.uuid(0), REASON_DBE, True))
    clock.advance(150)
    clock.wait_for_reads()
    assert all(change.present for change in node.changes.changes)
    clock.advance(150)
    node.changes.wait_for((node.uuid(0), "xid 79", False), (node.uuid(0), REASON_DBE, False))


def test_quiet_period_is_per_gpu(make_node: NodeFactory) -> None:
    """Each GPU's quiet period runs from its own last event."""
    clock = FakeClock()
    node = make_node(config_with(recovery_quiet_period_s=300), with_mps=False, clock=clock)
    node.start()
    node.backend.inject_xid(node.uuid(0), 79)
    node.changes.wait_for((node.uuid(0), "xid 79", True))
    clock.advance(200)
    node.backend.inject_xid(node.uuid(1), 79)
    node.changes.wait_for((node.uuid(1), "xid 79", True))
    clock.advance(100)
    node.changes.wait_for((node.uuid(0), "xid 79", False))
    clock.wait_for_reads()
    assert (node.uuid(1), "xid 79", False) not in node.changes.summary()


def test_quiet_period_zero_never_recovers(make_node: NodeFactory) -> None:
    """With quiet period 0 a marked GPU stays Unhealthy however long it stays quiet."""
    clock = FakeClock()
    node = make_node(config_with(recovery_quiet_period_s=0), with_mps=False, clock=clock)
    node.start()
    node.backend.inject_xid(node.uuid(0), 79)
    node.changes.wait_for((node.uuid(0), "xid 79", True))
    clock.advance(10 * 365 * 24 * 3600)
    clock.wait_for_reads()
    assert node.changes.summary() == [(node.uuid(0), "xid 79", True)]


@pytest.mark.parametrize(
    ("quiet_period_s", "poll_interval_s", "tick_s"),
    [(0, 30, 30), (300, 5, 5), (2, 5, 2), (0.01, 5, 0.1)],
    ids=["no-recovery-poll-interval", "long-quiet-period", "short-quiet-period", "floor"],
)
def test_poll_tick(quiet_period_s: float, poll_interval_s: float, tick_s: float) -> None:
    """With no recovery to time the poll thread wakes only every poll interval (idle CPU);
    a short quiet period needs a finer tick, never below 0.1 s."""
    config = config_with(recovery_quiet_period_s=quiet_period_s, poll_interval_s=poll_interval_s)
    assert poll_tick_s(config) == tick_s


def test_recovery_waits_for_a_successful_query(make_node: NodeFactory) -> None:
    """A quiet GPU is not recovered while querying it fails; it is once a query succeeds."""
    clock = FakeClock()
    node = make_node(config_with(recovery_quiet_period_s=300), with_mps=False, clock=clock)
    node.start()
    node.backend.inject_xid(node.uuid(0), 79)
    node.changes.wait_for((node.uuid(0), "xid 79", True))
    node.backend.fail_calls("device busy")
    clock.advance(301)
    clock.wait_for_reads(3)
    assert all(change.present for change in node.changes.changes)
    node.backend.fail_calls(None)
    node.changes.wait_for((node.uuid(0), "xid 79", False))


def test_lost_gpu_keeps_its_fault_until_it_answers(make_node: NodeFactory) -> None:
    """A GPU that is lost is not recovered by the quiet period; after it answers, it is."""
    node = make_node(config_with(recovery_quiet_period_s=0.2), with_mps=False)
    node.start()
    node.backend.inject_xid(node.uuid(0), 79)
    node.backend.lose(node.uuid(0))
    node.changes.wait_for((node.uuid(0), "xid 79", True), (node.uuid(0), REASON_LOST, True))
    # GPU 1's XID, raised later, recovers after its quiet period: by then GPU 0's was due.
    node.backend.inject_xid(node.uuid(1), 79)
    node.changes.wait_for((node.uuid(1), "xid 79", True), (node.uuid(1), "xid 79", False))
    assert (node.uuid(0), "xid 79", False) not in node.changes.summary()
    node.backend.recover(node.uuid(0))
    node.changes.wait_for((node.uuid(0), REASON_LOST, False), (node.uuid(0), "xid 79", False))


# -- reset ------------------------------------------------------------------------------------


def test_reset_clears_fault_reasons(make_node: NodeFactory) -> None:
    """reset clears every fault reason of the GPU at once and returns them."""
    node = make_node(with_mps=False)
    node.start()
    node.backend.inject_xid(node.uuid(0), 79)
    node.backend.inject_double_bit_ecc(node.uuid(0))
    node.backend.inject_xid(node.uuid(1), 48)
    node.changes.wait_for(
        (node.uuid(0), "xid 79", True),
        (node.uuid(0), REASON_DBE, True),
        (node.uuid(1), "xid 48", True),
    )
    assert [r.text for r in node.monitor.reset(node.uuid(0))] == sorted([REASON_DBE, "xid 79"])
    cleared = node.changes.wait_for(
        (node.uuid(0), "xid 79", False), (node.uuid(0), REASON_DBE, False)
    )
    assert {change.detail for change in cleared} == {"reset by operator"}
    assert (node.uuid(1), "xid 48", False) not in node.changes.summary()
    assert node.monitor.reset(node.uuid(0)) == []


def test_reset_leaves_lost_and_mps_reasons(make_node: NodeFactory) -> None:
    """reset clears only faults: "GPU lost" and MPS reasons stay until their cause ends."""
    node = make_node()
    node.start()
    node.backend.lose(node.uuid(0))
    node.daemons.set_down(node.uuid(0))
    node.changes.wait_for((node.uuid(0), REASON_LOST, True), (node.uuid(0), MPS_DOWN, True))
    assert node.monitor.reset(node.uuid(0)) == []
    assert all(change.present for change in node.changes.changes)


def test_fault_after_reset_starts_a_new_quiet_period(make_node: NodeFactory) -> None:
    """A GPU reset and then faulted again recovers a full quiet period after the new event."""
    clock = FakeClock()
    node = make_node(config_with(recovery_quiet_period_s=300), with_mps=False, clock=clock)
    node.start()
    node.backend.inject_xid(node.uuid(0), 79)
    node.changes.wait_for((node.uuid(0), "xid 79", True))
    node.monitor.reset(node.uuid(0))
    clock.advance(250)
    node.backend.inject_xid(node.uuid(0), 48)
    node.changes.wait_for((node.uuid(0), "xid 48", True))
    clock.advance(100)
    clock.wait_for_reads()
    assert (node.uuid(0), "xid 48", False) not in node.changes.summary()
    clock.advance(200)
    node.changes.wait_for((node.uuid(0), "xid 48", False))


def test_emit_may_call_reset(make_node: NodeFactory) -> None:
    """An emit callback that resets the GPU (an automatic policy) does not deadlock."""
    node = make_node(with_mps=False)
    resets: list[list[str]] = []

    def reset_on_fault(change: Union[HealthChange, ApplicationFault]) -> None:
        node.changes(change)
        if isinstance(change, HealthChange) and change.present and change.reason.is_fault:
            resets.append([reason.text for reason in node.monitor.reset(change.gpu_uuid)])

    node.monitor = HealthMonitor(node.backend, None, FAST, [node.uuid(0)], emit=reset_on_fault)
    node.start()
    try:
        node.backend.inject_xid(node.uuid(0), 79)
        node.changes.wait_for((node.uuid(0), "xid 79", True), (node.uuid(0), "xid 79", False))
        assert resets == [["xid 79"]]
    finally:
        stop_promptly(node)


# -- MPS liveness -----------------------------------------------------------------------------


def test_mps_daemon_down_and_up(make_node: NodeFactory) -> None:
    """A daemon that stops answering marks its GPU; answering again clears it."""
    node = make_node()
    node.start()
    node.daemons.set_down(node.uuid(1))
    node.changes.wait_for((node.uuid(1), MPS_DOWN, True))
    node.daemons.set_down(node.uuid(1), None)
    (cleared,) = node.changes.wait_for((node.uuid(1), MPS_DOWN, False))
    assert cleared.detail == "MPS daemon answers"
    assert {change.gpu_uuid for change in node.changes.changes} == {node.uuid(1)}


@pytest.mark.parametrize(
    ("problem", "reason"),
    [
        ("MPS daemon hung", "MPS daemon hung"),
        ("control pipe missing", "MPS daemon: control pipe missing"),
    ],
    ids=["already-prefixed", "gets-prefix"],
)
def test_mps_reason_names_the_daemon(make_node: NodeFactory, problem: str, reason: str) -> None:
    """Every MPS reason starts with "MPS daemon", so a person reading it knows the cause."""
    node = make_node()
    node.start()
    node.daemons.set_down(node.uuid(0), problem)
    node.changes.wait_for((node.uuid(0), reason, True))


def test_mps_reason_change_replaces_the_old_reason(make_node: NodeFactory) -> None:
    """When the problem changes, the new reason is raised before the old one is withdrawn,
    so the GPU never looks Healthy in between."""
    node = make_node()
    node.start()
    node.daemons.set_down(node.uuid(0))
    node.changes.wait_for((node.uuid(0), MPS_DOWN, True))
    node.daemons.set_down(node.uuid(0), "MPS daemon hung")
    node.changes.wait_for((node.uuid(0), MPS_DOWN, False), (node.uuid(0), "MPS daemon hung", True))
    assert node.changes.summary() == [
        (node.uuid(0), MPS_DOWN, True),
        (node.uuid(0), "MPS daemon hung", True),
        (node.uuid(0), MPS_DOWN, False),
    ]


def test_mps_daemon_never_started(make_node: NodeFactory) -> None:
    """A GPU whose daemon was never started is marked with a reason that says so."""
    node = make_node(daemons_running=False)
    node.start()
    node.changes.wait_for(
        (node.uuid(0), "MPS daemon not started", True),
        (node.uuid(1), "MPS daemon not started", True),
    )


class ScriptedDaemons:
    """MpsDaemons whose quick (or full) check raises ``error`` while it is set, else answers."""

    def __init__(self, raising: str) -> None:
        self._lock = threading.Lock()
        self._raising = raising
        self.error: Optional[Exception] = None
        self.probes = 0

    def start(self, gpu: Gpu) -> MpsDaemonInfo:
        """Nothing to start."""
        return MpsDaemonInfo(gpu.uuid, "/run/none", "/var/log/none", multi_user=False)

    def apply_defaults(self, gpu: Gpu, ceiling: Ceiling) -> list[str]:
        """No defaults to set."""
        return []

    def stop(self, gpu_uuid: str) -> None:
        """Nothing to stop."""

    def quick_check(self, gpu_uuid: str) -> QuickCheck:
        """Raise the scripted error (when the quick check is the one that raises), or pass."""
        self._check("quick")
        return QuickCheck()

    def full_check(self, gpu_uuid: str) -> Optional[str]:
        """Raise the scripted error (when the full check is the one that raises), or answer."""
        self._check("full")
        return None

    def _check(self, which: str) -> None:
        with self._lock:
            if which != self._raising:
                return
            self.probes += 1
            error = self.error
        if error is not None:
            raise error

    def probe_count(self) -> int:
        """How many checks of the raising kind ran."""
        with self._lock:
            return self.probes


@pytest.mark.parametrize("raising", ["quick", "full"])
def test_raising_probe_does_not_kill_the_watcher(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture, raising: str
) -> None:
    """A check that raises marks the GPU, is logged once, and the watcher keeps checking."""
    daemons = ScriptedDaemons(raising)
    daemons.error = RuntimeError("boom")
    node = make_node(count=1, mps=daemons)
    with caplog.at_level(logging.ERROR, logger="vgpu_agent.agent.health"):
        node.start()
        node.changes.wait_for((node.uuid(0), "MPS daemon probe failed: boom", True))
        first = daemons.probe_count()
        deadline = time.monotonic() + PROMPTLY_S
        while daemons.probe_count() < first + 3:
            assert time.monotonic() < deadline, "the probe watcher stopped probing"
            time.sleep(0.02)
        daemons.error = None
        node.changes.wait_for((node.uuid(0), "MPS daemon probe failed: boom", False))
    assert len([r for r in caplog.records if "probing the MPS daemon" in r.getMessage()]) == 1
    assert node.watcher_names().count(LIVENESS) == 1


class GatedDaemons:
    """MpsDaemons whose quick checks report a scripted problem per GPU, and whose full checks
    of a held GPU hang until it is released; counts every check and the full checks of each
    GPU running at once."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._quick_problems: dict[str, str] = {}
        self._held: set[str] = set()
        self.quick = Counter[str]()
        self.full = Counter[str]()
        self.running = Counter[str]()
        self.most_running = Counter[str]()

    def start(self, gpu: Gpu) -> MpsDaemonInfo:
        """Nothing to start."""
        return MpsDaemonInfo(gpu.uuid, "/run/none", "/var/log/none", multi_user=False)

    def apply_defaults(self, gpu: Gpu, ceiling: Ceiling) -> list[str]:
        """No defaults to set."""
        return []

    def stop(self, gpu_uuid: str) -> None:
        """Nothing to stop."""

    def quick_check(self, gpu_uuid: str) -> QuickCheck:
        """The scripted problem of the GPU, if any."""
        with self._changed:
            self.quick[gpu_uuid] += 1
            self._changed.notify_all()
            return QuickCheck(self._quick_problems.get(gpu_uuid))

    def full_check(self, gpu_uuid: str) -> Optional[str]:
        """Answers, after the GPU is released when it is held."""
        with self._changed:
            self.full[gpu_uuid] += 1
            self.running[gpu_uuid] += 1
            self.most_running[gpu_uuid] = max(self.most_running[gpu_uuid], self.running[gpu_uuid])
            self._changed.notify_all()
            self._changed.wait_for(lambda: gpu_uuid not in self._held)
            self.running[gpu_uuid] -= 1
            self._changed.notify_all()
        return None

    def hold(self, *gpu_uuids: str) -> None:
        """Make the full checks of these GPUs hang (a hung daemon) until released."""
        with self._changed:
            self._held.update(gpu_uuids)

    def release_all(self) -> None:
        """Let every held full check answer."""
        with self._changed:
            self._held.clear()
            self._changed.notify_all()

    def set_quick_problem(self, gpu_uuid: str, problem: Optional[str]) -> None:
        """Make the GPU's quick check report ``problem`` (None: pass)."""
        with self._changed:
            if problem is None:
                self._quick_problems.pop(gpu_uuid, None)
            else:
                self._quick_problems[gpu_uuid] = problem

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait (promptly) until ``condition`` holds; it is evaluated under the lock."""
        with self._changed:
            assert self._changed.wait_for(condition, PROMPTLY_S), f"waiting for {what}"


def test_a_hung_full_check_does_not_delay_other_gpus(make_node: NodeFactory) -> None:
    """While GPU 0's full check hangs, every GPU is still quick-checked each interval, GPU 1
    still gets its full checks, and a dead daemon of either GPU is reported at once; the
    hung check's late answer does not clear what a quick check found meanwhile."""
    daemons = GatedDaemons()
    node = make_node(count=2, mps=daemons, full_check_interval_s=0.0)
    gpu0, gpu1 = node.uuid(0), node.uuid(1)
    daemons.hold(gpu0)
    try:
        node.start()
        daemons.wait_until(lambda: daemons.running[gpu0] == 1, "GPU 0's full check to hang")
        quick0, full1 = daemons.quick[gpu0], daemons.full[gpu1]
        daemons.wait_until(
            lambda: daemons.quick[gpu0] >= quick0 + 3 and daemons.full[gpu1] >= full1 + 3,
            "more quick checks of GPU 0 and full checks of GPU 1",
        )
        daemons.set_quick_problem(gpu1, "MPS daemon of GPU 1 gone")
        daemons.set_quick_problem(gpu0, "MPS daemon of GPU 0 gone")
        node.changes.wait_for(
            (gpu1, "MPS daemon of GPU 1 gone", True), (gpu0, "MPS daemon of GPU 0 gone", True)
        )
        assert daemons.running[gpu0] == 1, "reported while its full check still hangs"
        daemons.release_all()
        daemons.wait_until(lambda: daemons.running[gpu0] == 0, "the hung check to answer")
    finally:
        daemons.release_all()
    node.monitor.stop()  # joins the watcher and waits for full checks: all is reported
    assert (gpu0, "MPS daemon of GPU 0 gone", False) not in node.changes.summary()
    assert daemons.full[gpu0] == 1, "no full check while the quick check sees it down"


def test_at_most_one_full_check_per_gpu_runs(make_node: NodeFactory) -> None:
    """A GPU whose full check hangs gets no second one until the first answers, however
    many intervals pass; then its full checks resume."""
    daemons = GatedDaemons()
    node = make_node(count=2, mps=daemons, full_check_interval_s=0.0)
    gpu0 = node.uuid(0)
    daemons.hold(gpu0)
    try:
        node.start()
        daemons.wait_until(lambda: daemons.running[gpu0] == 1, "GPU 0's full check to hang")
        quick0 = daemons.quick[gpu0]
        daemons.wait_until(lambda: daemons.quick[gpu0] >= quick0 + 5, "five more intervals")
        assert daemons.full[gpu0] == 1
        daemons.release_all()
        daemons.wait_until(lambda: daemons.full[gpu0] >= 3, "full checks to resume")
    finally:
        daemons.release_all()
    node.monitor.stop()
    assert daemons.most_running[gpu0] == 1
    assert daemons.most_running[node.uuid(1)] == 1


@pytest.mark.parametrize("count", [1, 8])
def test_one_liveness_thread_for_any_number_of_gpus(make_node: NodeFactory, count: int) -> None:
    """One thread checks every GPU's daemon; full checks add a worker per GPU at most, even
    with every GPU's full check hung through many intervals."""
    daemons = GatedDaemons()
    node = make_node(count=count, mps=daemons, full_check_interval_s=0.0)
    uuids = [node.uuid(index) for index in range(count)]
    daemons.hold(*uuids)
    try:
        node.start()
        daemons.wait_until(
            lambda: all(daemons.running[uuid] == 1 for uuid in uuids), "every full check to hang"
        )
        quick = daemons.quick[uuids[0]]
        daemons.wait_until(lambda: daemons.quick[uuids[0]] >= quick + 5, "five more intervals")
        assert [name for name in node.watcher_names() if name.startswith("vgpu-mps")] == [LIVENESS]
        assert node.full_workers() == count
    finally:
        daemons.release_all()
    node.monitor.stop()
    assert node.new_thread_names() == []


# -- switches and shutdown --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "with_mps", "expected_threads"),
    [
        (FAST, True, ["vgpu-health-events", "vgpu-health-poll", LIVENESS]),
        (config_with(xid_enabled=False), True, ["vgpu-health-poll", LIVENESS]),
        (config_with(mps_liveness_enabled=False), True, ["vgpu-health-events", "vgpu-health-poll"]),
        (FAST, False, ["vgpu-health-events", "vgpu-health-poll"]),
        (
            config_with(xid_enabled=False, mps_liveness_enabled=False),
            True,
            ["vgpu-health-poll"],
        ),
    ],
    ids=["everything", "xid-off", "mps-liveness-off", "no-mps", "both-off"],
)
def test_watchers_started(
    make_node: NodeFactory, config: HealthConfig, with_mps: bool, expected_threads: list[str]
) -> None:
    """Each check that is switched off (or has nothing to watch) starts no thread."""
    node = make_node(config, with_mps=with_mps)
    node.start()
    assert node.watcher_names() == sorted(expected_threads)


def test_xid_off_ignores_events(make_node: NodeFactory) -> None:
    """With XID checks off, injected GPU events change nothing (MPS still reports)."""
    node = make_node(config_with(xid_enabled=False))
    node.start()
    node.backend.inject_xid(node.uuid(0), 79)
    node.backend.lose(node.uuid(0))
    node.daemons.set_down(node.uuid(0))
    node.changes.wait_for((node.uuid(0), MPS_DOWN, True))
    assert "vgpu-health-events" not in node.new_thread_names(), "nothing waits for events"
    node.monitor.stop()  # joins every watcher: whatever they would report is reported
    assert node.changes.summary() == [(node.uuid(0), MPS_DOWN, True)]


def test_mps_liveness_off_ignores_dead_daemons(make_node: NodeFactory) -> None:
    """With MPS liveness off, a dead daemon changes nothing (XIDs still report)."""
    node = make_node(config_with(mps_liveness_enabled=False))
    node.start()
    node.daemons.set_down(node.uuid(0))
    assert not [name for name in node.new_thread_names() if name.startswith("vgpu-mps")]
    node.backend.inject_xid(node.uuid(1), 79)
    node.changes.wait_for((node.uuid(1), "xid 79", True))
    assert node.changes.summary() == [(node.uuid(1), "xid 79", True)]


def test_no_gpus_starts_no_event_watcher(make_node: NodeFactory) -> None:
    """A monitor over no GPUs registers for nothing and starts no event thread."""
    node = make_node(served=[])
    node.start()
    assert node.new_thread_names() == ["vgpu-health-poll"]


def test_stop_joins_every_thread_quickly(make_node: NodeFactory) -> None:
    """stop() ends the event, poll and MPS threads well within a generous bound."""
    node = make_node(count=4)
    node.start()
    assert len(node.watcher_names()) == 3
    started = time.monotonic()
    node.monitor.stop()
    assert time.monotonic() - started < PROMPTLY_S / 2
    assert node.new_thread_names() == []


def test_stop_without_start(make_node: NodeFactory) -> None:
    """Stopping a monitor that never started is harmless."""
    node = make_node()
    node.monitor.stop()
    assert node.changes.changes == []


def test_no_changes_after_stop(make_node: NodeFactory) -> None:
    """Once stopped, the monitor reports nothing more."""
    node = make_node()
    node.start()
    node.monitor.stop()
    assert node.new_thread_names() == [], "no watcher is left to report anything"
    node.backend.inject_xid(node.uuid(0), 79)
    node.daemons.set_down(node.uuid(0))
    assert node.changes.changes == []
