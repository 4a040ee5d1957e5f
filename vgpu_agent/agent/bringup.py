"""Bringing the served GPUs up, and leaving them as found at stop.

Opening the GPU backend (retried while the driver is not there yet), then for each GPU the
config serves: its compute mode, its MPS daemon and the daemon's ceiling, and the health
checks that watch them. At stop the compute modes the agent changed are restored; the MPS
daemons are left running (jobs using them outlive agent restarts).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from vgpu_agent.agent.health import Emit
from vgpu_agent.agent.isolation import daemon_gate
from vgpu_agent.agent.parts import AgentParts, HealthChecks, HealthChecksFactory, HealthScope
from vgpu_agent.config.plan import daemon_ceiling, plan_gpus, slice_warnings
from vgpu_agent.config.schema import Config
from vgpu_agent.host.log import log_event
from vgpu_agent.model.daemons import MpsDaemons
from vgpu_agent.model.devices import CEILING_TEXT, HealthReason, Inventory, ReasonKind, ServedGpu
from vgpu_agent.model.errors import ConfigError, GpuError, MpsError
from vgpu_agent.model.gpu import ComputeMode, Gpu, GpuBackend, set_compute_mode
from vgpu_agent.model.node import Node

log = logging.getLogger(__name__)


def open_gpus(
    config: Config,
    parts: AgentParts,
    *,
    emit: Emit,
    on_failure: Callable[[str], None],
    pause: Callable[[float], bool],
) -> Optional[GpuBringUp]:
    """Open the GPU backend, retrying while the driver is not there yet (boot), with a
    doubling delay; the GPUs ready to bring up through it. ``on_failure`` is told why the
    backend is not open and when it is retried; ``pause(delay_s)`` waits between tries and
    returns False when the agent must stop instead (then None is returned). Health changes
    go to ``emit``."""
    delay_s = parts.backend_retry_initial_s
    while True:
        try:
            backend = parts.open_backend(config)
            break
        except GpuError as exc:
            on_failure(f"{exc}; retrying in {delay_s:.0f} s")
            log.warning("opening the GPU backend failed: %s; retrying in %.0f s", exc, delay_s)
        if not pause(delay_s):
            return None
        delay_s = min(delay_s * 2, parts.backend_retry_max_s)
    return GpuBringUp(
        backend,
        parts.node,
        make_mps=parts.make_mps,
        make_health_checks=parts.make_health_checks,
        emit=emit,
    )


class GpuBringUp:
    """The hardware side of the served GPUs, through an open GPU backend: compute modes,
    MPS daemons and their ceilings, health checks. Each call takes the config it works to
    (a reload changes it)."""

    def __init__(
        self,
        backend: GpuBackend,
        node: Node,
        *,
        make_mps: Callable[[Config], Optional[MpsDaemons]],
        make_health_checks: HealthChecksFactory,
        emit: Emit,
    ) -> None:
        self.backend = backend
        #: The MPS daemons; None before :meth:`serve` and when MPS is off.
        self.mps: Optional[MpsDaemons] = None
        self.node = node
        self._make_mps = make_mps
        self._make_health_checks = make_health_checks
        self._emit = emit
        self._health: Optional[HealthChecks] = None
        self._changed_modes: dict[str, ComputeMode] = {}

    def serve(self, config: Config) -> None:
        """Bring up the GPUs ``config`` serves, hand them to the node and start watching
        them; raises ConfigError when there is none to serve, GpuError when a compute mode
        cannot be set."""
        plan = plan_gpus(config, self.backend.list_gpus())
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
            for warning in slice_warnings(config, gpu.model, gpu.memory_mib):
                log.warning("GPU %s (%s): %s", gpu.index, gpu.uuid, warning)
        for gpu, _ in plan.served:
            self.apply_compute_mode(config, gpu)
        self.mps = self._make_mps(config)
        if self.mps is not None:
            self.node.set_daemon_gate(daemon_gate(self.mps))
        served = [self.start_mps(config, gpu, replicas) for gpu, replicas in plan.served]
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
        self.start_health_checks(config)

    def serve_added(self, config: Config, gpu: Gpu, replicas: int) -> Optional[ServedGpu]:
        """Prepare a GPU a reload adds: its compute mode, then its MPS daemon; None (and
        the GPU is not served) when its compute mode cannot be set."""
        try:
            self.apply_compute_mode(config, gpu)
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
        return self.start_mps(config, gpu, replicas)

    def start_mps(self, config: Config, gpu: Gpu, replicas: int) -> ServedGpu:
        """Start the GPU's MPS daemon and set its ceiling; the GPU as served (Unhealthy
        when the daemon did not start, or an enforced ceiling could not be set)."""
        if self.mps is None:
            return ServedGpu(gpu, replicas)
        try:
            info = self.mps.start(gpu)
        except MpsError as exc:
            log_event(log, logging.ERROR, str(exc), GPU_UUID=gpu.uuid, VGPU_EVENT="mps-failed")
            reason = HealthReason.mps_down(f"MPS daemon could not start: {exc}")
            return ServedGpu(gpu, replicas, (reason,), config.mps.pipe_dir(gpu.uuid))
        reasons = self.apply_ceiling(config, gpu, replicas)
        return ServedGpu(gpu, replicas, reasons, info.pipe_dir)

    def apply_ceiling(self, config: Config, gpu: Gpu, replicas: int) -> tuple[HealthReason, ...]:
        """Set the GPU's daemon ceiling (mps.confinement), which the daemon manager's probe
        then keeps; the reason to mark the GPU Unhealthy when an enforced ceiling cannot be
        set."""
        assert self.mps is not None  # noqa: S101 - only called with MPS
        try:
            ceiling = daemon_ceiling(config.mps, gpu.memory_mib, replicas)
            sent = self.mps.apply_defaults(gpu, ceiling)
        except MpsError as exc:
            log_event(log, logging.ERROR, str(exc), GPU_UUID=gpu.uuid, VGPU_EVENT="mps")
            if config.mps.confinement == "enforced":
                # Without its ceiling a pod could take the whole GPU: not served until the
                # probe has set it and read it back.
                return (HealthReason.mps_down(f"{CEILING_TEXT} not set: {exc}"),)
            return ()
        for command in sent:
            log.info("GPU %s MPS daemon: %s", gpu.uuid, command)
        return ()

    def apply_compute_mode(self, config: Config, gpu: Gpu) -> None:
        """Set the compute mode gpus.compute_mode asks for; raises GpuError when it cannot."""
        setting = config.gpus.compute_mode
        if setting == "unchanged":
            return
        wanted = ComputeMode(setting)
        previous = set_compute_mode(
            self.backend,
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

    # -- health checks ---------------------------------------------------------------------

    def start_health_checks(self, config: Config) -> None:
        """Start health checks on the GPUs the node serves now."""
        inventory = self.node.inventory()
        scope = HealthScope(
            backend=self.backend,
            mps=self.mps,
            config=config.health,
            probe_timeout_s=config.mps.control_timeout_s,
            gpu_uuids=[served.gpu.uuid for served in inventory.gpus],
            emit=self._emit,
            mps_down={
                served.gpu.uuid: reason
                for served in inventory.gpus
                for reason in served.unhealthy_reasons
                if reason.kind is ReasonKind.MPS
            },
        )
        self._health = self._make_health_checks(scope)
        self._health.start()

    def restart_health_checks(self, config: Config) -> None:
        """Watch the GPUs the node serves now, with ``config``'s health settings."""
        if self._health is not None:
            self._health.stop()
            self.start_health_checks(config)

    def reset_health(self, gpu_uuid: str) -> list[HealthReason]:
        """Clear the GPU's fault reasons (the changes are emitted); returns them."""
        return self._health.reset(gpu_uuid) if self._health is not None else []

    def stop_health_checks(self) -> None:
        """Stop the health checks and wait for them."""
        if self._health is not None:
            self._health.stop()

    # -- stop ------------------------------------------------------------------------------

    def close(self, config: Config) -> None:
        """Restore the compute modes the agent changed (gpus.restore_compute_mode) and
        close the backend. The MPS daemons are left running on purpose: jobs using them
        outlive agent restarts."""
        if config.gpus.restore_compute_mode:
            for gpu_uuid, previous in self._changed_modes.items():
                try:
                    self.backend.set_compute_mode(gpu_uuid, previous)
                    log.info("restored compute mode %s on GPU %s", previous.value, gpu_uuid)
                except GpuError as exc:
                    log.error("restoring the compute mode of GPU %s: %s", gpu_uuid, exc)
        try:
            self.backend.close()
        except GpuError as exc:
            log.warning("closing the GPU backend: %s", exc)
