"""sd_notify and journald's native protocol, checked against real datagram sockets."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Optional, Union

import pytest

from vgpu_agent.host.systemd import (
    JOURNAL_SOCKET_PATH,
    Journal,
    Notifier,
    Watchdog,
    encode_journal_entry,
    journal_field_name,
    under_systemd,
)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A temp directory with a path short enough for a unix socket name (108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="vgpu-sd-", dir="/tmp") as path:
        yield Path(path)


def bind_datagram(address: Union[str, bytes]) -> socket.socket:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    receiver.settimeout(5)
    return receiver


@pytest.fixture
def notify_receiver(short_dir: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket standing in for systemd's notify socket: (path, socket)."""
    path = str(short_dir / "notify")
    with bind_datagram(path) as receiver:
        yield path, receiver


@pytest.fixture
def notifier(notify_receiver: tuple[str, socket.socket]) -> Iterator[Notifier]:
    """A Notifier speaking our own wire code to notify_receiver."""
    path, _ = notify_receiver
    sender = Notifier.from_environ({"NOTIFY_SOCKET": path}, use_libsystemd=False)
    yield sender
    sender.close()


@pytest.fixture
def journal_receiver(short_dir: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket standing in for journald's socket: (path, socket)."""
    path = str(short_dir / "journal")
    with bind_datagram(path) as receiver:
        yield path, receiver


@pytest.fixture
def journal(journal_receiver: tuple[str, socket.socket]) -> Iterator[Journal]:
    """A Journal speaking our own native-protocol code to journal_receiver."""
    path, _ = journal_receiver
    sender = Journal(path, use_libsystemd=False)
    yield sender
    sender.close()


def parse_journal_entry(payload: bytes) -> dict[str, str]:
    """Decode a native-protocol entry, written from the protocol description."""
    fields: dict[str, str] = {}
    position = 0
    while position < len(payload):
        line_end = payload.index(b"\n", position)
        line = payload[position:line_end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            position = line_end + 1
        else:
            name = line
            (length,) = struct.unpack_from("<Q", payload, line_end + 1)
            start = line_end + 1 + 8
            value = payload[start : start + length]
            assert payload[start + length : start + length + 1] == b"\n"
            position = start + length + 1
        fields[name.decode("ascii")] = value.decode("utf-8")
    return fields


# sd_notify


@pytest.mark.parametrize(
    ("send", "expected"),
    [
        (lambda n: n.ready(), b"READY=1"),
        (lambda n: n.ready("serving 20 vGPUs"), b"READY=1\nSTATUS=serving 20 vGPUs"),
        (lambda n: n.status("waiting for kubelet"), b"STATUS=waiting for kubelet"),
        (lambda n: n.status("two\nlines"), b"STATUS=two lines"),
        (lambda n: n.watchdog(), b"WATCHDOG=1"),
        (lambda n: n.stopping(), b"STOPPING=1"),
        (lambda n: n.stopping("shutting down"), b"STOPPING=1\nSTATUS=shutting down"),
        (lambda n: n.notify("EXTEND_TIMEOUT_USEC=5000000"), b"EXTEND_TIMEOUT_USEC=5000000"),
    ],
    ids=[
        "ready",
        "ready-status",
        "status",
        "status-newline-flattened",
        "watchdog",
        "stopping",
        "stopping-status",
        "raw-assignment",
    ],
)
def test_notify_sends_exact_datagram(
    notifier: Notifier,
    notify_receiver: tuple[str, socket.socket],
    send: Callable[[Notifier], bool],
    expected: bytes,
) -> None:
    """Each state change arrives as exactly the documented datagram."""
    _, receiver = notify_receiver
    assert send(notifier) is True
    assert receiver.recv(4096) == expected


def test_libsystemd_sends_the_same_datagrams(
    notify_receiver: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With systemd-python installed, its sd_notify produces what our own code does."""
    pytest.importorskip("systemd.daemon")
    path, receiver = notify_receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    for use_libsystemd in (True, False):
        sender = Notifier.from_environ({"NOTIFY_SOCKET": path}, use_libsystemd=use_libsystemd)
        try:
            sent = [sender.ready("serving"), sender.watchdog(), sender.stopping()]
        finally:
            sender.close()
        assert sent == [True, True, True]
        assert [receiver.recv(4096) for _ in range(3)] == [
            b"READY=1\nSTATUS=serving",
            b"WATCHDOG=1",
            b"STOPPING=1",
        ]


def test_reloading_carries_monotonic_time(
    notifier: Notifier, notify_receiver: tuple[str, socket.socket]
) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC taken from CLOCK_MONOTONIC at the call."""
    _, receiver = notify_receiver
    before_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading("reloading config")
    after_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = receiver.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=")
    assert before_usec <= int(lines[1].split("=", 1)[1]) <= after_usec
    assert lines[2:] == ["STATUS=reloading config"]


def test_abstract_namespace_socket() -> None:
    """An '@name' NOTIFY_SOCKET reaches a socket bound in the abstract namespace."""
    name = f"vgpu-agent-test-{uuid.uuid4().hex}"
    with bind_datagram(b"\0" + name.encode()) as receiver:
        sender = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}, use_libsystemd=False)
        try:
            assert sender.ready("up")
            assert receiver.recv(4096) == b"READY=1\nSTATUS=up"
        finally:
            sender.close()


def test_one_socket_is_reused(
    notifier: Notifier, notify_receiver: tuple[str, socket.socket]
) -> None:
    """Every message leaves from the same socket, not a new one per call."""
    _, receiver = notify_receiver
    notifier.watchdog()
    first_fd = notifier._socket.fileno() if notifier._socket else None
    notifier.watchdog()
    assert first_fd is not None
    assert notifier._socket is not None
    assert notifier._socket.fileno() == first_fd
    assert receiver.recv(64) == receiver.recv(64) == b"WATCHDOG=1"


@pytest.mark.parametrize(
    "environ",
    [{}, {"NOTIFY_SOCKET": ""}, {"WATCHDOG_USEC": "1000000"}],
    ids=["empty", "blank-socket", "watchdog-only"],
)
def test_no_notify_socket_is_a_no_op(environ: dict[str, str]) -> None:
    """Without NOTIFY_SOCKET every call returns False and nothing is raised."""
    sender = Notifier.from_environ(environ, use_libsystemd=False)
    assert not sender.enabled
    assert sender.watchdog_interval_s is None
    assert sender.ready("x") is False
    assert sender.status("x") is False
    assert sender.watchdog() is False
    assert sender.reloading() is False
    assert sender.stopping() is False


@pytest.mark.parametrize(
    "notify_socket", ["relative/path", "vsock:2:1234"], ids=["relative", "vsock"]
)
def test_unsupported_notify_socket_disables_notifier(notify_socket: str) -> None:
    """A NOTIFY_SOCKET that is not a unix path or abstract name turns notification off."""
    sender = Notifier.from_environ({"NOTIFY_SOCKET": notify_socket}, use_libsystemd=False)
    assert not sender.enabled
    assert sender.ready() is False


def test_vanished_socket_does_not_raise(short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Sending to a socket that went away returns False, warns once, and recovers."""
    path = str(short_dir / "notify")
    sender = Notifier.from_environ({"NOTIFY_SOCKET": path}, use_libsystemd=False)
    try:
        with caplog.at_level("DEBUG", logger="vgpu_agent.host.systemd"):
            assert sender.watchdog() is False
            assert sender.watchdog() is False
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1
        assert "WATCHDOG=1" in warnings[0].getMessage()
        with bind_datagram(path) as receiver:
            assert sender.watchdog() is True
            assert receiver.recv(64) == b"WATCHDOG=1"
    finally:
        sender.close()


WATCHDOG_CASES = [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "not-a-pid"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ""}, 15.0),
    ({"WATCHDOG_USEC": "abc"}, None),
    ({"WATCHDOG_USEC": "1.5"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": ""}, None),
    ({}, None),
]


@pytest.mark.parametrize(
    ("watchdog_environ", "interval_s"),
    WATCHDOG_CASES,
    ids=[
        "usec",
        "pid-is-us",
        "pid-is-another",
        "pid-garbage",
        "pid-blank",
        "usec-garbage",
        "usec-float",
        "usec-zero",
        "usec-negative",
        "usec-blank",
        "unset",
    ],
)
def test_watchdog_interval_from_environ(
    watchdog_environ: dict[str, str], interval_s: Optional[float]
) -> None:
    """The ping interval is half of WATCHDOG_USEC, only when it is meant for this process."""
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify", **watchdog_environ}
    assert Notifier.from_environ(environ).watchdog_interval_s == interval_s


def test_watchdog_pings_once_an_interval_has_passed(
    notify_receiver: tuple[str, socket.socket],
) -> None:
    """The watchdog is pinged at once, then not again until half of WatchdogSec passed."""
    path, receiver = notify_receiver
    notifier = Notifier(path, watchdog_usec=4_000_000, use_libsystemd=False)
    now = [10.0]
    watchdog = Watchdog(notifier, clock=lambda: now[0])
    watchdog.ping()
    assert receiver.recv(4096) == b"WATCHDOG=1"
    now[0] = 11.5
    watchdog.ping()
    assert watchdog.seconds_until_due(now[0]) == pytest.approx(0.5)
    now[0] = 12.0
    watchdog.ping()
    assert receiver.recv(4096) == b"WATCHDOG=1"
    receiver.setblocking(False)
    with pytest.raises(BlockingIOError):
        receiver.recv(4096)  # 11.5 sent nothing
    notifier.close()


def test_watchdog_does_nothing_without_watchdog_sec() -> None:
    """A unit without WatchdogSec gets no pings and no deadline."""
    watchdog = Watchdog(Notifier(None), clock=lambda: 0.0)
    watchdog.ping()
    assert watchdog.seconds_until_due(0.0) is None


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, False),
        ({"INVOCATION_ID": "0123abcd"}, True),
        ({"JOURNAL_STREAM": "8:12345"}, True),
        ({"NOTIFY_SOCKET": "/run/systemd/notify"}, True),
        ({"INVOCATION_ID": ""}, False),
    ],
    ids=["none", "invocation-id", "journal-stream", "notify-socket", "blank"],
)
def test_under_systemd(environ: dict[str, str], expected: bool) -> None:
    """A unit is recognised by any of the variables systemd sets for it."""
    assert under_systemd(environ) is expected


# journald


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("GPU_UUID", "GPU_UUID"),
        ("gpu_uuid", "GPU_UUID"),
        ("vgpu-event", "VGPU_EVENT"),
        ("vgpu.health", "VGPU_HEALTH"),
        ("_PID", "PID"),
        ("__x", "X"),
        ("9lives", "F_9LIVES"),
        ("Ünïcode", "N_CODE"),
        ("a" * 80, "A" * 64),
    ],
    ids=[
        "valid",
        "lower",
        "dash",
        "dot",
        "trusted-prefix",
        "double-underscore",
        "leading-digit",
        "non-ascii",
        "too-long",
    ],
)
def test_journal_field_name_normalisation(name: str, expected: str) -> None:
    """Field names become upper case letters, digits and underscores journald accepts."""
    assert journal_field_name(name) == expected


@pytest.mark.parametrize("name", ["", "_", "-", "__"], ids=["empty", "underscore", "dash", "2us"])
def test_journal_field_name_rejects_empty(name: str) -> None:
    """A name with no letters or digits is refused."""
    with pytest.raises(ValueError, match="no letters or digits"):
        journal_field_name(name)


def test_encode_simple_and_binary_forms() -> None:
    """Single-line values are KEY=value; multi-line ones KEY, length (u64 LE), value."""
    payload = encode_journal_entry({"MESSAGE": "hi", "TRACEBACK": "a\nb"})
    assert payload == b"MESSAGE=hi\nTRACEBACK\n" + (3).to_bytes(8, "little") + b"a\nb\n"


def test_journal_send_over_native_protocol(
    journal: Journal, journal_receiver: tuple[str, socket.socket]
) -> None:
    """An entry arrives with MESSAGE, PRIORITY, identifier and the caller's fields."""
    _, receiver = journal_receiver
    assert journal.send("XID 79 on GPU 0", 3, {"gpu_uuid": "GPU-1234", "XID": 79, "SKIPPED": None})
    assert parse_journal_entry(receiver.recv(65536)) == {
        "GPU_UUID": "GPU-1234",
        "XID": "79",
        "MESSAGE": "XID 79 on GPU 0",
        "PRIORITY": "3",
        "SYSLOG_IDENTIFIER": "vgpu-agent",
    }


def test_journal_send_multiline_and_unicode(
    journal: Journal, journal_receiver: tuple[str, socket.socket]
) -> None:
    """Multi-line and non-ASCII values survive the trip through the binary form."""
    _, receiver = journal_receiver
    message = "first line\nsecond line — ünïcode"
    assert journal.send(message, 6, {"TRACEBACK": "Traceback\n  File x\nError: =oops"})
    raw = receiver.recv(65536)
    assert b"MESSAGE\n" in raw
    entry = parse_journal_entry(raw)
    assert entry["MESSAGE"] == message
    assert entry["TRACEBACK"] == "Traceback\n  File x\nError: =oops"


def test_explicit_message_and_priority_win(
    journal: Journal, journal_receiver: tuple[str, socket.socket]
) -> None:
    """Extra fields named MESSAGE or PRIORITY cannot replace the real ones."""
    _, receiver = journal_receiver
    journal.send("real", 4, {"message": "fake", "PRIORITY": "0", "SYSLOG_IDENTIFIER": "other"})
    entry = parse_journal_entry(receiver.recv(65536))
    assert (entry["MESSAGE"], entry["PRIORITY"]) == ("real", "4")
    assert entry["SYSLOG_IDENTIFIER"] == "other"


def test_large_entry_travels_in_sealed_memfd(
    journal: Journal, journal_receiver: tuple[str, socket.socket]
) -> None:
    """An entry over the datagram limit is passed as a sealed memfd with an empty payload."""
    _, receiver = journal_receiver
    big_message = "x" * 1_000_000
    assert journal.send(big_message, 6, {"GPU_UUID": "GPU-1"})
    payload, fds, _, _ = socket.recv_fds(receiver, 1024, 1)
    assert payload == b""
    assert len(fds) == 1
    with os.fdopen(fds[0], "rb") as memfd:
        seals = fcntl.fcntl(memfd.fileno(), fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE
        assert seals & fcntl.F_SEAL_SEAL
        # The description is shared with the sender, whose writes left it at the end.
        memfd.seek(0)
        entry = parse_journal_entry(memfd.read())
    assert entry["MESSAGE"] == big_message
    assert entry["GPU_UUID"] == "GPU-1"


def test_large_entry_truncated_without_memfd(journal_receiver: tuple[str, socket.socket]) -> None:
    """Without memfd the largest value is cut so the entry fits one datagram."""
    path, receiver = journal_receiver
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sender = Journal(path, use_libsystemd=False, use_memfd=False)
    try:
        assert sender.send("y" * 1_000_000, 6, {"GPU_UUID": "GPU-1"})
        entry = parse_journal_entry(receiver.recv(2_000_000))
    finally:
        sender.close()
    assert entry["MESSAGE"].startswith("yyyy")
    assert entry["MESSAGE"].endswith("[truncated]")
    assert len(entry["MESSAGE"]) < 1_000_000
    assert entry["GPU_UUID"] == "GPU-1"


def test_journal_missing_socket_returns_false(short_dir: Path) -> None:
    """Sending with no journald listening returns False and raises nothing."""
    sender = Journal(str(short_dir / "absent"), use_libsystemd=False)
    try:
        assert not sender.available
        assert sender.send("lost", 6) is False
    finally:
        sender.close()


def test_default_journal_path() -> None:
    """By default entries go to journald's documented socket."""
    assert Journal().socket_path == JOURNAL_SOCKET_PATH == "/run/systemd/journal/socket"
