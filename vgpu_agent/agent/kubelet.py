"""The agent's link to the kubelet, kept across reloads.

A reload that changes the plugin settings replaces the :class:`~.registration.Registrar`;
:class:`KubeletLink` keeps the current one, adds up the counts of those it replaced, and
watches the plugin directory so that the loop sleeps until something there changes.
"""

from __future__ import annotations

from typing import Callable, Optional

from vgpu_agent.agent.parts import Watch, WatchFactory
from vgpu_agent.agent.registration import Registrar
from vgpu_agent.config.schema import PluginConfig
from vgpu_agent.host.systemd import Watchdog

#: How often the loop looks at the kubelet socket and our own socket when it cannot watch
#: the plugin directory (inotify); with the watch it wakes on changes, and at least every
#: IDLE_TICK_S.
SOCKET_CHECK_INTERVAL_S = 0.1
IDLE_TICK_S = 1.0


class KubeletLink:
    """The registrar of the current plugin settings and the watch on the plugin directory."""

    def __init__(
        self,
        make_registrar: Callable[[PluginConfig], Registrar],
        plugin: PluginConfig,
        *,
        watch_directory: WatchFactory,
        wake: Callable[[], None],
    ) -> None:
        """``make_registrar(plugin)`` makes the registrar for plugin settings;
        ``watch_directory`` watches the plugin directory, calling ``wake`` on a change."""
        self._make_registrar = make_registrar
        self._registrar = make_registrar(plugin)
        self._watch_directory = watch_directory
        self._wake = wake
        self._watch: Optional[Watch] = None
        #: Registrations by registrars a reload replaced.
        self._earlier_registrations = 0
        self._earlier_kubelet_restarts = 0

    @property
    def registered(self) -> bool:
        """Whether the plugin is registered with the current kubelet."""
        return self._registrar.registered

    @property
    def registrations(self) -> int:
        """How many times the plugin registered since the agent started."""
        return self._earlier_registrations + self._registrar.registrations

    @property
    def kubelet_restarts(self) -> int:
        """How many kubelet restarts the agent noticed since it started."""
        return self._earlier_kubelet_restarts + self._registrar.kubelet_restarts

    @property
    def waiting_for(self) -> str:
        """What the registrar waits for, for the status line ("" when registered)."""
        return self._registrar.waiting_for

    @property
    def watching(self) -> bool:
        """Whether the plugin directory is watched (else the loop must poll)."""
        return self._watch is not None and self._watch.active

    def check(self, plugin_dir: str) -> bool:
        """Watch ``plugin_dir`` when it exists (again), then look at the sockets and
        register when needed and due; True when what the status line says changed."""
        if not self.watching:
            self.stop_watch()
            self._watch = self._watch_directory(plugin_dir, self._wake)
        return self._registrar.check()

    def seconds_until_due(self, now: float) -> Optional[float]:
        """How long until the next registration attempt (None: none pending)."""
        return self._registrar.seconds_until_due(now)

    def reregister(self, plugin: PluginConfig) -> None:
        """Hand over to a registrar for new plugin settings: the current one stops serving
        (its counts are kept), and the plugin directory is watched afresh."""
        self._registrar.stop()
        self._earlier_registrations += self._registrar.registrations
        self._earlier_kubelet_restarts += self._registrar.kubelet_restarts
        self._registrar = self._make_registrar(plugin)
        self.stop_watch()

    def stop_watch(self) -> None:
        """Stop watching the plugin directory."""
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def stop(self) -> None:
        """Stop serving the plugin socket."""
        self._registrar.stop()


def loop_timeout(link: KubeletLink, watchdog: Watchdog, now: float) -> float:
    """How long the loop may sleep: until the next due registration attempt or watchdog
    ping, at most IDLE_TICK_S while watching the plugin directory, else the polling
    interval."""
    if not link.watching:
        return SOCKET_CHECK_INTERVAL_S
    timeout = IDLE_TICK_S
    for due_in in (link.seconds_until_due(now), watchdog.seconds_until_due(now)):
        if due_in is not None:
            timeout = min(timeout, due_in)
    return max(timeout, 0.01)
