"""Registration with the kubelet as a small state machine, driven by the agent's loop.

The kubelet announces itself only through its socket file: it appears (register), it is
replaced (the kubelet restarted: register again), it disappears (wait). Our own socket can
be deleted too (a restarting kubelet deletes every file in the plugin directory). A failed
attempt is retried with a doubling backoff that a new kubelet socket resets.

:class:`Registrar` owns that logic and nothing else: the register call, serving the plugin
socket, reading the kubelet socket's identity and the clock are handed in, so it is tested
with plain functions and a driven clock.
"""

from __future__ import annotations

import enum
import logging
import os
from typing import Callable, Optional, Protocol

from vgpu_agent.config.schema import PluginConfig
from vgpu_agent.host.log import log_event
from vgpu_agent.host.sockets import SocketIdentity
from vgpu_agent.model.errors import VgpuError

log = logging.getLogger(__name__)

REGISTER_BACKOFF_INITIAL_S = 0.5
REGISTER_BACKOFF_MAX_S = 10.0


class RegistrationState(enum.Enum):
    """Where registration stands."""

    #: Nothing looked at yet.
    STARTING = "starting"
    #: No kubelet socket: wait until one appears.
    WAITING_FOR_KUBELET = "waiting for kubelet"
    #: A kubelet is there and we are not registered with it: register when due.
    UNREGISTERED = "unregistered"
    #: The last attempt failed: the next one is due after the backoff.
    RETRYING = "retrying"
    #: Registered with the kubelet that owns the current socket.
    REGISTERED = "registered"


class Endpoint(Protocol):
    """Our served plugin socket, as registration needs to see it."""

    def socket_exists(self) -> bool:
        """Whether our socket file is still the one we made."""
        ...

    def stop(self) -> None:
        """Stop serving and remove our socket file."""
        ...


#: Serve the plugin socket anew (the previous endpoint is stopped first); raises VgpuError.
Serve = Callable[[], Endpoint]
#: Register with the kubelet; asks ``abandon()`` while in flight and gives up when it says
#: True. Raises VgpuError saying what failed.
Register = Callable[[Callable[[], bool]], None]


class Registrar:
    """Keeps the plugin registered with whichever kubelet owns the kubelet socket."""

    def __init__(
        self,
        *,
        kubelet_identity: Callable[[], Optional[SocketIdentity]],
        serve: Serve,
        register: Register,
        clock: Callable[[], float],
        on_wait: Callable[[], None] = lambda: None,
        description: str = "the device plugin",
        kubelet_socket: str = "kubelet.sock",
        backoff_initial_s: float = REGISTER_BACKOFF_INITIAL_S,
        backoff_max_s: float = REGISTER_BACKOFF_MAX_S,
        directory_hint: str = "",
    ) -> None:
        """``kubelet_identity`` reads the kubelet socket (None: no socket); ``on_wait`` is
        called while a registration is in flight (the watchdog keeps being pinged);
        ``description`` names what registers and ``kubelet_socket`` where, for the log;
        ``directory_hint`` says which setting names the kubelet's directory (the device
        plugin's by default)."""
        self._kubelet_identity = kubelet_identity
        self._serve = serve
        self._register = register
        self._clock = clock
        self._on_wait = on_wait
        self._description = description
        self._kubelet_socket = kubelet_socket
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._directory_hint = directory_hint
        self._state = RegistrationState.STARTING
        self._endpoint: Optional[Endpoint] = None
        #: The kubelet socket we are registered with, and the one last attempted.
        self._registered_with: Optional[SocketIdentity] = None
        self._attempted: Optional[SocketIdentity] = None
        self._backoff_s = backoff_initial_s
        self._next_attempt_at = 0.0
        self._problem = ""
        self.registrations = 0
        #: Registrations with a kubelet.sock other than the previous registration's.
        self.kubelet_restarts = 0

    @property
    def state(self) -> RegistrationState:
        """Where registration stands."""
        return self._state

    @property
    def registered(self) -> bool:
        """Whether we are registered with the current kubelet."""
        return self._state is RegistrationState.REGISTERED

    @property
    def waiting_for(self) -> str:
        """What the agent waits for, for its status line ("" when registered)."""
        if self._state is RegistrationState.STARTING:
            return "starting"
        if self._state is RegistrationState.WAITING_FOR_KUBELET:
            return "kubelet"
        if self._state is RegistrationState.RETRYING:
            return self._problem
        return ""

    def seconds_until_due(self, now: float) -> Optional[float]:
        """How long until the next attempt, when one is pending (None: nothing to do
        until a socket changes)."""
        if self._state in (RegistrationState.REGISTERED, RegistrationState.WAITING_FOR_KUBELET):
            return None
        return self._next_attempt_at - now

    def check(self) -> bool:
        """Look at the sockets and register when needed and due; True when the state or
        what it waits for changed."""
        before = (self._state, self.waiting_for)
        self._check()
        return (self._state, self.waiting_for) != before

    def stop(self) -> None:
        """Stop serving our plugin socket."""
        if self._endpoint is not None:
            self._endpoint.stop()
            self._endpoint = None

    def _check(self) -> None:
        identity = self._kubelet_identity()
        if identity is None:
            if self._state is RegistrationState.REGISTERED:
                log.warning(
                    "kubelet socket %s disappeared; waiting for kubelet", self._kubelet_socket
                )
            elif self._state is not RegistrationState.WAITING_FOR_KUBELET:
                # Once per wait: an agent started before the kubelet says what it waits for.
                log.warning("waiting for the kubelet: %s", self._why_no_kubelet())
            self._state = RegistrationState.WAITING_FOR_KUBELET
            return
        ours_gone = self._endpoint is not None and not self._endpoint.socket_exists()
        if self.registered and identity == self._registered_with and not ours_gone:
            return
        if self.registered:
            log_event(
                log,
                logging.INFO,
                "kubelet restarted (its socket was replaced or ours deleted); registering again",
                VGPU_EVENT="kubelet-restart",
            )
            self._state = RegistrationState.UNREGISTERED
            self._restart_backoff()
        elif self._state is not RegistrationState.RETRYING:
            self._state = RegistrationState.UNREGISTERED
        if identity != self._attempted:
            # A new kubelet socket is a new kubelet: the backoff earned by the old one
            # (up to the maximum) must not delay registering with it.
            self._restart_backoff()
        if self._clock() < self._next_attempt_at:
            return
        self._attempt(identity)

    def _why_no_kubelet(self) -> str:
        """Why there is no kubelet socket, and what to do when it is not just early."""
        directory = os.path.dirname(self._kubelet_socket) or "."
        where = self._directory_hint or (
            "set plugin.plugin_dir (or --plugin-dir) to the kubelet's device plugin "
            f"directory, usually {PluginConfig.plugin_dir}"
        )
        if os.path.lexists(directory) and not os.path.isdir(directory):
            return f"the plugin directory {directory} is not a directory; {where}"
        if not os.path.isdir(directory):
            return (
                f"the plugin directory {directory} does not exist yet (the kubelet creates "
                f"it); if the kubelet runs already, {where}"
            )
        return (
            f"no socket {self._kubelet_socket} yet; the agent registers as soon as the "
            "kubelet creates it"
        )

    def _restart_backoff(self) -> None:
        self._backoff_s = self._backoff_initial_s
        self._next_attempt_at = 0.0

    def _attempt(self, identity: SocketIdentity) -> None:
        self._attempted = identity
        self.stop()
        try:
            endpoint = self._serve()
            self._endpoint = endpoint

            def abandon() -> bool:
                # A kubelet that restarts again, or deletes our socket, while we register
                # would only time out; give up now and register anew.
                self._on_wait()
                return self._kubelet_identity() != identity or not endpoint.socket_exists()

            self._register(abandon)
        except VgpuError as exc:
            delay_s = self._backoff_s
            self._next_attempt_at = self._clock() + delay_s
            self._backoff_s = min(delay_s * 2, self._backoff_max_s)
            self._problem = f"registration ({exc}); retrying in {delay_s:.1f} s"
            self._state = RegistrationState.RETRYING
            log.warning("registering with the kubelet failed: %s; retrying in %.1f s", exc, delay_s)
            return
        if self._registered_with is not None and identity != self._registered_with:
            # Registered before, now with another kubelet.sock: the kubelet restarted.
            self.kubelet_restarts += 1
        self._registered_with = identity
        self._state = RegistrationState.REGISTERED
        self.registrations += 1
        self._backoff_s = self._backoff_initial_s
        log_event(
            log,
            logging.INFO,
            f"registered with the kubelet as {self._description}",
            VGPU_EVENT="registered",
        )
