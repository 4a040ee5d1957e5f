"""The registration state machine, driven with plain functions and a clock the test moves."""

from __future__ import annotations

from typing import Callable, Optional

import pytest

from vgpu_agent.agent.registration import Registrar, RegistrationState
from vgpu_agent.host.sockets import SocketIdentity
from vgpu_agent.model.errors import RegistrationError


class FakeEndpoint:
    """A served plugin socket that can be deleted by the test."""

    def __init__(self) -> None:
        self.exists = True
        self.stopped = False

    def socket_exists(self) -> bool:
        """Whether the socket is still there."""
        return self.exists

    def stop(self) -> None:
        """Stop serving."""
        self.stopped = True


class FakeKubelet:
    """The kubelet as registration sees it: a socket identity and a Register call."""

    def __init__(self) -> None:
        self.identity: Optional[SocketIdentity] = (1, 1)
        self.failures: list[str] = []
        self.registered: list[SocketIdentity] = []
        self.endpoints: list[FakeEndpoint] = []
        self.now = 100.0
        #: Runs inside Register, with the registrar's abandon(), when set.
        self.during_register: Optional[Callable[[Callable[[], bool]], None]] = None

    def serve(self) -> FakeEndpoint:
        """A new endpoint."""
        endpoint = FakeEndpoint()
        self.endpoints.append(endpoint)
        return endpoint

    def register(self, abandon: Callable[[], bool]) -> None:
        """Accept, or fail with the next scripted failure."""
        if self.during_register is not None:
            self.during_register(abandon)
        if self.failures:
            raise RegistrationError(self.failures.pop(0))
        assert self.identity is not None
        self.registered.append(self.identity)

    def registrar(self) -> Registrar:
        """A registrar over this fake kubelet and clock."""
        return Registrar(
            kubelet_identity=lambda: self.identity,
            serve=self.serve,
            register=self.register,
            clock=lambda: self.now,
        )


@pytest.fixture
def kubelet() -> FakeKubelet:
    """A fake kubelet whose socket is there."""
    return FakeKubelet()


def test_registers_with_a_present_kubelet(kubelet: FakeKubelet) -> None:
    """The first check serves the plugin socket and registers."""
    registrar = kubelet.registrar()
    before = registrar.state
    assert registrar.check()
    assert (before, registrar.state) == (RegistrationState.STARTING, RegistrationState.REGISTERED)
    assert (kubelet.registered, registrar.registrations, registrar.waiting_for) == ([(1, 1)], 1, "")
    assert not registrar.check(), "nothing changed, nothing to do"
    assert len(kubelet.registered) == 1


def test_waits_without_a_kubelet(kubelet: FakeKubelet) -> None:
    """No kubelet socket: wait for one, with no attempt due until it appears."""
    kubelet.identity = None
    registrar = kubelet.registrar()
    registrar.check()
    assert (registrar.state, registrar.waiting_for) == (
        RegistrationState.WAITING_FOR_KUBELET,
        "kubelet",
    )
    assert registrar.seconds_until_due(kubelet.now) is None
    kubelet.identity = (1, 1)
    registrar.check()
    assert registrar.registered


@pytest.mark.parametrize(
    ("change", "expected_socket"),
    [
        (lambda kubelet, registrar: setattr(kubelet, "identity", (2, 2)), (2, 2)),
        (lambda kubelet, registrar: setattr(kubelet.endpoints[-1], "exists", False), (1, 1)),
    ],
    ids=["kubelet-socket-replaced", "our-socket-deleted"],
)
def test_registers_again_after_a_kubelet_restart(
    kubelet: FakeKubelet,
    change: Callable[[FakeKubelet, Registrar], None],
    expected_socket: SocketIdentity,
) -> None:
    """A replaced kubelet socket or a deleted plugin socket means a new registration, on a
    new endpoint (the old one stopped)."""
    registrar = kubelet.registrar()
    registrar.check()
    change(kubelet, registrar)
    registrar.check()
    assert registrar.registered
    assert kubelet.registered == [(1, 1), expected_socket]
    assert registrar.registrations == 2
    assert kubelet.endpoints[0].stopped


def test_failed_registration_backs_off_doubling(kubelet: FakeKubelet) -> None:
    """Failures are retried after 0.5, 1, 2 ... s (capped), saying why meanwhile."""
    kubelet.failures = ["refused"] * 6
    registrar = kubelet.registrar()
    delays = []
    for _ in range(6):
        registrar.check()
        assert registrar.state is RegistrationState.RETRYING
        due_in = registrar.seconds_until_due(kubelet.now)
        assert due_in is not None
        delays.append(due_in)
        registrar.check()  # not due yet: no attempt
        kubelet.now += due_in
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]
    assert "registration (refused); retrying in" in registrar.waiting_for
    registrar.check()
    assert registrar.registered
    assert registrar.seconds_until_due(kubelet.now) is None


def test_new_kubelet_resets_the_backoff(kubelet: FakeKubelet) -> None:
    """A new kubelet socket is registered with at once, whatever backoff the old one earned."""
    kubelet.failures = ["refused"] * 4
    registrar = kubelet.registrar()
    for _ in range(4):
        registrar.check()
        due_in = registrar.seconds_until_due(kubelet.now)
        assert due_in is not None
        kubelet.now += due_in
    assert registrar.seconds_until_due(kubelet.now - 8.0) == 8.0
    kubelet.identity = (3, 3)
    registrar.check()
    assert registrar.registered
    assert kubelet.registered == [(3, 3)]


def test_abandon_reports_a_restart_during_register(kubelet: FakeKubelet) -> None:
    """While Register is in flight, abandon() turns true once the kubelet socket changes,
    and pings the waiter (the watchdog) each time it is asked."""
    answers: list[bool] = []
    waits: list[int] = []

    def restart_meanwhile(abandon: Callable[[], bool]) -> None:
        answers.append(abandon())
        kubelet.identity = (9, 9)
        answers.append(abandon())
        raise RegistrationError("abandoned")

    kubelet.during_register = restart_meanwhile
    registrar = Registrar(
        kubelet_identity=lambda: kubelet.identity,
        serve=kubelet.serve,
        register=kubelet.register,
        clock=lambda: kubelet.now,
        on_wait=lambda: waits.append(1),
    )
    registrar.check()
    assert answers == [False, True]
    assert len(waits) == 2
    assert registrar.state is RegistrationState.RETRYING
    kubelet.during_register = None
    registrar.check()
    assert registrar.registered, "the new socket is registered with at once"


def test_stop_stops_the_endpoint(kubelet: FakeKubelet) -> None:
    """stop() stops serving the plugin socket."""
    registrar = kubelet.registrar()
    registrar.check()
    registrar.stop()
    assert kubelet.endpoints[0].stopped


def test_kubelet_restarts_are_counted_once_per_new_kubelet(kubelet: FakeKubelet) -> None:
    """A new kubelet socket counts as a kubelet restart (also after a gap without one); our
    own deleted socket does not."""
    registrar = kubelet.registrar()
    registrar.check()
    assert registrar.kubelet_restarts == 0
    kubelet.endpoints[-1].exists = False
    registrar.check()
    assert (registrar.registrations, registrar.kubelet_restarts) == (2, 0)
    kubelet.identity = None
    registrar.check()
    kubelet.identity = (3, 3)
    registrar.check()
    assert (registrar.registrations, registrar.kubelet_restarts) == (3, 1)
