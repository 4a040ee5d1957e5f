"""The composition root and the event loop.

:func:`build_backend` and :func:`build_mps` pick the implementations; :class:`Agent` wires
everything together and owns time: signals, watchers and the control socket only queue
events, and one loop turns them into reloads, re-registrations, health changes and the stop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from vgpu_agent import kubelet
from vgpu_agent.config import Config, simulated_mps
from vgpu_agent.devices import Inventory, MpsGrantPolicy, ServedGpu
from vgpu_agent.errors import ConfigError, GpuError, MpsError, VgpuError
from vgpu_agent.gpu import ComputeMode, Gpu, GpuBackend
from vgpu_agent.health import MPS_REASON_PREFIX, HealthChange, HealthMonitor
from vgpu_agent.log import log_event, set_level
from vgpu_agent.mps import MpsDaemons, apply_daemon_defaults
from vgpu_agent.plugin import DeviceState, PluginServer, PluginServicer
from vgpu_agent.sandbox import PluginDirGuard
from vgpu_agent.simulated import SimulatedBackend, SimulatedMpsDaemons, gpus_from_config
from vgpu_agent.systemd import Notifier
from vgpu_agent.watch import DirectoryWatch

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
REGISTER_BACKOFF_INITIAL_S = 0.5
REGISTER_BACKOFF_MAX_S = 10.0
BACKEND_RETRY_INITIAL_S = 1.0
BACKEND_RETRY_MAX_S = 30.0


# -- building the parts ------------------------------------------------------------------------


def build_backend(config: Config) -> GpuBackend:
    """The GPU backend the config names; raises GpuError when it cannot start."""
    if config.gpus.backend == "simulated":
        return SimulatedBackend(gpus_from_config(config.simulated))
    from vgpu_agent.nvml import NvmlBackend  # pynvml is only needed on real nodes

    return NvmlBackend()


def build_mps(config: Config) -> Optional[MpsDaemons]:
    """The MPS daemon manager for the config (None when MPS is off)."""
    if not config.mps.enabled:
        return None
    if simulated_mps(config):
        return SimulatedMpsDaemons(config.mps.pipe_root, config.mps.log_root)
    from vgpu_agent.mps import build_mps_daemons

    return build_mps_daemons(config.mps)


def mps_policy(config: Config) -> Optional[MpsGrantPolicy]:
    """What Allocate hands out for MPS, from the config."""
    if not config.mps.enabled:
        return None
    return MpsGrantPolicy(
        container_pipe_dir=config.mps.container_pipe_dir,
        thread_limit=config.mps.thread_limit,
        memory_limit=config.mps.memory_limit,
        memory_headroom_mib=config.mps.memory_headroom_mib,
        share_host_shm=config.mps.share_host_shm,
        # Clients only connect to the daemon's sockets (shown on an H200, docs/mps.md);
        # read-only keeps pods from touching its lock and pid files.
        pipe_dir_read_only=True,
    )


@dataclass(frozen=True)
class GpuPlan:
    """Which GPUs to serve with how many vGPUs, and why the others are not served."""

    served: tuple[tuple[Gpu, int], ...]
    refused: tuple[str, ...] = ()


def plan_gpus(config: Config, gpus: list[Gpu]) -> GpuPlan:
    """Choose the GPUs to serve (pure): the config's selection, each within MPS's limits."""
    selection = config.gpus.serve
    refused: list[str] = []
    chosen: list[Gpu] = []
    if selection == "all":
        chosen = list(gpus)
    else:
        for wanted in selection:
            match = [
                gpu
                for gpu in gpus
                if (isinstance(wanted, int) and gpu.index == wanted) or gpu.uuid == wanted
            ]
            if not match:
                refused.append(f"gpus.serve names {wanted!r}, but no such GPU is on this node")
            chosen.extend(gpu for gpu in match if gpu not in chosen)
    served: list[tuple[Gpu, int]] = []
    for gpu in chosen:
        replicas = config.replicas_for_model(gpu.model)
        unconfined = config.gpus.allow_unconfined_sharing
        if config.mps.enabled and gpu.mig_enabled and not unconfined:
            refused.append(
                f"GPU {gpu.index} ({gpu.uuid}, {gpu.model}) is in MIG mode, where MPS cannot "
                "confine clients; disable MIG or set gpus.allow_unconfined_sharing = true"
            )
            continue
        if config.mps.enabled and not gpu.volta_or_newer and not unconfined:
            refused.append(
                f"GPU {gpu.index} ({gpu.uuid}, {gpu.model}) is older than Volta: MPS gives it no "
                "per-client memory or thread limits; set gpus.allow_unconfined_sharing = true "
                "to share it unconfined"
            )
            continue
        if replicas > gpu.mps_client_limit:
            refused.append(
                f"GPU {gpu.index} ({gpu.uuid}, {gpu.model}) would get {replicas} vGPUs, more "
                f"than the {gpu.mps_client_limit} MPS clients it serves; lower "
                "gpus.replicas_per_gpu or add a gpus.replicas_by_model entry"
            )
            continue
        served.append((gpu, replicas))
    return GpuPlan(tuple(served), tuple(refused))


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

    command: dict[str, Any]
    reply: Future[dict[str, Any]] = field(default_factory=Future)


Event = Union[Stop, Reload, Wake, HealthChange, ControlRequest]


# -- the agent -------------------------------------------------------------------------------------


class Agent:
    """The daemon: serves vGPUs to the kubelet until told to stop."""

    def __init__(
        self,
        config: Config,
        *,
        notifier: Notifier,
        backend_factory: Callable[[Config], GpuBackend] = build_backend,
        mps_factory: Callable[[Config], Optional[MpsDaemons]] = build_mps,
        config_loader: Optional[Callable[[], Config]] = None,
        clock: Callable[[], float] = time.monotonic,
        plugin_dir_guard: Optional[PluginDirGuard] = None,
    ) -> None:
        self.config = config
        self._plugin_dir_guard = plugin_dir_guard or PluginDirGuard()
        self._notifier = notifier
        self._backend_factory = backend_factory
        self._mps_factory = mps_factory
        self._config_loader = config_loader
        self._clock = clock
        # SimpleQueue.put is reentrant: signal handlers may call request_stop().
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.state = DeviceState(Inventory())
        self._servicer = PluginServicer(self.state, mps_policy(config))
        self._server: Optional[PluginServer] = None
        self._backend: Optional[GpuBackend] = None
        self._mps: Optional[MpsDaemons] = None
        self._monitor: Optional[HealthMonitor] = None
        self._gpus: list[Gpu] = []
        self._changed_modes: dict[str, ComputeMode] = {}
        self._kubelet_identity: Optional[tuple[int, int]] = None
        self.registered = False
        self.registrations = 0
        self._next_register_at = 0.0
        self._register_backoff_s = REGISTER_BACKOFF_INITIAL_S
        #: The kubelet socket the last registration attempt went to.
        self._attempted_identity: Optional[tuple[int, int]] = None
        self._waiting_for = "starting"
        self._last_status = ""
        self._next_watchdog_at = 0.0
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self._control: Optional[Any] = None
        self._watch: Optional[DirectoryWatch] = None

    # -- for signal handlers, the control socket and watchers (any thread) ---------------------

    def request_stop(self, why: str = "stop requested") -> None:
        """Ask the loop to stop (safe from a signal handler)."""
        self._events.put(Stop(why))

    def request_reload(self) -> None:
        """Ask the loop to re-read the config (safe from a signal handler)."""
        self._events.put(Reload())

    def submit(self, command: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
        """Run a control command on the loop's thread and return its answer."""
        request = ControlRequest(command)
        self._events.put(request)
        return request.reply.result(timeout=timeout_s)

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
        backend = self._open_backend()
        if backend is None:
            self._notifier.stopping()
            return EXIT_OK
        self._backend = backend
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
                must_restart = self._plugin_dir_guard.check(self.config.plugin.plugin_dir)
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
        delay_s = BACKEND_RETRY_INITIAL_S
        while True:
            try:
                return self._backend_factory(self.config)
            except GpuError as exc:
                self._set_status(f"waiting for the GPU driver: {exc}; retrying in {delay_s:.0f} s")
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
                    event.reply.set_result({"ok": False, "error": "no GPU backend yet"})
            delay_s = min(delay_s * 2, BACKEND_RETRY_MAX_S)

    def _start_serving(self) -> None:
        assert self._backend is not None  # noqa: S101 - set by _run
        gpus = self._backend.list_gpus()
        plan = plan_gpus(self.config, gpus)
        for problem in plan.refused:
            log.warning("%s", problem)
        if not plan.served:
            raise GpuError(
                "no GPU to serve: "
                + ("; ".join(plan.refused) if plan.refused else "the node has no NVIDIA GPU")
            )
        self._gpus = [gpu for gpu, _ in plan.served]
        self._apply_compute_modes()
        self._mps = self._mps_factory(self.config)
        served: list[ServedGpu] = []
        for gpu, replicas in plan.served:
            served.append(self._start_mps(gpu, replicas))
        self.state.set(Inventory(tuple(served)))
        for entry in served:
            log_event(
                log,
                logging.INFO,
                f"serving GPU {entry.gpu.index} ({entry.gpu.model}) as {entry.replicas} vGPUs",
                GPU_UUID=entry.gpu.uuid,
                VGPU_EVENT="gpu-served",
                VGPU_REPLICAS=str(entry.replicas),
            )
        self._start_monitor()
        self._start_control()

    def _start_mps(self, gpu: Gpu, replicas: int) -> ServedGpu:
        if self._mps is None:
            return ServedGpu(gpu, replicas)
        try:
            info = self._mps.start(gpu)
        except MpsError as exc:
            log_event(log, logging.ERROR, str(exc), GPU_UUID=gpu.uuid, VGPU_EVENT="mps-failed")
            pipe_dir = os.path.join(self.config.mps.pipe_root, gpu.uuid)
            return ServedGpu(gpu, replicas, (f"MPS daemon could not start: {exc}",), pipe_dir)
        if not isinstance(self._mps, SimulatedMpsDaemons):
            try:
                sent = apply_daemon_defaults(
                    self.config.mps, info.pipe_dir, gpu.memory_mib, replicas
                )
            except MpsError as exc:
                # A safety net only: pods still get their limits from Allocate.
                log_event(log, logging.WARNING, str(exc), GPU_UUID=gpu.uuid, VGPU_EVENT="mps")
            else:
                for command in sent:
                    log.info("GPU %s MPS daemon: %s", gpu.uuid, command)
        return ServedGpu(gpu, replicas, (), info.pipe_dir)

    def _apply_compute_modes(self) -> None:
        for gpu in self._gpus:
            self._apply_compute_mode(gpu)

    def _apply_compute_mode(self, gpu: Gpu) -> None:
        assert self._backend is not None  # noqa: S101 - set by _run
        setting = self.config.gpus.compute_mode
        if setting == "unchanged":
            return
        wanted = ComputeMode(setting)
        previous = self._backend.get_compute_mode(gpu.uuid)
        if previous is not wanted:
            self._backend.set_compute_mode(gpu.uuid, wanted)
            self._changed_modes.setdefault(gpu.uuid, previous)
        now = self._backend.get_compute_mode(gpu.uuid)
        if now is not wanted:
            raise GpuError(
                f"setting compute mode {wanted.value} on GPU {gpu.uuid}: it reads back as "
                f"{now.value}; check that nothing else changes it (nvidia-smi -q -d COMPUTE)"
            )
        log_event(
            log,
            logging.INFO,
            f"GPU {gpu.index} compute mode is {now.value} (was {previous.value})",
            GPU_UUID=gpu.uuid,
            VGPU_EVENT="compute-mode",
        )

    def _start_monitor(self) -> None:
        assert self._backend is not None  # noqa: S101 - set by _run
        self._monitor = HealthMonitor(
            self._backend,
            self._mps,
            self.config.health,
            [gpu.uuid for gpu in self._gpus],
            emit=self.emit_health,
            clock=self._clock,
            mps_down={
                served.gpu.uuid: reason
                for served in self.state.get().gpus
                for reason in served.unhealthy_reasons
                if reason.startswith(MPS_REASON_PREFIX)
            },
        )
        self._monitor.start()

    def _start_control(self) -> None:
        from vgpu_agent.control import ControlServer

        self._control = ControlServer(
            os.path.join(self.config.agent.state_dir, "control.sock"), self.submit
        )
        try:
            self._control.start()
        except VgpuError as exc:
            log.warning("%s; `vgpu-agent status` will not reach this agent", exc)
            self._control = None

    def _tick(self) -> None:
        self._ping_watchdog()
        self._ensure_watch()
        self._check_registration()

    def _ensure_watch(self) -> None:
        """Watch the plugin directory when it exists (again), so the loop can sleep."""
        if self._watch is not None and self._watch.active:
            return
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        plugin_dir = self.config.plugin.plugin_dir
        if os.path.isdir(plugin_dir):
            watch = DirectoryWatch(plugin_dir, lambda: self._events.put(Wake()))
            if watch.start():
                self._watch = watch

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
        if not self.registered and self._waiting_for != "kubelet":
            timeout = min(timeout, self._next_register_at - now)
        interval = self._notifier.watchdog_interval_s
        if interval is not None:
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

    # -- registration -------------------------------------------------------------------------

    def _plugin_dir(self) -> str:
        return self.config.plugin.plugin_dir

    def _check_registration(self) -> None:
        plugin = self.config.plugin
        kubelet_path = os.path.join(plugin.plugin_dir, plugin.kubelet_socket_name)
        identity = kubelet.kubelet_socket_identity(kubelet_path)
        if identity is None:
            if self.registered or self._waiting_for != "kubelet":
                if self.registered:
                    log.warning("kubelet socket %s disappeared; waiting for kubelet", kubelet_path)
                self.registered = False
                self._waiting_for = "kubelet"
                self._set_status(self._status_line())
            return
        ours_gone = self._server is not None and not self._server.socket_exists()
        if self.registered and identity == self._kubelet_identity and not ours_gone:
            return
        if self.registered:
            log_event(
                log,
                logging.INFO,
                "kubelet restarted (its socket was replaced or ours deleted); registering again",
                VGPU_EVENT="kubelet-restart",
            )
            self.registered = False
            self._register_backoff_s = REGISTER_BACKOFF_INITIAL_S
            self._next_register_at = 0.0
        if identity != self._attempted_identity:
            # A new kubelet socket is a new kubelet: the backoff earned by the old one
            # (up to REGISTER_BACKOFF_MAX_S) must not delay registering with it.
            self._register_backoff_s = REGISTER_BACKOFF_INITIAL_S
            self._next_register_at = 0.0
        if self._clock() < self._next_register_at:
            return
        self._register(identity)

    def _register(self, identity: tuple[int, int]) -> None:
        plugin = self.config.plugin
        self._attempted_identity = identity
        if self._server is not None:
            self._server.stop()
            self._server = None
        socket_path = os.path.join(plugin.plugin_dir, plugin.socket_name)
        kubelet_path = os.path.join(plugin.plugin_dir, plugin.kubelet_socket_name)
        try:
            server = PluginServer(socket_path, self._servicer)
            self._server = server
            server.start()

            def abandon() -> bool:
                # A kubelet that restarts again, or deletes our socket, while we register
                # would only time out (register_timeout_s); give up now and register anew.
                self._ping_watchdog()
                return (
                    kubelet.kubelet_socket_identity(kubelet_path) != identity
                    or not server.socket_exists()
                )

            kubelet.register(
                plugin.plugin_dir,
                plugin.kubelet_socket_name,
                plugin.socket_name,
                plugin.resource_name,
                plugin.register_timeout_s,
                abandon=abandon,
            )
        except VgpuError as exc:
            delay_s = self._register_backoff_s
            self._next_register_at = self._clock() + delay_s
            self._register_backoff_s = min(delay_s * 2, REGISTER_BACKOFF_MAX_S)
            self._waiting_for = f"registration ({exc}); retrying in {delay_s:.1f} s"
            self._set_status(self._status_line())
            log.warning("registering with the kubelet failed: %s; retrying in %.1f s", exc, delay_s)
            return
        self._kubelet_identity = identity
        self.registered = True
        self.registrations += 1
        self._waiting_for = ""
        self._register_backoff_s = REGISTER_BACKOFF_INITIAL_S
        log_event(
            log,
            logging.INFO,
            f"registered with the kubelet as {plugin.resource_name} on {socket_path}",
            VGPU_EVENT="registered",
        )
        self._set_status(self._status_line())

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
        before = self.state.get().get(change.gpu_uuid)
        if before is None:
            return
        had = change.reason in before.unhealthy_reasons
        if had == change.present:
            return
        self.state.update(
            lambda inv: inv.with_reason(change.gpu_uuid, change.reason, change.present)
        )
        after = self.state.get().get(change.gpu_uuid)
        healthy = after is not None and after.healthy
        verb = "" if change.present else "cleared "
        fields = {
            "GPU_UUID": change.gpu_uuid,
            "VGPU_EVENT": "health",
            "VGPU_HEALTH": "Healthy" if healthy else "Unhealthy",
            "VGPU_REASON": change.reason,
        }
        if change.xid is not None:
            fields["XID"] = str(change.xid)
        detail = f" ({change.detail})" if change.detail else ""
        log_event(
            log,
            logging.WARNING if change.present else logging.INFO,
            f"GPU {change.gpu_uuid}: {verb}{change.reason}{detail}; its vGPUs are now "
            f"{fields['VGPU_HEALTH']}",
            **fields,
        )
        self._set_status(self._status_line())

    def _reload(self) -> None:
        self._notifier.reloading()
        if self._config_loader is None:
            log.info("reload requested, but the config was not loaded from a file; nothing to do")
            self._notifier.ready(self._status_line())
            return
        try:
            new = self._config_loader()
        except ConfigError as exc:
            log.error("reload: keeping the running config, the new one is invalid: %s", exc)
            self._notifier.ready(self._status_line())
            return
        assert self._backend is not None  # noqa: S101 - set by _run
        try:
            node_gpus = self._backend.list_gpus()
        except GpuError as exc:
            log.warning("reload: listing the GPUs failed (%s); considering those served now", exc)
            node_gpus = self._gpus
        plan = plan_gpus(new, node_gpus)
        if not plan.served:
            # At start such a config is refused; on reload it would silently withdraw every
            # vGPU from the kubelet.
            log.error(
                "reload: keeping the running config, the new one serves no GPU: %s",
                "; ".join(plan.refused) or "no GPU selected",
            )
            self._notifier.ready(self._status_line())
            return
        old = self.config
        self.config = new
        set_level(new.agent.log_level)
        self._servicer.set_mps_policy(mps_policy(new))
        for problem in plan.refused:
            log.warning("reload: %s", problem)
        replicas = {gpu.uuid: count for gpu, count in plan.served}
        served_before = {served.gpu.uuid for served in self.state.get().gpus}
        added: list[ServedGpu] = []
        for gpu, count in plan.served:
            if gpu.uuid in served_before:
                continue
            entry = self._serve_added(gpu, count)
            if entry is None:
                del replicas[gpu.uuid]
            else:
                added.append(entry)

        def resize(inventory: Inventory) -> Inventory:
            kept = [
                dataclasses.replace(served, replicas=replicas[served.gpu.uuid])
                for served in inventory.gpus
                if served.gpu.uuid in replicas
            ]
            return Inventory(tuple(sorted(kept + added, key=lambda served: served.gpu.index)))

        self.state.update(resize)
        gpus_changed = {gpu.uuid for gpu in self._gpus} != set(replicas)
        self._gpus = [gpu for gpu, _ in plan.served if gpu.uuid in replicas]
        if old.plugin != new.plugin:
            log.info("reload: plugin settings changed; registering again")
            if self._server is not None:
                self._server.stop()
                self._server = None
            self.registered = False
            self._next_register_at = 0.0
            self._stop_watch()
        if (old.health != new.health or gpus_changed) and self._monitor is not None:
            self._monitor.stop()
            self._start_monitor()
        log_event(
            log,
            logging.INFO,
            f"reloaded {new.source}: {self.state.get().vgpu_count} vGPUs",
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

    def _control_command(self, command: dict[str, Any]) -> dict[str, Any]:
        name = command.get("command")
        if name == "status":
            return {"ok": True, **self.describe()}
        if name == "health-reset":
            gpu = self._find_gpu(command.get("gpu"))
            cleared = self._monitor.reset(gpu.uuid) if self._monitor is not None else []
            # The reset's changes are queued; apply them now so the answer is true.
            self._drain_health()
            return {"ok": True, "gpu": gpu.uuid, "cleared": cleared}
        if name == "simulate":
            return self._simulate(command)
        raise VgpuError(f"unknown control command {name!r}")

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

    def _find_gpu(self, ref: object) -> Gpu:
        for gpu in self._gpus:
            if ref in (gpu.uuid, str(gpu.index)) or ref == gpu.index:
                return gpu
        known = ", ".join(f"{gpu.index}={gpu.uuid}" for gpu in self._gpus)
        raise VgpuError(f"no served GPU {ref!r} (served: {known})")

    def _simulate(self, command: dict[str, Any]) -> dict[str, Any]:
        backend = self._backend
        if not isinstance(backend, SimulatedBackend):
            raise VgpuError("simulate works only with the simulated backend (gpus.backend)")
        action = command.get("action")
        gpu = self._find_gpu(command.get("gpu"))
        if action == "xid":
            xid = command.get("xid")
            if not isinstance(xid, int):
                raise VgpuError("simulate xid needs an XID number")
            backend.inject_xid(gpu.uuid, xid)
        elif action == "ecc":
            backend.inject_double_bit_ecc(gpu.uuid)
        elif action == "lose":
            backend.lose(gpu.uuid)
        elif action == "recover":
            backend.recover(gpu.uuid)
        elif action in ("mps-down", "mps-up"):
            if not isinstance(self._mps, SimulatedMpsDaemons):
                raise VgpuError("MPS is off in this config; nothing to simulate")
            reason = "MPS daemon down (simulated)" if action == "mps-down" else None
            self._mps.set_down(gpu.uuid, reason)
        else:
            raise VgpuError(f"unknown simulate action {action!r}")
        return {"ok": True, "gpu": gpu.uuid, "action": action}

    # -- status -----------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What `vgpu-agent status` shows: the agent, each GPU and its health."""
        inventory = self.state.get()
        return {
            "status": self._status_line(),
            "resource_name": self.config.plugin.resource_name,
            "registered": self.registered,
            "registrations": self.registrations,
            "gpus": [
                {
                    "index": served.gpu.index,
                    "uuid": served.gpu.uuid,
                    "model": served.gpu.model,
                    "memory_mib": served.gpu.memory_mib,
                    "replicas": served.replicas,
                    "healthy": served.healthy,
                    "reasons": list(served.unhealthy_reasons),
                    "pipe_dir": served.pipe_dir,
                    "vgpu_ids": served.vgpu_ids,
                }
                for served in inventory.gpus
            ],
        }

    def _status_line(self) -> str:
        inventory = self.state.get()
        plugin = self.config.plugin
        line = (
            f"serving {inventory.vgpu_count} vGPUs on {len(inventory.gpus)} GPUs "
            f"as {plugin.resource_name}"
        )
        unhealthy = [served for served in inventory.gpus if not served.healthy]
        if unhealthy:
            causes = "; ".join(
                f"GPU {served.gpu.index}: {', '.join(served.unhealthy_reasons)}"
                for served in unhealthy
            )
            line += f"; {inventory.unhealthy_vgpu_count} unhealthy ({causes})"
        if self.registered:
            line += "; registered with kubelet"
        elif self._waiting_for:
            line += f"; waiting for {self._waiting_for}"
        return line

    def _set_status(self, line: str) -> None:
        if line != self._last_status:
            self._last_status = line
            self._notifier.status(line)

    # -- shutdown ---------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        self._notifier.stopping()
        self._stop_watch()
        if self._monitor is not None:
            self._monitor.stop()
        if self._control is not None:
            self._control.stop()
        self.state.close()
        if self._server is not None:
            self._server.stop()
            self._server = None
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
