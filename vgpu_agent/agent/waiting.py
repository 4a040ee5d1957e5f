"""Waiting for the GPU driver: what the agent does before its GPU backend opens.

A node without the NVIDIA driver (yet) is not an error to restart on: the agent tells
systemd it is ready with a status that says what it waits for (so ``systemctl start``,
``dpkg -i`` and an image build on a non-GPU builder return), answers the control socket
and reloads while it waits, and tries the backend again on a backoff or at once after a
reload. :class:`DriverWait` holds that state for the loop.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from vgpu_agent.agent.events import ControlRequest, Events, Reload, Stop
from vgpu_agent.config.schema import Config
from vgpu_agent.host.systemd import Notifier, Watchdog
from vgpu_agent.model.commands import ControlCommand
from vgpu_agent.model.errors import ConfigError

log = logging.getLogger(__name__)


class DriverWait:
    """Why the GPU backend is not open yet (``why``; None once it is), and the waiting."""

    def __init__(
        self,
        notifier: Notifier,
        clock: Callable[[], float],
        watchdog: Watchdog,
        events: Events,
        *,
        status_line: Callable[[], str],
        set_status: Callable[[str], None],
        announce: Callable[[str], None],
        answer: Callable[[ControlCommand], dict[str, Any]],
        reload: Callable[[], None],
    ) -> None:
        self.why: Optional[str] = None
        self._notifier = notifier
        self._clock = clock
        self._watchdog = watchdog
        self._events = events
        self._status_line = status_line
        self._set_status = set_status
        self._announce = announce
        self._answer = answer
        self._reload = reload

    def failed(self, why: str) -> None:
        """The backend did not open (``why``): say so, the first time with READY=1."""
        first = self.why is None
        self.why = why
        if first:
            # Started, though nothing is served yet: READY=1 now, so that systemctl start
            # (and dpkg -i, and a Packer build on a non-GPU builder) returns instead of
            # timing out and restarting the agent in a loop; STATUS says what it waits for,
            # and `status` exits 3 (waiting) until the driver is there.
            self._announce(self._status_line())
        else:
            self._set_status(self._status_line())

    def pause(self, delay_s: float) -> bool:
        """Wait ``delay_s`` before the GPU backend is tried again, answering the control
        socket and reloads meanwhile (a reload also ends the wait: the backend is tried
        again at once); False when told to stop."""
        deadline = self._clock() + delay_s
        while self._clock() < deadline:
            self._watchdog.ping()
            event = self._events.get(min(1.0, delay_s))
            if isinstance(event, Stop):
                return False
            if isinstance(event, ControlRequest):
                event.reply.set_result(self._answer(event.command))
            elif isinstance(event, Reload):
                self._reload()
                return True
        return True


def reload_while_waiting(config: Config, load: Optional[Callable[[], Config]]) -> Config:
    """A reload before any GPU is served: read the file again now (the GPUs are brought up
    with it once the driver is there); the config to keep running with."""
    if load is None:
        return config
    try:
        new = load()
    except ConfigError as exc:
        log.error("reload: keeping the running config, the new one is invalid: %s", exc)
        return config
    if new.agent.state_dir != config.agent.state_dir:
        log.error(
            "reload: keeping the running config, restart needed: "
            "agent.state_dir cannot change (systemctl restart vgpu-agent)"
        )
        return config
    log.info("reload: config read again; it applies once the GPUs are up")
    return new
