"""Which pod and container each vGPU and each MPS client process belongs to.

Three sources are joined, none of which a pod can write:

- the kubelet's PodResources API: namespace, pod name and container name -> vGPU ids
  (it carries no pod UID);
- the kubelet's device checkpoint (``kubelet_internal_checkpoint``, read only): pod UID and
  container name -> vGPU ids, which links the two other sources;
- a process's cgroup (``/proc/<pid>/cgroup``): the pod UID and container id the container
  runtime placed it in, for the MPS client processes NVML lists with their GPU memory.

Environment variables and process names are never read: a pod controls both.

The memory of a pod's processes on a GPU goes to the one container of that pod holding vGPUs
of that GPU. When several containers of one pod hold vGPUs of the same GPU, the cgroup names
the container's runtime id but neither the kubelet's API nor its checkpoint maps ids to
names, so their processes cannot be told apart: their memory is reported for the pod
(:class:`PodGpuUsage`) and each of those containers says so (``memory_shared_with``) with no
figure of its own.

Everything here but :func:`gather` (and :class:`PodListCache`, which it may be handed) is
pure. It asks the sources (the PodResources API through the function it is handed, the
checkpoint through :mod:`vgpu_agent.observability.checkpoint`, the processes' cgroups
through :mod:`vgpu_agent.observability.cgroups`), then calls the pure :func:`attribute`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Callable, Optional

from vgpu_agent.model.devices import (
    InvalidRequestError,
    Inventory,
    MpsGrantPolicy,
    memory_limit_mib,
    parse_vgpu_id,
    thread_percentage,
)
from vgpu_agent.model.errors import AttributionError, GpuError
from vgpu_agent.model.gpu import GpuBackend, GpuProcess
from vgpu_agent.observability.cgroups import PodCgroup, pod_cgroups_by_pid, read_process_cgroup
from vgpu_agent.observability.checkpoint import CheckpointEntry, read_checkpoint


@dataclass(frozen=True)
class ContainerDevices:
    """One container's devices of one resource, as the kubelet's PodResources API lists
    them (:mod:`vgpu_agent.observability.podresources` reads them)."""

    namespace: str
    pod: str
    container: str
    resource_name: str
    device_ids: tuple[str, ...]


# -- the join ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContainerUsage:
    """One container's vGPUs on one GPU, its limits and the GPU memory its processes use.

    ``namespace`` and ``pod`` are empty when the PodResources API did not answer;
    ``pod_uid`` is empty when the checkpoint could not be read.
    """

    namespace: str
    pod: str
    container: str
    pod_uid: str
    gpu_uuid: str
    vgpu_ids: tuple[str, ...]
    thread_limit_percent: Optional[float]
    memory_limit_mib: Optional[int]
    #: MPS client processes found in this container (empty when shared, see below).
    pids: tuple[int, ...]
    #: None when unknown: shared with other containers of the pod, or NVML cannot tell.
    memory_used_mib: Optional[int]
    #: Other containers of the pod on the same GPU whose processes cannot be told apart.
    memory_shared_with: tuple[str, ...] = ()


@dataclass(frozen=True)
class PodGpuUsage:
    """All of one pod's MPS client processes on one GPU and the memory they use."""

    namespace: str
    pod: str
    pod_uid: str
    gpu_uuid: str
    containers: tuple[str, ...]
    pids: tuple[int, ...]
    memory_used_mib: Optional[int]


@dataclass(frozen=True)
class StrayProcess:
    """An MPS client that no container holding vGPUs of its GPU accounts for."""

    pid: int
    gpu_uuid: str
    memory_used_mib: Optional[int]
    why: str


@dataclass(frozen=True)
class Attribution:
    """Who holds and uses each served GPU, with what could not be found out and why."""

    containers: tuple[ContainerUsage, ...] = ()
    pods: tuple[PodGpuUsage, ...] = ()
    strays: tuple[StrayProcess, ...] = ()
    #: MPS client processes per GPU, including strays.
    clients_by_gpu: tuple[tuple[str, int], ...] = ()
    problems: tuple[str, ...] = ()

    def containers_on(self, gpu_uuid: str) -> list[ContainerUsage]:
        """The containers holding vGPUs of this GPU."""
        return [usage for usage in self.containers if usage.gpu_uuid == gpu_uuid]

    def strays_on(self, gpu_uuid: str) -> list[StrayProcess]:
        """The unaccounted MPS clients on this GPU."""
        return [stray for stray in self.strays if stray.gpu_uuid == gpu_uuid]

    def clients_on(self, gpu_uuid: str) -> int:
        """How many MPS client processes run on this GPU."""
        return dict(self.clients_by_gpu).get(gpu_uuid, 0)

    def client_keys(self) -> frozenset[tuple[str, int]]:
        """Every MPS client listed, pods' and strays', as (GPU UUID, pid)."""
        keys = {(usage.gpu_uuid, pid) for usage in self.pods for pid in usage.pids}
        return frozenset(keys | {(stray.gpu_uuid, stray.pid) for stray in self.strays})


#: (GPU UUID, vGPUs held) -> (thread percentage, memory MiB), None for no limit.
LimitsFor = Callable[[str, int], tuple[Optional[float], Optional[int]]]


@dataclass(frozen=True)
class _Holder:
    namespace: str
    pod: str
    container: str
    pod_uid: str
    gpu_uuid: str
    vgpu_ids: tuple[str, ...]


def _by_gpu(device_ids: Iterable[str], served: Mapping[str, object]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for device_id in device_ids:
        try:
            gpu_uuid, _replica = parse_vgpu_id(device_id)
        except InvalidRequestError:
            continue
        if gpu_uuid in served:
            grouped.setdefault(gpu_uuid, []).append(device_id)
    return grouped


def _holders(
    pod_devices: Optional[Sequence[ContainerDevices]],
    checkpoint: Optional[Sequence[CheckpointEntry]],
    resource_name: str,
    served: Mapping[str, object],
) -> list[_Holder]:
    ours = [entry for entry in checkpoint or () if entry.resource_name == resource_name]
    uid_by_device: dict[tuple[str, str], str] = {}
    for entry in ours:
        for device_id in entry.device_ids:
            uid_by_device[(entry.container, device_id)] = entry.pod_uid
    holders: list[_Holder] = []
    if pod_devices is not None:
        for devices in pod_devices:
            if devices.resource_name != resource_name:
                continue
            for gpu_uuid, ids in _by_gpu(devices.device_ids, served).items():
                # vGPU ids are held by one container at a time, so any of them finds its
                # pod UID in the checkpoint (under the same container name).
                uid = next(
                    (
                        uid_by_device[(devices.container, device_id)]
                        for device_id in ids
                        if (devices.container, device_id) in uid_by_device
                    ),
                    "",
                )
                holders.append(
                    _Holder(
                        devices.namespace, devices.pod, devices.container, uid, gpu_uuid, tuple(ids)
                    )
                )
        return holders
    # Without the PodResources API the checkpoint is all there is: pod UIDs, no names.
    for entry in ours:
        for gpu_uuid, ids in _by_gpu(entry.device_ids, served).items():
            holders.append(_Holder("", "", entry.container, entry.pod_uid, gpu_uuid, tuple(ids)))
    return holders


def _sum_memory(processes: Sequence[GpuProcess]) -> Optional[int]:
    known = [process.used_memory_mib for process in processes]
    if not processes:
        return 0
    if any(memory is None for memory in known):
        return None
    return sum(memory for memory in known if memory is not None)


def attribute(
    *,
    served: Mapping[str, object],
    resource_name: str,
    pod_devices: Optional[Sequence[ContainerDevices]],
    checkpoint: Optional[Sequence[CheckpointEntry]],
    processes: Sequence[tuple[GpuProcess, Optional[PodCgroup]]],
    limits_for: LimitsFor,
    problems: Sequence[str] = (),
) -> Attribution:
    """Join the sources (None: that source could not be read) for the ``served`` GPUs."""
    holders = _holders(pod_devices, checkpoint, resource_name, served)
    by_pod_gpu: dict[tuple[str, str], list[_Holder]] = {}
    for holder in holders:
        if holder.pod_uid:
            by_pod_gpu.setdefault((holder.pod_uid, holder.gpu_uuid), []).append(holder)
    found: dict[tuple[str, str], list[GpuProcess]] = {}
    strays: list[StrayProcess] = []
    clients: dict[str, int] = {}
    for process, cgroup in processes:
        if process.gpu_uuid not in served:
            continue
        clients[process.gpu_uuid] = clients.get(process.gpu_uuid, 0) + 1
        if cgroup is None:
            why = "not in a pod (a host process, or it has exited)"
        elif (cgroup.pod_uid, process.gpu_uuid) in by_pod_gpu:
            found.setdefault((cgroup.pod_uid, process.gpu_uuid), []).append(process)
            continue
        elif checkpoint is None:
            why = f"in pod {cgroup.pod_uid}, which cannot be matched without the kubelet checkpoint"
        else:
            why = f"in pod {cgroup.pod_uid}, which holds no vGPU of this GPU"
        strays.append(StrayProcess(process.pid, process.gpu_uuid, process.used_memory_mib, why))
    containers: list[ContainerUsage] = []
    pods: list[PodGpuUsage] = []
    seen_pods: set[tuple[str, str, str, str]] = set()
    for holder in holders:
        group = by_pod_gpu.get((holder.pod_uid, holder.gpu_uuid), []) if holder.pod_uid else []
        pod_processes = found.get((holder.pod_uid, holder.gpu_uuid), [])
        shared = tuple(sorted(other.container for other in group if other is not holder))
        threads, memory_limit = limits_for(holder.gpu_uuid, len(holder.vgpu_ids))
        pids = tuple(sorted(process.pid for process in pod_processes))
        containers.append(
            ContainerUsage(
                namespace=holder.namespace,
                pod=holder.pod,
                container=holder.container,
                pod_uid=holder.pod_uid,
                gpu_uuid=holder.gpu_uuid,
                vgpu_ids=holder.vgpu_ids,
                thread_limit_percent=threads,
                memory_limit_mib=memory_limit,
                pids=() if shared else pids,
                memory_used_mib=None if shared else _sum_memory(pod_processes),
                memory_shared_with=shared,
            )
        )
        pod_key = (holder.namespace, holder.pod, holder.pod_uid, holder.gpu_uuid)
        if pod_key in seen_pods:
            continue
        seen_pods.add(pod_key)
        pods.append(
            PodGpuUsage(
                namespace=holder.namespace,
                pod=holder.pod,
                pod_uid=holder.pod_uid,
                gpu_uuid=holder.gpu_uuid,
                containers=tuple(sorted({holder.container, *shared})),
                pids=pids,
                memory_used_mib=_sum_memory(pod_processes),
            )
        )
    return Attribution(
        containers=tuple(containers),
        pods=tuple(pods),
        strays=tuple(strays),
        clients_by_gpu=tuple(sorted(clients.items())),
        problems=tuple(problems),
    )


def limits_from(inventory: Inventory, policy: Optional[MpsGrantPolicy]) -> LimitsFor:
    """The limits Allocate hands a container holding n vGPUs of a GPU, as :func:`grant`
    computes them (None for no limit, and for both without MPS)."""

    def limits_for(gpu_uuid: str, vgpus: int) -> tuple[Optional[float], Optional[int]]:
        served = inventory.get(gpu_uuid)
        if policy is None or served is None or served.pipe_dir is None:
            return None, None
        threads = thread_percentage(policy.thread_limit, vgpus, served.replicas)
        memory = memory_limit_mib(
            policy.memory_limit,
            vgpus,
            served.replicas,
            served.gpu.memory_mib,
            policy.memory_headroom_mib,
        )
        # A float, for JSON and the metric: fractions are kept (12.5 for 1 of 8).
        return (None if threads is None else float(threads)), memory

    return limits_for


#: (PodResources socket, resource name) -> every container's devices of that resource;
#: raises AttributionError (:func:`vgpu_agent.observability.podresources.list_pod_resources`).
ListPods = Callable[[str, str], list[ContainerDevices]]


def gather(
    *,
    backend: GpuBackend,
    inventory: Inventory,
    policy: Optional[MpsGrantPolicy],
    resource_name: str,
    pod_resources_socket: str,
    checkpoint_path: str,
    proc_root: str = "/proc",
    cgroup_root: str = "/sys/fs/cgroup",
    list_pods: ListPods,
    read_checkpoint_at: Callable[[str], list[CheckpointEntry]] = read_checkpoint,
    hidden_cgroups: Optional[dict[int, Optional[PodCgroup]]] = None,
) -> Attribution:
    """Ask every source once and join them; a source that fails is named in ``problems``.

    ``hidden_cgroups`` (pid -> pod, None for none) keeps, from one gather to the next, what
    the cgroup tree said of processes ``/proc`` hides, so that a refresher looking every
    second walks the tree only when a new hidden client comes (a process does not leave
    its pod); it is left holding this gather's listed processes only."""
    problems: list[str] = []
    pod_devices: Optional[list[ContainerDevices]]
    try:
        pod_devices = list_pods(pod_resources_socket, resource_name)
    except AttributionError as exc:
        pod_devices = None
        problems.append(str(exc))
    checkpoint: Optional[list[CheckpointEntry]]
    try:
        checkpoint = read_checkpoint_at(checkpoint_path)
    except AttributionError as exc:
        checkpoint = None
        problems.append(str(exc))
    processes: list[tuple[GpuProcess, Optional[PodCgroup]]] = []
    by_pid: Optional[dict[int, PodCgroup]] = None
    known = hidden_cgroups if hidden_cgroups is not None else {}
    hidden: dict[int, Optional[PodCgroup]] = {}
    for served in inventory.gpus:
        try:
            listed = backend.mps_client_processes(served.gpu.uuid)
        except GpuError as exc:
            problems.append(str(exc))
            continue
        for process in listed:
            cgroup = read_process_cgroup(process.pid, proc_root)
            if cgroup is None:
                # Hidden from /proc (ProtectProc=invisible), or really in no pod: the
                # cgroup tree tells, read at most once per gather.
                if process.pid in known:
                    cgroup = known[process.pid]
                else:
                    if by_pid is None:
                        by_pid = pod_cgroups_by_pid(cgroup_root)
                    cgroup = by_pid.get(process.pid)
                hidden[process.pid] = cgroup
            processes.append((process, cgroup))
    if hidden_cgroups is not None:
        hidden_cgroups.clear()
        hidden_cgroups.update(hidden)
    return attribute(
        served={served.gpu.uuid: served for served in inventory.gpus},
        resource_name=resource_name,
        pod_devices=pod_devices,
        checkpoint=checkpoint,
        processes=processes,
        limits_for=limits_from(inventory, policy),
        problems=problems,
    )


class PodListCache:
    """The PodResources answer for the checks between full refreshes: asked again only
    when the kubelet's device checkpoint changed (every Allocate rewrites it, so a pod that
    got vGPUs since is never missed) or ``max_age_s`` passed (names of deleted pods)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._key: Optional[tuple[str, str, tuple[int, int, int]]] = None
        self._answer: list[ContainerDevices] = []
        self._taken_at = 0.0

    def lister(self, list_pods: ListPods, checkpoint_path: str, max_age_s: float) -> ListPods:
        """``list_pods``, answered from the last answer while it holds."""

        def listed(socket_path: str, resource_name: str) -> list[ContainerDevices]:
            try:
                info = os.stat(checkpoint_path)
            except OSError:
                return self.remember(list_pods, None, socket_path, resource_name)
            key = (socket_path, resource_name, (info.st_ino, info.st_size, info.st_mtime_ns))
            if key == self._key and self._clock() - self._taken_at < max_age_s:
                return list(self._answer)
            return self.remember(list_pods, key, socket_path, resource_name)

        return listed

    def remember(
        self,
        list_pods: ListPods,
        key: Optional[tuple[str, str, tuple[int, int, int]]],
        socket_path: str,
        resource_name: str,
    ) -> list[ContainerDevices]:
        """Ask the kubelet and keep its answer under ``key`` (nothing kept on an error)."""
        self._key = None
        answer = list_pods(socket_path, resource_name)
        self._key, self._answer, self._taken_at = key, list(answer), self._clock()
        return answer
