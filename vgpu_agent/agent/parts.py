"""What the agent is handed: the collaborators it works through, as Protocols and factories.

:class:`AgentParts` lists every one; :func:`vgpu_agent.runtime.compose.build_agent` fills it
(and tests fill it with fakes). Nothing here does anything: it only says what the agent
needs from the outside.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

from vgpu_agent.agent.faults import FaultLog, FaultObserver, NoObserver
from vgpu_agent.agent.health import Emit
from vgpu_agent.agent.offenders import OffenderPolicy
from vgpu_agent.agent.registration import Registrar
from vgpu_agent.config.schema import Config, HealthConfig, PluginConfig
from vgpu_agent.host.sandbox import PluginDirGuard
from vgpu_agent.host.systemd import Notifier
from vgpu_agent.model.commands import ControlCommand, FaultInjector
from vgpu_agent.model.daemons import DaemonLogs, MpsDaemons
from vgpu_agent.model.devices import HealthReason, Inventory
from vgpu_agent.model.gpu import GpuBackend
from vgpu_agent.model.node import Node

BACKEND_RETRY_INITIAL_S = 1.0
BACKEND_RETRY_MAX_S = 30.0


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


class Observer(FaultObserver, Protocol):
    """What the agent tells about itself beyond the kubelet: attribution, metrics, labels
    (:class:`vgpu_agent.observability.service.Observability`), and what the fault log reads
    and counts."""

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
    #: The MPS daemons' output, read for the culprit of each fault (None: not read, e.g.
    #: mps.manager = "external" or simulated daemons).
    make_daemon_logs: Callable[[Config], Optional[DaemonLogs]] = field(default=lambda config: None)
    #: Re-reads the config on reload; None when it was not loaded from a file.
    config_loader: Optional[Callable[[], Config]] = None
    clock: Callable[[], float] = time.monotonic
    backend_retry_initial_s: float = BACKEND_RETRY_INITIAL_S
    backend_retry_max_s: float = BACKEND_RETRY_MAX_S
    #: Says when the sandbox lost the plugin directory (exit 75 for a fresh one).
    plugin_dir_guard: PluginDirGuard = field(default_factory=PluginDirGuard)


def fault_log_for(config: Config, parts: AgentParts) -> FaultLog:
    """The agent's fault log: pods from the observer's latest attribution and its counters
    (none of either without an observer), and the offender policy of ``[faults]`` on the
    agent's clock. The daemons' output comes once the GPUs are up (:func:`daemon_logs_for`)."""
    observer: FaultObserver = parts.observer if parts.observer is not None else NoObserver()
    return FaultLog(
        observer,
        OffenderPolicy(config.faults, clock=parts.clock),
        None,
        no_daemon_logs="no GPU is served yet",
    )


def daemon_logs_for(config: Config, parts: AgentParts) -> tuple[Optional[DaemonLogs], str]:
    """The MPS daemons' output the fault log reads for culprits, and why there is none
    when there is none."""
    if config.mps.manager == "external":
        unread = "mps.manager = \"external\": the daemons' output is not the agent's to read"
    else:
        unread = "the MPS daemons are simulated: they write no output"
    return parts.make_daemon_logs(config), unread
