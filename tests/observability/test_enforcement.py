"""The per-pod client policy acting (ClientEnforcer): each client beyond its pod's allowance
ended once, or reported once; a failed end logged once and tried again; nothing outside
enforced confinement; start times from /proc, else when first seen; the status lines."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Optional

import pytest

from tests.observability.test_excess import GPU_A, STARTS, UID_WEB, _one_pod
from vgpu_agent.config.schema import Config, IsolationConfig, MpsConfig
from vgpu_agent.model.errors import MpsError
from vgpu_agent.observability.attribution import Attribution, StrayProcess
from vgpu_agent.observability.enforcement import (
    RECENT_ENDINGS,
    ClientEnforcer,
    policy_status_lines,
    process_start_s,
)


class Daemons:
    """Stands in for the GPUs' MPS daemons: the clients each serves; ends on request."""

    def __init__(self, clients: set[int]) -> None:
        self.clients = set(clients)
        self.ended: list[tuple[str, int]] = []
        self.refuse: Optional[str] = None

    def end(self, mps: MpsConfig, gpu_uuid: str, pid: int) -> Optional[str]:
        if self.refuse is not None:
            raise MpsError(f"ending MPS client {pid} on GPU {gpu_uuid}: {self.refuse}")
        if pid not in self.clients:
            return None
        self.clients.discard(pid)
        self.ended.append((gpu_uuid, pid))
        return "MPS server 497"


def _config(confinement: str = "enforced", **isolation: object) -> Config:
    return Config(
        mps=MpsConfig(confinement=confinement),  # type: ignore[arg-type]
        isolation=replace(IsolationConfig(), **isolation),  # type: ignore[arg-type]
    )


def _enforcer(
    daemons: Daemons,
    config: Optional[Config] = None,
    held: Optional[Mapping[str, str]] = None,
    counted: Optional[list[tuple[str, str, str]]] = None,
) -> ClientEnforcer:
    return ClientEnforcer(
        config or _config(),
        end_client=daemons.end,
        held=lambda: held or {},
        start_time=STARTS.get,
        count=lambda *labels: (counted if counted is not None else []).append(labels),
        wall_clock=lambda: 0.0,
        boot_clock=lambda: 1000.0,
    )


def _events(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    return [
        record.__dict__["fields"]
        for record in caplog.records
        if record.__dict__.get("fields", {}).get("VGPU_EVENT") == "mps-client-ended"
    ]


def test_the_newest_clients_are_ended_once_each(caplog: pytest.LogCaptureFixture) -> None:
    """Four clients on one vGPU: the three newest are ended, newest first, each with one
    journal entry and one count; the next check, with NVML still listing them, ends
    nothing again."""
    daemons = Daemons({10, 11, 12, 13})
    counted: list[tuple[str, str, str]] = []
    enforcer = _enforcer(daemons, counted=counted)
    attribution = _one_pod(1, (10, 11, 12, 13))
    with caplog.at_level(logging.INFO, logger="vgpu_agent"):
        actions = enforcer.check(attribution)
        assert enforcer.check(attribution) == []
    assert daemons.ended == [(GPU_A, 13), (GPU_A, 12), (GPU_A, 11)]
    assert [action.action for action in actions] == ["ended"] * 3
    assert counted == [(GPU_A, "ns/web", "excess")] * 3
    first = _events(caplog)[0]
    assert first == {
        "VGPU_EVENT": "mps-client-ended",
        "GPU_UUID": GPU_A,
        "VGPU_POD": "ns/web",
        "VGPU_CONTAINER": "app",
        "CLIENT_PID": "13",
        "VGPU_REASON": "excess",
        "VGPU_ACTION": "ended",
    }
    assert len(_events(caplog)) == 3
    recent = enforcer.describe()["recent"]
    assert recent[0] == {
        "at": "1970-01-01T00:00:00Z",
        "gpu_uuid": GPU_A,
        "pod": "ns/web",
        "pod_uid": UID_WEB,
        "container": "app",
        "pid": 13,
        "action": "ended",
        "reason": "excess",
        "why": "4 MPS clients on 1 vGPU(s) of this GPU, 1 allowed (isolation.clients_per_vgpu = 1)",
        "detail": "MPS server 497",
    }


def test_an_ended_client_leaves_room_for_no_one_else() -> None:
    """With the ended client still listed, a newcomer is ended too; the old one stays."""
    daemons = Daemons({10, 11, 12})
    enforcer = _enforcer(daemons)
    enforcer.check(_one_pod(1, (10, 11)))
    enforcer.check(_one_pod(1, (10, 11, 12)))
    assert daemons.ended == [(GPU_A, 11), (GPU_A, 12)]


def test_report_mode_ends_nothing_and_reports_once(caplog: pytest.LogCaptureFixture) -> None:
    """excess_clients = "report": each client beyond the allowance is logged and listed
    once, counted nowhere, ended never."""
    daemons = Daemons({10, 11})
    counted: list[tuple[str, str, str]] = []
    enforcer = _enforcer(daemons, _config(excess_clients="report"), counted=counted)
    with caplog.at_level(logging.INFO, logger="vgpu_agent"):
        enforcer.check(_one_pod(1, (10, 11)))
        enforcer.check(_one_pod(1, (10, 11)))
    assert daemons.ended == []
    assert counted == []
    (event,) = _events(caplog)
    assert (event["CLIENT_PID"], event["VGPU_ACTION"]) == ("11", "reported")
    assert 'not ended (isolation.excess_clients = "report")' in caplog.text
    assert [entry["action"] for entry in enforcer.describe()["recent"]] == ["reported"]


def test_cooperative_confinement_does_nothing() -> None:
    """Outside enforced confinement the check acts on nothing and says it is off."""
    daemons = Daemons({10, 11})
    enforcer = _enforcer(daemons, _config("cooperative"))
    assert enforcer.check(_one_pod(1, (10, 11))) == []
    assert daemons.ended == []
    described = enforcer.describe()
    assert not described["active"]
    assert described["summary"].startswith("off: in cooperative confinement")


def test_a_reconfigured_allowance_applies_at_the_next_check() -> None:
    """clients_per_vgpu 2 lets two run; reconfigured to 1, the newer is ended."""
    daemons = Daemons({10, 11})
    enforcer = _enforcer(daemons, _config(clients_per_vgpu=2))
    enforcer.check(_one_pod(1, (10, 11)))
    assert daemons.ended == []
    enforcer.reconfigure(_config(clients_per_vgpu=1))
    enforcer.check(_one_pod(1, (10, 11)))
    assert daemons.ended == [(GPU_A, 11)]


def test_a_held_pod_loses_every_client() -> None:
    """A pod the fault policy holds gets no client: each is ended, counted as held, and
    status lists the pod with why."""
    daemons = Daemons({10})
    counted: list[tuple[str, str, str]] = []
    enforcer = _enforcer(daemons, held={UID_WEB: "3 faults in 10 min"}, counted=counted)
    enforcer.check(_one_pod(1, (10,)))
    assert daemons.ended == [(GPU_A, 10)]
    assert counted == [(GPU_A, "ns/web", "held")]
    assert enforcer.describe()["held"] == {UID_WEB: "3 faults in 10 min"}


def test_a_failed_end_is_logged_once_and_tried_again(caplog: pytest.LogCaptureFixture) -> None:
    """An end the daemon refuses is logged once with its answer, tried at every check, and
    recorded as ended once it works."""
    daemons = Daemons({10, 11})
    daemons.refuse = "terminate_client 497 11 answered 'no', and the server still lists it"
    enforcer = _enforcer(daemons)
    with caplog.at_level(logging.INFO, logger="vgpu_agent"):
        for _ in range(3):
            enforcer.check(_one_pod(1, (10, 11)))
        daemons.refuse = None
        enforcer.check(_one_pod(1, (10, 11)))
    assert [event["VGPU_ACTION"] for event in _events(caplog)] == ["failed", "ended"]
    assert caplog.text.count("answered 'no'") == 1
    assert daemons.ended == [(GPU_A, 11)]
    assert [entry["action"] for entry in enforcer.describe()["recent"]] == ["failed", "ended"]


def test_a_client_gone_after_a_failed_attempt_counts_as_ended() -> None:
    """An attempt that failed after terminate_client may have reached the daemon: when no
    server lists the client at the next check, it is recorded as ended, not tried again."""
    daemons = Daemons({10, 11})
    daemons.refuse = "the server's clients could not be read back"
    enforcer = _enforcer(daemons)
    enforcer.check(_one_pod(1, (10, 11)))
    daemons.refuse = None
    daemons.clients.discard(11)
    enforcer.check(_one_pod(1, (10, 11)))
    recent = enforcer.describe()["recent"]
    assert [(entry["action"], entry.get("detail", "")) for entry in recent][-1] == (
        "ended",
        "no MPS server lists it any more, after an earlier attempt",
    )


def test_a_client_no_server_lists_is_not_counted_as_ended(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """NVML lists a client the daemon does not (it exited): nothing is recorded, it is said
    once, and looked for again."""
    daemons = Daemons({10})
    enforcer = _enforcer(daemons)
    with caplog.at_level(logging.INFO, logger="vgpu_agent"):
        enforcer.check(_one_pod(1, (10, 11)))
        enforcer.check(_one_pod(1, (10, 11)))
    assert caplog.text.count("no MPS server of the GPU lists it") == 1
    assert enforcer.describe()["recent"] == []
    daemons.clients.add(11)
    enforcer.check(_one_pod(1, (10, 11)))
    assert daemons.ended == [(GPU_A, 11)]


def test_clients_of_no_pod_are_reported_once_never_ended(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client no pod accounts for is reported once (at info), and never ended."""
    daemons = Daemons({77})
    enforcer = _enforcer(daemons)
    attribution = Attribution(strays=(StrayProcess(77, GPU_A, 9, "not in a pod"),))
    with caplog.at_level(logging.INFO, logger="vgpu_agent"):
        enforcer.check(attribution)
        enforcer.check(attribution)
    assert daemons.ended == []
    (record,) = [r for r in caplog.records if "reported, never ended" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert record.__dict__["fields"]["VGPU_REASON"] == "unattributed"


def test_a_broken_held_source_is_said_once_and_holds_no_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A fault policy that raises: a warning once, and the check goes on without holds."""
    daemons = Daemons({10, 11})

    def broken() -> Mapping[str, str]:
        raise RuntimeError("policy state unreadable")

    enforcer = ClientEnforcer(_config(), end_client=daemons.end, held=broken)
    with caplog.at_level(logging.WARNING, logger="vgpu_agent"):
        enforcer.check(_one_pod(1, (10,)))
        enforcer.check(_one_pod(1, (10,)))
    assert caplog.text.count("policy state unreadable") == 1
    assert daemons.ended == []


def test_hidden_processes_are_ordered_by_when_they_were_first_seen() -> None:
    """Without /proc start times, the client seen later is the newer one."""
    daemons = Daemons({10, 11, 12})
    now = [500.0]
    enforcer = ClientEnforcer(
        _config(),
        end_client=daemons.end,
        start_time=lambda pid: None,
        boot_clock=lambda: now[0],
    )
    enforcer.check(_one_pod(2, (12, 11)))
    now[0] += 1.0
    enforcer.check(_one_pod(2, (12, 11, 10)))
    assert daemons.ended == [(GPU_A, 10)], "10 came last, whatever its pid"


def test_status_keeps_the_latest_actions() -> None:
    """The recent list keeps RECENT_ENDINGS; the text status shows the last few."""
    daemons = Daemons(set(range(100, 160)))
    enforcer = _enforcer(daemons, _config(excess_clients="report"))
    enforcer.check(_one_pod(1, tuple(range(100, 160))))
    described = enforcer.describe()
    assert len(described["recent"]) == RECENT_ENDINGS
    lines = policy_status_lines(described)
    assert lines[0] == (
        "per-pod MPS clients: a pod may run 1 MPS client process per vGPU it holds on a GPU; "
        'those beyond that are only reported (isolation.excess_clients = "report"); checked '
        "every 1 s"
    )
    assert len(lines) == 6
    assert lines[-1].startswith(f"  MPS client reported 1970-01-01T00:00:00Z: GPU {GPU_A} pid ")
    assert ", ns/web app: 60 MPS clients on 1 vGPU(s)" in lines[-1]


@pytest.mark.parametrize(
    ("stat", "seconds"),
    [
        ("4242 (python3) S 1 4242 4242 0 -1 4194560 0 0 0 0 5 1 0 0 20 0 3 0 12345 0", 123.45),
        ("7 (a (b) c) R 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 200 0", 2.0),
        ("8 (short) S 1", None),
    ],
    ids=["plain", "name-with-spaces-and-parentheses", "truncated"],
)
def test_process_start_is_read_from_proc_stat(
    tmp_path: Path, stat: str, seconds: Optional[float]
) -> None:
    """Field 22 of /proc/<pid>/stat in clock ticks (100 a second here), after the command
    name however it is spelled; None when it cannot be read."""
    pid = int(stat.split(maxsplit=1)[0])
    (tmp_path / str(pid)).mkdir()
    (tmp_path / str(pid) / "stat").write_text(stat + "\n")
    assert process_start_s(pid, str(tmp_path), ticks_per_s=100) == seconds
    assert process_start_s(999, str(tmp_path), ticks_per_s=100) is None


def test_this_process_has_a_start_time() -> None:
    """The real /proc: this test's own process started after boot and before now."""
    started = process_start_s(os.getpid())
    assert started is not None
    assert 0 < started <= time.clock_gettime(time.CLOCK_BOOTTIME)


def test_pending_work_makes_a_quiet_check_look_again() -> None:
    """A failed end to retry, or a pod newly held, is work for the next check even when no
    client came or went; outside enforced confinement there is none."""
    daemons = Daemons({10, 11})
    held: dict[str, str] = {}
    enforcer = ClientEnforcer(_config(), end_client=daemons.end, held=lambda: held)
    enforcer.check(_one_pod(1, (10,)))
    assert not enforcer.pending()
    held[UID_WEB] = "3 faults in 10 min"
    assert enforcer.pending()
    enforcer.check(_one_pod(1, (10,)))
    assert not enforcer.pending()
    daemons.refuse = "no answer"
    enforcer.check(_one_pod(1, (10, 11)))
    assert enforcer.pending()
    assert not _enforcer(daemons, _config("cooperative")).pending()
