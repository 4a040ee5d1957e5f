"""A complete agent built by the composition root from fakes, with no module patched: the
GPU backend, MPS daemons, Register call, health checks, control socket and directory
watch are all handed in."""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest

from tests.harness import WAIT_S, make_config, wait_until
from vgpu_agent.agent.health import HealthChange
from vgpu_agent.agent.loop import Agent
from vgpu_agent.agent.parts import HealthScope, Watch
from vgpu_agent.config.schema import Config
from vgpu_agent.host.systemd import Notifier
from vgpu_agent.model.commands import (
    ControlCommand,
    HealthResetCommand,
    SimulateAction,
    SimulateCommand,
    StatusCommand,
)
from vgpu_agent.model.daemons import MpsDaemons
from vgpu_agent.model.devices import HealthReason
from vgpu_agent.model.errors import RegistrationError
from vgpu_agent.model.gpu import GpuBackend
from vgpu_agent.runtime.compose import build_agent
from vgpu_agent.standins.simulated import SimulatedBackend, SimulatedMpsDaemons, gpus_from_config


class FakeHealthChecks:
    """Health checks that only record their scope; the test emits changes through it."""

    def __init__(self, scope: HealthScope) -> None:
        self.scope = scope
        self.running = False
        self.faults: dict[str, list[HealthReason]] = {}

    def start(self) -> None:
        """Start watching (nothing to do)."""
        self.running = True

    def stop(self) -> None:
        """Stop watching."""
        self.running = False

    def reset(self, gpu_uuid: str) -> list[HealthReason]:
        """Clear the GPU's recorded faults, emitting the changes."""
        cleared = self.faults.pop(gpu_uuid, [])
        for reason in cleared:
            self.scope.emit(HealthChange(gpu_uuid, reason, present=False))
        return cleared


class FakeControl:
    """A control socket that is never opened: the test calls the handler directly."""

    def __init__(self, path: str, handler: Callable[[ControlCommand], dict[str, Any]]) -> None:
        self.path = path
        self.handler = handler
        self.started = threading.Event()

    def start(self) -> None:
        """Start serving."""
        self.started.set()

    def stop(self) -> None:
        """Stop serving."""


class Fakes:
    """Every fake handed to build_agent, and what they recorded."""

    def __init__(self, config: Config) -> None:
        self.backend = SimulatedBackend(gpus_from_config(config.simulated))
        self.daemons = SimulatedMpsDaemons(config.mps.pipe_root, config.mps.log_root)
        self.health: list[FakeHealthChecks] = []
        self.controls: list[FakeControl] = []
        self.registrations: list[str] = []
        self.refuse_registration = False

    def open_backend(self, _config: Config) -> GpuBackend:
        """The simulated backend."""
        return self.backend

    def make_mps(self, _config: Config) -> Optional[MpsDaemons]:
        """The simulated daemons."""
        return self.daemons

    def register(self, abandon: Callable[[], bool]) -> None:
        """Record a Register call (or refuse it)."""
        if self.refuse_registration:
            raise RegistrationError("refused by the fake kubelet")
        self.registrations.append("registered")

    def make_health(self, scope: HealthScope) -> FakeHealthChecks:
        """Health checks that record their scope."""
        checks = FakeHealthChecks(scope)
        self.health.append(checks)
        return checks

    def make_control(
        self, path: str, handler: Callable[[ControlCommand], dict[str, Any]]
    ) -> FakeControl:
        """A control socket the test drives."""
        control = FakeControl(path, handler)
        self.controls.append(control)
        return control

    @staticmethod
    def no_watch(_path: str, _wake: Callable[[], None]) -> Optional[Watch]:
        """No directory watch: the loop polls."""
        return None


@pytest.fixture
def kubelet_socket(short_tmp_dir: str) -> Iterator[str]:
    """A unix socket file where the kubelet's would be (registration looks for one)."""
    plugin_dir = os.path.join(short_tmp_dir, "dp")
    os.makedirs(plugin_dir)
    path = os.path.join(plugin_dir, "kubelet.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    yield path
    listener.close()


def start(config: Config, fakes: Fakes, **extra: Any) -> tuple[Agent, threading.Thread]:
    """Build the agent from ``fakes`` and run it in a thread until it is ready."""
    agent = build_agent(
        config,
        notifier=Notifier(None),
        open_backend=fakes.open_backend,
        make_mps=fakes.make_mps,
        register=fakes.register,
        make_health_checks=fakes.make_health,
        make_control=fakes.make_control,
        watch=fakes.no_watch,
        **extra,
    )
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    assert agent.ready.wait(WAIT_S)
    return agent, thread


def test_agent_from_fakes_serves_registers_and_reports(
    short_tmp_dir: str, kubelet_socket: str
) -> None:
    """Built from fakes, the agent serves both GPUs, registers through the injected call,
    hands its health checks the served GPUs and answers control commands."""
    config = make_config(short_tmp_dir)
    fakes = Fakes(config)
    agent, thread = start(config, fakes)
    try:
        wait_until(lambda: agent.registered)
        assert fakes.registrations == ["registered"]
        (checks,) = fakes.health
        assert checks.running
        assert checks.scope.gpu_uuids == [gpu.uuid for gpu in fakes.backend.list_gpus()]
        (control,) = fakes.controls
        assert control.path == config.agent.control_socket_path
        status = control.handler(StatusCommand())
        assert (status["ok"], status["registered"]) == (True, True)
        assert [gpu["replicas"] for gpu in status["gpus"]] == [4, 4]
    finally:
        agent.request_stop()
        thread.join(WAIT_S)
    assert not checks.running


def test_agent_from_fakes_applies_health_and_reset(short_tmp_dir: str, kubelet_socket: str) -> None:
    """A change emitted by the health checks marks the GPU; a reset through the control
    handler clears it before the answer."""
    config = make_config(short_tmp_dir)
    fakes = Fakes(config)
    agent, thread = start(config, fakes)
    try:
        (checks,) = fakes.health
        gpu_uuid = checks.scope.gpu_uuids[0]
        xid = HealthReason.xid_fault(79)
        checks.faults[gpu_uuid] = [xid]
        checks.scope.emit(HealthChange(gpu_uuid, xid, present=True))
        wait_until(lambda: not agent.node.inventory().gpus[0].healthy)
        answer = fakes.controls[0].handler(HealthResetCommand("0"))
        assert answer == {"ok": True, "gpu": gpu_uuid, "cleared": ["xid 79"]}
        assert agent.node.inventory().gpus[0].healthy
    finally:
        agent.request_stop()
        thread.join(WAIT_S)


def test_simulate_needs_an_injector(short_tmp_dir: str, kubelet_socket: str) -> None:
    """With fakes handed in there is no fault injector unless one is given: simulate says
    it needs the simulated backend."""
    config = make_config(short_tmp_dir)
    fakes = Fakes(config)
    agent, thread = start(config, fakes)
    try:
        answer = fakes.controls[0].handler(SimulateCommand(SimulateAction.LOSE, "0"))
        assert answer == {
            "ok": False,
            "error": "simulate works only with the simulated backend (gpus.backend)",
        }
    finally:
        agent.request_stop()
        thread.join(WAIT_S)


def test_reload_from_fakes_restarts_health_checks_for_new_settings(
    short_tmp_dir: str, kubelet_socket: str
) -> None:
    """A reload with other health settings and more vGPUs resizes the GPUs and restarts the
    health checks with the new settings."""
    config = make_config(short_tmp_dir)
    new = dataclasses.replace(
        config,
        gpus=dataclasses.replace(config.gpus, replicas_per_gpu=6),
        health=dataclasses.replace(config.health, poll_interval_s=2.0),
    )
    fakes = Fakes(config)
    agent, thread = start(config, fakes, config_loader=lambda: new)
    try:
        agent.request_reload()
        wait_until(lambda: len(fakes.health) == 2)
        assert fakes.health[1].scope.config.poll_interval_s == 2.0
        assert not fakes.health[0].running
        assert [served.replicas for served in agent.node.inventory().gpus] == [6, 6]
    finally:
        agent.request_stop()
        thread.join(WAIT_S)


def test_refused_registration_is_retried_with_status(
    short_tmp_dir: str, kubelet_socket: str
) -> None:
    """A Register call that fails leaves the agent serving and saying it retries."""
    config = make_config(short_tmp_dir)
    fakes = Fakes(config)
    fakes.refuse_registration = True
    agent, thread = start(config, fakes)
    try:
        wait_until(lambda: "retrying in" in agent.describe()["status"])
        assert not agent.registered
        fakes.refuse_registration = False
        wait_until(lambda: agent.registered)
    finally:
        agent.request_stop()
        thread.join(WAIT_S)
