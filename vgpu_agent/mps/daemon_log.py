"""The output of each GPU's MPS control daemon, read for the client the server names after a
fault.

Under MPS a fatal fault of one client ends every client of its GPU, and the kernel's XID line
may name an innocent client's pid (measured twice on an H100, driver 580). After a client's
illegal memory access the MPS server logs ``Client {PID: <n>, Context: 1} encountered a fatal
GPU error.`` for one client, then ``All clients belonging to error trigging process <pid>
will be torn down`` for each client. That first client is a lead, not proof: on an H100
(driver 580, 2026-12-07) it was an innocent neighbour, not the faulting client
(bench/RESULTS.md, docs/security.md). Lines carry a bracketed prefix
(``[2026-12-07 21:53:22.747 Server  1316]`` on that H100); the text is looked for anywhere
in a line, and the prefix's time is used when there is one.

Where the output goes depends on ``mps.manager``. The daemon runs in the foreground, and its
own lines and its servers' go to its standard output:

- ``"direct"``: ``<log_dir>/control.log`` (:class:`vgpu_agent.mps.daemons.DirectMpsDaemons`
  writes the daemon's output there), and ``server.log`` beside it where the server writes
  one of its own;
- ``"systemd"``: the journal of ``vgpu-mps@<uuid>.service`` (read with ``journalctl``), and
  ``server.log`` in the GPU's log directory likewise;
- ``"external"``: someone else's daemons; their output is not read, the culprit is unknown.

Files are followed from where they ended when the GPU was first followed, across rotation;
the journal is read from a little before the fault. Each line names the culprit of one
fault only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, Callable, Optional, Protocol

from vgpu_agent.config.schema import MpsConfig
from vgpu_agent.model.daemons import FaultCulprit
from vgpu_agent.mps.daemons import SYSTEMD_UNIT_TEMPLATE
from vgpu_agent.mps.directories import log_dir_for

log = logging.getLogger(__name__)

#: The server's line for the client that faulted (the ``Context`` part is not required).
FATAL_CLIENT_RE = re.compile(
    r"Client\s*\{\s*PID:\s*(?P<pid>\d+)[^}]*\}\s*encountered a fatal GPU error"
)
#: The server's line for each client it ends after a fault (its spelling, and the right one).
TORN_DOWN_RE = re.compile(
    r"error\s+trigg(?:er)?ing\s+process\s+(?P<pid>\d+)\s+will\s+be\s+torn\s+down"
)
#: The server's one line listing every client it ended for a fault.
STICKY_RE = re.compile(
    r"following\s+client\s+process(?:es)?\s+ha(?:ve|s)\s+a\s+sticky\s+error\s+set:?"
    r"(?P<pids>(?:\s+\d+)+)"
)
#: The time in a line's bracketed prefix, local time as the daemon writes it.
_STAMP_RE = re.compile(
    r"\[\s*(?P<date>\d{4}-\d{2}-\d{2})[ T](?P<time>\d{2}:\d{2}:\d{2})(?P<fraction>\.\d+)?"
)

#: How long before the fault (as the agent saw it) a line may have been written: the
#: server may log before NVML's event reaches the agent.
LOOKBACK_S = 10.0
#: Lines naming a fatal client within this long after the one taken belong to the same
#: fault (the victims', should a server name them too): they name no later fault's culprit.
BURST_S = 2.0
#: How long after the culprit's line the lines naming the clients torn down are waited for
#: (the server writes them at once; the one listing them all ends the wait).
TEARDOWN_WAIT_S = 1.0
#: How often the output is read again while waiting for the line.
POLL_INTERVAL_S = 0.1
#: How long one ``journalctl`` run may take.
JOURNAL_TIMEOUT_S = 5.0
#: The most a file is read at once: the culprit's line is at its end.
MAX_READ_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class FatalClient:
    """A line naming the client that encountered a fatal GPU error."""

    pid: int
    #: When the line says it was written (seconds since the epoch), if it says.
    logged_at: Optional[float] = None


def _stamp(text: str) -> Optional[float]:
    found = _STAMP_RE.search(text)
    if found is None:
        return None
    try:
        parsed = time.strptime(f"{found['date']} {found['time']}", "%Y-%m-%d %H:%M:%S")
        seconds = time.mktime(parsed)
    except (ValueError, OverflowError):
        return None
    return seconds + float(found["fraction"] or 0.0)


@dataclass(frozen=True)
class TornDown:
    """A line naming clients the server ended for a fault: one (``... will be torn
    down``), or all of them (``... have a sticky error set: ...``, ``complete``)."""

    pids: tuple[int, ...]
    complete: bool
    logged_at: Optional[float] = None


def torn_down(line: str) -> Optional[TornDown]:
    """The clients a line of the daemon's output says the server ended for a fault, with
    the time of the line's prefix; None for any other line."""
    found = TORN_DOWN_RE.search(line)
    if found is not None:
        return TornDown((int(found["pid"]),), False, _stamp(line[: found.start()]))
    listed = STICKY_RE.search(line)
    if listed is not None:
        pids = tuple(int(word) for word in listed["pids"].split())
        return TornDown(pids, True, _stamp(line[: listed.start()]))
    return None


def fatal_client(line: str) -> Optional[FatalClient]:
    """The client a line of the daemon's output names as having encountered a fatal GPU
    error, with the time of the line's prefix; None for any other line."""
    found = FATAL_CLIENT_RE.search(line)
    if found is None:
        return None
    return FatalClient(int(found["pid"]), _stamp(line[: found.start()]))


class FileFollower:
    """The lines appended to one file since the last read, across rotation (the file
    renamed away and made anew, or truncated in place). A last line without its newline
    waits for it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: Optional[BinaryIO] = None
        self._partial = b""

    def start_at_end(self) -> None:
        """Skip what the file holds now (a file made later is read from its start)."""
        self._close()
        try:
            opened = self._open()
        except OSError:
            return  # unreadable now: each read tries again, and says why
        if opened is not None:
            opened.seek(0, os.SEEK_END)

    def read_lines(self) -> list[str]:
        """The complete lines written since the last read; OSError when the file cannot be
        read (it is then opened anew next time)."""
        if self._file is None and self._open() is None:
            return []
        assert self._file is not None  # noqa: S101 - opened just above
        try:
            lines = self._drain(self._file)
            current = os.stat(self.path)
        except FileNotFoundError:
            return lines  # renamed away, its successor not made yet: keep the old one
        except OSError:
            self._close()
            raise
        mine = os.fstat(self._file.fileno())
        if (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
            # Rotated: the old file is read to its end; its last line is complete now.
            if self._partial:
                lines.append(self._partial.decode("utf-8", "replace"))
            self._close()
            if self._open() is not None:
                lines.extend(self._drain(self._file))
        elif current.st_size < self._file.tell():
            # Truncated in place (copytruncate): start again from its beginning.
            self._file.seek(0)
            self._partial = b""
            lines.extend(self._drain(self._file))
        return lines

    def close(self) -> None:
        """Stop following (the file is opened again at the next read)."""
        self._close()

    def _open(self) -> Optional[BinaryIO]:
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open to follow renames
        except FileNotFoundError:
            self._file = None
        self._partial = b""
        return self._file

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self._partial = b""

    def _drain(self, handle: Optional[BinaryIO]) -> list[str]:
        if handle is None:
            return []
        end = os.fstat(handle.fileno()).st_size
        if end - handle.tell() > MAX_READ_BYTES:
            # Far behind: what matters is at the end; the first line read is cut.
            handle.seek(end - MAX_READ_BYTES)
            handle.readline()
            self._partial = b""
        data = self._partial + handle.read()
        complete, newline, self._partial = data.rpartition(b"\n")
        if not newline:
            return []
        return [line.decode("utf-8", "replace") for line in complete.split(b"\n")]


#: Lines of the daemon's output: the text, and its time when the source knows it.
Lines = list[tuple[str, Optional[float]]]


class _Source(Protocol):
    """One place a GPU's daemon output is read from."""

    description: str

    def follow(self) -> None:
        """Read from here on."""
        ...

    def close(self) -> None:
        """Stop reading (files closed)."""
        ...

    def read(self, since_epoch_s: float) -> Lines:
        """What is new (a file) or what was written since ``since_epoch_s`` (the journal);
        OSError or a subprocess error when it cannot be read."""
        ...


class _LogFile:
    """A file the daemon (or its server) writes its output to."""

    def __init__(self, path: str) -> None:
        self.description = path
        self._follower = FileFollower(path)
        self._followed = False

    def follow(self) -> None:
        if not self._followed:
            self._follower.start_at_end()
            self._followed = True

    def read(self, since_epoch_s: float) -> Lines:
        return [(line, None) for line in self._follower.read_lines()]

    def close(self) -> None:
        self._follower.close()


class _UnitJournal:
    """The journal of a GPU's ``vgpu-mps@`` unit, read with ``journalctl``."""

    def __init__(self, unit: str, journalctl: str) -> None:
        self.description = f"the journal of {unit}"
        self._unit = unit
        self._journalctl = journalctl

    def follow(self) -> None:
        """Nothing to do: each read asks for the time around the fault."""

    def close(self) -> None:
        """Nothing is kept open."""

    def read(self, since_epoch_s: float) -> Lines:
        command = [
            self._journalctl,
            f"--unit={self._unit}",
            "--output=json",
            "--no-pager",
            "--quiet",
            f"--since=@{max(0, int(since_epoch_s))}",
        ]
        completed = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=JOURNAL_TIMEOUT_S,
            check=False,
        )
        said = completed.stderr.decode("utf-8", "replace").strip().splitlines()
        if completed.returncode != 0 and said:
            # Some versions exit 1 when nothing matched, silently: that is no line, no error.
            raise OSError(f"journalctl exited with status {completed.returncode}: {said[0]}")
        return [entry for entry in map(_journal_entry, completed.stdout.splitlines()) if entry]


def _journal_entry(raw: bytes) -> Optional[tuple[str, Optional[float]]]:
    """One ``journalctl --output=json`` line as (message, time); None when it has no
    message or is not JSON."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(entry, dict):
        return None
    message = entry.get("MESSAGE")
    if isinstance(message, list):  # not UTF-8: journald gives the bytes
        message = bytes(b & 0xFF for b in message if isinstance(b, int)).decode("utf-8", "replace")
    if not isinstance(message, str):
        return None
    at: Optional[float] = None
    stamp = entry.get("__REALTIME_TIMESTAMP")
    if isinstance(stamp, str) and stamp.isdigit():
        at = int(stamp) / 1e6
    return message, at


@dataclass
class _Sighting:
    #: The client named as having encountered the fatal error, or those torn down.
    pids: tuple[int, ...]
    at: float
    #: "fatal", "down" (one client torn down) or "all" (the list of every one).
    kind: str


class _GpuOutput:
    """One GPU's daemon output: where it is read, the fatal-client lines seen and not yet
    taken, and the end of the last fault's burst."""

    def __init__(self, sources: Sequence[_Source]) -> None:
        self.lock = threading.Lock()
        self.sources = list(sources)
        self.sightings: list[_Sighting] = []
        self.burst_until = float("-inf")
        for source in self.sources:
            source.follow()

    def describe(self) -> str:
        return " and ".join(source.description for source in self.sources)


class DaemonLogCulprits:
    """Names each fault's culprit from the output of its GPU's MPS daemon (the
    :class:`~vgpu_agent.model.daemons.DaemonLogs` of the ``"direct"`` and ``"systemd"``
    managers). Thread safe: the loop follows GPUs while a worker waits for a fault's line."""

    def __init__(
        self,
        config: MpsConfig,
        *,
        journalctl: str = "journalctl",
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._config = config
        self._journalctl = journalctl
        self._wall_clock = wall_clock
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._gpus: dict[str, _GpuOutput] = {}
        self._reported: set[str] = set()
        self._closed = False

    def _sources(self, gpu_uuid: str) -> list[_Source]:
        log_dir = log_dir_for(self._config.log_root, gpu_uuid)
        server_log = _LogFile(os.path.join(log_dir, "server.log"))
        if self._config.manager == "systemd":
            unit = SYSTEMD_UNIT_TEMPLATE.format(gpu_uuid=gpu_uuid)
            return [_UnitJournal(unit, self._journalctl), server_log]
        return [_LogFile(os.path.join(log_dir, "control.log")), server_log]

    def follow(self, gpu_uuids: Sequence[str]) -> None:
        """Start reading these GPUs' output from where it ends now."""
        with self._lock:
            for gpu_uuid in gpu_uuids:
                if gpu_uuid not in self._gpus and not self._closed:
                    self._gpus[gpu_uuid] = _GpuOutput(self._sources(gpu_uuid))

    def culprit(self, gpu_uuid: str, fault_at_epoch_s: float, wait_s: float) -> FaultCulprit:
        """The client the GPU's MPS server names for the fault seen at
        ``fault_at_epoch_s``: the first line naming one, written from :data:`LOOKBACK_S`
        before the fault on, and after the last fault's burst; waits up to ``wait_s``. Then
        the clients the server says it tore down for that fault, waited for up to
        :data:`TEARDOWN_WAIT_S` more (until the line listing them all)."""
        self.follow([gpu_uuid])
        with self._lock:
            output = self._gpus.get(gpu_uuid)
        deadline = self._clock() + wait_s
        earliest = fault_at_epoch_s - LOOKBACK_S
        if output is None:
            return FaultCulprit(None, "", "the agent is stopping")
        taken: Optional[_Sighting] = None
        while True:
            # Only this GPU's output is held while it is read (journalctl may take seconds).
            with output.lock:
                where = output.describe()
                if self._closed:
                    return FaultCulprit(None, where, "the agent is stopping")
                problems = self._read(output, earliest)
                if taken is None:
                    taken = self._take(output, earliest)
                    if taken is not None:
                        deadline = self._clock() + TEARDOWN_WAIT_S
                if taken is not None:
                    down, complete = self._torn_down(output, taken)
            if taken is not None and (complete or self._clock() >= deadline):
                return FaultCulprit(taken.pids[0], where, torn_down=down)
            if taken is None and self._clock() >= deadline:
                why = "; ".join(problems) or (
                    f"no line naming a client that 'encountered a fatal GPU error' in {where} "
                    f"from {LOOKBACK_S:g} s before the fault to {wait_s:g} s after it"
                )
                return FaultCulprit(None, where, why)
            self._sleep(POLL_INTERVAL_S)

    def close(self) -> None:
        """Stop reading: every file is closed, and a culprit still waited for is unknown."""
        with self._lock:
            self._closed = True
            outputs = list(self._gpus.values())
        for output in outputs:
            with output.lock:
                for source in output.sources:
                    source.close()

    def _read(self, output: _GpuOutput, earliest: float) -> list[str]:
        problems: list[str] = []
        read_at = self._wall_clock()
        for source in output.sources:
            try:
                lines = source.read(earliest)
            except (OSError, subprocess.SubprocessError) as exc:
                problem = f"reading {source.description}: {_reason(exc)}"
                problems.append(problem)
                with self._lock:
                    first_time = problem not in self._reported
                    self._reported.add(problem)
                if first_time:
                    log.warning("naming the culprit of MPS faults: %s", problem)
                continue
            for text, source_at in lines:
                sighting = _sighting(text, source_at, read_at)
                if sighting is not None and not any(
                    seen.pids == sighting.pids
                    and seen.kind == sighting.kind
                    and abs(seen.at - sighting.at) < 1e-3
                    for seen in output.sightings
                ):
                    output.sightings.append(sighting)
        # The journal is asked again on every read: older lines are kept out by time.
        output.sightings = [
            seen for seen in output.sightings if seen.at >= read_at - 6 * LOOKBACK_S
        ]
        return problems

    @staticmethod
    def _take(output: _GpuOutput, earliest: float) -> Optional[_Sighting]:
        candidates = sorted(
            (
                seen
                for seen in output.sightings
                if seen.kind == "fatal" and seen.at >= earliest and seen.at > output.burst_until
            ),
            key=lambda seen: seen.at,
        )
        if not candidates:
            return None
        first = candidates[0]
        output.burst_until = first.at + BURST_S
        return first

    @staticmethod
    def _torn_down(output: _GpuOutput, taken: _Sighting) -> tuple[tuple[int, ...], bool]:
        """The clients the server tore down for the fault of ``taken`` (lines within
        :data:`BURST_S` of it), in the order named, and whether a line listed them all."""
        pids: list[int] = []
        complete = False
        for seen in output.sightings:
            if seen.kind == "fatal" or abs(seen.at - taken.at) > BURST_S:
                continue
            complete = complete or seen.kind == "all"
            pids.extend(pid for pid in seen.pids if pid not in pids)
        return tuple(pids), complete


def _sighting(text: str, source_at: Optional[float], read_at: float) -> Optional[_Sighting]:
    """What a line of the daemon's output says of a fault, at the source's time, else the
    line's own, else when it was read; None for any other line."""
    found = fatal_client(text)
    down = torn_down(text) if found is None else None
    pids: tuple[int, ...]
    if found is not None:
        pids, logged_at, kind = (found.pid,), found.logged_at, "fatal"
    elif down is not None:
        pids, logged_at, kind = down.pids, down.logged_at, "all" if down.complete else "down"
    else:
        return None
    at = next((when for when in (source_at, logged_at) if when is not None), read_at)
    return _Sighting(pids, at, kind)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename is not None:
        return f"{exc.filename}: not found"
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"journalctl did not answer within {JOURNAL_TIMEOUT_S:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def daemon_logs_for(
    config: MpsConfig, journalctl: str = "journalctl"
) -> Optional[DaemonLogCulprits]:
    """Where the culprit of a fault is read for ``mps.manager``; None for ``"external"``
    (someone else's daemons: their output is not the agent's to read)."""
    if not config.enabled or config.manager == "external":
        return None
    return DaemonLogCulprits(config, journalctl=journalctl)
