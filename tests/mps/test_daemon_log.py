"""The MPS daemons' output read for each fault's culprit (issue 20 item 2): the line the
server writes for the client that faulted, a file followed across appends, partial lines and
rotation, the unit's journal through a stand-in journalctl on PATH, and which fault a line
names."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest

from vgpu_agent.config.schema import MpsConfig
from vgpu_agent.mps import daemon_log
from vgpu_agent.mps.daemon_log import (
    DaemonLogCulprits,
    FatalClient,
    FileFollower,
    TornDown,
    daemon_logs_for,
    fatal_client,
    torn_down,
)

GPU = "GPU-3f2a8c1e-0000-4000-8000-000000000001"
OTHER_GPU = "GPU-3f2a8c1e-0000-4000-8000-000000000002"
FAKE_JOURNALCTL = Path(__file__).parents[1] / "fakes" / "fake_journalctl.py"


def stamp(epoch_s: float) -> str:
    """The bracketed prefix the MPS daemon writes, for a wall-clock time (local time)."""
    millis = int((epoch_s % 1) * 1000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch_s)) + f".{millis:03d}"


def fatal_line(pid: int, at: Optional[float] = None, server: int = 1477) -> str:
    """The server's line for a client that faulted, as measured on an H100 (driver 580)."""
    prefix = f"[{stamp(at)} Server {server:>5}] " if at is not None else ""
    return f"{prefix}Client {{PID: {pid}, Context: 1}} encountered a fatal GPU error."


def torn_down_line(pid: int, at: float) -> str:
    """The server's line for each client it ends after a fault."""
    return (
        f"[{stamp(at)} Server  1477] All clients belonging to error trigging process {pid} "
        "will be torn down"
    )


def sticky_line(pids: tuple[int, ...], at: float) -> str:
    """The server's line listing every client it ended for a fault."""
    listed = " ".join(str(pid) for pid in pids)
    return (
        f"[{stamp(at)} Server  1477] The following client process have a sticky error set: {listed}"
    )


# -- the line ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "[2026-12-07 10:11:12.345 Server  1477] Client {PID: 1523, Context: 1} encountered "
            "a fatal GPU error.",
            FatalClient(1523, time.mktime((2026, 12, 7, 10, 11, 12, 0, 0, -1)) + 0.345),
        ),
        (
            "Client {PID: 77, Context: 2} encountered a fatal GPU error.",
            FatalClient(77, None),
        ),
        (
            "2026-12-07T10:11:12.445568425Z [2026-12-07 10:11:12.000 Server 9] "
            "Client {PID: 9, Context: 0} encountered a fatal GPU error",
            FatalClient(9, time.mktime((2026, 12, 7, 10, 11, 12, 0, 0, -1))),
        ),
        (
            "[2026-12-07 10:11:12 Other 3] Client {PID:42} encountered a fatal GPU error",
            FatalClient(42, time.mktime((2026, 12, 7, 10, 11, 12, 0, 0, -1))),
        ),
        (
            "[2026-12-07 10:11:12.346 Server 1477] All clients belonging to error trigging "
            "process 1523 will be torn down",
            None,
        ),
        ("[2026-12-07 10:11:12.100 Control 61] Accepting connection...", None),
        ("[2026-12-07 10:11:12.100 Server 1477] New client 1523 connected", None),
        ("Client {PID: x, Context: 1} encountered a fatal GPU error.", None),
        ("", None),
    ],
    ids=[
        "measured-form",
        "no-prefix",
        "another-prefix-first",
        "no-fraction-no-context",
        "torn-down",
        "control-line",
        "new-client",
        "not-a-pid",
        "empty",
    ],
)
def test_the_fatal_client_line_is_found_with_or_without_its_prefix(
    line: str, expected: Optional[FatalClient]
) -> None:
    """The client's pid wherever the text sits in the line, the prefix's time when it has
    one; every other line is no culprit."""
    assert fatal_client(line) == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "[2026-12-07 10:11:12.346 Server 1477] All clients belonging to error trigging "
            "process 1523 will be torn down",
            TornDown((1523,), False, time.mktime((2026, 12, 7, 10, 11, 12, 0, 0, -1)) + 0.346),
        ),
        (
            "All clients belonging to error triggering process 9 will be torn down",
            TornDown((9,), False, None),
        ),
        (
            "[2026-12-07 10:11:12.400 Server 1477] The following client process have a sticky "
            "error set: 1359 1516 1363",
            TornDown(
                (1359, 1516, 1363), True, time.mktime((2026, 12, 7, 10, 11, 12, 0, 0, -1)) + 0.4
            ),
        ),
        ("The following client processes has a sticky error set: 7", TornDown((7,), True, None)),
        ("The following client process have a sticky error set:", None),
        ("Client {PID: 1523, Context: 1} encountered a fatal GPU error.", None),
        ("[2026-12-07 10:11:12.100 Server 1477] New client 1523 connected", None),
    ],
    ids=["measured-form", "spelled-right", "sticky-list", "plural", "empty-list", "fatal", "other"],
)
def test_the_lines_naming_clients_torn_down_are_read(
    line: str, expected: Optional[TornDown]
) -> None:
    """Each client the server ends after a fault, one line each, and the list of them all."""
    assert torn_down(line) == expected


# -- a file followed -----------------------------------------------------------------------------


def _append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text)


def test_a_file_is_followed_line_by_line_and_a_partial_line_waits(tmp_path: Path) -> None:
    """What was there before is skipped; appended lines come once each; a line without its
    newline comes when the newline does."""
    path = tmp_path / "control.log"
    path.write_text("before the agent\n")
    follower = FileFollower(str(path))
    follower.start_at_end()
    assert follower.read_lines() == []
    _append(path, "one\ntwo\nthr")
    assert follower.read_lines() == ["one", "two"]
    assert follower.read_lines() == []
    _append(path, "ee\n\n")
    assert follower.read_lines() == ["three", ""]
    follower.close()


def test_a_file_renamed_away_is_read_to_its_end_then_its_successor(tmp_path: Path) -> None:
    """Rotation by rename: the old file's last lines (a last one without newline too),
    then the new file from its start; while no new file exists the old one is kept."""
    path = tmp_path / "control.log"
    path.write_text("")
    follower = FileFollower(str(path))
    follower.start_at_end()
    _append(path, "1\n")
    assert follower.read_lines() == ["1"]
    _append(path, "2\nlast")
    path.rename(tmp_path / "control.log.1")
    assert follower.read_lines() == ["2"]
    path.write_text("3\n")
    assert follower.read_lines() == ["last", "3"]
    _append(path, "4\n")
    assert follower.read_lines() == ["4"]
    follower.close()


def test_a_file_truncated_in_place_is_read_again_from_its_start(tmp_path: Path) -> None:
    """copytruncate: a file shorter than the place read to starts over."""
    path = tmp_path / "control.log"
    path.write_text("a fairly long first line\n")
    follower = FileFollower(str(path))
    follower.start_at_end()
    path.write_text("new\n")
    assert follower.read_lines() == ["new"]
    follower.close()


def test_a_missing_file_is_read_from_its_start_once_it_exists(tmp_path: Path) -> None:
    """server.log may never exist; once it does, all of it is new."""
    path = tmp_path / "server.log"
    follower = FileFollower(str(path))
    follower.start_at_end()
    assert follower.read_lines() == []
    path.write_text("first\n")
    assert follower.read_lines() == ["first"]
    follower.close()
    _append(path, "second\n")
    assert follower.read_lines() == ["first", "second"], "closed: opened anew from the start"
    follower.close()


def test_a_file_far_behind_is_read_from_near_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the last MAX_READ_BYTES are read (64: six lines and a piece), and the line
    cut there is dropped."""
    monkeypatch.setattr(daemon_log, "MAX_READ_BYTES", 64)
    path = tmp_path / "control.log"
    path.write_text("")
    follower = FileFollower(str(path))
    follower.start_at_end()
    _append(path, "".join(f"line {number:04d}\n" for number in range(100)))
    assert follower.read_lines() == [f"line {number:04d}" for number in range(94, 100)]
    follower.close()


# -- culprits from the direct manager's files ----------------------------------------------------


@pytest.fixture
def direct(tmp_path: Path) -> Iterator[tuple[DaemonLogCulprits, Path]]:
    """The direct manager's output of GPU: its control.log (with lines from before the
    agent), followed from its end; closed at the end."""
    config = MpsConfig(manager="direct", log_root=str(tmp_path / "log"))
    log_dir = tmp_path / "log" / GPU
    log_dir.mkdir(parents=True)
    control = log_dir / "control.log"
    control.write_text(
        f"[{stamp(time.time() - 1)} Control    61] Starting control daemon\n"
        + fatal_line(999, time.time())
        + "\n"
    )
    logs = daemon_logs_for(config)
    assert isinstance(logs, DaemonLogCulprits)
    logs.follow([GPU])
    yield logs, control
    logs.close()


def test_the_culprit_is_the_first_client_named_near_the_fault(
    direct: tuple[DaemonLogCulprits, Path],
) -> None:
    """Lines written before the GPU was followed are skipped; the first fatal client after
    it is the culprit, whatever is around it, and it names that one fault only."""
    logs, control = direct
    now = time.time()
    _append(
        control,
        f"[{stamp(now)} Control    61] Accepting connection...\n"
        + fatal_line(1523, now)
        + "\n"
        + "".join(torn_down_line(pid, now) + "\n" for pid in (1523, 1601, 1602)),
    )
    found = logs.culprit(GPU, now, wait_s=0.5)
    assert (found.pid, found.source) == (1523, f"{control} and {control.parent}/server.log")
    again = logs.culprit(GPU, now + 0.1, wait_s=0.2)
    assert again.pid is None
    assert again.why_unknown == (
        f"no line naming a client that 'encountered a fatal GPU error' in {again.source} "
        "from 10 s before the fault to 0.2 s after it"
    )


def test_the_clients_torn_down_come_with_the_culprit(
    direct: tuple[DaemonLogCulprits, Path],
) -> None:
    """The clients torn down within the burst of the culprit's line, in the order named and
    once each; the list of them all ends the wait at once, and a later fault's lines are
    its own."""
    logs, control = direct
    now = time.time()
    _append(
        control,
        fatal_line(1359, now)
        + "\n"
        + "".join(torn_down_line(pid, now) + "\n" for pid in (1359, 1516))
        + sticky_line((1359, 1516, 1363), now)
        + "\n",
    )
    started = time.monotonic()
    found = logs.culprit(GPU, now, wait_s=0.5)
    assert (found.pid, found.torn_down) == (1359, (1359, 1516, 1363))
    assert time.monotonic() - started < 0.5, "the full list ends the wait"
    later = now + 5.0
    _append(control, fatal_line(1516, later) + "\n" + torn_down_line(1516, later) + "\n")
    started = time.monotonic()
    alone = logs.culprit(GPU, later, wait_s=0.5)
    assert (alone.pid, alone.torn_down) == (1516, (1516,))
    assert time.monotonic() - started >= daemon_log.TEARDOWN_WAIT_S - 0.05, (
        "without the full list it waits for more lines"
    )


def test_a_culprit_without_torn_down_lines_has_none(
    direct: tuple[DaemonLogCulprits, Path],
) -> None:
    """A server that lists no client torn down: the culprit comes alone."""
    logs, control = direct
    now = time.time()
    _append(control, fatal_line(42, now) + "\n" + torn_down_line(77, now - 30) + "\n")
    found = logs.culprit(GPU, now, wait_s=0.2)
    assert (found.pid, found.torn_down) == (42, ())


def test_a_line_written_while_waiting_is_found(direct: tuple[DaemonLogCulprits, Path]) -> None:
    """The fault may reach the agent before the server writes its line: it waits for it."""
    logs, control = direct
    now = time.time()
    later = threading.Timer(0.3, lambda: _append(control, fatal_line(4242) + "\n"))
    later.start()
    try:
        found = logs.culprit(GPU, now, wait_s=5.0)
    finally:
        later.join()
    assert found.pid == 4242
    assert time.time() - now < 4.0, "it stops waiting once the line is there"


def test_a_line_too_old_for_the_fault_names_no_culprit(
    direct: tuple[DaemonLogCulprits, Path],
) -> None:
    """A line written long before the fault belongs to another fault."""
    logs, control = direct
    now = time.time()
    _append(control, fatal_line(77, now - 60) + "\n")
    found = logs.culprit(GPU, now, wait_s=0.1)
    assert found.pid is None


def test_lines_of_one_burst_name_one_fault(direct: tuple[DaemonLogCulprits, Path]) -> None:
    """A second client named within BURST_S of the first is part of the same fault: the
    next fault does not take it as its culprit; one after the burst does."""
    logs, control = direct
    now = time.time()
    _append(control, fatal_line(10, now) + "\n" + fatal_line(20, now + 0.5) + "\n")
    assert logs.culprit(GPU, now, wait_s=0.1).pid == 10
    assert logs.culprit(GPU, now + 1.0, wait_s=0.1).pid is None
    _append(control, fatal_line(30, now + 3.0) + "\n")
    assert logs.culprit(GPU, now + 3.0, wait_s=0.1).pid == 30


def test_the_servers_own_log_is_read_too_and_gpus_apart(
    direct: tuple[DaemonLogCulprits, Path],
) -> None:
    """server.log beside control.log, made after the GPU was followed, names a culprit; a
    GPU's lines never name another GPU's culprit."""
    logs, control = direct
    logs.follow([OTHER_GPU])
    now = time.time()
    (control.parent / "server.log").write_text(fatal_line(555, now) + "\n")
    assert logs.culprit(OTHER_GPU, now, wait_s=0.1).pid is None
    assert logs.culprit(GPU, now, wait_s=0.1).pid == 555


def test_a_line_without_a_time_counts_as_read_now(direct: tuple[DaemonLogCulprits, Path]) -> None:
    """Without a prefix the line is taken as written when it was read."""
    logs, control = direct
    _append(control, fatal_line(31) + "\n")
    assert logs.culprit(GPU, time.time(), wait_s=0.1).pid == 31


def test_an_unreadable_log_says_why_the_culprit_is_unknown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A log that cannot be read is named in the answer and logged once."""
    config = MpsConfig(manager="direct", log_root=str(tmp_path / "log"))
    (tmp_path / "log" / GPU / "control.log").mkdir(parents=True)
    logs = DaemonLogCulprits(config)
    for _ in range(2):
        found = logs.culprit(GPU, time.time(), wait_s=0.0)
        assert found.pid is None
        assert found.why_unknown.startswith(f"reading {tmp_path}/log/{GPU}/control.log: ")
        assert "directory" in found.why_unknown
    logs.close()
    assert logs.culprit(GPU, time.time(), wait_s=0.0).why_unknown == "the agent is stopping"
    assert len([r for r in caplog.records if "naming the culprit" in r.getMessage()]) == 1


@pytest.mark.parametrize(
    ("manager", "enabled", "reads"),
    [
        ("direct", True, True),
        ("systemd", True, True),
        ("external", True, False),
        ("direct", False, False),
    ],
    ids=["direct", "systemd", "external", "mps-off"],
)
def test_which_managers_output_is_read(manager: str, enabled: bool, reads: bool) -> None:
    """The agent's own daemons' output is read; someone else's is not, nor without MPS."""
    config = MpsConfig(manager=manager, enabled=enabled)  # type: ignore[arg-type]
    assert (daemon_logs_for(config) is not None) is reads


# -- culprits from the systemd manager's journal -------------------------------------------------


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-in journalctl first on PATH, answering from the returned file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "journalctl"
    program.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{FAKE_JOURNALCTL}" "$@"\n')
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    path = tmp_path / "journal.jsonl"
    monkeypatch.setenv("FAKE_JOURNAL", str(path))
    return path


def _entry(journal: Path, unit: str, at: float, message: object) -> None:
    entry = {
        "_SYSTEMD_UNIT": unit,
        "__REALTIME_TIMESTAMP": str(int(at * 1e6)),
        "MESSAGE": message,
    }
    with journal.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


def test_the_culprit_is_read_from_the_units_journal(journal: Path, tmp_path: Path) -> None:
    """Under systemd: the unit's journal from a little before the fault, the journal's
    own time; other units' and older entries name nobody; a taken line is not taken
    again though the journal is read again."""
    unit = f"vgpu-mps@{GPU}.service"
    now = time.time()
    _entry(journal, unit, now - 30, fatal_line(1))
    _entry(journal, f"vgpu-mps@{OTHER_GPU}.service", now, fatal_line(2))
    _entry(journal, unit, now - 0.2, "[x Control 61] Accepting connection...")
    _entry(journal, unit, now + 0.1, fatal_line(1523))
    logs = DaemonLogCulprits(MpsConfig(manager="systemd", log_root=str(tmp_path / "log")))
    logs.follow([GPU])
    found = logs.culprit(GPU, now, wait_s=1.0)
    assert (found.pid, found.source) == (
        1523,
        f"the journal of {unit} and {tmp_path}/log/{GPU}/server.log",
    )
    assert logs.culprit(GPU, now + 0.5, wait_s=0.3).pid is None
    logs.close()
    calls = (journal.parent / "journal.jsonl.calls").read_text().splitlines()
    assert calls[0] == (f"--unit={unit} --output=json --no-pager --quiet --since=@{int(now - 10)}")


def test_a_journal_message_in_bytes_is_read(journal: Path, tmp_path: Path) -> None:
    """journald gives a message that is not UTF-8 as its bytes."""
    now = time.time()
    raw = list((fatal_line(64) + " \udcff").encode("utf-8", "surrogateescape"))
    _entry(journal, f"vgpu-mps@{GPU}.service", now, raw)
    logs = DaemonLogCulprits(MpsConfig(manager="systemd", log_root=str(tmp_path / "log")))
    assert logs.culprit(GPU, now, wait_s=0.5).pid == 64
    logs.close()


def test_a_journal_that_cannot_be_read_says_why(
    journal: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """journalctl failing, and journalctl missing, each named as why the culprit is
    unknown."""
    config = MpsConfig(manager="systemd", log_root=str(tmp_path / "log"))
    unit = f"vgpu-mps@{GPU}.service"
    monkeypatch.setenv("FAKE_JOURNALCTL_FAIL", "Failed to open the journal: Permission denied")
    found = DaemonLogCulprits(config).culprit(GPU, time.time(), wait_s=0.0)
    assert found.why_unknown == (
        f"reading the journal of {unit}: journalctl exited with status 1: Failed to open the "
        "journal: Permission denied"
    )
    missing = DaemonLogCulprits(config, journalctl=str(tmp_path / "no-journalctl"))
    found = missing.culprit(GPU, time.time(), wait_s=0.0)
    assert found.why_unknown == (
        f"reading the journal of {unit}: {tmp_path}/no-journalctl: not found"
    )
