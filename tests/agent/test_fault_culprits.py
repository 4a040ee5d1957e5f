"""The culprit of each MPS fault and repeat offenders (issue 20 item 2): the fault log names
the client the MPS server names, finds its pod (the attribution, else its cgroup), says when
it cannot, and holds a pod named too often; and through an agent whose direct-manager daemon
(the stand-in control program) writes the server's line to its control.log, the fault event
names its culprit in status, the journal and metrics, and a repeat offender is held."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from tests.builders import write_fake_control
from tests.harness import AgentRun, agent_runs, make_config, scrape_metrics, wait_until
from tests.mps.test_daemon_log import fatal_line, torn_down_line
from tests.observability.test_observability_e2e import (
    POD_UID,
    RESOURCE,
    _pods,
    pod_process,
)
from vgpu_agent.agent.describe import fault_lines
from vgpu_agent.agent.faults import (
    NAMED,
    SOLE_CLIENT,
    ApplicationFault,
    Culprit,
    FaultLog,
    NamedFault,
    NoObserver,
    SeenFault,
)
from vgpu_agent.agent.offenders import OffenderPolicy
from vgpu_agent.config.schema import AttributionConfig, FaultsConfig, MetricsConfig, MpsConfig
from vgpu_agent.model.commands import SimulateAction, SimulateCommand
from vgpu_agent.model.daemons import FaultCulprit
from vgpu_agent.model.pods import PodRef, PodsPresent
from vgpu_agent.mps.daemon_log import BURST_S
from vgpu_agent.mps.daemons import DirectMpsDaemons
from vgpu_agent.mps.directories import log_dir_for
from vgpu_agent.observability.attribution import gather
from vgpu_agent.observability.checkpoint import CHECKPOINT_NAME
from vgpu_agent.standins.podresources import PodResourcesStandin
from vgpu_agent.standins.simulated import Simulation

GPU = "GPU-1"
TRAINER = PodRef("uid-trainer", "team-a/trainer")
SERVER = PodRef("uid-server", "team-b/server")
WAIT_S = 20.0


class RecordingObserver:
    """The fault log's observer: the attribution it is given, what it was told."""

    def __init__(
        self,
        clients: Optional[dict[str, dict[int, PodRef]]] = None,
        running: Optional[dict[int, PodRef]] = None,
    ) -> None:
        self.clients = clients or {}
        self.running = running or {}
        self.present: Optional[PodsPresent] = None
        self.faults: list[tuple[str, int, tuple[str, ...]]] = []
        self.culprits: list[tuple[str, str]] = []
        self.held: dict[str, str] = {}
        self.offenders: list[tuple[str, str, bool]] = []

    def clients_on(self, gpu_uuid: str) -> dict[int, PodRef]:
        return dict(self.clients.get(gpu_uuid, {}))

    def pod_of_process(self, pid: int) -> Optional[PodRef]:
        return self.running.get(pid)

    def pods_present(self) -> Optional[PodsPresent]:
        return self.present

    def record_fault(self, gpu_uuid: str, xid: int, pods: tuple[str, ...]) -> None:
        self.faults.append((gpu_uuid, xid, pods))

    def record_culprit(self, gpu_uuid: str, pod: str) -> None:
        self.culprits.append((gpu_uuid, pod))

    def record_offender(self, pod_uid: str, pod: str, held: bool) -> None:
        self.offenders.append((pod_uid, pod, held))
        if held:
            self.held[pod_uid] = pod

    def release_offender(self, pod_uid: str) -> None:
        self.held.pop(pod_uid, None)


class ScriptedLogs:
    """Daemon output that names the given culprits, one per fault, in order."""

    def __init__(self, *answers: FaultCulprit, fails: Optional[Exception] = None) -> None:
        self.answers = list(answers)
        self.fails = fails
        self.followed: list[str] = []
        self.asked: list[tuple[str, float, float]] = []
        self.closed = False

    def follow(self, gpu_uuids: Sequence[str]) -> None:
        self.followed.extend(gpu_uuids)

    def culprit(self, gpu_uuid: str, fault_at_epoch_s: float, wait_s: float) -> FaultCulprit:
        self.asked.append((gpu_uuid, fault_at_epoch_s, wait_s))
        if self.fails is not None:
            raise self.fails
        return self.answers.pop(0)

    def close(self) -> None:
        self.closed = True


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _log(
    observer: RecordingObserver,
    logs: Optional[ScriptedLogs],
    clock: Optional[Clock] = None,
    **settings: object,
) -> FaultLog:
    policy = OffenderPolicy(
        FaultsConfig(**settings),  # type: ignore[arg-type]
        clock=clock or Clock(),
        wall_clock=lambda: 1_800_000_000.0,
    )
    return FaultLog(observer, policy, logs, wall_clock=lambda: 1_800_000_000.0, wait_s=0.5)


def _record(faults: FaultLog, gpu_uuid: str = GPU, xid: int = 31) -> Any:
    seen = faults.seen(ApplicationFault(gpu_uuid, xid))
    return faults.record(seen, faults.name(seen))


def _named(pid: int, *torn_down: int) -> FaultCulprit:
    """The server's answer: ``pid`` named, and the clients it tore down (``pid`` alone when
    none are given: it was the only client)."""
    return FaultCulprit(pid, "/var/log/nvidia-mps/GPU-1/control.log", "", torn_down or (pid,))


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [
        record.__dict__["fields"]
        for record in caplog.records
        if record.__dict__.get("fields", {}).get("VGPU_EVENT") == name
    ]


# -- naming the culprit ---------------------------------------------------------------------------


def test_the_fault_names_its_culprit_and_every_pod_it_hit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The pid the daemon's output names, mapped through the attribution seen when the
    fault came: the journal entry, the counters and status name the culprit apart from the
    pods hit; the kernel's pid plays no part."""
    observer = RecordingObserver({GPU: {101: TRAINER, 202: SERVER}})
    logs = ScriptedLogs(_named(101, 101, 202))
    faults = _log(observer, logs)
    with caplog.at_level(logging.WARNING):
        event = _record(faults)
    assert logs.asked == [(GPU, 1_800_000_000.0, 0.5)]
    assert event.culprit == Culprit(
        101,
        TRAINER,
        f"named by {_named(101).source}; a lead: the server also tore down 1 client(s) of "
        "other or unknown pods, and may name any of them",
        NAMED,
        (TRAINER, SERVER),
    )
    assert event.pods == ("team-a/trainer", "team-b/server")
    (fields,) = _events(caplog, "mps-fault")
    assert fields == {
        "GPU_UUID": GPU,
        "XID": "31",
        "VGPU_EVENT": "mps-fault",
        "VGPU_PODS": "team-a/trainer,team-b/server",
        "VGPU_CULPRIT_POD": "team-a/trainer",
        "VGPU_CULPRIT_POD_UID": "uid-trainer",
        "VGPU_CULPRIT_PID": "101",
        "VGPU_CULPRIT_EVIDENCE": "named",
    }
    assert observer.culprits == [(GPU, "team-a/trainer")]
    assert observer.faults == [(GPU, 31, ("team-a/trainer", "team-b/server"))]
    (shown,) = faults.recent()
    assert (
        shown["culprit"],
        shown["culprit_pod_uid"],
        shown["culprit_pid"],
        shown["culprit_evidence"],
    ) == ("team-a/trainer", "uid-trainer", 101, "named")
    assert fault_lines({"mps_faults": [shown]}) == [
        f"MPS fault 2027-01-15T08:00:00Z: GPU {GPU} XID 31: culprit team-a/trainer (pid 101), "
        "a lead (other pods' clients were torn down too); hit team-a/trainer, team-b/server"
    ]
    assert faults.offenders.offenders() == [], "a lead counts for nobody by default"


@pytest.mark.parametrize(
    ("torn_down", "evidence", "why"),
    [
        ((101,), SOLE_CLIENT, "every client the server tore down (1) was this pod's"),
        ((101, 102), SOLE_CLIENT, "every client the server tore down (2) was this pod's"),
        ((), NAMED, "a lead: the server listed no clients it tore down"),
        ((202,), NAMED, "a lead: the server did not list it among the clients it tore down"),
        (
            (101, 404),
            NAMED,
            "a lead: the server also tore down 1 client(s) of other or unknown pods, and may "
            "name any of them",
        ),
    ],
    ids=["alone", "two-of-its-own", "no-list", "not-listed", "unknown-beside"],
)
def test_a_culprit_is_sure_only_when_every_client_torn_down_was_its_pods(
    torn_down: tuple[int, ...], evidence: str, why: str
) -> None:
    """The faulting client is always among those the server tears down: when they are all
    one pod's, that pod faulted (whichever the server names first); beside any other or
    unknown client the name is a lead. The attribution's other pods (202, gone by the
    fault) do not make it a lead: the server's own list does."""
    observer = RecordingObserver({GPU: {101: TRAINER, 102: TRAINER, 202: SERVER}})
    answer = FaultCulprit(101, "control.log", "", torn_down)
    event = _record(_log(observer, ScriptedLogs(answer)))
    assert (event.culprit.evidence, event.culprit.note) == (
        evidence,
        f"named by control.log; {why}",
    )
    assert event.pods == ("team-a/trainer", "team-b/server")


@pytest.mark.parametrize(("counted", "held_at"), [("sole-client", 4), ("named", 2)])
def test_which_faults_count_against_a_pod_is_the_operators_choice(
    counted: str, held_at: int
) -> None:
    """Two faults where the server tore down another pod's client too, then two where it
    tore down the named pod's only: by default only the last two count (held at the 4th);
    with offender_evidence = "named" every fault it was named for does (held at the 2nd)."""
    observer = RecordingObserver({GPU: {101: TRAINER, 202: SERVER}})
    logs = ScriptedLogs(_named(101, 101, 202), _named(101, 101, 202), _named(101), _named(101))
    faults = _log(observer, logs, repeat_limit=2, offender_evidence=counted)
    held = []
    for _ in range(4):
        _record(faults)
        held.append(bool(faults.offenders.held()))
    assert held.index(True) + 1 == held_at


def test_a_culprit_not_in_the_attribution_is_found_by_its_cgroup() -> None:
    """A client newer than the latest attribution: its running process's cgroup names the
    pod, which is then among the pods hit too; a pod known by name only gets its UID so."""
    observer = RecordingObserver(
        {GPU: {202: SERVER, 303: PodRef("", "team-c/job")}},
        running={101: PodRef("uid-trainer", ""), 303: PodRef("uid-job", "")},
    )
    faults = _log(observer, ScriptedLogs(_named(101), _named(303)))
    event = _record(faults)
    assert event.culprit.pod == PodRef("uid-trainer", "")
    assert event.pods == ("team-b/server", "team-c/job", "uid-trainer")
    assert _record(faults).culprit.pod == PodRef("uid-job", "team-c/job")


def test_an_unknown_culprit_is_stated_and_counts_for_nobody(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No line in the output, a pid in no pod, output that cannot be read, no output read
    at all: each says why in status and the journal, and no pod gets a fault counted."""
    observer = RecordingObserver({GPU: {202: SERVER}})
    why = "no line naming a client that 'encountered a fatal GPU error' in control.log"
    logs = ScriptedLogs(FaultCulprit(None, "control.log", why), _named(999))
    faults = _log(observer, logs, repeat_limit=1)
    with caplog.at_level(logging.WARNING):
        first = _record(faults)
        second = _record(faults)
    assert first.culprit == Culprit(None, None, why)
    assert second.culprit == Culprit(
        999,
        None,
        f"pid 999 (named by {_named(999).source}) is in no pod the agent knows: no MPS client "
        "of the latest attribution, and not running in a pod's cgroup",
    )
    assert second.describe()["culprit"] == "unknown"
    assert [fields["VGPU_CULPRIT_POD"] for fields in _events(caplog, "mps-fault")] == [
        "unknown",
        "unknown",
    ]
    broken = _log(observer, ScriptedLogs(fails=RuntimeError("boom")))
    with caplog.at_level(logging.ERROR):
        assert _record(broken).culprit.note == "reading the MPS daemon's output failed: boom"
    unread = FaultLog(
        observer, OffenderPolicy(FaultsConfig(repeat_limit=1, offender_action="hold")), None
    )
    assert _record(unread).culprit.note == "the MPS daemons' output is not read"
    assert faults.offenders.offenders() == []
    assert observer.culprits[-1] == (GPU, "")
    assert observer.offenders == []


# -- repeat offenders ------------------------------------------------------------------------------


def test_a_repeat_offender_is_held_then_released(caplog: pytest.LogCaptureFixture) -> None:
    """repeat_limit faults named on one pod hold it (journal event, metrics, status); the
    pods it only hit are never counted; it is released when its hold is over."""
    clock = Clock()
    observer = RecordingObserver({GPU: {101: TRAINER, 202: SERVER}})
    logs = ScriptedLogs(_named(101), _named(101))
    faults = _log(observer, logs, clock, repeat_limit=2, window_s=60.0, hold_s=30.0)
    assert faults.offenders.config.offender_action == "hold", "the default holds"
    with caplog.at_level(logging.WARNING):
        _record(faults)
        assert faults.offenders.held() == {}
        clock.now += 10
        _record(faults)
        (held,) = _events(caplog, "mps-offender-held")
        assert held == {
            "GPU_UUID": GPU,
            "VGPU_EVENT": "mps-offender-held",
            "VGPU_POD": "team-a/trainer",
            "VGPU_POD_UID": "uid-trainer",
            "VGPU_FAULTS": "2",
            "VGPU_WINDOW_S": "60",
        }
        assert list(faults.offenders.held()) == ["uid-trainer"]
        assert observer.held == {"uid-trainer": "team-a/trainer"}
        assert observer.offenders == [("uid-trainer", "team-a/trainer", True)]
        (shown,) = faults.offenders.describe()
        assert fault_lines({"mps_offenders": [shown]}) == [
            f"MPS HELD: pod team-a/trainer (uid-trainer): {shown['reason']}"
        ]
        faults.tick()
        assert list(faults.offenders.held()) == ["uid-trainer"]
        clock.now += 30
        faults.tick()
        (released,) = _events(caplog, "mps-offender-released")
    assert released["VGPU_POD_UID"] == "uid-trainer"
    assert observer.held == {}
    assert faults.offenders.held() == {}


def test_a_held_pod_that_is_gone_is_released_and_a_reload_to_report_releases_all(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An attribution taken after the hold without the pod releases it; a reload to
    offender_action = "report" releases every hold; a report-mode offender is logged as
    reported, and held by nobody."""
    clock = Clock()
    observer = RecordingObserver({GPU: {101: TRAINER}})
    faults = _log(observer, ScriptedLogs(*[_named(101)] * 3), clock, repeat_limit=1)
    with caplog.at_level(logging.WARNING):
        _record(faults)
        clock.now += 5
        observer.present = PodsPresent(0.0, frozenset({SERVER.uid}))
        faults.tick()
        assert [e["VGPU_POD_UID"] for e in _events(caplog, "mps-offender-released")] == [
            "uid-trainer"
        ]
        observer.present = None
        _record(faults)
        assert faults.offenders.held()
        faults.configure(FaultsConfig(repeat_limit=1, offender_action="report"))
        assert len(_events(caplog, "mps-offender-released")) == 2
        assert faults.offenders.held() == {}
        clock.now += 5
        faults.offenders.expire(PodsPresent(0.0, frozenset()))
        _record(faults)
        (reported,) = _events(caplog, "mps-offender-reported")
    assert reported["VGPU_POD"] == "team-a/trainer"
    assert observer.offenders[-1] == ("uid-trainer", "team-a/trainer", False)
    assert faults.offenders.held() == {}


def test_faults_are_named_on_a_worker_and_handed_back(tmp_path: Path) -> None:
    """arrive(): the loop sees the fault at once and gets it back named through ``emit``;
    close() stops the reader."""
    observer = RecordingObserver({GPU: {101: TRAINER}})
    logs = ScriptedLogs(_named(101))
    faults = _log(observer, logs)
    faults.follow([GPU])
    assert logs.followed == [GPU]
    handed: list[NamedFault] = []
    faults.arrive(ApplicationFault(GPU, 31), handed.append)
    wait_until(lambda: bool(handed), 5.0, "the named fault")
    (named,) = handed
    assert named.seen == SeenFault(ApplicationFault(GPU, 31), 1_800_000_000.0, {101: TRAINER})
    assert named.culprit.pod == TRAINER
    faults.close()
    assert logs.closed


# -- through an agent --------------------------------------------------------------------------


@pytest.fixture
def start(short_tmp_dir: str) -> Iterator[Callable[..., AgentRun]]:
    """Agents in this process (tests.harness), stopped at the end."""
    yield from agent_runs(short_tmp_dir)


def _kill_daemons(mps: MpsConfig) -> None:
    for pid_file in Path(mps.pipe_root).glob("*/nvidia-cuda-mps-control.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_an_agent_names_the_culprit_from_its_daemons_log_and_holds_a_repeat_offender(
    start: Callable[..., AgentRun],
    short_tmp_dir: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Simulated GPUs, a direct-manager daemon (the stand-in control program) writing to
    control.log, a pod with an MPS client: XID 31 with the server's line for that client
    names the pod as culprit in status, the journal and metrics; the second such fault
    (repeat_limit = 2; the line coming after the XID this time) holds the pod."""
    root = short_tmp_dir
    proc = tmp_path / "proc"
    pod_process(proc, 4242)
    socket_path = f"{root}/pr/kubelet.sock"
    binary = write_fake_control(Path(root) / "nvidia-cuda-mps-control")
    config = make_config(
        root,
        attribution=AttributionConfig(pod_resources_socket=socket_path, refresh_interval_s=0.2),
        metrics=MetricsConfig(enabled=True, listen_address="127.0.0.1:0"),
        faults=FaultsConfig(repeat_limit=2, offender_action="hold"),
    )
    config = replace(
        config,
        mps=replace(
            config.mps, manager="direct", control_binary=str(binary), control_timeout_s=1.0
        ),
    )
    # The simulation the agent would build, with a daemons object the test can stop.
    simulation = Simulation.from_config(config)
    daemons = DirectMpsDaemons(config.mps)
    run = start(
        config,
        open_backend=lambda _config: simulation.backend,
        make_mps=lambda _config: daemons,
        faults=simulation,
        gather_attribution=functools.partial(
            gather, proc_root=str(proc), cgroup_root=str(tmp_path / "cgroup")
        ),
    )
    pods: Optional[PodResourcesStandin] = None
    try:
        devices = run.devices(lambda devs: len(devs) == 8)
        ids = [device.device_id for device in devices[:1]]
        run.standin.allocate(RESOURCE, ids)
        pods = PodResourcesStandin(
            socket_path, _pods(ids), checkpoint_path=f"{root}/dp/{CHECKPOINT_NAME}"
        )
        pods.start()
        uuid0 = run.agent.describe()["gpus"][0]["uuid"]
        control_log = Path(log_dir_for(config.mps.log_root, uuid0)) / "control.log"
        run.agent.submit(SimulateCommand(SimulateAction.MPS_CLIENT, "0", pid=4242, memory_mib=9))

        def attributed() -> bool:
            containers = run.agent.describe()["gpus"][0]["attribution"]["containers"]
            return bool(containers) and containers[0]["pids"] == [4242]

        wait_until(attributed, WAIT_S, "the pod's client")
        with caplog.at_level(logging.WARNING):
            first_at = time.time()
            with control_log.open("a") as written:
                written.write(fatal_line(4242, first_at) + "\n")
                written.write(torn_down_line(4242, first_at) + "\n")
            run.agent.submit(SimulateCommand(SimulateAction.XID, "0", xid=31))
            wait_until(lambda: len(run.agent.describe()["mps_faults"]) == 1, WAIT_S, "fault 1")
            (fault,) = run.agent.describe()["mps_faults"]
            assert (fault["culprit"], fault["culprit_pod_uid"], fault["culprit_pid"]) == (
                "ns/web",
                POD_UID,
                4242,
            )
            assert fault["culprit_note"] == (
                f"named by {control_log} and {control_log.parent}/server.log; every client "
                "the server tore down (1) was this pod's"
            )
            assert fault["culprit_evidence"] == "sole-client"
            assert fault["pods"] == ["ns/web"]
            assert run.agent.offenders.held() == {}
            # A later fault: past the first one's burst (a restarted client faults later).
            time.sleep(max(0.0, first_at + BURST_S + 0.1 - time.time()))
            run.agent.submit(SimulateCommand(SimulateAction.XID, "0", xid=31))
            time.sleep(0.3)
            with control_log.open("a") as written:
                written.write(fatal_line(4242) + "\n" + torn_down_line(4242, time.time()) + "\n")
            wait_until(lambda: bool(run.agent.describe()["mps_offenders"]), WAIT_S, "the hold")
            described = run.agent.describe()
            (offender,) = described["mps_offenders"]
            assert (offender["pod"], offender["pod_uid"], offender["held"]) == (
                "ns/web",
                POD_UID,
                True,
            )
            assert list(run.agent.offenders.held()) == [POD_UID]
            culprits = [e["VGPU_CULPRIT_POD"] for e in _events(caplog, "mps-fault")]
            assert culprits == ["ns/web", "ns/web"]
            (held,) = _events(caplog, "mps-offender-held")
        assert (held["VGPU_POD_UID"], held["VGPU_FAULTS"], held["VGPU_WINDOW_S"]) == (
            POD_UID,
            "2",
            "600",
        )
        samples = scrape_metrics(described["metrics_address"])
        assert samples[f"vgpu_mps_fault_culprits_total{{gpu_uuid={uuid0},pod=ns/web}}"] == 2
        assert samples["vgpu_mps_offenders_total{action=hold,pod=ns/web}"] == 1
        assert samples[f"vgpu_mps_offender_held{{pod=ns/web,pod_uid={POD_UID}}}"] == 1
    finally:
        if pods is not None:
            pods.stop()
        run.stop()
        daemons.stop_all()
        _kill_daemons(config.mps)


def test_a_reload_changes_the_offender_policy(
    short_tmp_dir: str, run_agent: Callable[..., AgentRun]
) -> None:
    """New [faults] settings take effect on reload, without a restart."""
    base = make_config(short_tmp_dir)
    reloaded = replace(base, faults=FaultsConfig(repeat_limit=5, offender_action="report"))
    harness = run_agent(base, config_loader=lambda: reloaded)
    harness.devices(lambda devs: len(devs) == 8)
    assert harness.agent.offenders.config == FaultsConfig()
    harness.agent.request_reload()
    wait_until(lambda: harness.agent.offenders.config == reloaded.faults, WAIT_S, "the reload")


class BrokenObserver(RecordingObserver):
    """An attribution that fails every question."""

    def clients_on(self, gpu_uuid: str) -> dict[int, PodRef]:
        raise RuntimeError("attribution broken")

    def pod_of_process(self, pid: int) -> Optional[PodRef]:
        raise RuntimeError("cgroups unreadable")

    def pods_present(self) -> Optional[PodsPresent]:
        raise RuntimeError("attribution broken")


class BrokenFollow(ScriptedLogs):
    """Daemon output that cannot be followed."""

    def follow(self, gpu_uuids: Sequence[str]) -> None:
        raise OSError("no such directory")


def test_a_fault_is_recorded_whatever_fails_around_it(caplog: pytest.LogCaptureFixture) -> None:
    """A failing attribution, cgroup lookup or follow, and no observer at all: the fault is
    still recorded, its culprit unknown or unplaced, and nothing is raised."""
    broken = BrokenObserver()
    faults = _log(broken, BrokenFollow(_named(101)))
    with caplog.at_level(logging.WARNING):
        faults.follow([GPU])
        event = _record(faults)
        faults.tick()
    assert event.pods == ()
    assert event.culprit.pod is None
    assert event.culprit.pid == 101
    messages = " ".join(record.getMessage() for record in caplog.records)
    for words in ("attribution broken", "cgroups unreadable", "no such directory"):
        assert words in messages
    bare = FaultLog(NoObserver(), OffenderPolicy(FaultsConfig()), ScriptedLogs(_named(7)))
    assert _record(bare).culprit == Culprit(7, None, _record_note(7))
    bare.tick()
    bare.close()


def _record_note(pid: int) -> str:
    return (
        f"pid {pid} (named by {_named(pid).source}) is in no pod the agent knows: no MPS "
        "client of the latest attribution, and not running in a pod's cgroup"
    )
