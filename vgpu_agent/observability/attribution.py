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

Everything here but :func:`read_process_cgroup`, :func:`pod_cgroups_by_pid`,
:func:`read_checkpoint` and :func:`gather` (which asks the sources, the PodResources API
through the function it is handed, then calls the pure :func:`attribute`) is pure.
"""

from __future__ import annotations

import json
import os
import re
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


@dataclass(frozen=True)
class ContainerDevices:
    """One container's devices of one resource, as the kubelet's PodResources API lists
    them (:mod:`vgpu_agent.observability.podresources` reads them)."""

    namespace: str
    pod: str
    container: str
    resource_name: str
    device_ids: tuple[str, ...]


#: The kubelet's device checkpoint, in the device plugin directory.
CHECKPOINT_NAME = "kubelet_internal_checkpoint"
#: Checkpoints are small; a bigger file is not the kubelet's.
MAX_CHECKPOINT_BYTES = 16 * 1024 * 1024

# systemd cgroup driver: kubepods[-<qos>]-pod<UID with '_' for '-'>.slice, possibly with a
# prefix from a nested kubelet (kubelet-kubepods-...).
_SYSTEMD_POD_RE = re.compile(
    r"(?:[a-z0-9]+-)*kubepods(?:-(?P<qos>burstable|besteffort))?-pod(?P<uid>[0-9a-fA-F_]{36})\.slice"
)
# cgroupfs driver: .../kubepods/[<qos>/]pod<UID>
_CGROUPFS_POD_RE = re.compile(r"pod(?P<uid>[0-9a-fA-F-]{36})")
_CGROUPFS_QOS = frozenset({"burstable", "besteffort"})
# systemd scopes of container runtimes: cri-containerd-<id>.scope, crio-<id>.scope,
# docker-<id>.scope (cri-dockerd).
_SCOPE_RE = re.compile(r"(?:cri-containerd|crio|docker)-(?P<id>[0-9a-fA-F]{12,})\.scope")
_CONTAINER_ID_RE = re.compile(r"[0-9a-fA-F]{12,}")


@dataclass(frozen=True)
class PodCgroup:
    """Where a process sits: its pod's UID, its container's runtime id, its QoS class."""

    pod_uid: str
    #: None for a process in the pod's cgroup but in no container's (CRI-O's conmon).
    container_id: Optional[str]
    qos: str


def _pod_from_path(path: str) -> Optional[PodCgroup]:
    segments = [segment for segment in path.split("/") if segment]
    for position, segment in enumerate(segments):
        systemd = _SYSTEMD_POD_RE.fullmatch(segment)
        if systemd is not None:
            uid = systemd.group("uid").replace("_", "-").lower()
            qos = systemd.group("qos") or "guaranteed"
            return PodCgroup(uid, _container_id(segments[position + 1 :]), qos)
        cgroupfs = _CGROUPFS_POD_RE.fullmatch(segment)
        if cgroupfs is not None and "kubepods" in segments[:position]:
            parent = segments[position - 1]
            qos = parent if parent in _CGROUPFS_QOS else "guaranteed"
            uid = cgroupfs.group("uid").lower()
            return PodCgroup(uid, _container_id(segments[position + 1 :]), qos)
    return None


def _container_id(rest: Sequence[str]) -> Optional[str]:
    if not rest:
        return None
    first = rest[0]
    scope = _SCOPE_RE.fullmatch(first)
    if scope is not None:
        return scope.group("id").lower()
    if _CONTAINER_ID_RE.fullmatch(first):
        return first.lower()
    return None


def parse_cgroup(text: str) -> Optional[PodCgroup]:
    """The pod of a process from its ``/proc/<pid>/cgroup`` text; None when in no pod.

    cgroup v2 gives one line ``0::<path>``; on cgroup v1 every hierarchy's line names the
    same pod, and the first that does is used.
    """
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        _controllers, separator, path = rest.partition(":")
        if not hierarchy or not separator:
            continue
        found = _pod_from_path(path.strip())
        if found is not None:
            return found
    return None


#: How deep below the cgroup root container cgroups are looked for (kubepods nests 4-6 deep).
MAX_CGROUP_DEPTH = 10


def pod_cgroups_by_pid(cgroup_root: str = "/sys/fs/cgroup") -> dict[int, PodCgroup]:
    """Every pid in a container cgroup of a pod, from the cgroup v2 tree's ``cgroup.procs``.

    The answer for processes ``/proc`` hides: under systemd's ``ProtectProc=invisible`` the
    agent (root without capabilities) cannot see other users' ``/proc/<pid>``, while the
    cgroup tree stays readable. Pids are in the reader's PID namespace, as NVML's are.
    """
    found: dict[int, PodCgroup] = {}
    root_depth = cgroup_root.rstrip("/").count("/")
    for directory, subdirectories, _files in os.walk(cgroup_root):
        relative = directory[len(cgroup_root) :]
        depth = directory.rstrip("/").count("/") - root_depth
        pod = _pod_from_path(relative) if "pod" in relative else None
        if pod is not None and pod.container_id is not None:
            # A container's cgroup: its processes (and any sub-cgroup's) are its own.
            subdirectories.clear()
            for pid in _cgroup_pids(directory):
                found[pid] = pod
            continue
        if depth >= MAX_CGROUP_DEPTH:
            subdirectories.clear()
    return found


def _cgroup_pids(directory: str) -> list[int]:
    pids: list[int] = []
    for current, _subdirectories, files in os.walk(directory):
        if "cgroup.procs" not in files:
            continue
        try:
            with open(os.path.join(current, "cgroup.procs"), encoding="ascii") as procs:
                pids.extend(int(line) for line in procs if line.strip().isdigit())
        except (OSError, ValueError):
            continue
    return pids


def read_process_cgroup(pid: int, proc_root: str = "/proc") -> Optional[PodCgroup]:
    """The pod of process ``pid``; None when it is in no pod or has exited."""
    try:
        with open(os.path.join(proc_root, str(pid), "cgroup"), encoding="utf-8") as cgroup:
            return parse_cgroup(cgroup.read())
    except (OSError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class CheckpointEntry:
    """One allocation the kubelet recorded: a pod UID's container and its device ids."""

    pod_uid: str
    container: str
    resource_name: str
    device_ids: tuple[str, ...]


def parse_checkpoint(text: str, source: str = CHECKPOINT_NAME) -> list[CheckpointEntry]:
    """The allocations in the kubelet's device checkpoint JSON.

    ``DeviceIDs`` is a map from NUMA node to ids (kubelet 1.20 and newer) or a plain list
    (older kubelets); both are read.
    """
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise AttributionError(f"reading the kubelet checkpoint {source}: not JSON: {exc}") from exc
    data = document.get("Data") if isinstance(document, dict) else None
    if not isinstance(data, dict):
        raise AttributionError(
            f"reading the kubelet checkpoint {source}: no 'Data' object; is it the kubelet's "
            "device manager checkpoint?"
        )
    raw_entries = data.get("PodDeviceEntries")
    if raw_entries is None:  # a kubelet without allocations writes null
        raw_entries = []
    if not isinstance(raw_entries, list):
        raise AttributionError(
            f"reading the kubelet checkpoint {source}: 'PodDeviceEntries' is not a list"
        )
    entries: list[CheckpointEntry] = []
    for raw in raw_entries:
        if not isinstance(raw, dict):
            continue
        pod_uid, container = raw.get("PodUID"), raw.get("ContainerName")
        resource = raw.get("ResourceName")
        if not isinstance(pod_uid, str) or not isinstance(container, str):
            continue
        entries.append(
            CheckpointEntry(
                pod_uid=pod_uid.lower(),
                container=container,
                resource_name=resource if isinstance(resource, str) else "",
                device_ids=_checkpoint_ids(raw.get("DeviceIDs")),
            )
        )
    return entries


def _checkpoint_ids(raw: object) -> tuple[str, ...]:
    if isinstance(raw, dict):
        lists: Iterable[object] = raw.values()
    elif isinstance(raw, list):
        lists = [raw]
    else:
        return ()
    ids: list[str] = []
    for group in lists:
        if isinstance(group, list):
            ids.extend(item for item in group if isinstance(item, str) and item not in ids)
    return tuple(ids)


def read_checkpoint(path: str) -> list[CheckpointEntry]:
    """Read the kubelet's device checkpoint at ``path`` (never written here)."""
    try:
        with open(path, "rb") as checkpoint:
            data = checkpoint.read(MAX_CHECKPOINT_BYTES + 1)
    except FileNotFoundError:
        raise AttributionError(
            f"kubelet checkpoint {path} not found; processes cannot be matched to containers "
            "(is plugin.plugin_dir the kubelet's device plugin directory?)"
        ) from None
    except OSError as exc:
        raise AttributionError(
            f"reading the kubelet checkpoint {path}: {exc.strerror or exc}; run the agent as root"
        ) from exc
    if len(data) > MAX_CHECKPOINT_BYTES:
        raise AttributionError(
            f"reading the kubelet checkpoint {path}: larger than {MAX_CHECKPOINT_BYTES} bytes; "
            "not the kubelet's checkpoint"
        )
    return parse_checkpoint(data.decode("utf-8", "replace"), path)


class CachedCheckpoint:
    """:func:`read_checkpoint` that parses the file again only when it changed (inode,
    size or modification time), for a refresher that reads it every few seconds."""

    def __init__(self) -> None:
        self._key: Optional[tuple[str, int, int, int]] = None
        self._entries: list[CheckpointEntry] = []

    def __call__(self, path: str) -> list[CheckpointEntry]:
        """The allocations in the checkpoint at ``path``; AttributionError as
        :func:`read_checkpoint`."""
        try:
            info = os.stat(path)
        except OSError:
            self._key = None
            return read_checkpoint(path)  # raises the error that names the problem
        key = (path, info.st_ino, info.st_size, info.st_mtime_ns)
        if key != self._key:
            self._entries = read_checkpoint(path)
            self._key = key
        return list(self._entries)


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
) -> Attribution:
    """Ask every source once and join them; a source that fails is named in ``problems``."""
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
                # cgroup tree tells, read once per gather.
                if by_pid is None:
                    by_pid = pod_cgroups_by_pid(cgroup_root)
                cgroup = by_pid.get(process.pid)
            processes.append((process, cgroup))
    return attribute(
        served={served.gpu.uuid: served for served in inventory.gpus},
        resource_name=resource_name,
        pod_devices=pod_devices,
        checkpoint=checkpoint,
        processes=processes,
        limits_for=limits_from(inventory, policy),
        problems=problems,
    )
