"""The composition root: the one place that chooses and builds the agent's collaborators.

:func:`build_agent` picks the GPU backend (NVML, or the simulated one), the MPS daemon
manager (real, or simulated daemons), and builds the node, the device plugin server, the
registrar, the health checks, the control socket and the directory watch, then hands them
to :class:`~vgpu_agent.agent.loop.Agent`. Nothing else in the product asks whether a GPU or an
MPS daemon is simulated. Tests pass fakes for any of the parts.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional

from vgpu_agent.agent.health import HealthMonitor
from vgpu_agent.agent.loop import Agent
from vgpu_agent.agent.parts import (
    BACKEND_RETRY_INITIAL_S,
    BACKEND_RETRY_MAX_S,
    AgentParts,
    ControlFactory,
    HealthChecks,
    HealthChecksFactory,
    HealthScope,
    Observer,
    RegistrarFactory,
    Watch,
    WatchFactory,
)
from vgpu_agent.agent.registration import Register, Registrar
from vgpu_agent.config.dra import resolve_node_name
from vgpu_agent.config.plan import simulated_mps
from vgpu_agent.config.schema import Config, PluginConfig
from vgpu_agent.frontends.deviceplugin import kubelet
from vgpu_agent.frontends.deviceplugin.server import PluginServer, PluginServicer
from vgpu_agent.frontends.dra.plugin import DraPlugin
from vgpu_agent.frontends.dra.types import ResourceApi
from vgpu_agent.host.control import ControlServer
from vgpu_agent.host.sandbox import PluginDirGuard
from vgpu_agent.host.sockets import socket_identity
from vgpu_agent.host.systemd import Notifier
from vgpu_agent.host.watch import DirectoryWatch
from vgpu_agent.model.commands import ControlCommand, FaultInjector
from vgpu_agent.model.daemons import DaemonLogs, MpsDaemons, MpsInspector
from vgpu_agent.model.gpu import ComputeMode, GpuBackend
from vgpu_agent.model.node import Node
from vgpu_agent.observability.attribution import gather
from vgpu_agent.observability.enforcement import EndClient, HeldPods, process_start_s
from vgpu_agent.observability.excess import StartTime
from vgpu_agent.observability.podresources import PodResourcesClient
from vgpu_agent.observability.service import AgentCounts, Gather, Observability
from vgpu_agent.standins.simulated import (
    SIMULATED_DRIVER_VERSION,
    SimulatedMpsInspector,
    Simulation,
)


def open_nvml(config: Config) -> GpuBackend:
    """The NVML backend; raises GpuError when the driver cannot be opened."""
    from vgpu_agent.gpus.nvml import NvmlBackend  # pynvml is only needed on real nodes

    return NvmlBackend()


def real_mps(config: Config) -> Optional[MpsDaemons]:
    """The MPS manager ``mps.manager`` names (None when MPS is off)."""
    if not config.mps.enabled:
        return None
    from vgpu_agent.mps.daemons import build_mps_daemons

    return build_mps_daemons(config.mps)


def real_daemon_logs(config: Config) -> Optional[DaemonLogs]:
    """The output of the MPS daemons ``mps.manager`` runs, read for each fault's culprit
    (None when MPS is off or the daemons are someone else's)."""
    from vgpu_agent.mps.daemon_log import daemon_logs_for

    return daemon_logs_for(config.mps)


def open_backend_for(config: Config) -> GpuBackend:
    """The GPU backend ``gpus.backend`` names, for the commands that only look at GPUs
    (`gpus`, `mps`, doctor); raises GpuError when it cannot start."""
    if config.gpus.backend == "simulated":
        return Simulation.from_config(config).backend
    return open_nvml(config)


def inspected_backend_for(config: Config) -> GpuBackend:
    """The GPUs as doctor inspects them from outside the agent. Simulated GPUs keep their
    compute mode inside the agent's process, so doctor sees them as the agent leaves them
    and a simulated node checks clean."""
    if config.gpus.backend != "simulated":
        return open_nvml(config)
    backend = Simulation.from_config(config).backend
    if config.gpus.compute_mode != "unchanged":
        wanted = ComputeMode(config.gpus.compute_mode)
        for gpu in backend.list_gpus():
            backend.set_compute_mode(gpu.uuid, wanted)
    return backend


def mps_inspector_for(config: Config) -> MpsInspector:
    """How doctor inspects the MPS daemons ``config`` describes: simulated ones when the
    simulated backend simulates them, else the host's."""
    if config.gpus.backend == "simulated" and simulated_mps(config):
        return SimulatedMpsInspector(config.mps.multi_user)
    from vgpu_agent.mps.daemons import HostMpsInspector

    return HostMpsInspector(config.mps)


def plugin_registrar(
    node: Node,
    clock: Callable[[], float],
    register: Optional[Register] = None,
    observe_latency: Optional[Callable[[str, float], None]] = None,
) -> RegistrarFactory:
    """Registrars that serve ``node`` on the plugin socket and register it with the
    kubelet (``register`` replaces the kubelet call, for tests); ``observe_latency`` is told
    how long each Allocate and GetPreferredAllocation took."""
    servicer = PluginServicer(node, observe_latency=observe_latency)

    def make(plugin: PluginConfig, on_wait: Callable[[], None]) -> Registrar:
        def serve() -> PluginServer:
            server = PluginServer(plugin.socket_path, servicer)
            server.start()
            return server

        def register_with_kubelet(abandon: Callable[[], bool]) -> None:
            kubelet.register(
                plugin.plugin_dir,
                plugin.kubelet_socket_name,
                plugin.socket_name,
                plugin.resource_name,
                plugin.register_timeout_s,
                abandon=abandon,
            )

        return Registrar(
            kubelet_identity=lambda: socket_identity(plugin.kubelet_socket_path),
            serve=serve,
            register=register if register is not None else register_with_kubelet,
            clock=clock,
            on_wait=on_wait,
            description=f"{plugin.resource_name} on {plugin.socket_path}",
            kubelet_socket=plugin.kubelet_socket_path,
        )

    return make


def kube_resource_api(config: Config) -> ResourceApi:
    """The API server client for DRA mode, with the credentials ``dra.kubeconfig`` names;
    DraApiError (a VgpuError) when they cannot be read."""
    # Imported here: the Kubernetes client library is only needed in DRA mode.
    from vgpu_agent.frontends.dra.kubeapi import from_kubeconfig

    return from_kubeconfig(config.dra.kubeconfig)


def dra_registrar(
    plugin: DraPlugin, clock: Callable[[], float], register: Optional[Register] = None
) -> RegistrarFactory:
    """Registrars that serve ``plugin``'s sockets and wait for the kubelet's plugin watcher
    to accept them (``register`` replaces that wait, for tests)."""

    def make(plugin_config: PluginConfig, on_wait: Callable[[], None]) -> Registrar:
        return Registrar(
            kubelet_identity=plugin.registry_identity,
            serve=plugin.serve,
            register=register if register is not None else plugin.register,
            clock=clock,
            on_wait=on_wait,
            description=plugin.description,
            kubelet_socket=plugin.dra.registration_socket_path,
            directory_hint=(
                "set dra.registry_dir to the kubelet's plugin registration directory, usually "
                "/var/lib/kubelet/plugins_registry"
            ),
        )

    return make


def build_dra_plugin(
    config: Config,
    node: Node,
    api: ResourceApi,
    backend: Callable[[], Optional[GpuBackend]],
    observe_latency: Optional[Callable[[str, float], None]] = None,
) -> DraPlugin:
    """The DRA kubelet plugin for ``config`` over ``node``; ``backend()`` is the GPU backend
    once the agent opened it (for the driver version attribute)."""

    def driver_version() -> str:
        opened = backend()
        version_of = getattr(opened, "driver_version", None)
        if callable(version_of):
            return str(version_of())
        return SIMULATED_DRIVER_VERSION if config.gpus.backend == "simulated" else ""

    return DraPlugin(
        node,
        api,
        config.dra,
        node_name=resolve_node_name(config.dra, os.environ, socket.gethostname()),
        state_dir=config.agent.state_dir,
        register_timeout_s=config.plugin.register_timeout_s,
        driver_version=driver_version,
        observe_latency=observe_latency,
    )


def health_monitor(clock: Callable[[], float]) -> HealthChecksFactory:
    """Health checks by :class:`~vgpu_agent.agent.health.HealthMonitor` threads."""

    def make(scope: HealthScope) -> HealthChecks:
        return HealthMonitor(
            scope.backend,
            scope.mps,
            scope.config,
            scope.gpu_uuids,
            emit=scope.emit,
            clock=clock,
            mps_down=scope.mps_down,
            probe_timeout_s=scope.probe_timeout_s,
        )

    return make


def control_server(path: str, handler: Callable[[ControlCommand], dict[str, Any]]) -> ControlServer:
    """The control socket server at ``path``."""
    return ControlServer(path, handler)


def client_ender(simulation: Optional[Simulation]) -> EndClient:
    """How the per-pod policy ends an MPS client: ``terminate_client`` through the GPU's
    daemon, or, where the daemons are simulated, by removing the simulated client."""
    if simulation is not None and simulation.mps is not None:
        return simulation.end_client
    from vgpu_agent.mps.clients import end_client

    return end_client


def build_observability(
    config: Config,
    node: Node,
    agent: Callable[[], Optional[Agent]],
    gather_attribution: Gather = gather,
    *,
    end_client: Optional[EndClient] = None,
    held_pods: Optional[HeldPods] = None,
    client_start_time: StartTime = process_start_s,
) -> Observability:
    """Attribution, metrics and node labels for ``node``, reading the registration counts
    of the agent ``agent()`` returns (built after it); ``gather_attribution`` asks the
    sources (tests and the demo point it at a /proc and cgroup tree of their own);
    ``end_client`` ends the MPS clients the per-pod policy acts on (None: no policy),
    ``held_pods`` names the pods held at none, ``client_start_time`` says when a client
    started (tests point it at a /proc of their own)."""

    pod_resources = PodResourcesClient()

    def counts() -> AgentCounts:
        built = agent()
        if built is None:
            return AgentCounts(registered=False)
        return AgentCounts(built.registered, built.registrations, built.kubelet_restarts)

    return Observability(
        config,
        inventory=node.inventory,
        counts=counts,
        policy=lambda: node.grant_policy,
        list_pods=pod_resources,
        close_sources=pod_resources.close,
        gather_attribution=gather_attribution,
        end_client=end_client,
        held_pods=held_pods,
        client_start_time=client_start_time,
    )


def latency_observer(observed: Observability) -> Callable[[str, float], None]:
    """Sends the plugin's call times to the metrics (when they are on)."""

    def observe(method: str, seconds: float) -> None:
        if method == "Allocate":
            observed.observe_allocate(seconds)
        elif method == "GetPreferredAllocation":
            observed.observe_preferred_allocation(seconds)

    return observe


def watch_directory(path: str, wake: Callable[[], None]) -> Optional[Watch]:
    """An inotify watch on ``path`` calling ``wake``; None when it does not exist or cannot
    be watched (the loop then polls)."""
    if not os.path.isdir(path):
        return None
    watch = DirectoryWatch(path, wake)
    return watch if watch.start() else None


def build_agent(
    config: Config,
    *,
    notifier: Notifier,
    config_loader: Optional[Callable[[], Config]] = None,
    clock: Callable[[], float] = time.monotonic,
    open_backend: Optional[Callable[[Config], GpuBackend]] = None,
    make_mps: Optional[Callable[[Config], Optional[MpsDaemons]]] = None,
    make_daemon_logs: Optional[Callable[[Config], Optional[DaemonLogs]]] = None,
    faults: Optional[FaultInjector] = None,
    register: Optional[Register] = None,
    make_health_checks: Optional[HealthChecksFactory] = None,
    make_control: Optional[ControlFactory] = None,
    watch: Optional[WatchFactory] = None,
    observer: Optional[Observer] = None,
    gather_attribution: Gather = gather,
    held_pods: Optional[HeldPods] = None,
    client_start_time: StartTime = process_start_s,
    backend_retry_initial_s: float = BACKEND_RETRY_INITIAL_S,
    backend_retry_max_s: float = BACKEND_RETRY_MAX_S,
    plugin_dir_guard: Optional[PluginDirGuard] = None,
    make_resource_api: Optional[Callable[[Config], ResourceApi]] = None,
    dra_plugin: Optional[list[DraPlugin]] = None,
) -> Agent:
    """The agent for ``config`` with every collaborator built; each keyword replaces one
    (tests hand in fakes). ``notifier`` speaks to systemd; ``config_loader`` re-reads the
    config on reload; ``held_pods`` names the pods the per-pod client policy holds at no
    MPS client (pod UID -> why), and ``client_start_time`` says when a client process
    started."""
    simulation: Optional[Simulation] = None
    if config.gpus.backend == "simulated":
        simulation = Simulation.from_config(config)
        backend = simulation.backend
        simulated_daemons = simulation.mps

        def default_backend(_config: Config) -> GpuBackend:
            return backend

        def default_mps(config: Config) -> Optional[MpsDaemons]:
            if simulated_daemons is not None:
                return simulated_daemons
            return real_mps(config)  # a stand-in control program the config names

        def default_daemon_logs(config: Config) -> Optional[DaemonLogs]:
            # Simulated daemons write nothing; a stand-in control program does.
            return None if simulated_daemons is not None else real_daemon_logs(config)

        chosen_backend: Callable[[Config], GpuBackend] = default_backend
        chosen_mps: Callable[[Config], Optional[MpsDaemons]] = default_mps
        chosen_logs: Callable[[Config], Optional[DaemonLogs]] = default_daemon_logs
        if faults is None and open_backend is None and make_mps is None:
            faults = simulation
    else:
        chosen_backend, chosen_mps, chosen_logs = open_nvml, real_mps, real_daemon_logs
    node = Node()  # the agent sets its grant policy from the config
    built: list[Agent] = []
    observe_latency: Optional[Callable[[str, float], None]] = None
    if held_pods is None:
        # The repeat offenders of the fault policy (agent/offenders.py) run no MPS client.
        def offenders_held() -> Mapping[str, str]:
            return built[0].offenders.held() if built else {}

        held_pods = offenders_held

    if observer is None:
        observed = build_observability(
            config,
            node,
            lambda: built[0] if built else None,
            gather_attribution,
            end_client=client_ender(simulation),
            held_pods=held_pods,
            client_start_time=client_start_time,
        )
        observe_latency = latency_observer(observed)
        observer = observed
    opened: list[GpuBackend] = []
    backend_opener = open_backend or chosen_backend

    def open_and_remember(config: Config) -> GpuBackend:
        backend = backend_opener(config)
        opened.append(backend)
        return backend

    make_registrar: RegistrarFactory
    if config.dra.enabled:
        # One frontend per node, never both: the device plugin is not served in DRA mode.
        api = (make_resource_api or kube_resource_api)(config)
        dra = build_dra_plugin(
            config, node, api, lambda: opened[-1] if opened else None, observe_latency
        )
        if dra_plugin is not None:
            dra_plugin.append(dra)
        make_registrar = dra_registrar(dra, clock, register)
    else:
        make_registrar = plugin_registrar(node, clock, register, observe_latency)
    parts = AgentParts(
        node=node,
        notifier=notifier,
        open_backend=open_and_remember,
        make_mps=make_mps or chosen_mps,
        make_registrar=make_registrar,
        make_health_checks=make_health_checks or health_monitor(clock),
        make_control=make_control or control_server,
        watch_directory=watch or watch_directory,
        faults=faults,
        observer=observer,
        make_daemon_logs=make_daemon_logs or chosen_logs,
        config_loader=config_loader,
        clock=clock,
        backend_retry_initial_s=backend_retry_initial_s,
        backend_retry_max_s=backend_retry_max_s,
        plugin_dir_guard=plugin_dir_guard or PluginDirGuard(),
    )
    agent = Agent(config, parts)
    built.append(agent)
    return agent
