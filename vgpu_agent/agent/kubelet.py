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
