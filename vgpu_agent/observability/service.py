"""What the agent shows about itself beyond the kubelet: attribution, metrics, node labels.

:class:`Observability` is built by the composition root with the collaborators it reads:

- a refresher thread asks every attribution source
  (:func:`vgpu_agent.observability.attribution.gather`) every
  ``attribution.refresh_interval_s`` and keeps the latest answer, so a scrape or a
  ``vgpu-agent status`` never waits on the kubelet or NVML;
- under enforced confinement it also hands each attribution to the per-pod client policy
  (:class:`~vgpu_agent.observability.enforcement.ClientEnforcer`), and then looks every
  ``isolation.check_interval_s``: NVML and the processes' cgroups are read each time, the
  kubelet's PodResources API only when its device checkpoint changed (a new allocation) or
  ``attribution.refresh_interval_s`` has passed;
- with ``metrics.enabled`` it serves ``/metrics`` and/or rewrites the textfile after each
  refresh;
- with ``labels.enabled`` it rewrites the node-feature-discovery file whenever what the
  node offers changes.

A failure of any of these is logged once per distinct message and never stops the agent:
sharing GPUs matters more than describing them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from vgpu_agent.config.schema import Config
from vgpu_agent.config.values import split_listen_address
from vgpu_agent.model.devices import HEALTHY, UNHEALTHY, Inventory, MpsGrantPolicy
from vgpu_agent.model.errors import GpuError, VgpuError
from vgpu_agent.model.gpu import GpuBackend
from vgpu_agent.model.pods import PodRef, PodsPresent
from vgpu_agent.observability.attribution import Attribution, ListPods, PodListCache, gather
from vgpu_agent.observability.cgroups import PodCgroup, pod_cgroups_by_pid, read_process_cgroup
from vgpu_agent.observability.checkpoint import CHECKPOINT_NAME, CachedCheckpoint
from vgpu_agent.observability.enforcement import (
    ClientEnforcer,
    EndClient,
    HeldPods,
    policy_status_lines,
    process_start_s,
)
from vgpu_agent.observability.excess import StartTime
from vgpu_agent.observability.labels import (
    NodeLabels,
    node_labels,
    remove_feature_file,
    write_feature_file,
)

if TYPE_CHECKING:
    # prometheus_client is imported only when metrics are on (the GPU test machine's
    # interpreter need not have it).
    from vgpu_agent.observability.metrics import AgentMetrics, MetricsServer

log = logging.getLogger(__name__)

#: A scrape that finds the attribution older than this many refresh intervals (nobody
#: scraped for a while, so the refresher rested) waits up to STALE_WAIT_S for a new one.
STALE_INTERVALS = 2.0
STALE_WAIT_S = 1.0

Gather = Callable[..., Attribution]


@dataclass(frozen=True)
class AgentCounts:
    """What the agent knows of its registration, for metrics."""

    registered: bool
    registrations: int = 0
    kubelet_restarts: int = 0


@dataclass(frozen=True)
class AttributionSnapshot:
    """The latest attribution and when it was taken (``time.monotonic()``)."""

    attribution: Attribution
    taken_at: float


class Observability:
    """Keeps attribution fresh and feeds metrics, the textfile and the node labels."""

    def __init__(
        self,
        config: Config,
        *,
        inventory: Callable[[], Inventory],
        counts: Callable[[], AgentCounts],
        policy: Callable[[], Optional[MpsGrantPolicy]],
        list_pods: ListPods,
        close_sources: Optional[Callable[[], None]] = None,
        gather_attribution: Gather = gather,
        clock: Callable[[], float] = time.monotonic,
        proc_root: str = "/proc",
        cgroup_root: str = "/sys/fs/cgroup",
        end_client: Optional[EndClient] = None,
        held_pods: Optional[HeldPods] = None,
        client_start_time: StartTime = process_start_s,
    ) -> None:
        """``end_client`` ends an MPS client for the per-pod policy (None: no policy);
        ``held_pods`` names the pods held at no client; ``client_start_time`` says when a
        client process started."""
        self._config = config
        self._backend: Optional[GpuBackend] = None
        self._inventory = inventory
        self._counts = counts
        self._policy = policy
        self._gather = gather_attribution
        self._list_pods = list_pods
        self._close_sources = close_sources
        self._proc_root = proc_root
        self._cgroup_root = cgroup_root
        #: The pods held as repeat offenders (UID -> shown name), for the held gauge.
        self._held: dict[str, str] = {}
        self._checkpoint = CachedCheckpoint()
        self._pod_list = PodListCache(clock)
        #: What the cgroup tree said of clients /proc hides (see gather).
        self._hidden_cgroups: dict[int, Optional[PodCgroup]] = {}
        #: When the last full refresh (every source asked) was taken.
        self._full_at = clock()
        #: The MPS clients (GPU UUID, pid) of the last attribution.
        self._clients_listed: frozenset[tuple[str, int]] = frozenset()
        #: The per-pod MPS client policy (None: no way to end a client was handed in).
        self.client_policy: Optional[ClientEnforcer] = None
        if end_client is not None:
            self.client_policy = ClientEnforcer(
                config,
                end_client=end_client,
                held=held_pods or (lambda: {}),
                start_time=client_start_time,
                count=self._count_client_ended,
            )
        #: Whether a scrape read the attribution since the last refresh: the refresher
        #: gathers only what someone reads (or the textfile needs).
        self._read_since_refresh = False
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._snapshot = AttributionSnapshot(Attribution(), clock())
        #: Refreshes begun and finished, so that fresh() waits for one begun after it asked.
        self._begun = 0
        self._finished = 0
        self._refresh_wanted = False
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._reported: set[str] = set()
        self._attribution_problems: set[str] = set()
        self._labels_written: Optional[NodeLabels] = None
        self.metrics: Optional[AgentMetrics] = None
        self._server: Optional[MetricsServer] = None
        self.metrics_address = ""

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, backend: GpuBackend) -> None:
        """Start the metrics endpoint (when enabled) and the refresher thread, which asks
        ``backend`` for the MPS clients."""
        self._backend = backend
        if self._config.metrics.enabled:
            self._start_metrics()
        self._thread = threading.Thread(target=self._run, name="vgpu-observability", daemon=True)
        self._thread.start()
        self.inventory_changed()

    def stop(self) -> None:
        """Stop the refresher and the metrics endpoint."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        self._stop_metrics()
        if self._close_sources is not None:
            self._close_sources()

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config: restart the endpoint if its settings changed."""
        old = self._config
        self._config = config
        if self.client_policy is not None:
            self.client_policy.reconfigure(config)
        if old.metrics != config.metrics:
            self._stop_metrics()
            if config.metrics.enabled:
                self._start_metrics()
        if old.labels != config.labels:
            self._labels_written = None
            if old.labels.enabled and (
                not config.labels.enabled or old.labels.features_dir != config.labels.features_dir
            ):
                # Labels of a node that no longer offers them must not linger.
                try:
                    if remove_feature_file(old.labels.features_dir):
                        log.info("removed node labels from %s", old.labels.features_dir)
                except VgpuError as exc:
                    self._report(str(exc))
        self.inventory_changed()
        self.request_refresh()

    # -- metrics ------------------------------------------------------------------------------

    def _start_metrics(self) -> None:
        from vgpu_agent.observability.metrics import AgentMetrics, MetricsServer, NodeView

        def view() -> NodeView:
            counts = self._counts()
            return NodeView(
                inventory=self._inventory(),
                attribution=self._read_for_scrape().attribution,
                mps_enabled=self._config.mps.enabled,
                registered=counts.registered,
                registrations=counts.registrations,
                kubelet_restarts=counts.kubelet_restarts,
                ignored_xids=self._config.health.ignored_xids,
            )

        metrics = AgentMetrics(view)
        metrics.set_held(self._held)
        self.metrics = metrics
        address = self._config.metrics.listen_address
        if not address:
            return
        host, port = split_listen_address(address)
        server = MetricsServer(metrics, host, port)
        try:
            server.start()
        except VgpuError as exc:
            self._report(str(exc))
            return
        self._server = server
        shown = f"[{host}]" if ":" in host else host
        self.metrics_address = f"{shown}:{server.port}"
        log.info("serving metrics on http://%s/metrics", self.metrics_address)

    def _stop_metrics(self) -> None:
        server = self._server
        self._server = None
        self.metrics_address = ""
        if server is not None:
            server.stop()
        self.metrics = None

    def record_xid(self, gpu_uuid: str, xid: int) -> None:
        """Count a critical XID event (metrics on)."""
        if self.metrics is not None:
            self.metrics.xid_event(gpu_uuid, xid)

    def record_fault(self, gpu_uuid: str, xid: int, pods: tuple[str, ...]) -> None:
        """Count an application fault under MPS, once per pod it may have hit (metrics on)."""
        if self.metrics is not None:
            self.metrics.mps_fault(gpu_uuid, xid, pods)

    def _count_client_ended(self, gpu_uuid: str, pod: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.mps_client_ended(gpu_uuid, pod, reason)

    def record_culprit(self, gpu_uuid: str, pod: str) -> None:
        """Count a fault's culprit (``""``: unknown; metrics on)."""
        if self.metrics is not None:
            self.metrics.mps_culprit(gpu_uuid, pod)

    def record_offender(self, pod_uid: str, pod: str, held: bool) -> None:
        """Count a pod that became an offender, and show it held while it is."""
        if held:
            self._held[pod_uid] = pod
        if self.metrics is not None:
            self.metrics.offender(pod, "hold" if held else "report")
            self.metrics.set_held(self._held)

    def release_offender(self, pod_uid: str) -> None:
        """A pod is no longer an offender: no longer shown held."""
        if self._held.pop(pod_uid, None) is not None and self.metrics is not None:
            self.metrics.set_held(self._held)

    def clients_on(self, gpu_uuid: str) -> dict[int, PodRef]:
        """The MPS client pids on the GPU in the latest attribution, each with its pod
        (``namespace/pod`` empty when the PodResources API did not answer)."""
        return {
            pid: PodRef(usage.pod_uid, f"{usage.namespace}/{usage.pod}" if usage.pod else "")
            for usage in self.snapshot().attribution.pods
            if usage.gpu_uuid == gpu_uuid
            for pid in usage.pids
        }

    def pod_of_process(self, pid: int) -> Optional[PodRef]:
        """The pod of a running process from its cgroup (``/proc``, else the cgroup tree for
        a process ``/proc`` hides), named as the latest attribution names it."""
        cgroup = read_process_cgroup(pid, self._proc_root)
        if cgroup is None:
            cgroup = pod_cgroups_by_pid(self._cgroup_root).get(pid)
        if cgroup is None:
            return None
        name = next(
            (
                f"{usage.namespace}/{usage.pod}"
                for usage in self.snapshot().attribution.containers
                if usage.pod_uid == cgroup.pod_uid and usage.pod
            ),
            "",
        )
        return PodRef(cgroup.pod_uid, name)

    def pods_present(self) -> Optional[PodsPresent]:
        """The UIDs of the pods holding vGPUs in the latest attribution, and its age; None
        before the first one, or when it could not tell (a pod UID unknown: the kubelet
        checkpoint unread; or no holder at all while a source failed)."""
        with self._lock:
            snapshot = self._snapshot
            refreshed = self._finished > 0
        attribution = snapshot.attribution
        if not refreshed or any(not usage.pod_uid for usage in attribution.containers):
            return None
        if not attribution.containers and attribution.problems:
            return None
        return PodsPresent(
            max(0.0, self._clock() - snapshot.taken_at),
            frozenset(usage.pod_uid for usage in attribution.containers),
        )

    def record_health(self, gpu_uuid: str, healthy: bool) -> None:
        """Count a GPU's vGPUs turning Healthy or Unhealthy (metrics on)."""
        if self.metrics is not None:
            self.metrics.health_changed(gpu_uuid, healthy)

    def observe_allocate(self, seconds: float) -> None:
        """Record the time one Allocate call took (metrics on)."""
        if self.metrics is not None:
            self.metrics.observe_allocate(seconds)

    def observe_preferred_allocation(self, seconds: float) -> None:
        """Record the time one GetPreferredAllocation call took (metrics on)."""
        if self.metrics is not None:
            self.metrics.observe_preferred_allocation(seconds)

    # -- labels -------------------------------------------------------------------------------

    def inventory_changed(self) -> None:
        """Rewrite the node labels if what the node offers changed (labels enabled)."""
        labels_config = self._config.labels
        if not labels_config.enabled:
            return
        labels = node_labels(self._config, self._inventory())
        if labels == self._labels_written:
            return
        try:
            path = write_feature_file(labels_config.features_dir, labels)
        except VgpuError as exc:
            self._report(str(exc))
            return
        self._labels_written = labels
        log.info("wrote node labels to %s", path)

    # -- attribution --------------------------------------------------------------------------

    def snapshot(self) -> AttributionSnapshot:
        """The latest attribution."""
        with self._lock:
            return self._snapshot

    def _read_for_scrape(self) -> AttributionSnapshot:
        """The attribution for a scrape (on the HTTP server's thread): the latest, or a new
        one when the latest is stale."""
        with self._lock:
            self._read_since_refresh = True
            snapshot = self._snapshot
        interval = self._config.attribution.refresh_interval_s
        if self._clock() - snapshot.taken_at > STALE_INTERVALS * interval:
            return self.fresh(STALE_WAIT_S)
        return snapshot

    def request_refresh(self) -> None:
        """Ask the refresher for a new attribution now."""
        with self._wake:
            self._refresh_wanted = True
            self._wake.notify_all()

    def fresh(self, timeout_s: float) -> AttributionSnapshot:
        """A new attribution, waiting up to ``timeout_s`` for it (else the latest one)."""
        deadline = self._clock() + timeout_s
        with self._wake:
            if self._thread is None or self._stopping:
                return self._snapshot  # not started (yet), or stopped: nobody refreshes
            wanted = self._begun + 1
            self._refresh_wanted = True
            self._wake.notify_all()
            while self._finished < wanted and not self._stopping:
                left = deadline - self._clock()
                if left <= 0:
                    break
                self._wake.wait(left)
            return self._snapshot

    def _enforcing(self) -> bool:
        """Whether the per-pod client policy looks at each attribution."""
        return self.client_policy is not None and self.client_policy.active

    def _interval(self) -> float:
        """Seconds between refreshes: the check interval while the client policy acts."""
        interval = self._config.attribution.refresh_interval_s
        if self._enforcing():
            interval = min(interval, self._config.isolation.check_interval_s)
        return interval

    def refresh_once(self, *, full: bool = True) -> AttributionSnapshot:
        """Gather the attribution now on this thread, store it, hand it to the client
        policy and write the textfile. Not ``full``: a check between full refreshes, which
        reuses the last PodResources answer while it holds, and writes no textfile."""
        config = self._config
        backend = self._backend
        if backend is None:
            return self.snapshot()
        with self._lock:
            self._begun += 1
            number = self._begun
        checkpoint_path = os.path.join(config.plugin.plugin_dir, CHECKPOINT_NAME)
        if full:
            self._full_at = self._clock()
        attribution = self._gather(
            backend=backend,
            inventory=self._inventory(),
            policy=self._policy(),
            resource_name=config.plugin.resource_name,
            pod_resources_socket=config.attribution.pod_resources_socket,
            checkpoint_path=checkpoint_path,
            list_pods=self._pod_list.lister(
                self._list_pods,
                checkpoint_path,
                0.0 if full else config.attribution.refresh_interval_s,
            ),
            read_checkpoint_at=self._checkpoint,
            hidden_cgroups=self._hidden_cgroups,
        )
        self._report_problems(attribution.problems)
        self._clients_listed = attribution.client_keys()
        snapshot = AttributionSnapshot(attribution, self._clock())
        with self._lock:
            self._snapshot = snapshot
        if self.client_policy is not None:
            # Before waiters are woken: a status that waited for this refresh shows what
            # the policy did with it.
            self.client_policy.check(attribution)
        # Before waiters are woken: the textfile of a refresh they waited for is on disk.
        if full:
            self._write_textfile()
        with self._wake:
            self._finished = max(self._finished, number)
            self._wake.notify_all()
        return snapshot

    def describe(self, inventory: Inventory, wait_s: float) -> dict[str, Any]:
        """The status fields: a fresh attribution (waiting up to ``wait_s``) per GPU, with
        its age and problems, and where metrics are served."""
        snapshot = self.fresh(wait_s) if wait_s > 0 else self.snapshot()
        attribution = snapshot.attribution
        shown: dict[str, Any] = {
            "attribution": {
                "age_s": round(max(0.0, self._clock() - snapshot.taken_at), 1),
                "problems": list(attribution.problems),
            },
            "metrics_address": self.metrics_address,
            "gpus": {
                served.gpu.uuid: describe_gpu(attribution, served.gpu.uuid)
                for served in inventory.gpus
            },
        }
        if self.client_policy is not None:
            shown["mps_client_policy"] = self.client_policy.describe()
        return shown

    def _write_textfile(self) -> None:
        path = self._config.metrics.textfile_path
        metrics = self.metrics
        if not path or metrics is None:
            return
        from vgpu_agent.observability.metrics import write_textfile

        try:
            write_textfile(path, metrics)
        except VgpuError as exc:
            self._report(str(exc))

    def _due(self) -> tuple[bool, bool]:
        """Whether the next pass is a full refresh: a reader asked for one or a scrape read
        the last one, or the textfile is due (each call takes the request). And whether
        there is a pass at all: also every check interval while the client policy acts."""
        with self._lock:
            asked, read = self._refresh_wanted, self._read_since_refresh
            self._refresh_wanted = False
            self._read_since_refresh = False
        metrics = self._config.metrics
        textfile = metrics.enabled and bool(metrics.textfile_path)
        if not self._enforcing():
            due = asked or read or textfile
            return due, due
        if textfile:
            # Writing the textfile reads the attribution itself: only its age counts.
            interval = self._config.attribution.refresh_interval_s
            return asked or self._clock() - self._full_at >= interval, True
        return asked or read, True

    def _check_due(self) -> bool:
        """Whether a check between full refreshes has anything to look at: NVML lists other
        MPS clients than the last attribution did (one call per GPU, the whole cost of a
        quiet check), or the policy has a retry or a newly held pod waiting."""
        backend = self._backend
        if backend is None or self.client_policy is None:
            return False
        if self.client_policy.pending():
            return True
        listed: set[tuple[str, int]] = set()
        for served in self._inventory().gpus:
            try:
                processes = backend.mps_client_processes(served.gpu.uuid)
            except GpuError:
                return True  # the gather names the problem
            listed.update((served.gpu.uuid, process.pid) for process in processes)
        return listed != self._clients_listed

    def _run(self) -> None:
        first = True
        while True:
            full, due = self._due()
            if first or full or (due and self._check_due()):
                try:
                    self.refresh_once(full=first or full)
                except Exception:  # the refresher must outlive any one bad answer
                    log.exception("refreshing the attribution failed")
            first = False
            with self._wake:
                deadline = self._clock() + self._interval()
                while not self._refresh_wanted and not self._stopping:
                    left = deadline - self._clock()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                if self._stopping:
                    return

    def _report(self, message: str) -> None:
        # Each distinct problem once: the refresher would otherwise log it every interval.
        if message in self._reported:
            return
        self._reported.add(message)
        log.warning("%s", message)

    def _report_problems(self, problems: tuple[str, ...]) -> None:
        current = set(problems)
        for message in sorted(self._attribution_problems - current):
            self._reported.discard(message)
            log.info("attribution: resolved: %s", message)
        self._attribution_problems = current
        for message in problems:
            self._report(message)


# -- status -------------------------------------------------------------------------------------


def describe_gpu(attribution: Attribution, gpu_uuid: str) -> dict[str, Any]:
    """The ``status --json`` fields of one GPU's users: its containers, the memory of pods
    whose containers share it, and the MPS clients no container accounts for."""
    pods_memory = {
        (pod.namespace, pod.pod, pod.pod_uid): pod.memory_used_mib
        for pod in attribution.pods
        if pod.gpu_uuid == gpu_uuid
    }
    containers = []
    for usage in attribution.containers_on(gpu_uuid):
        entry: dict[str, Any] = {
            "namespace": usage.namespace,
            "pod": usage.pod,
            "pod_uid": usage.pod_uid,
            "container": usage.container,
            "vgpu_ids": list(usage.vgpu_ids),
            "thread_limit_percent": usage.thread_limit_percent,
            "memory_limit_mib": usage.memory_limit_mib,
            "memory_used_mib": usage.memory_used_mib,
            "pids": list(usage.pids),
        }
        if usage.memory_shared_with:
            entry["memory_shared_with"] = list(usage.memory_shared_with)
            entry["pod_memory_used_mib"] = pods_memory.get(
                (usage.namespace, usage.pod, usage.pod_uid)
            )
        containers.append(entry)
    return {
        "mps_clients": attribution.clients_on(gpu_uuid),
        "containers": containers,
        "unattributed": [
            {"pid": stray.pid, "memory_used_mib": stray.memory_used_mib, "why": stray.why}
            for stray in attribution.strays_on(gpu_uuid)
        ],
    }


def _mib(value: Optional[int]) -> str:
    return "unknown" if value is None else f"{value} MiB"


def status_lines(gpu: Mapping[str, Any]) -> list[str]:
    """The lines ``vgpu-agent status`` prints under a GPU (an entry of its ``"gpus"``): the
    containers holding its vGPUs, unattributed clients, then each vGPU and its holder."""
    lines: list[str] = []
    holders: dict[str, str] = {}
    users: Mapping[str, Any] = gpu.get("attribution") or {}
    for container in users.get("containers", []):
        who = (
            f"{container['namespace']}/{container['pod']}"
            if container["pod"]
            else f"pod {container['pod_uid'] or '?'}"
        )
        name = f"{who} {container['container']}"
        for vgpu_id in container["vgpu_ids"]:
            holders[vgpu_id] = name
        limits = []
        if container["thread_limit_percent"] is not None:
            limits.append(f"{container['thread_limit_percent']:g}% of SMs")
        if container["memory_limit_mib"] is not None:
            limits.append(f"{container['memory_limit_mib']} MiB")
        limit_text = ", limit " + " and ".join(limits) if limits else ", no limits"
        shared = container.get("memory_shared_with")
        if shared:
            used = (
                f"shares {_mib(container.get('pod_memory_used_mib'))} used by its pod's "
                f"clients with {', '.join(shared)}"
            )
        else:
            used = f"uses {_mib(container['memory_used_mib'])}"
            if container["pids"]:
                used += f" (pids {', '.join(str(pid) for pid in container['pids'])})"
        count = len(container["vgpu_ids"])
        lines.append(f"  {name}: {count} vGPU{'s' if count != 1 else ''}{limit_text}; {used}")
    for stray in users.get("unattributed", []):
        lines.append(
            f"  unattributed MPS client pid {stray['pid']}: uses "
            f"{_mib(stray['memory_used_mib'])} ({stray['why']})"
        )
    health = HEALTHY if gpu["healthy"] else UNHEALTHY
    for vgpu_id in gpu["vgpu_ids"]:
        holder = holders.get(vgpu_id)
        lines.append(f"  {vgpu_id}  {health}" + (f"  {holder}" if holder else ""))
    return lines


def status_header_lines(answer: Mapping[str, Any]) -> list[str]:
    """The lines ``vgpu-agent status`` prints after the STATUS line: why attribution is
    incomplete, where metrics are served, the per-pod client policy and what it did last."""
    lines = [
        f"attribution: {problem}"
        for problem in (answer.get("attribution") or {}).get("problems", [])
    ]
    if answer.get("metrics_address"):
        lines.append(f"metrics: http://{answer['metrics_address']}/metrics")
    policy = answer.get("mps_client_policy")
    if policy:
        lines.extend(policy_status_lines(policy))
    return lines
