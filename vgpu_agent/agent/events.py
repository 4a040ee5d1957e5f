"""What the loop is told, and the queue it is told through.

Signal handlers, watchers and the control socket only put events here (from any thread);
the loop alone takes them.
"""

from __future__ import annotations

import concurrent.futures
import queue
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from vgpu_agent.agent.faults import ApplicationFault, NamedFault
from vgpu_agent.agent.health import HealthChange
from vgpu_agent.model.commands import ControlCommand


@dataclass(frozen=True)
class Stop:
    """Stop the agent (SIGTERM, SIGINT)."""

    why: str = "stop requested"


@dataclass(frozen=True)
class Reload:
    """Re-read the config (SIGHUP)."""


@dataclass(frozen=True)
class Wake:
    """Something changed in the plugin directory: look at the sockets now."""


@dataclass(frozen=True)
class ControlRequest:
    """A request from the control socket, answered through ``reply``."""

    command: ControlCommand
    reply: Future[dict[str, Any]] = field(default_factory=Future)

    def answer(self, timeout_s: float, busy_with: str) -> dict[str, Any]:
        """The reply, waiting up to ``timeout_s``; when none came, an answer saying the
        agent is busy (``busy_with``: its state)."""
        try:
            return self.reply.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            # The loop is busy (starting MPS daemons, registering): say so, not "internal".
            return {
                "ok": False,
                "error": f"the agent did not answer within {timeout_s:g} s "
                f"({busy_with}); try again",
            }


Event = Union[Stop, Reload, Wake, HealthChange, ApplicationFault, NamedFault, ControlRequest]


class Events:
    """The loop's queue: any thread puts, the loop's thread takes."""

    def __init__(self) -> None:
        # SimpleQueue.put is reentrant: signal handlers may put a Stop.
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()

    def put(self, event: Event) -> None:
        """Queue ``event`` (safe from a signal handler)."""
        self._queue.put(event)

    def get(self, timeout_s: float) -> Optional[Event]:
        """The next event, waiting up to ``timeout_s``; None when none came."""
        try:
            return self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def take_health_changes(self) -> list[HealthChange]:
        """The health changes queued now, in order; the other events stay queued."""
        changes: list[HealthChange] = []
        others: list[Event] = []
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(event, HealthChange):
                changes.append(event)
            else:
                others.append(event)
        for event in others:
            self._queue.put(event)
        return changes
