"""Logging setup: journald entries with structured fields, stderr lines, idempotent setup."""

from __future__ import annotations

import io
import logging
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.host.test_systemd import parse_journal_entry
from vgpu_agent.host.log import (
    FieldsFormatter,
    JournalHandler,
    log_event,
    parse_level,
    set_level,
    setup_logging,
    syslog_priority,
)
from vgpu_agent.host.systemd import Journal
from vgpu_agent.model.errors import ConfigError

SYSTEMD_ENVIRON = {"INVOCATION_ID": "0123456789abcdef0123456789abcdef"}


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """Put the root logger's handlers and level back after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.fixture
def journal_receiver() -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket standing in for journald's socket: (path, socket)."""
    with tempfile.TemporaryDirectory(prefix="vgpu-log-", dir="/tmp") as directory:
        path = str(Path(directory) / "journal")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
            receiver.bind(path)
            receiver.settimeout(5)
            yield path, receiver


@pytest.fixture
def journal(journal_receiver: tuple[str, socket.socket]) -> Journal:
    """A Journal speaking our own native-protocol code to journal_receiver."""
    path, _ = journal_receiver
    return Journal(path, use_libsystemd=False)


def fail(error: Exception) -> None:
    raise error


def receive_entry(receiver: socket.socket) -> dict[str, str]:
    return parse_journal_entry(receiver.recv(1 << 20))


def ours(root: logging.Logger) -> list[logging.Handler]:
    return [h for h in root.handlers if (h.name or "").startswith("vgpu-agent.")]


def test_journal_entry_has_standard_and_extra_fields(
    journal: Journal, journal_receiver: tuple[str, socket.socket]
) -> None:
    """Under systemd a record becomes one entry with code location and its own fields."""
    _, receiver = journal_receiver
    setup_logging("info", SYSTEMD_ENVIRON, journal=journal)
    logger = logging.getLogger("vgpu_agent.agent.health")
    logger.warning(
        "XID %d on %s",
        79,
        "GPU-1",
        extra={"fields": {"GPU_UUID": "GPU-1", "VGPU_EVENT": "xid", "XID": 79}},
    )
    line = test_journal_entry_has_standard_and_extra_fields.__code__.co_firstlineno
    entry = receive_entry(receiver)
    assert entry.pop("CODE_FILE").endswith("test_log.py")
    assert line < int(entry.pop("CODE_LINE")) < line + 15
    assert entry == {
        "MESSAGE": "XID 79 on GPU-1",
        "PRIORITY": "4",
        "SYSLOG_IDENTIFIER": "vgpu-agent",
        "CODE_FUNC": "test_journal_entry_has_standard_and_extra_fields",
        "LOGGER": "vgpu_agent.agent.health",
        "THREAD_NAME": "MainThread",
        "GPU_UUID": "GPU-1",
        "VGPU_EVENT": "xid",
        "XID": "79",
    }


def test_log_event_upper_cases_names_and_points_at_caller(
    journal: Journal, journal_receiver: tuple[str, socket.socket]
) -> None:
    """log_event() turns keyword names into journal fields and records the caller's location."""
    _, receiver = journal_receiver
    setup_logging("info", SYSTEMD_ENVIRON, journal=journal)
    logger = logging.getLogger("vgpu_agent.agent.health")
    log_event(
        logger,
        logging.INFO,
        "GPU-1 healthy again (100%)",
        gpu_uuid="GPU-1",
        vgpu_health="Healthy",
        vgpu_reason=None,
    )
    entry = receive_entry(receiver)
    assert entry["MESSAGE"] == "GPU-1 healthy again (100%)"
    assert entry["GPU_UUID"] == "GPU-1"
    assert entry["VGPU_HEALTH"] == "Healthy"
    assert "VGPU_REASON" not in entry
    assert entry["CODE_FILE"].endswith("test_log.py")
    assert entry["CODE_FUNC"] == "test_log_event_upper_cases_names_and_points_at_caller"


def test_log_event_below_level_sends_nothing(
    journal: Journal, journal_receiver: tuple[str, socket.socket]
) -> None:
    """A log_event() below the configured level is dropped before it reaches the journal."""
    _, receiver = journal_receiver
    setup_logging("warning", SYSTEMD_ENVIRON, journal=journal)
    logger = logging.getLogger("vgpu_agent.agent.health")
    log_event(logger, logging.INFO, "quiet", gpu_uuid="GPU-1")
    log_event(logger, logging.ERROR, "loud", gpu_uuid="GPU-1")
    assert receive_entry(receiver)["MESSAGE"] == "loud"


def test_traceback_goes_to_its_own_field(
    journal: Journal, journal_receiver: tuple[str, socket.socket]
) -> None:
    """An exception's traceback is sent as TRACEBACK, and MESSAGE stays one line."""
    _, receiver = journal_receiver
    setup_logging("info", SYSTEMD_ENVIRON, journal=journal)
    try:
        fail(RuntimeError("MPS daemon for GPU-1 did not answer"))
    except RuntimeError:
        logging.getLogger("vgpu_agent.mps.daemons").exception("probing MPS failed")
    entry = receive_entry(receiver)
    assert entry["MESSAGE"] == "probing MPS failed"
    assert entry["PRIORITY"] == "3"
    assert entry["TRACEBACK"].startswith("Traceback (most recent call last):")
    assert entry["TRACEBACK"].endswith("RuntimeError: MPS daemon for GPU-1 did not answer")


def test_stack_info_goes_to_its_own_field(
    journal: Journal, journal_receiver: tuple[str, socket.socket]
) -> None:
    """stack_info=True sends the stack as STACK."""
    _, receiver = journal_receiver
    setup_logging("debug", SYSTEMD_ENVIRON, journal=journal)
    logging.getLogger("vgpu_agent").debug("where am I", stack_info=True)
    entry = receive_entry(receiver)
    assert entry["MESSAGE"] == "where am I"
    assert entry["PRIORITY"] == "7"
    assert "test_stack_info_goes_to_its_own_field" in entry["STACK"]


def test_extra_fields_cannot_replace_standard_ones(
    journal: Journal, journal_receiver: tuple[str, socket.socket]
) -> None:
    """Fields named like the standard ones do not overwrite them."""
    _, receiver = journal_receiver
    setup_logging("info", SYSTEMD_ENVIRON, journal=journal)
    logging.getLogger("vgpu_agent").info(
        "real", extra={"fields": {"message": "fake", "code_line": "0", "logger": "x"}}
    )
    entry = receive_entry(receiver)
    assert entry["MESSAGE"] == "real"
    assert entry["CODE_LINE"] != "0"
    assert entry["LOGGER"] == "vgpu_agent"


def test_stderr_outside_systemd_appends_fields(journal: Journal) -> None:
    """Outside systemd lines go to stderr with time, level, logger and KEY=value fields."""
    stream = io.StringIO()
    setup_logging("info", {}, journal=journal, stream=stream)
    log_event(
        logging.getLogger("vgpu_agent.agent.health"),
        logging.WARNING,
        "GPU-1 unhealthy",
        gpu_uuid="GPU-1",
        vgpu_reason="XID 79: fallen off the bus",
    )
    output = stream.getvalue()
    assert output.endswith(
        ' WARNING vgpu_agent.agent.health: GPU-1 unhealthy GPU_UUID=GPU-1 VGPU_REASON="XID 79:'
        ' fallen off the bus"\n'
    )
    assert output[:4].isdigit()  # a timestamp first


def test_stderr_under_systemd_without_journal_uses_priority_prefix(tmp_path: Path) -> None:
    """Under systemd with no journal socket, each stderr line starts with <priority>."""
    stream = io.StringIO()
    absent = Journal(str(tmp_path / "absent"), use_libsystemd=False)
    setup_logging("info", SYSTEMD_ENVIRON, journal=absent, stream=stream)
    try:
        fail(ValueError("bad"))
    except ValueError:
        logging.getLogger("vgpu_agent").exception("it broke")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "<3>vgpu_agent: it broke"
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>ValueError: bad"


def test_journal_refusal_falls_back_to_stderr(
    journal: Journal, journal_receiver: tuple[str, socket.socket]
) -> None:
    """When journald goes away after setup, records still reach stderr."""
    path, receiver = journal_receiver
    stream = io.StringIO()
    setup_logging("info", SYSTEMD_ENVIRON, journal=journal, stream=stream)
    receiver.close()
    Path(path).unlink()
    logging.getLogger("vgpu_agent").error("journald vanished", extra={"fields": {"GPU_UUID": "G"}})
    assert stream.getvalue() == "<3>vgpu_agent: journald vanished GPU_UUID=G\n"


def test_setup_twice_keeps_one_handler(journal: Journal) -> None:
    """Calling setup_logging again replaces our handler instead of adding a second."""
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    setup_logging("info", SYSTEMD_ENVIRON, journal=journal)
    setup_logging("debug", SYSTEMD_ENVIRON, journal=journal)
    assert len(ours(root)) == 1
    assert isinstance(ours(root)[0], JournalHandler)
    assert foreign in root.handlers
    setup_logging("info", {}, journal=journal, stream=io.StringIO())
    assert len(ours(root)) == 1
    assert not isinstance(ours(root)[0], JournalHandler)
    root.removeHandler(foreign)


def test_set_level_changes_root_level(journal: Journal) -> None:
    """set_level() changes what gets through after setup (used on reload)."""
    stream = io.StringIO()
    setup_logging("warning", {}, journal=journal, stream=stream)
    logging.getLogger("vgpu_agent").info("hidden")
    set_level("DEBUG")
    logging.getLogger("vgpu_agent").info("shown")
    assert "hidden" not in stream.getvalue()
    assert "shown" in stream.getvalue()


@pytest.mark.parametrize(
    ("name", "level"),
    [
        ("debug", logging.DEBUG),
        ("info", logging.INFO),
        ("WARNING", logging.WARNING),
        (" error ", logging.ERROR),
    ],
    ids=["debug", "info", "upper", "spaces"],
)
def test_parse_level(name: str, level: int) -> None:
    """Config level names map to logging levels, case-insensitively."""
    assert parse_level(name) == level


@pytest.mark.parametrize("name", ["verbose", "", "10"], ids=["word", "empty", "number"])
def test_unknown_level_is_a_config_error(name: str) -> None:
    """An unknown level names itself and the allowed ones."""
    with pytest.raises(ConfigError, match=r"unknown level .* use one of debug, info, warning"):
        setup_logging(name, {})


@pytest.mark.parametrize(
    ("levelno", "priority"),
    [
        (logging.CRITICAL, 2),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO, 6),
        (logging.DEBUG, 7),
        (logging.INFO + 5, 6),
        (5, 7),
    ],
    ids=["critical", "error", "warning", "info", "between-info-warning", "debug", "below-debug"],
)
def test_syslog_priority(levelno: int, priority: int) -> None:
    """Logging levels map to syslog priorities, levels in between to the lower one."""
    assert syslog_priority(levelno) == priority


def test_formatter_quotes_awkward_values() -> None:
    """Values with spaces, quotes or newlines are quoted so the line stays one line."""
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    record.fields = {"A": "plain", "B": 'say "hi"', "C": "two\nlines", "D": ""}
    line = FieldsFormatter("%(message)s").format(record)
    assert line == 'm A=plain B="say \\"hi\\"" C="two\\nlines" D=""'
