"""Everything the agent says to systemd: sd_notify state changes and journald entries.

This is the only module that speaks sd_notify and journald (starting MPS units with
``systemctl`` is :mod:`vgpu_agent.mps.daemons`'s). It uses systemd-python where that is installed
(it is optional and not bundled in the packages) and otherwise speaks the two documented
datagram protocols itself, with the same observable behaviour:

- sd_notify: newline-separated ``KEY=value`` assignments in one datagram to the
  AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract
  namespace).
- journald's native protocol: one datagram per entry to ``/run/systemd/journal/socket``
  holding ``KEY=value`` lines; a value containing a newline is sent as ``KEY``, a newline,
  its length as a 64-bit little-endian integer, the value and a newline. An entry too
  big for one datagram travels in a sealed memfd passed as the datagram's only content.

Neither side ever raises into the caller because systemd is absent or unreachable: a
daemon must not die because its supervisor's socket went away.
"""

from __future__ import annotations

import array
import errno
import fcntl
import importlib
import logging
import os
import re
import socket
import struct
import threading
import time
from types import ModuleType
from typing import Callable, Mapping, Optional

_log = logging.getLogger(__name__)


def _import_optional(name: str) -> Optional[ModuleType]:
    # systemd-python is optional and untyped. Imported by name so that only this module
    # sees it, and so mypy does not mistake the repository's systemd/ unit directory for it.
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


_sd_daemon = _import_optional("systemd.daemon")
_sd_journal = _import_optional("systemd.journal")

#: A send to a reader that stopped reading (its buffer full) gives up after this: the agent's
#: loop sends STATUS lines and must not stall on them.
_SEND_TIMEOUT_S = 0.1
JOURNAL_SOCKET_PATH = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "vgpu-agent"

# journald refuses longer field names.
_MAX_FIELD_NAME_LENGTH = 64
_INVALID_FIELD_CHARS = re.compile(r"[^A-Z0-9_]")


def under_systemd(environ: Mapping[str, str]) -> bool:
    """True when the process runs as (or under) a systemd unit."""
    return any(environ.get(name) for name in ("INVOCATION_ID", "JOURNAL_STREAM", "NOTIFY_SOCKET"))


def _unix_address(name: str) -> Optional[bytes]:
    """The sockaddr path for a $NOTIFY_SOCKET value, or None if it names no unix socket."""
    if name.startswith("@"):
        # The abstract namespace: the kernel sees a leading NUL instead of the '@'.
        return b"\0" + os.fsencode(name[1:])
    if name.startswith("/"):
        return os.fsencode(name)
    return None  # e.g. "vsock:..." (systemd 253+), which we do not speak.


def _parse_watchdog_usec(environ: Mapping[str, str]) -> Optional[int]:
    """The watchdog timeout in microseconds if it applies to this process, else None."""
    raw_usec = environ.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    raw_pid = environ.get("WATCHDOG_PID")
    if raw_pid:
        try:
            watchdog_pid = int(raw_pid)
        except ValueError:
            _log.debug("ignoring the watchdog: WATCHDOG_PID=%r is not a process id", raw_pid)
            return None
        if watchdog_pid != os.getpid():
            # The variable was inherited from a parent that systemd watches, not us.
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        _log.debug("ignoring the watchdog: WATCHDOG_USEC=%r is not a number", raw_usec)
        return None
    return usec if usec > 0 else None


class Notifier:
    """Tells systemd about the service's state (sd_notify); a no-op outside a notify unit.

    One datagram socket is created on first use and reused for every message, so a
    watchdog ping costs one ``sendto``.
    """

    def __init__(
        self,
        notify_socket: Optional[str],
        *,
        watchdog_usec: Optional[int] = None,
        use_libsystemd: bool = True,
    ) -> None:
        self._address = _unix_address(notify_socket) if notify_socket else None
        if notify_socket and self._address is None:
            _log.warning(
                "not notifying systemd: NOTIFY_SOCKET=%r is not a unix socket path", notify_socket
            )
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        # libsystemd reads $NOTIFY_SOCKET itself, so it is only right when that is our socket.
        self._libsystemd = (
            _sd_daemon
            if use_libsystemd
            and notify_socket is not None
            and os.environ.get("NOTIFY_SOCKET") == notify_socket
            else None
        )
        self._socket: Optional[socket.socket] = None
        self._lock = threading.Lock()
        self._failing = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], *, use_libsystemd: bool = True) -> Notifier:
        """Build from NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID in ``environ``."""
        return cls(
            environ.get("NOTIFY_SOCKET") or None,
            watchdog_usec=_parse_watchdog_usec(environ),
            use_libsystemd=use_libsystemd,
        )

    @property
    def enabled(self) -> bool:
        """True when there is a notify socket to talk to."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> Optional[float]:
        """How often to call watchdog(): half the unit's WatchdogSec, or None if it has none."""
        if self._watchdog_usec is None or not self.enabled:
            return None
        return self._watchdog_usec / 2_000_000

    def ready(self, status: Optional[str] = None) -> bool:
        """Startup is complete (READY=1), optionally with a status line."""
        return self.notify("READY=1", *_status_lines(status))

    def status(self, text: str) -> bool:
        """Set the one-line status that ``systemctl status`` shows."""
        return self.notify(*_status_lines(text))

    def watchdog(self) -> bool:
        """Ping the service watchdog (WATCHDOG=1)."""
        return self.notify("WATCHDOG=1")

    def reloading(self, status: Optional[str] = None) -> bool:
        """A reload has started (RELOADING=1 with the CLOCK_MONOTONIC time it began)."""
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(
            "RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}", *_status_lines(status)
        )

    def stopping(self, status: Optional[str] = None) -> bool:
        """Shutdown has begun (STOPPING=1)."""
        return self.notify("STOPPING=1", *_status_lines(status))

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one message; True if systemd got it.

        False when there is no notify socket or sending failed; the first failure of a
        run of failures is logged as a warning, the rest at debug level.
        """
        if self._address is None or not assignments:
            return False
        message = "\n".join(assignments)
        try:
            if self._libsystemd is not None:
                sent = bool(self._libsystemd.notify(message))
            else:
                self._send(self._address, message.encode())
                sent = True
        except OSError as exc:
            self._report_failure(f"notifying systemd ({assignments[0]}) failed: {exc}")
            return False
        if sent:
            self._failing = False
        else:
            self._report_failure(f"notifying systemd ({assignments[0]}) failed")
        return sent

    def close(self) -> None:
        """Close the socket; a later message opens a new one."""
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def _send(self, address: bytes, payload: bytes) -> None:
        with self._lock:
            if self._socket is None:
                self._socket = _datagram_socket()
            sock = self._socket
        sock.sendto(payload, address)

    def _report_failure(self, text: str) -> None:
        _log.log(logging.DEBUG if self._failing else logging.WARNING, text)
        self._failing = True


class Watchdog:
    """Keeps the service watchdog fed: a ping once an interval (half the unit's
    WatchdogSec) has passed since the last; nothing when the unit has no watchdog."""

    def __init__(self, notifier: Notifier, clock: Callable[[], float]) -> None:
        self._notifier = notifier
        self._clock = clock
        self._next_ping_at = 0.0

    def ping(self) -> None:
        """Ping the watchdog when a ping is due; cheap to call as often as one likes."""
        interval = self._notifier.watchdog_interval_s
        if interval is None:
            return
        now = self._clock()
        if now >= self._next_ping_at:
            self._notifier.watchdog()
            self._next_ping_at = now + interval

    def seconds_until_due(self, now: float) -> Optional[float]:
        """How long until the next ping is due (None: the unit has no watchdog)."""
        if self._notifier.watchdog_interval_s is None:
            return None
        return self._next_ping_at - now


def _datagram_socket() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    # A reader that stopped reading must not hang the agent: give up on a send after this.
    sock.settimeout(_SEND_TIMEOUT_S)
    return sock


def _status_lines(status: Optional[str]) -> tuple[str, ...]:
    # A newline would end the assignment and start a bogus one.
    if status is None:
        return ()
    return ("STATUS=" + " ".join(status.splitlines()),)


def journal_field_name(name: str) -> str:
    """``name`` as a valid journal field name: upper case letters, digits and underscores.

    Lower case becomes upper case, any other character an underscore; leading
    underscores (reserved for fields journald itself adds) are dropped, a leading digit
    gets an ``F_`` prefix and the result is cut to 64 characters. Raises ValueError for a
    name with nothing usable in it.
    """
    normalised = _INVALID_FIELD_CHARS.sub("_", name.upper()).lstrip("_")
    if not normalised:
        raise ValueError(f"journal field name {name!r} has no letters or digits")
    if normalised[0].isdigit():
        normalised = "F_" + normalised
    return normalised[:_MAX_FIELD_NAME_LENGTH]


def encode_journal_entry(fields: Mapping[str, str]) -> bytes:
    """The native-protocol payload for ``fields`` (names must already be valid)."""
    parts: list[bytes] = []
    for name, value in fields.items():
        key = name.encode("ascii")
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            parts.append(key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key + b"=" + data + b"\n")
    return b"".join(parts)


def _entry_fields(message: str, priority: int, fields: Mapping[str, object]) -> dict[str, str]:
    entry: dict[str, str] = {}
    for name, value in fields.items():
        if value is None:
            continue
        try:
            entry[journal_field_name(name)] = str(value)
        except ValueError:
            continue  # a name like "-" carries nothing a reader could search for
    # The explicit message and priority win over same-named extra fields.
    entry["MESSAGE"] = message
    entry["PRIORITY"] = str(priority)
    entry.setdefault("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER)
    return entry


_TRUNCATION_MARK = " [truncated]"


def _truncate_to_fit(fields: dict[str, str], limit_bytes: int) -> dict[str, str]:
    """A copy of ``fields`` with the largest values cut until the entry fits ``limit_bytes``."""
    fitted = dict(fields)
    for _ in range(len(fitted)):
        excess = len(encode_journal_entry(fitted)) - limit_bytes
        if excess <= 0:
            break
        largest = max(fitted, key=lambda name: len(fitted[name].encode("utf-8", "replace")))
        data = fitted[largest].encode("utf-8", "replace")
        keep = max(0, len(data) - excess - len(_TRUNCATION_MARK) - 16)
        fitted[largest] = data[:keep].decode("utf-8", "ignore") + _TRUNCATION_MARK
    return fitted


class Journal:
    """Sends structured entries to journald over one reused datagram socket."""

    def __init__(
        self,
        socket_path: str = JOURNAL_SOCKET_PATH,
        *,
        use_libsystemd: bool = True,
        use_memfd: bool = True,
    ) -> None:
        self.socket_path = socket_path
        # libsystemd only knows the standard socket.
        self._libsystemd = (
            _sd_journal if use_libsystemd and socket_path == JOURNAL_SOCKET_PATH else None
        )
        self._use_memfd = use_memfd and hasattr(os, "memfd_create")
        self._socket: Optional[socket.socket] = None
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        """True when journald's socket exists."""
        return os.path.exists(self.socket_path)

    def send(self, message: str, priority: int, fields: Mapping[str, object] = {}) -> bool:
        """Write one entry; True if journald accepted it, False (never an exception) if not.

        Field names are normalised with journal_field_name(), values turned into
        strings, None values left out. SYSLOG_IDENTIFIER defaults to ``vgpu-agent``.
        """
        entry = _entry_fields(message, priority, fields)
        try:
            if self._libsystemd is not None:
                # sendv takes ready-made assignments; send() would insist on an int CODE_LINE
                # and invent a code location when none is given.
                self._libsystemd.sendv(*(f"{name}={value}" for name, value in entry.items()))
            else:
                self._send_native(entry)
            return True
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        """Close the socket; a later entry opens a new one."""
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def _get_socket(self) -> socket.socket:
        with self._lock:
            if self._socket is None:
                self._socket = _datagram_socket()
            return self._socket

    def _send_native(self, entry: dict[str, str]) -> None:
        sock = self._get_socket()
        payload = encode_journal_entry(entry)
        try:
            sock.sendto(payload, self.socket_path)
            return
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
        if self._use_memfd:
            try:
                self._send_memfd(sock, payload)
                return
            except (OSError, AttributeError):
                pass  # no memfd or no sealing here: fall back to a cut-down entry
        limit_bytes = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2
        while limit_bytes >= 1024:
            try:
                sock.sendto(
                    encode_journal_entry(_truncate_to_fit(entry, limit_bytes)), self.socket_path
                )
                return
            except OSError as exc:
                if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                limit_bytes //= 2
        raise OSError(errno.EMSGSIZE, "journal entry too large even when truncated")

    def _send_memfd(self, sock: socket.socket, payload: bytes) -> None:
        # journald reads a large entry from a sealed memfd passed as the datagram's only content.
        memfd = os.memfd_create("vgpu-agent-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(memfd, view) :]
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, seals)
            rights = array.array("i", [memfd])
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, self.socket_path)
        finally:
            os.close(memfd)
