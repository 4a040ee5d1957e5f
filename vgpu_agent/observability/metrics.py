"""Prometheus metrics: the only module that imports prometheus_client.

:class:`AgentMetrics` owns a private registry with three kinds of metric:

- histograms the agent updates as things happen (Allocate and GetPreferredAllocation
  latency);
- metrics read from a :class:`NodeView` of the node on each scrape, by a custom collector
  (vGPUs by state, MPS daemons, MPS clients, per container vGPUs, limits and memory, the
  registrations and kubelet restarts the agent counts, and the XID events and health
  changes counted as they are reported);
- counters and a gauge the fault log updates: application faults under MPS by the pods they
  hit and by their culprit, repeat offenders, and the pods held.

Label sets are bounded: GPUs, the containers that hold vGPUs on this node, XID numbers and a
fixed set of unhealthy reason kinds. An event counter whose labels are known before its
first event (per served GPU: each health it can turn to, and the :data:`PRESET_XIDS`) is
exported at 0 from the start: Prometheus' ``increase()`` and ``rate()`` count a rise between
two samples, so a series that first appeared already at 1 would hide its first event.

:class:`MetricsServer` serves ``/metrics`` over HTTP; :func:`write_textfile` writes the
same text for node-exporter's textfile collector, through a temporary file renamed into
place, so a reader never sees half a file.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any, Callable, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import write_to_textfile
from prometheus_client.registry import Collector

from vgpu_agent.model.devices import HealthReason, Inventory, ReasonKind
from vgpu_agent.model.errors import AgentError
from vgpu_agent.observability.attribution import Attribution

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: Allocate and GetPreferredAllocation answer in well under a millisecond; the kubelet's
#: own timeout is seconds.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
#: The reason kinds ``vgpu_gpu_unhealthy`` reports (a bounded set; the text is in status).
REASON_KINDS = ("xid", "double_bit_ecc", "gpu_lost", "mps_daemon", "mps_ceiling")
#: XIDs whose ``vgpu_xid_events_total`` series exist at 0 on every served GPU (unless
#: ``health.ignored_xids`` lists them) before their first event: the GPU and driver faults
#: NVIDIA's XID catalogue lists as the common ones on data-centre GPUs (48 double-bit ECC,
#: 63/64 row remapping, 74 NVLink, 79 fallen off the bus, 94/95 contained and uncontained
#: ECC, 119/120 GSP). The set of XIDs is open: any other gets its series at its first
#: event, which docs/observability.md's query counts too.
PRESET_XIDS = (48, 63, 64, 74, 79, 94, 95, 119, 120)
#: The values of ``vgpu_health_changes_total``'s ``health`` label.
HEALTH_STATES = ("healthy", "unhealthy")


def reason_kind(reason: HealthReason) -> str:
    """The bounded kind of an unhealthy reason, for a metric label."""
    if reason.kind is ReasonKind.FAULT:
        return "xid" if reason.xid is not None else "double_bit_ecc"
    if reason.kind is ReasonKind.LOST:
        return "gpu_lost"
    # The daemon answers but does not hold the ceiling: told apart from a daemon that is
    # down, so that vgpu_mps_daemon_up stays true to its name and an alert can say which.
    return "mps_ceiling" if reason.about_ceiling else "mps_daemon"


@dataclass(frozen=True)
class NodeView:
    """What a scrape reports: the served GPUs with their health, and who uses them."""

    inventory: Inventory
    attribution: Attribution
    mps_enabled: bool
    registered: bool
    #: Successful registrations with the kubelet, and kubelet restarts seen, since start.
    registrations: int = 0
    kubelet_restarts: int = 0
    #: XIDs the config ignores: not among the preset zero series of vgpu_xid_events_total.
    ignored_xids: tuple[int, ...] = ()


class _EventCounts:
    """The XID events and health changes counted so far, by their labels (thread safe: the
    agent's loop counts, the HTTP server's threads and the refresher read)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._xids: dict[tuple[str, int], int] = {}
        self._health: dict[tuple[str, str], int] = {}

    def count_xid(self, gpu_uuid: str, xid: int) -> None:
        with self._lock:
            self._xids[(gpu_uuid, xid)] = self._xids.get((gpu_uuid, xid), 0) + 1

    def count_health(self, gpu_uuid: str, health: str) -> None:
        with self._lock:
            self._health[(gpu_uuid, health)] = self._health.get((gpu_uuid, health), 0) + 1

    def snapshot(self) -> tuple[dict[tuple[str, int], int], dict[tuple[str, str], int]]:
        with self._lock:
            return dict(self._xids), dict(self._health)


class _NodeCollector(Collector):
    """Builds the node's gauges and event counters from a fresh :class:`NodeView` on every
    scrape."""

    def __init__(self, view: Callable[[], NodeView], events: _EventCounts) -> None:
        self._view = view
        self._events = events

    def collect(self) -> Iterator[Metric]:
        """The gauges of the node as it is now, and the events counted so far."""
        view = self._view()
        yield from _gpu_metrics(view)
        yield from _event_metrics(view, self._events)
        yield from _container_metrics(view.attribution)


def _event_metrics(view: NodeView, events: _EventCounts) -> Iterator[Metric]:
    xids, health = events.snapshot()
    served = [served.gpu.uuid for served in view.inventory.gpus]
    # A GPU no longer served keeps the series it has: a counter does not vanish.
    preset = [xid for xid in PRESET_XIDS if xid not in view.ignored_xids]
    xid_events = CounterMetricFamily(
        "vgpu_xid_events",
        "Critical XID events, by GPU and XID (those in health.ignored_xids are only logged).",
        labels=["gpu_uuid", "xid"],
    )
    for gpu_uuid, xid in sorted(set(xids) | {(uuid, xid) for uuid in served for xid in preset}):
        xid_events.add_metric([gpu_uuid, str(xid)], float(xids.get((gpu_uuid, xid), 0)))
    changes = CounterMetricFamily(
        "vgpu_health_changes",
        "Times a GPU's vGPUs changed health, by the health they changed to.",
        labels=["gpu_uuid", "health"],
    )
    for key in sorted(set(health) | {(uuid, state) for uuid in served for state in HEALTH_STATES}):
        changes.add_metric(list(key), float(health.get(key, 0)))
    yield from (xid_events, changes)


def _gpu_metrics(view: NodeView) -> Iterator[Metric]:
    registered = GaugeMetricFamily(
        "vgpu_registered", "1 while the agent is registered with the kubelet."
    )
    registered.add_metric([], 1.0 if view.registered else 0.0)
    yield registered
    registrations = CounterMetricFamily(
        "vgpu_registrations", "Successful registrations with the kubelet."
    )
    registrations.add_metric([], float(view.registrations))
    restarts = CounterMetricFamily("vgpu_kubelet_restarts", "Kubelet restarts the agent noticed.")
    restarts.add_metric([], float(view.kubelet_restarts))
    yield from (registrations, restarts)
    info = GaugeMetricFamily(
        "vgpu_gpu_info",
        "A served GPU: its index and model (always 1).",
        labels=["gpu_uuid", "gpu_index", "model"],
    )
    vgpus = GaugeMetricFamily(
        "vgpu_vgpus",
        "vGPUs per GPU by state: allocatable (advertised Healthy), allocated (held by a "
        "container), unhealthy.",
        labels=["gpu_uuid", "state"],
    )
    unhealthy = GaugeMetricFamily(
        "vgpu_gpu_unhealthy",
        "1 for each kind of reason that currently marks the GPU's vGPUs Unhealthy.",
        labels=["gpu_uuid", "reason"],
    )
    daemon_up = GaugeMetricFamily(
        "vgpu_mps_daemon_up", "1 while the GPU's MPS control daemon answers.", labels=["gpu_uuid"]
    )
    clients = GaugeMetricFamily(
        "vgpu_mps_clients", "MPS client processes on the GPU.", labels=["gpu_uuid"]
    )
    allocated: dict[str, int] = {}
    for usage in view.attribution.containers:
        allocated[usage.gpu_uuid] = allocated.get(usage.gpu_uuid, 0) + len(usage.vgpu_ids)
    for served in view.inventory.gpus:
        uuid = served.gpu.uuid
        info.add_metric([uuid, str(served.gpu.index), served.gpu.model], 1.0)
        healthy = served.healthy
        vgpus.add_metric([uuid, "allocatable"], float(served.replicas if healthy else 0))
        vgpus.add_metric([uuid, "allocated"], float(allocated.get(uuid, 0)))
        vgpus.add_metric([uuid, "unhealthy"], float(0 if healthy else served.replicas))
        kinds = {reason_kind(reason) for reason in served.unhealthy_reasons}
        for kind in sorted(kinds):
            unhealthy.add_metric([uuid, kind], 1.0)
        if view.mps_enabled:
            down = "mps_daemon" in kinds
            daemon_up.add_metric([uuid], 0.0 if down else 1.0)
        clients.add_metric([uuid], float(view.attribution.clients_on(uuid)))
    yield from (info, vgpus, unhealthy, clients)
    if view.mps_enabled:
        yield daemon_up


_CONTAINER_LABELS = ["namespace", "pod", "container", "gpu_uuid"]


def _container_metrics(attribution: Attribution) -> Iterator[Metric]:
    held = GaugeMetricFamily(
        "vgpu_container_vgpus", "vGPUs a container holds on the GPU.", labels=_CONTAINER_LABELS
    )
    threads = GaugeMetricFamily(
        "vgpu_container_thread_limit_percent",
        "The container's MPS active thread percentage (absent: no limit).",
        labels=_CONTAINER_LABELS,
    )
    memory_limit = GaugeMetricFamily(
        "vgpu_container_memory_limit_bytes",
        "The container's MPS pinned device memory limit (absent: no limit).",
        labels=_CONTAINER_LABELS,
    )
    memory_used = GaugeMetricFamily(
        "vgpu_container_memory_used_bytes",
        "GPU memory the container's MPS clients use (absent when unknown, or shared with "
        "other containers of its pod on the GPU: see vgpu_pod_memory_used_bytes).",
        labels=_CONTAINER_LABELS,
    )
    pod_memory = GaugeMetricFamily(
        "vgpu_pod_memory_used_bytes",
        "GPU memory all MPS clients of the pod use on the GPU.",
        labels=["namespace", "pod", "gpu_uuid"],
    )
    stray_memory = GaugeMetricFamily(
        "vgpu_unattributed_memory_used_bytes",
        "GPU memory of MPS clients no container holding vGPUs of the GPU accounts for.",
        labels=["gpu_uuid"],
    )
    stray_clients = GaugeMetricFamily(
        "vgpu_unattributed_clients",
        "MPS clients no container holding vGPUs of the GPU accounts for.",
        labels=["gpu_uuid"],
    )
    for usage in attribution.containers:
        labels = [usage.namespace, usage.pod or usage.pod_uid, usage.container, usage.gpu_uuid]
        held.add_metric(labels, float(len(usage.vgpu_ids)))
        if usage.thread_limit_percent is not None:
            threads.add_metric(labels, float(usage.thread_limit_percent))
        if usage.memory_limit_mib is not None:
            memory_limit.add_metric(labels, float(usage.memory_limit_mib * MIB))
        if usage.memory_used_mib is not None:
            memory_used.add_metric(labels, float(usage.memory_used_mib * MIB))
    for pod in attribution.pods:
        if pod.memory_used_mib is not None:
            pod_memory.add_metric(
                [pod.namespace, pod.pod or pod.pod_uid, pod.gpu_uuid],
                float(pod.memory_used_mib * MIB),
            )
    stray_by_gpu: dict[str, tuple[int, int]] = {}
    for stray in attribution.strays:
        count, memory = stray_by_gpu.get(stray.gpu_uuid, (0, 0))
        stray_by_gpu[stray.gpu_uuid] = (count + 1, memory + (stray.memory_used_mib or 0))
    for gpu_uuid, (count, memory) in sorted(stray_by_gpu.items()):
        stray_clients.add_metric([gpu_uuid], float(count))
        stray_memory.add_metric([gpu_uuid], float(memory * MIB))
    yield from (held, threads, memory_limit, memory_used, pod_memory, stray_clients, stray_memory)


class AgentMetrics:
    """The agent's metrics: event counters, latency histograms and the node's gauges."""

    def __init__(self, view: Callable[[], NodeView]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        registry = self.registry
        self._events = _EventCounts()
        self._mps_faults = Counter(
            "vgpu_mps_faults",
            "Application faults under MPS (an XID of health.ignored_xids on a served GPU), by "
            "GPU, XID and each pod that had MPS clients on the GPU then ('' when none).",
            ["gpu_uuid", "xid", "pod"],
            registry=registry,
        )
        self._culprits = Counter(
            "vgpu_mps_fault_culprits",
            "Application faults under MPS by GPU and the pod their culprit ran in, as the MPS "
            "server's log names it ('' when unknown).",
            ["gpu_uuid", "pod"],
            registry=registry,
        )
        self._offenders = Counter(
            "vgpu_mps_offenders",
            "Pods that became repeat offenders (the culprit of faults.repeat_limit counted "
            "faults within faults.window_s), by pod and faults.offender_action.",
            ["pod", "action"],
            registry=registry,
        )
        self._held = Gauge(
            "vgpu_mps_offender_held",
            "1 for each pod held as a repeat offender of MPS faults (allowed no MPS clients).",
            ["pod_uid", "pod"],
            registry=registry,
        )
        self._clients_ended = Counter(
            "vgpu_mps_clients_ended",
            "MPS client processes the agent ended, by GPU, pod and reason: excess (beyond "
            "isolation.clients_per_vgpu per vGPU the pod holds) or held (a pod held at none).",
            ["gpu_uuid", "pod", "reason"],
            registry=registry,
        )
        self._allocate = Histogram(
            "vgpu_allocate_duration_seconds",
            "Time to answer the kubelet's Allocate calls.",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self._preferred = Histogram(
            "vgpu_preferred_allocation_duration_seconds",
            "Time to answer the kubelet's GetPreferredAllocation calls.",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        registry.register(_NodeCollector(view, self._events))

    def xid_event(self, gpu_uuid: str, xid: int) -> None:
        """Count one XID event."""
        self._events.count_xid(gpu_uuid, xid)

    def mps_fault(self, gpu_uuid: str, xid: int, pods: tuple[str, ...]) -> None:
        """Count one application fault under MPS, for each pod it may have hit."""
        for pod in pods or ("",):
            self._mps_faults.labels(gpu_uuid, str(xid), pod).inc()

    def mps_culprit(self, gpu_uuid: str, pod: str) -> None:
        """Count the culprit of one application fault under MPS (``""``: unknown)."""
        self._culprits.labels(gpu_uuid, pod).inc()

    def offender(self, pod: str, action: str) -> None:
        """Count a pod that became a repeat offender (``action``: hold or report)."""
        self._offenders.labels(pod, action).inc()

    def set_held(self, held: Mapping[str, str]) -> None:
        """Show exactly these pods (UID -> name) as held."""
        self._held.clear()
        for pod_uid, pod in sorted(held.items()):
            self._held.labels(pod_uid, pod).set(1)

    def mps_client_ended(self, gpu_uuid: str, pod: str, reason: str) -> None:
        """Count one MPS client ended by the per-pod policy."""
        self._clients_ended.labels(gpu_uuid, pod, reason).inc()

    def health_changed(self, gpu_uuid: str, healthy: bool) -> None:
        """Count a GPU's vGPUs turning Healthy or Unhealthy."""
        self._events.count_health(gpu_uuid, HEALTH_STATES[0] if healthy else HEALTH_STATES[1])

    def observe_allocate(self, seconds: float) -> None:
        """Record how long one Allocate call took."""
        self._allocate.observe(seconds)

    def observe_preferred_allocation(self, seconds: float) -> None:
        """Record how long one GetPreferredAllocation call took."""
        self._preferred.observe(seconds)

    def render(self) -> bytes:
        """The metrics in Prometheus' text format, as a scrape gets them."""
        return generate_latest(self.registry)


def write_textfile(path: str, metrics: AgentMetrics) -> None:
    """Write the metrics to ``path`` for node-exporter, atomically (temp file + rename)."""
    try:
        # The library writes <path>.<pid>.<thread> in the same directory, then renames it;
        # node-exporter reads only *.prom, so it never sees the partial file.
        write_to_textfile(path, metrics.registry)
    except OSError as exc:
        raise AgentError(
            f"writing the metrics textfile {path}: {exc.strerror or exc}; check that its "
            "directory exists and is writable (metrics.textfile_path)"
        ) from exc


class _QuietHandler(WSGIRequestHandler):
    """Logs no line per request (a scrape every 15 s would fill the journal)."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Log nothing."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One daemon thread per request, so a slow client holds up no other scrape."""

    daemon_threads = True


class MetricsServer:
    """``/metrics`` over HTTP on ``host:port`` (port 0: a free one, see :attr:`port`).

    The serving thread blocks until a request comes or :meth:`stop` shuts the listening
    socket (which wakes it at once on Linux): unlike the library's ``start_http_server``,
    whose thread polls every 0.5 s, an idle endpoint costs no CPU."""

    def __init__(self, metrics: AgentMetrics, host: str, port: int) -> None:
        self._metrics = metrics
        self.host = host
        self.port = port
        self._server: Optional[WSGIServer] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()

    def start(self) -> None:
        """Listen and serve in a daemon thread; AgentError when the address cannot be used."""
        shown = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            # The first address the host resolves to, IPv6 included (the server class
            # binds IPv4 unless told the family).
            family, _, _, _, sockaddr = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]

            class Server(_ThreadingServer):
                address_family = family

            server = make_server(
                str(sockaddr[0]),
                self.port,
                make_wsgi_app(self._metrics.registry),
                Server,
                handler_class=_QuietHandler,
            )
        except OSError as exc:
            raise AgentError(
                f"serving metrics on {shown}: {exc.strerror or exc}; choose another "
                "metrics.listen_address"
            ) from exc
        server.timeout = None  # handle_request blocks until a request (or the stop)
        self._stopping.clear()
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=self._serve, args=(server,), name="vgpu-metrics-http", daemon=True
        )
        self._thread.start()

    def _serve(self, server: WSGIServer) -> None:
        while not self._stopping.is_set():
            server.handle_request()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        server = self._server
        self._server = None
        if server is None:
            return
        self._stopping.set()
        try:
            # Wakes the serving thread's wait for a connection, which then sees the stop.
            server.socket.shutdown(socket.SHUT_RDWR)
        except OSError as exc:
            log.debug("shutting the metrics socket: %s", exc)
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        server.server_close()
