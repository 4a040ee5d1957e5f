"""The agent's event loop: it owns time and every change to the node.

Signals, watchers and the control socket only queue events; one loop turns them into
reloads, re-registrations, health changes and the stop. The agent builds nothing itself:
every collaborator comes in :class:`AgentParts`, which
:func:`vgpu_agent.runtime.compose.build_agent` fills (and tests fill with fakes).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Union

from vgpu_agent.agent.health import Emit, HealthChange
from vgpu_agent.agent.registration import Registrar
from vgpu_agent.config.plan import (
    confinement_line,
    daemon_ceiling,
    gpu_ceiling,
    grant_policy,
    offered_as,
    plan_gpus,
    slice_warnings,
)
from vgpu_agent.config.reload import (
    ApplyCeiling,
    KeepRunningConfig,
    Reregister,
    ResizeGpu,
    RestartHealthChecks,
    ServeGpu,
    UseDeviceListStrategy,
    UseGrantPolicy,
    UseLogLevel,
    WarnNotServed,
    WithdrawGpu,
    plan_reload,
)
from vgpu_agent.config.schema import Config, HealthConfig, PluginConfig
from vgpu_agent.host.log import log_event, set_level
from vgpu_agent.host.sandbox import PluginDirGuard
from vgpu_agent.host.systemd import Notifier
from vgpu_agent.model.commands import (
    ControlCommand,
    FaultInjector,
    HealthResetCommand,
    SimulateCommand,
    StatusCommand,
)
from vgpu_agent.model.daemons import MpsDaemons
from vgpu_agent.model.devices import HealthReason, Inventory, ReasonKind, ServedGpu
from vgpu_agent.model.errors import ConfigError, GpuError, MpsError, VgpuError
from vgpu_agent.model.gpu import ComputeMode, Gpu, GpuBackend, set_compute_mode
from vgpu_agent.model.node import Node

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
#: EX_CONFIG: systemd's RestartPreventExitStatus=78 keeps a bad config from restart-looping.
EXIT_CONFIG = 78
#: EX_TEMPFAIL: only a restart can fix it (the sandbox lost the plugin directory); systemd
#: restarts the agent (Restart=always).
EXIT_RESTART = 75

#: How often the loop looks at the kubelet socket and our own socket when it cannot watch
#: the plugin directory (inotify); with the watch it wakes on changes, and at least every
#: IDLE_TICK_S.
SOCKET_CHECK_INTERVAL_S = 0.1
IDLE_TICK_S = 1.0
BACKEND_RETRY_INITIAL_S = 1.0
BACKEND_RETRY_MAX_S = 30.0
#: How long `vgpu-agent status` waits for a fresh attribution before showing the last one.
STATUS_ATTRIBUTION_WAIT_S = 1.0


# -- what the agent is handed ----------------------------------------------------------------


class HealthChecks(Protocol):
    """The health watchers of a fixed set of GPUs (:class:`.health.HealthMonitor`)."""

    def start(self) -> None:
        """Start watching."""
        ...

    def stop(self) -> None:
        """Stop watching and wait for the watchers."""
        ...

    def reset(self, gpu_uuid: str) -> list[HealthReason]:
        """Clear the GPU's fault reasons now (emitting the changes); returns them."""
        ...


class Service(Protocol):
    """Something started once and stopped at the end (the control socket)."""

    def start(self) -> None:
        """Start; raises VgpuError when it cannot."""
        ...

    def stop(self) -> None:
        """Stop; safe to call more than once."""
        ...


class Observer(Protocol):
    """What the agent tells about itself beyond the kubelet: attribution, metrics, labels
    (:class:`vgpu_agent.observability.service.Observability`)."""

    def start(self, backend: GpuBackend) -> None:
        """Start observing the served GPUs through ``backend``."""
        ...

    def stop(self) -> None:
        """Stop; safe to call more than once."""
        ...

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config (and what it changed in the served GPUs)."""
        ...

    def record_xid(self, gpu_uuid: str, xid: int) -> None:
        """A critical XID event was reported for the GPU."""
        ...

    def record_health(self, gpu_uuid: str, healthy: bool) -> None:
        """The GPU's vGPUs turned Healthy or Unhealthy."""
        ...

    def describe(self, inventory: Inventory, wait_s: float) -> dict[str, Any]:
        """Status fields: who uses each GPU (``"gpus"`` by UUID) and the rest."""
        ...


class Watch(Protocol):
    """A watch on the plugin directory that wakes the loop when it changes."""

    @property
    def active(self) -> bool:
        """Whether it still watches (False once the directory was deleted)."""
        ...

    def stop(self) -> None:
        """Stop watching."""
        ...


@dataclass(frozen=True)
class HealthScope:
    """What health checks watch, and where their findings go."""

    backend: GpuBackend
    mps: Optional[MpsDaemons]
    config: HealthConfig
    #: How long one MPS probe may take (mps.control_timeout_s).
    probe_timeout_s: float
    gpu_uuids: list[str]
    emit: Emit
    #: GPUs whose MPS daemon was already down, with the reason raised.
    mps_down: dict[str, HealthReason]


#: The health checks of a scope.
HealthChecksFactory = Callable[[HealthScope], HealthChecks]
#: (socket path, handler) -> the control socket server
ControlFactory = Callable[[str, Callable[[ControlCommand], dict[str, Any]]], Service]
#: (plugin settings, called while registering) -> the registrar for those settings
RegistrarFactory = Callable[[PluginConfig, Callable[[], None]], Registrar]
#: (directory, wake) -> a started watch, or None when the directory cannot be watched
WatchFactory = Callable[[str, Callable[[], None]], Optional[Watch]]


@dataclass(frozen=True)
class AgentParts:
    """Every collaborator of the agent, built by the composition root."""

    node: Node
    notifier: Notifier
    open_backend: Callable[[Config], GpuBackend]
    make_mps: Callable[[Config], Optional[MpsDaemons]]
    make_registrar: RegistrarFactory
    make_health_checks: HealthChecksFactory
    make_control: ControlFactory
    watch_directory: WatchFactory
    #: Injects `vgpu-agent simulate` faults; None on a real node.
    faults: Optional[FaultInjector] = None
    #: Attribution, metrics and node labels; None to run without them.
    observer: Optional[Observer] = None
    #: Re-reads the config on reload; None when it was not loaded from a file.
    config_loader: Optional[Callable[[], Config]] = None
    clock: Callable[[], float] = time.monotonic
    backend_retry_initial_s: float = BACKEND_RETRY_INITIAL_S
    backend_retry_max_s: float = BACKEND_RETRY_MAX_S
    #: Says when the sandbox lost the plugin directory (exit 75 for a fresh one).
    plugin_dir_guard: PluginDirGuard = field(default_factory=PluginDirGuard)


# -- events --------------------------------------------------------------------------------------


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


Event = Union[Stop, Reload, Wake, HealthChange, ControlRequest]


# -- the agent -------------------------------------------------------------------------------------


def status_line(
    inventory: Inventory,
    resource_name: str,
    *,
    registered: bool,
    waiting_for: str,
    waiting_for_driver: Optional[str] = None,
) -> str:
    """The one-line state systemd shows (STATUS=) and `vgpu-agent status` prints first;
    ``waiting_for_driver`` says why the GPU backend is not open yet (nothing served)."""
    if waiting_for_driver is not None:
        return f"waiting for the GPU driver: {waiting_for_driver}"
    line = f"serving {inventory.vgpu_count} vGPUs on {len(inventory.gpus)} GPUs as {resource_name}"
    unhealthy = [served for served in inventory.gpus if not served.healthy]
    if unhealthy:
        causes = "; ".join(
            f"GPU {served.gpu.index}: {', '.join(served.reason_texts)}" for served in unhealthy
        )
        line += f"; {inventory.unhealthy_vgpu_count} unhealthy ({causes})"
    if registered:
        line += "; registered with kubelet"
    elif waiting_for:
        line += f"; waiting for {waiting_for}"
    return line


class Agent:
    """The daemon: serves vGPUs to the kubelet until told to stop."""

    def __init__(self, config: Config, parts: AgentParts) -> None:
        self.config = config
        self._parts = parts
        self._notifier = parts.notifier
        self._clock = parts.clock
        self.node = parts.node
        self.node.set_grant_policy(grant_policy(config))
        self.node.set_device_list_strategy(config.plugin.device_list_strategy)
        # SimpleQueue.put is reentrant: signal handlers may call request_stop().
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._backend: Optional[GpuBackend] = None
        self._mps: Optional[MpsDaemons] = None
        self._health: Optional[HealthChecks] = None
        self._changed_modes: dict[str, ComputeMode] = {}
        self._registrar = parts.make_registrar(config.plugin, self._ping_watchdog)
        #: Registrations by registrars a reload replaced.
        self._earlier_registrations = 0
        self._earlier_kubelet_restarts = 0
        self._observer = parts.observer
        self._last_status = ""
        self._next_watchdog_at = 0.0
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self._control: Optional[Service] = None
        self._watch: Optional[Watch] = None
        #: Why the GPU backend is not open yet (and when it is retried); None once it is.
        self._waiting_for_driver: Optional[str] = None

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
        try:
            return request.reply.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            # The loop is busy (starting MPS daemons, registering): say so, not "internal".
            return {
                "ok": False,
                "error": f"the agent did not answer within {timeout_s:g} s "
                f"({self._last_status}); try again",
            }

    def emit_health(self, change: HealthChange) -> None:
        """Queue a health change from a watcher."""
        self._events.put(change)

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
        self._start_control()
        backend = self._open_backend()
        if backend is None:
            self._notifier.stopping()
            if self._control is not None:
                self._control.stop()
            return EXIT_OK
        self._backend = backend
        self._waiting_for_driver = None
        try:
            self._start_serving()
        except ConfigError as exc:
            log.error("%s", exc)
            self._shutdown()
            return EXIT_CONFIG
        except VgpuError as exc:
            log.error("%s", exc)
            self._shutdown()
            return EXIT_FAILURE
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
                try:
                    event = self._events.get(timeout=self._loop_timeout())
                except queue.Empty:
                    continue
                if isinstance(event, Stop):
                    log.info("stopping: %s", event.why)
                    break
                self._handle(event)
        finally:
            self._shutdown()
        return exit_code

    def _open_backend(self) -> Optional[GpuBackend]:
        """Open the GPU backend, retrying while the driver is not there yet (boot)."""
        delay_s = self._parts.backend_retry_initial_s
        while True:
            try:
                return self._parts.open_backend(self.config)
            except GpuError as exc:
                self._waiting_for_driver = f"{exc}; retrying in {delay_s:.0f} s"
                self._set_status(self._status_line())
                log.warning("opening the GPU backend failed: %s; retrying in %.0f s", exc, delay_s)
            deadline = self._clock() + delay_s
            while self._clock() < deadline:
                self._ping_watchdog()
                try:
                    event = self._events.get(timeout=min(1.0, delay_s))
                except queue.Empty:
                    continue
                if isinstance(event, Stop):
                    return None
                if isinstance(event, ControlRequest):
                    event.reply.set_result(self._answer_while_waiting(event.command))
            delay_s = min(delay_s * 2, self._parts.backend_retry_max_s)

    def _answer_while_waiting(self, command: ControlCommand) -> dict[str, Any]:
        """A control answer before the GPU backend opened: the truth, no GPU yet."""
        if isinstance(command, StatusCommand):
            return {"ok": True, **self.describe()}
        return {
            "ok": False,
            "error": f"no GPU is served yet: {self._status_line()}; "
            "install or load the NVIDIA driver (the agent retries on its own)",
        }

    def _start_serving(self) -> None:
        assert self._backend is not None  # noqa: S101 - set by _run
        plan = plan_gpus(self.config, self._backend.list_gpus())
        for problem in plan.refused:
            log.warning("%s", problem)
        if not plan.served:
            # A node that has nothing to serve will not have it after a restart either:
            # a config error (exit 78), so that Restart=always does not loop on it.
            raise ConfigError(
                "no GPU to serve: "
                + ("; ".join(plan.refused) if plan.refused else "the node has no NVIDIA GPU")
                + "; fix the config (gpus.serve, ...) or stop the agent on this node"
            )
        for gpu, _ in plan.served:
            for warning in slice_warnings(self.config, gpu.model, gpu.memory_mib):
                log.warning("GPU %s (%s): %s", gpu.index, gpu.uuid, warning)
        for gpu, _ in plan.served:
            self._apply_compute_mode(gpu)
        self._mps = self._parts.make_mps(self.config)
        served = [self._start_mps(gpu, replicas) for gpu, replicas in plan.served]
        self.node.serve(Inventory(tuple(served)))
        for entry in served:
            log_event(
                log,
                logging.INFO,
                f"serving GPU {entry.gpu.index} ({entry.gpu.model}) as {entry.replicas} vGPUs",
                GPU_UUID=entry.gpu.uuid,
                VGPU_EVENT="gpu-served",
                VGPU_REPLICAS=str(entry.replicas),
            )
        self._start_health_checks()
        if self._observer is not None:
            self._observer.start(self._backend)

    def _start_mps(self, gpu: Gpu, replicas: int) -> ServedGpu:
        if self._mps is None:
            return ServedGpu(gpu, replicas)
        try:
            info = self._mps.start(gpu)
        except MpsError as exc:
            log_event(log, logging.ERROR, str(exc), GPU_UUID=gpu.uuid, VGPU_EVENT="mps-failed")
            reason = HealthReason.mps_down(f"MPS daemon could not start: {exc}")
            return ServedGpu(gpu, replicas, (reason,), self.config.mps.pipe_dir(gpu.uuid))
        reasons = self._apply_ceiling(gpu, replicas)
        return ServedGpu(gpu, replicas, reasons, info.pipe_dir)

    def _apply_ceiling(self, gpu: Gpu, replicas: int) -> tuple[HealthReason, ...]:
        """Set the GPU's daemon ceiling (mps.confinement), which the daemon manager's probe
        then keeps; the reason to mark the GPU Unhealthy when an enforced ceiling cannot be
        set."""
        assert self._mps is not None  # noqa: S101 - only called with MPS
        try:
            ceiling = daemon_ceiling(self.config.mps, gpu.memory_mib, replicas)
            sent = self._mps.apply_defaults(gpu, ceiling)
        except MpsError as exc:
            log_event(log, logging.ERROR, str(exc), GPU_UUID=gpu.uuid, VGPU_EVENT="mps")
            if self.config.mps.confinement == "enforced":
                # Without its ceiling a pod could take the whole GPU: not served until the
                # probe has set it and read it back.
                return (HealthReason.mps_down(f"MPS daemon ceiling not set: {exc}"),)
            return ()
        for command in sent:
            log.info("GPU %s MPS daemon: %s", gpu.uuid, command)
        return ()

    def _apply_compute_mode(self, gpu: Gpu) -> None:
        assert self._backend is not None  # noqa: S101 - set by _run
        setting = self.config.gpus.compute_mode
        if setting == "unchanged":
            return
        wanted = ComputeMode(setting)
        previous = set_compute_mode(
            self._backend,
            gpu.uuid,
            wanted,
            on_changed=lambda previous: self._remember_mode(gpu.uuid, previous),
        )
        log_event(
            log,
            logging.INFO,
            f"GPU {gpu.index} compute mode is {wanted.value} (was {previous.value})",
            GPU_UUID=gpu.uuid,
            VGPU_EVENT="compute-mode",
        )

    def _remember_mode(self, gpu_uuid: str, previous: ComputeMode) -> None:
        """Keep the mode a GPU had before the agent first changed it (restored at stop)."""
        self._changed_modes.setdefault(gpu_uuid, previous)

    def _start_health_checks(self) -> None:
        assert self._backend is not None  # noqa: S101 - set by _run
        inventory = self.node.inventory()
        scope = HealthScope(
            backend=self._backend,
            mps=self._mps,
            config=self.config.health,
            probe_timeout_s=self.config.mps.control_timeout_s,
            gpu_uuids=[served.gpu.uuid for served in inventory.gpus],
            emit=self.emit_health,
            mps_down={
                served.gpu.uuid: reason
                for served in inventory.gpus
                for reason in served.unhealthy_reasons
                if reason.kind is ReasonKind.MPS
            },
        )
        self._health = self._parts.make_health_checks(scope)
        self._health.start()

    def _start_control(self) -> None:
        control = self._parts.make_control(self.config.agent.control_socket_path, self.submit)
        try:
            control.start()
        except VgpuError as exc:
            log.warning("%s; `vgpu-agent status` will not reach this agent", exc)
            return
        self._control = control

    def _tick(self) -> None:
        self._ping_watchdog()
        self._ensure_watch()
        if self._registrar.check():
            self._set_status(self._status_line())

    def _ensure_watch(self) -> None:
        """Watch the plugin directory when it exists (again), so the loop can sleep."""
        if self._watch is not None and self._watch.active:
            return
        self._stop_watch()
        self._watch = self._parts.watch_directory(
            self.config.plugin.plugin_dir, lambda: self._events.put(Wake())
        )

    def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def _loop_timeout(self) -> float:
        """How long the loop may sleep: until the next due registration attempt or
        watchdog ping, at most IDLE_TICK_S while watching, else the polling interval."""
        if self._watch is None or not self._watch.active:
            return SOCKET_CHECK_INTERVAL_S
        timeout = IDLE_TICK_S
        now = self._clock()
        due_in = self._registrar.seconds_until_due(now)
        if due_in is not None:
            timeout = min(timeout, due_in)
        if self._notifier.watchdog_interval_s is not None:
            timeout = min(timeout, self._next_watchdog_at - now)
        return max(timeout, 0.01)

    def _ping_watchdog(self) -> None:
        interval = self._notifier.watchdog_interval_s
        if interval is None:
            return
        now = self._clock()
        if now >= self._next_watchdog_at:
            self._notifier.watchdog()
            self._next_watchdog_at = now + interval

    # -- events ---------------------------------------------------------------------------------

    def _handle(self, event: Event) -> None:
        if isinstance(event, Wake):
            return  # the next _tick looks at the sockets
        if isinstance(event, Reload):
            self._reload()
        elif isinstance(event, HealthChange):
            self._apply_health(event)
        elif isinstance(event, ControlRequest):
            try:
                answer = self._control_command(event.command)
            except VgpuError as exc:
                answer = {"ok": False, "error": str(exc)}
            except Exception as exc:  # a bad request must not stop the agent
                log.exception("control command %r failed", event.command)
                answer = {"ok": False, "error": f"internal error: {exc}"}
            event.reply.set_result(answer)

    def _apply_health(self, change: HealthChange) -> None:
        observer = self._observer
        if observer is not None and change.present and change.reason.xid is not None:
            observer.record_xid(change.gpu_uuid, change.reason.xid)
        transition = self.node.set_health(change.gpu_uuid, change.reason, change.present)
        if transition is None:
            return
        flipped = (
            transition.healthy
            if not change.present
            else (transition.gpu.unhealthy_reasons == (change.reason,))
        )
        if observer is not None and flipped:
            observer.record_health(change.gpu_uuid, transition.healthy)
        health = transition.gpu.health
        verb = "" if change.present else "cleared "
        fields = {
            "GPU_UUID": change.gpu_uuid,
            "VGPU_EVENT": "health",
            "VGPU_HEALTH": health,
            "VGPU_REASON": change.reason.text,
        }
        if change.reason.xid is not None:
            fields["XID"] = str(change.reason.xid)
        detail = f" ({change.detail})" if change.detail else ""
        log_event(
            log,
            logging.WARNING if change.present else logging.INFO,
            f"GPU {change.gpu_uuid}: {verb}{change.reason}{detail}; its vGPUs are now {health}",
            **fields,
        )
        self._set_status(self._status_line())

    def _reload(self) -> None:
        self._notifier.reloading()
        if self._parts.config_loader is None:
            log.info("reload requested, but the config was not loaded from a file; nothing to do")
            self._notifier.ready(self._status_line())
            return
        try:
            new = self._parts.config_loader()
        except ConfigError as exc:
            log.error("reload: keeping the running config, the new one is invalid: %s", exc)
            self._notifier.ready(self._status_line())
            return
        assert self._backend is not None  # noqa: S101 - set by _run
        inventory = self.node.inventory()
        try:
            node_gpus = self._backend.list_gpus()
        except GpuError as exc:
            log.warning("reload: listing the GPUs failed (%s); considering those served now", exc)
            node_gpus = [served.gpu for served in inventory.gpus]
        served_now = {served.gpu.uuid: served.replicas for served in inventory.gpus}
        actions = plan_reload(self.config, new, node_gpus, served_now)
        if actions and isinstance(actions[0], KeepRunningConfig):
            log.error("reload: keeping the running config, %s", actions[0].why)
            self._notifier.ready(self._status_line())
            return
        self.config = new
        added: list[ServedGpu] = []
        replicas = dict(served_now)
        restart_health = False
        for action in actions:
            if isinstance(action, UseLogLevel):
                set_level(action.level)
            elif isinstance(action, UseGrantPolicy):
                self.node.set_grant_policy(action.policy)
            elif isinstance(action, WarnNotServed):
                log.warning("reload: %s", action.problem)
            elif isinstance(action, ServeGpu):
                entry = self._serve_added(action.gpu, action.replicas)
                if entry is not None:
                    added.append(entry)
            elif isinstance(action, ResizeGpu):
                replicas[action.gpu_uuid] = action.replicas
            elif isinstance(action, WithdrawGpu):
                del replicas[action.gpu_uuid]
            elif isinstance(action, Reregister):
                log.info("reload: plugin settings changed; registering again")
                self._registrar.stop()
                self._earlier_registrations += self._registrar.registrations
                self._earlier_kubelet_restarts += self._registrar.kubelet_restarts
                self._registrar = self._parts.make_registrar(new.plugin, self._ping_watchdog)
                self._stop_watch()
            elif isinstance(action, RestartHealthChecks):
                restart_health = True
            elif isinstance(action, UseDeviceListStrategy):
                self.node.set_device_list_strategy(action.strategy)
            elif isinstance(action, ApplyCeiling) and self._mps is not None:
                # A daemon that does not answer gets it from the probe once it does.
                self._apply_ceiling(action.gpu, action.replicas)

        def resize(current: Inventory) -> Inventory:
            kept = [
                dataclasses.replace(served, replicas=replicas[served.gpu.uuid])
                for served in current.gpus
                if served.gpu.uuid in replicas
            ]
            return Inventory(tuple(sorted(kept + added, key=lambda served: served.gpu.index)))

        after = self.node.update(resize)
        gpus_changed = {served.gpu.uuid for served in after.gpus} != set(served_now)
        if (restart_health or gpus_changed) and self._health is not None:
            self._health.stop()
            self._start_health_checks()
        if self._observer is not None:
            self._observer.reconfigure(new)
        log_event(
            log,
            logging.INFO,
            f"reloaded {new.source}: {after.vgpu_count} vGPUs",
            VGPU_EVENT="reloaded",
        )
        self._notifier.ready(self._status_line())

    def _serve_added(self, gpu: Gpu, replicas: int) -> Optional[ServedGpu]:
        """Prepare a GPU a reload adds: its compute mode, then its MPS daemon; None (and
        the GPU is not served) when its compute mode cannot be set."""
        try:
            self._apply_compute_mode(gpu)
        except GpuError as exc:
            log_event(
                log,
                logging.ERROR,
                f"reload: not serving GPU {gpu.index}: {exc}",
                GPU_UUID=gpu.uuid,
                VGPU_EVENT="compute-mode",
            )
            return None
        log_event(
            log,
            logging.INFO,
            f"reload: serving GPU {gpu.index} ({gpu.model}) as {replicas} vGPUs",
            GPU_UUID=gpu.uuid,
            VGPU_EVENT="gpu-served",
            VGPU_REPLICAS=str(replicas),
        )
        return self._start_mps(gpu, replicas)

    def _control_command(self, command: ControlCommand) -> dict[str, Any]:
        if isinstance(command, StatusCommand):
            return {"ok": True, **self.describe()}
        gpu = self.node.find_gpu(command.gpu).gpu
        if isinstance(command, HealthResetCommand):
            cleared = self._health.reset(gpu.uuid) if self._health is not None else []
            # The reset's changes are queued; apply them now so the answer is true.
            self._drain_health()
            return {"ok": True, "gpu": gpu.uuid, "cleared": [reason.text for reason in cleared]}
        return self._simulate(command, gpu.uuid)

    def _simulate(self, command: SimulateCommand, gpu_uuid: str) -> dict[str, Any]:
        if self._parts.faults is None:
            raise VgpuError("simulate works only with the simulated backend (gpus.backend)")
        self._parts.faults.inject(command, gpu_uuid)
        return {"ok": True, "gpu": gpu_uuid, "action": command.action.value}

    def _drain_health(self) -> None:
        pending: list[Event] = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if isinstance(event, HealthChange):
                self._apply_health(event)
            else:
                pending.append(event)
        for event in pending:
            self._events.put(event)

    # -- status -----------------------------------------------------------------------------------

    def describe(self, attribution_wait_s: float = STATUS_ATTRIBUTION_WAIT_S) -> dict[str, Any]:
        """What `vgpu-agent status` shows: the agent, each GPU, its health and who uses it
        (waiting up to ``attribution_wait_s`` for a fresh attribution)."""
        inventory = self.node.inventory()
        observed: dict[str, Any] = {}
        if self._observer is not None:
            observed = self._observer.describe(inventory, attribution_wait_s)
        users: dict[str, Any] = observed.pop("gpus", {})
        return {
            "status": self._status_line(),
            "resource_name": self.config.plugin.resource_name,
            "registered": self.registered,
            "registrations": self.registrations,
            "confinement": {
                "mode": self.config.mps.confinement if self.config.mps.enabled else "none",
                "summary": confinement_line(self.config),
                "max_vgpus_per_container": self.config.mps.max_vgpus_per_container,
                "device_list_strategy": self.config.plugin.device_list_strategy,
            },
            "kubelet_restarts": self.kubelet_restarts,
            **observed,
            "gpus": [
                {
                    "index": served.gpu.index,
                    "uuid": served.gpu.uuid,
                    "model": served.gpu.model,
                    "memory_mib": served.gpu.memory_mib,
                    "replicas": served.replicas,
                    "healthy": served.healthy,
                    "reasons": served.reason_texts,
                    "pipe_dir": served.pipe_dir,
                    "ceiling": gpu_ceiling(
                        self.config, served.gpu.memory_mib, served.replicas
                    ).describe(),
                    "vgpu_ids": served.vgpu_ids,
                    "attribution": users.get(served.gpu.uuid),
                }
                for served in inventory.gpus
            ],
        }

    def _status_line(self) -> str:
        return status_line(
            self.node.inventory(),
            offered_as(self.config),
            registered=self.registered,
            waiting_for=self._registrar.waiting_for,
            waiting_for_driver=self._waiting_for_driver,
        )

    def _set_status(self, line: str) -> None:
        if line != self._last_status:
            self._last_status = line
            self._notifier.status(line)

    # -- shutdown ---------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        self._notifier.stopping()
        self._stop_watch()
        if self._observer is not None:
            self._observer.stop()
        if self._health is not None:
            self._health.stop()
        if self._control is not None:
            self._control.stop()
        self.node.close()
        self._registrar.stop()
        self._restore_compute_modes()
        if self._backend is not None:
            try:
                self._backend.close()
            except GpuError as exc:
                log.warning("closing the GPU backend: %s", exc)
        # MPS daemons are left running on purpose: jobs using them outlive agent restarts.
        log_event(log, logging.INFO, "stopped", VGPU_EVENT="stopped")

    def _restore_compute_modes(self) -> None:
        if not self.config.gpus.restore_compute_mode or self._backend is None:
            return
        for gpu_uuid, previous in self._changed_modes.items():
            try:
                self._backend.set_compute_mode(gpu_uuid, previous)
                log.info("restored compute mode %s on GPU %s", previous.value, gpu_uuid)
            except GpuError as exc:
                log.error("restoring the compute mode of GPU %s: %s", gpu_uuid, exc)
