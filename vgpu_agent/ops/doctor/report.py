"""What a check reports: :class:`Status`, one printed :class:`CheckLine`, and the
:class:`Report` every check writes to, which prints each line as it is found.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable


class Status(enum.Enum):
    """How a check came out."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


_TAGS = {Status.OK: "[ ok ]", Status.WARN: "[warn]", Status.FAIL: "[FAIL]"}


@dataclass(frozen=True)
class CheckLine:
    """One printed line: its status, which check, and what it found (and what to do)."""

    status: Status
    check: str
    message: str

    def render(self) -> str:
        """The line as doctor prints it."""
        return f"{_TAGS[self.status]} {self.check}: {self.message}"


class Report:
    """Prints each line as it is found and remembers them all."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self._echo = echo
        self.lines: list[CheckLine] = []

    def add(self, status: Status, check: str, message: str) -> None:
        line = CheckLine(status, check, message)
        self.lines.append(line)
        self._echo(line.render())

    def ok(self, check: str, message: str) -> None:
        self.add(Status.OK, check, message)

    def warn(self, check: str, message: str) -> None:
        self.add(Status.WARN, check, message)

    def fail(self, check: str, message: str) -> None:
        self.add(Status.FAIL, check, message)

    def count(self, status: Status) -> int:
        return sum(1 for line in self.lines if line.status is status)
