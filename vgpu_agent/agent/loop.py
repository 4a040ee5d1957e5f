"""The agent's event loop: it owns time and every change to the node.

Signals, watchers and the control socket only queue events; one loop turns them into
reloads, re-registrations, health changes and the stop. The agent builds nothing itself:
every collaborator comes in :class:`~vgpu_agent.agent.parts.AgentParts`, which
:func:`vgpu_agent.runtime.compose.build_agent` fills (and tests fill with fakes). What an
event asks for is done elsewhere: bringing GPUs up (:mod:`.bringup`), reloading
(:mod:`.reload`), answering the control socket (:mod:`.dispatch`), describing the node
(:mod:`.describe`), staying registered with the kubelet (:mod:`.kubelet`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional, Union

from vgpu_agent.agent.bringup import GpuBringUp, open_gpus
from vgpu_agent.agent.describe import (
    STATUS_ATTRIBUTION_WAIT_S,
    Registrations,
    describe_node,
    status_line,
)
from vgpu_agent.agent.dispatch import ControlDispatch, apply_health_change, start_control
from vgpu_agent.agent.events import ControlRequest, Event, Events, Reload, Stop, Wake
from vgpu_agent.agent.faults import ApplicationFault, NamedFault
from vgpu_agent.agent.health import HealthChange
from vgpu_agent.agent.kubelet import KubeletLink, loop_timeout
from vgpu_agent.agent.offenders import OffenderPolicy
from vgpu_agent.agent.parts import AgentParts, Service, daemon_logs_for, fault_log_for
from vgpu_agent.agent.reload import execute_reload, plan_reload_from
from vgpu_agent.agent.waiting import DriverWait, reload_while_waiting
from vgpu_agent.config.plan import grant_policy, offered_as
from vgpu_agent.config.schema import Config
from vgpu_agent.host.log import log_event
from vgpu_agent.host.systemd import Watchdog
from vgpu_agent.model.commands import ControlCommand
from vgpu_agent.model.devices import HealthReason
from vgpu_agent.model.errors import ConfigError, VgpuError

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
#: EX_CONFIG: systemd's RestartPreventExitStatus=78 keeps a bad config from restart-looping.
EXIT_CONFIG = 78
#: EX_TEMPFAIL: only a restart can fix it (the sandbox lost the plugin directory); systemd
#: restarts the agent (Restart=always).
EXIT_RESTART = 75


# -- the agent -------------------------------------------------------------------------------------


class Agent:
    """The daemon: serves vGPUs to the kubelet until told to stop."""

    def __init__(self, config: Config, parts: AgentParts) -> None:
        self.config = config
        self._parts = parts
        self._notifier = parts.notifier
        self._clock = parts.clock
        self._watchdog = Watchdog(parts.notifier, parts.clock)
        self.node = parts.node
        self.node.set_grant_policy(grant_policy(config))
        self.node.set_device_list_strategy(config.plugin.device_list_strategy)
        self._events = Events()
        #: The served GPUs' hardware side; None until the GPU backend is open.
        self._gpus: Optional[GpuBringUp] = None
        self._kubelet = KubeletLink(
            lambda plugin: parts.make_registrar(plugin, self._watchdog.ping),
            config.plugin,
            watch_directory=parts.watch_directory,
            wake=lambda: self._events.put(Wake()),
        )
        self._last_status = ""
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self._control: Optional[Service] = None
        self._commands = ControlDispatch(
            self.node,
            describe=self.describe,
            status_line=self._status_line,
            reset_health=self._reset_health,
            faults=parts.faults,
        )
        self._driver = DriverWait(
            parts.notifier,
            parts.clock,
            self._watchdog,
            self._events,
            status_line=self._status_line,
            set_status=self._set_status,
            announce=self._announce,
            answer=self._commands.answer_while_waiting,
            reload=self._reload_while_waiting,
        )
        #: MPS faults with their culprits, and the repeat offenders held.
        self._faults = fault_log_for(config, parts)

    @property
    def offenders(self) -> OffenderPolicy:
        """The repeat offenders of MPS faults; its ``held()`` (pod UID -> why) names the
        pods the per-pod client enforcement allows no MPS clients."""
        return self._faults.offenders

    @property
    def registered(self) -> bool:
        """Whether the plugin is registered with the current kubelet."""
        return self._kubelet.registered

    @property
    def registrations(self) -> int:
        """How many times the plugin registered since the agent started."""
        return self._kubelet.registrations

    @property
    def kubelet_restarts(self) -> int:
        """How many kubelet restarts the agent noticed since it started."""
        return self._kubelet.kubelet_restarts

    # -- for signal handlers, the control socket and watchers (any thread) ---------------------

    def request_stop(self, why: str = "stop requested") -> None:
        """Ask the loop to stop (safe from a signal handler)."""
        self._events.put(Stop(why))

    def request_reload(self) -> None:
        """Ask the loop to re-read the config (safe from a signal handler)."""
        self._events.put(Reload())

    def submit(self, command: ControlCommand, timeout_s: float = 5.0) -> dict[str, Any]:
        """Run a control command on the loop's thread and return its answer."""
        request = ControlRequest(command)
        self._events.put(request)
        return request.answer(timeout_s, busy_with=self._last_status)

    def emit_health(self, change: Union[HealthChange, ApplicationFault, NamedFault]) -> None:
        """Queue a health change (or an application fault, or its culprit named) from a
        watcher."""
        self._events.put(change)

    def describe(self, attribution_wait_s: float = STATUS_ATTRIBUTION_WAIT_S) -> dict[str, Any]:
        """What `vgpu-agent status` shows: the agent, each GPU, its health and who uses it
        (waiting up to ``attribution_wait_s`` for a fresh attribution)."""
        inventory = self.node.inventory()
        observer = self._parts.observer
        observed = observer.describe(inventory, attribution_wait_s) if observer is not None else {}
        counts = Registrations(self.registered, self.registrations, self.kubelet_restarts)
        return describe_node(
            self.config,
            inventory,
            status=self._status_line(),
            registrations=counts,
            observed=observed,
            faults=self._faults.recent(),
            offenders=self._faults.offenders.describe(),
            backend=self._gpus.backend if self._gpus is not None else None,
        )

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        try:
            return self._run()
        finally:
            self.stopped.set()

    def _run(self) -> int:
        self._set_status("starting")
        # The control socket comes first, so that `vgpu-agent status` tells the truth
        # (waiting for the GPU driver) from the start instead of "not running".
        self._control = start_control(
            self._parts.make_control, self.config.agent.control_socket_path, self.submit
        )
        self._gpus = open_gpus(
            self.config,
            self._parts,
            emit=self.emit_health,
            on_failure=self._driver.failed,
            pause=self._driver.pause,
        )
        if self._gpus is None:
            self._notifier.stopping()
            if self._control is not None:
                self._control.stop()
            return EXIT_OK
        self._driver.why = None
        # A reload while waiting may have changed what Allocate grants, the MPS manager
        # whose output names each fault's culprit, and [faults].
        self.node.set_grant_policy(grant_policy(self.config))
        self.node.set_device_list_strategy(self.config.plugin.device_list_strategy)
        self._faults.use_daemon_logs(*daemon_logs_for(self.config, self._parts))
        self._faults.configure(self.config.faults)
        try:
            self._gpus.serve(self.config)
            self._faults.follow([served.gpu.uuid for served in self.node.inventory().gpus])
            if self._parts.observer is not None:
                self._parts.observer.start(self._gpus.backend)
        except VgpuError as exc:
            log.error("%s", exc)
            self._shutdown()
            return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILURE
        self._notifier.ready(self._status_line())
        self.ready.set()
        exit_code = EXIT_OK
        try:
            while True:
                self._tick()
                must_restart = self._parts.plugin_dir_guard.check(self.config.plugin.plugin_dir)
                if must_restart is not None:
                    log_event(log, logging.ERROR, must_restart, VGPU_EVENT="sandbox-restart")
                    exit_code = EXIT_RESTART
                    break
                event = self._events.get(loop_timeout(self._kubelet, self._watchdog, self._clock()))
                if event is None:
                    continue
                if isinstance(event, Stop):
                    log.info("stopping: %s", event.why)
                    break
                self._handle(event)
        finally:
            self._shutdown()
        return exit_code

    def _tick(self) -> None:
        self._watchdog.ping()
        self._faults.tick()
        if self._kubelet.check(self.config.plugin.plugin_dir):
            self._set_status(self._status_line())

    # -- events ---------------------------------------------------------------------------------

    def _handle(self, event: Event) -> None:
        if isinstance(event, Wake):
            return  # the next _tick looks at the sockets
        if isinstance(event, Reload):
            self._reload()
        elif isinstance(event, HealthChange):
            self._apply_health(event)
        elif isinstance(event, ApplicationFault):
            self._faults.arrive(event, self.emit_health)
        elif isinstance(event, NamedFault):
            self._faults.record(event.seen, event.culprit)
        elif isinstance(event, ControlRequest):
            event.reply.set_result(self._commands.answer(event.command))

    def _apply_health(self, change: HealthChange) -> None:
        if apply_health_change(self.node, self._parts.observer, change):
            self._set_status(self._status_line())

    def _reset_health(self, gpu_uuid: str) -> list[HealthReason]:
        cleared = self._gpus.reset_health(gpu_uuid) if self._gpus is not None else []
        # The reset's changes are queued; apply them now so the answer is true.
        for change in self._events.take_health_changes():
            self._apply_health(change)
        return cleared

    def _reload(self) -> None:
        self._notifier.reloading()
        load = self._parts.config_loader
        if load is None:
            log.info("reload requested, but the config was not loaded from a file; nothing to do")
        else:
            assert self._gpus is not None  # noqa: S101 - set by _run
            plan = plan_reload_from(self.config, load, self._gpus.backend, self.node.inventory())
            if plan is not None:
                self.config = plan.config
                after = execute_reload(
                    plan,
                    self._gpus,
                    reregister=self._kubelet.reregister,
                    observer=self._parts.observer,
                    faults=self._faults.configure,
                )
                self._faults.follow([served.gpu.uuid for served in after.gpus])
        self._notifier.ready(self._status_line())

    # -- status and shutdown ----------------------------------------------------------------------

    def _status_line(self) -> str:
        return status_line(
            self.node.inventory(),
            offered_as(self.config),
            registered=self.registered,
            waiting_for=self._kubelet.waiting_for,
            waiting_for_driver=self._driver.why,
        )

    def _reload_while_waiting(self) -> None:
        self._notifier.reloading()
        self.config = reload_while_waiting(self.config, self._parts.config_loader)
        self._notifier.ready(self._status_line())

    def _announce(self, line: str) -> None:
        self._notifier.ready(line)
        self._last_status = line

    def _set_status(self, line: str) -> None:
        if line != self._last_status:
            self._last_status = line
            self._notifier.status(line)

    def _shutdown(self) -> None:
        self._notifier.stopping()
        self._kubelet.stop_watch()
        if self._parts.observer is not None:
            self._parts.observer.stop()
        if self._gpus is not None:
            self._gpus.stop_health_checks()
        self._faults.close()
        if self._control is not None:
            self._control.stop()
        self.node.close()
        self._kubelet.stop()
        if self._gpus is not None:
            self._gpus.close(self.config)
        log_event(log, logging.INFO, "stopped", VGPU_EVENT="stopped")
