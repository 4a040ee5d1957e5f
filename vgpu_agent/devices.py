"""The pure device model: physical GPUs -> vGPU ids, health, preferred allocation, and
what an Allocate grants a container. No I/O here; everything is plain values.
"""

from __future__ import annotations

import enum
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Literal, Optional, Union

from vgpu_agent.errors import VgpuError
from vgpu_agent.gpu import Gpu

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
#: GPU UUIDs never contain ':' so the last "::" splits an id unambiguously.
VGPU_ID_SEPARATOR = "::"
MAX_DEVICE_ID_LENGTH = 63
#: A per-client limit: "proportional" (the vGPUs' share of the GPU), "none", or a fixed
#: amount per vGPU (percent of threads, MiB of memory). Parsed once, by the config.
LimitPolicy = Union[Literal["proportional", "none"], int]


class InvalidRequestError(VgpuError):
    """A device plugin request the kubelet sent cannot be honoured (INVALID_ARGUMENT)."""


def make_vgpu_id(gpu_uuid: str, replica: int) -> str:
    """The vGPU id for replica ``replica`` of GPU ``gpu_uuid``."""
    vgpu_id = f"{gpu_uuid}{VGPU_ID_SEPARATOR}{replica}"
    if len(vgpu_id) > MAX_DEVICE_ID_LENGTH:
        raise ValueError(
            f"vGPU id {vgpu_id!r} is longer than the kubelet's {MAX_DEVICE_ID_LENGTH} characters"
        )
    return vgpu_id


def parse_vgpu_id(vgpu_id: str) -> tuple[str, int]:
    """Split a vGPU id into (GPU UUID, replica); raises InvalidRequestError if malformed."""
    gpu_uuid, separator, replica_text = vgpu_id.rpartition(VGPU_ID_SEPARATOR)
    # Only the canonical spelling make_vgpu_id writes: "01" would name replica 1 under a
    # second id and slip past the duplicate check of validate_allocation.
    canonical = (
        replica_text.isascii()
        and replica_text.isdigit()
        and (replica_text == "0" or not replica_text.startswith("0"))
    )
    if not separator or not gpu_uuid or not canonical:
        raise InvalidRequestError(
            f"device id {_shorten(vgpu_id)!r} is not a vGPU id of this plugin "
            f"(expected '<GPU UUID>{VGPU_ID_SEPARATOR}<n>')"
        )
    return gpu_uuid, int(replica_text)


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class ReasonKind(enum.Enum):
    """What kind of cause makes a GPU Unhealthy, which decides how the cause is cleared."""

    #: A critical GPU event (XID, double-bit ECC): cleared after a quiet period or a reset.
    FAULT = "fault"
    #: The GPU fell off the bus: cleared when it answers a query again.
    LOST = "lost"
    #: The GPU's MPS daemon does not answer: cleared when it answers.
    MPS = "mps"


#: Every MPS reason's text starts so (what `vgpu-agent status` and the journal show).
_MPS_TEXT = "MPS daemon"


@dataclass(frozen=True)
class HealthReason:
    """One cause for a GPU to be Unhealthy: its kind and the text people read.

    Build one with :meth:`xid_fault`, :meth:`ecc_fault`, :meth:`lost` or :meth:`mps_down`.
    """

    kind: ReasonKind
    text: str
    #: The XID number for an XID fault.
    xid: Optional[int] = None

    def __str__(self) -> str:
        return self.text

    @property
    def is_fault(self) -> bool:
        """Whether a GPU fault event raised it (cleared by the quiet period or a reset)."""
        return self.kind is ReasonKind.FAULT

    @classmethod
    def xid_fault(cls, xid: int) -> HealthReason:
        """A critical XID error."""
        return cls(ReasonKind.FAULT, f"xid {xid}", xid)

    @classmethod
    def ecc_fault(cls) -> HealthReason:
        """A double-bit (uncorrectable) ECC error."""
        return cls(ReasonKind.FAULT, "double-bit ECC error")

    @classmethod
    def lost(cls) -> HealthReason:
        """The GPU fell off the bus."""
        return cls(ReasonKind.LOST, "GPU lost")

    @classmethod
    def mps_down(cls, problem: str) -> HealthReason:
        """The GPU's MPS daemon does not answer, because of ``problem``."""
        text = problem if problem.startswith(_MPS_TEXT) else f"{_MPS_TEXT}: {problem}"
        return cls(ReasonKind.MPS, text)


@dataclass(frozen=True)
class VGpu:
    """One virtual GPU as advertised to the kubelet."""

    vgpu_id: str
    gpu_uuid: str
    replica: int
    health: str
    numa_node: Optional[int]


@dataclass(frozen=True)
class ServedGpu:
    """A physical GPU we serve, split into ``replicas`` vGPUs, with its health.

    ``unhealthy_reasons`` holds every current cause (an XID, a dead MPS daemon, ...); the
    GPU is healthy when there is none.
    """

    gpu: Gpu
    replicas: int
    unhealthy_reasons: tuple[HealthReason, ...] = ()
    #: The MPS pipe directory on the host, when MPS is used.
    pipe_dir: Optional[str] = None

    @property
    def healthy(self) -> bool:
        """Whether the GPU's vGPUs are advertised Healthy."""
        return not self.unhealthy_reasons

    @property
    def health(self) -> str:
        """``Healthy`` or ``Unhealthy``, as the kubelet reads it."""
        return HEALTHY if self.healthy else UNHEALTHY

    @property
    def reason_texts(self) -> list[str]:
        """The causes as people read them."""
        return [reason.text for reason in self.unhealthy_reasons]

    @property
    def vgpu_ids(self) -> list[str]:
        """The ids of this GPU's vGPUs in replica order."""
        return [make_vgpu_id(self.gpu.uuid, replica) for replica in range(self.replicas)]


@dataclass(frozen=True)
class Inventory:
    """Everything the plugin serves: the GPUs in index order."""

    gpus: tuple[ServedGpu, ...] = ()
    # Not an init field: dataclasses.replace() would otherwise hand the old inventory's
    # index to the copy, and filling it would change what the old one finds.
    _by_uuid: dict[str, ServedGpu] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        self._by_uuid.update({served.gpu.uuid: served for served in self.gpus})

    def get(self, gpu_uuid: str) -> Optional[ServedGpu]:
        """The served GPU with this UUID, if any."""
        return self._by_uuid.get(gpu_uuid)

    def vgpus(self) -> list[VGpu]:
        """Every vGPU with its health, GPU by GPU."""
        return [
            VGpu(
                vgpu_id=vgpu_id,
                gpu_uuid=served.gpu.uuid,
                replica=replica,
                health=served.health,
                numa_node=served.gpu.numa_node,
            )
            for served in self.gpus
            for replica, vgpu_id in enumerate(served.vgpu_ids)
        ]

    @property
    def vgpu_count(self) -> int:
        """How many vGPUs are advertised."""
        return sum(served.replicas for served in self.gpus)

    @property
    def unhealthy_vgpu_count(self) -> int:
        """How many advertised vGPUs are Unhealthy."""
        return sum(served.replicas for served in self.gpus if not served.healthy)

    def with_reason(self, gpu_uuid: str, reason: HealthReason, present: bool) -> Inventory:
        """A copy where ``reason`` is added to (present) or removed from a GPU's causes."""
        gpus = []
        for served in self.gpus:
            updated = served
            if served.gpu.uuid == gpu_uuid:
                reasons = tuple(r for r in served.unhealthy_reasons if r != reason)
                if present:
                    reasons = (*reasons, reason)
                updated = replace(served, unhealthy_reasons=reasons)
            gpus.append(updated)
        return Inventory(tuple(gpus))


def validate_allocation(inventory: Inventory, vgpu_ids: list[str]) -> ServedGpu:
    """Check one container's requested ids; return the one GPU they all live on.

    Raises InvalidRequestError, with a message for ``kubectl describe pod``, for an empty
    request, unknown, duplicated or unhealthy ids, or ids on more than one GPU.
    """
    if not vgpu_ids:
        raise InvalidRequestError("the request names no vGPU ids")
    duplicates = sorted(vgpu_id for vgpu_id, count in Counter(vgpu_ids).items() if count > 1)
    if duplicates:
        shown = ", ".join(_shorten(vgpu_id) for vgpu_id in duplicates[:3])
        raise InvalidRequestError(f"vGPU ids requested more than once: {shown}")
    gpu_uuids: dict[str, None] = {}
    for vgpu_id in vgpu_ids:
        gpu_uuid, replica = parse_vgpu_id(vgpu_id)
        served = inventory.get(gpu_uuid)
        if served is None or replica >= served.replicas:
            raise InvalidRequestError(
                f"unknown vGPU id {_shorten(vgpu_id)!r}: this node serves no such vGPU "
                "(the GPU may have been removed or reconfigured; delete the pod to reschedule it)"
            )
        if not served.healthy:
            raise InvalidRequestError(
                f"vGPU {vgpu_id} is unhealthy ({'; '.join(served.reason_texts)}); "
                "delete the pod to reschedule it"
            )
        gpu_uuids[gpu_uuid] = None
    if len(gpu_uuids) > 1:
        raise InvalidRequestError(
            f"the request spans {len(gpu_uuids)} physical GPUs ({', '.join(gpu_uuids)}); "
            "a container's vGPUs must all be on one GPU under MPS"
        )
    served = inventory.get(next(iter(gpu_uuids)))
    assert served is not None  # noqa: S101 - every id was looked up above
    return served


def preferred_allocation(
    inventory: Inventory,
    available_ids: list[str],
    must_include_ids: list[str],
    size: int,
) -> list[str]:
    """Pick ``size`` ids from ``available_ids`` on one GPU, best fit.

    Best fit: among GPUs that can hold the whole request (after the must-include ids, which
    fix the GPU when present), the one with the fewest free vGPUs, ties broken by index.
    When no single GPU fits, the answer is the must-include ids plus as many as fit on the
    GPU with the most free vGPUs: the kubelet treats our answer as a hint and fills the rest.
    """
    if size <= 0:
        raise InvalidRequestError(f"allocation size must be at least 1, got {size}")
    if len(must_include_ids) > size:
        raise InvalidRequestError(
            f"{len(must_include_ids)} must-include ids exceed the allocation size {size}"
        )
    available = set(available_ids)
    missing = [vgpu_id for vgpu_id in must_include_ids if vgpu_id not in available]
    if missing:
        raise InvalidRequestError(
            f"must-include id {_shorten(missing[0])!r} is not among the available ids"
        )
    free_by_gpu: dict[str, list[str]] = {}
    for served in inventory.gpus:
        if served.healthy:
            free_by_gpu[served.gpu.uuid] = [i for i in served.vgpu_ids if i in available]
    pinned_gpus = {parse_vgpu_id(vgpu_id)[0] for vgpu_id in must_include_ids}
    candidates = [uuid for uuid in free_by_gpu if not pinned_gpus or uuid in pinned_gpus]
    if not candidates:
        return list(must_include_ids)

    def pick(gpu_uuid: str) -> list[str]:
        # Every must-include id stays in the answer (even on another GPU), and the answer
        # never holds more than ``size`` ids.
        chosen = list(must_include_ids)
        chosen_set = set(chosen)
        for vgpu_id in free_by_gpu[gpu_uuid]:
            if len(chosen) >= size:
                break
            if vgpu_id not in chosen_set:
                chosen.append(vgpu_id)
        return chosen

    # Must-include ids on several GPUs already span GPUs: no single GPU can fit them.
    fitting = [
        uuid for uuid in candidates if len(pinned_gpus) <= 1 and len(free_by_gpu[uuid]) >= size
    ]
    if fitting:
        return pick(min(fitting, key=lambda uuid: len(free_by_gpu[uuid])))
    return pick(max(candidates, key=lambda uuid: len(free_by_gpu[uuid])))


@dataclass(frozen=True)
class MountGrant:
    """A host path the container gets at ``container_path``."""

    container_path: str
    host_path: str
    read_only: bool


@dataclass(frozen=True)
class MpsGrantPolicy:
    """How Allocate sets up MPS for a container (from the ``[mps]`` config)."""

    container_pipe_dir: str = "/run/nvidia-mps"
    #: A fixed number is a percentage per vGPU.
    thread_limit: LimitPolicy = "proportional"
    #: A fixed number is MiB per vGPU.
    memory_limit: LimitPolicy = "proportional"
    memory_headroom_mib: int = 0
    share_host_shm: bool = False
    pipe_dir_read_only: bool = False


@dataclass(frozen=True)
class ContainerGrant:
    """What Allocate returns for one container."""

    envs: dict[str, str]
    mounts: tuple[MountGrant, ...] = ()
    annotations: dict[str, str] = field(default_factory=dict)


def thread_percentage(policy: LimitPolicy, vgpus: int, replicas: int) -> Optional[int]:
    """CUDA_MPS_ACTIVE_THREAD_PERCENTAGE for ``vgpus`` of ``replicas``; None for no limit."""
    if isinstance(policy, int):
        # A fixed value is per vGPU: a pod of n vGPUs gets n times it.
        return min(100, policy * vgpus)
    if policy == "none":
        return None
    return max(1, min(100, (vgpus * 100) // replicas))


def proportional_memory_mib(memory_mib: int, headroom_mib: int, vgpus: int, replicas: int) -> int:
    """``vgpus`` of ``replicas`` equal slices of the GPU's memory less the headroom (MiB)."""
    return (max(memory_mib - headroom_mib, 0) * vgpus) // replicas


def memory_limit_mib(
    policy: LimitPolicy, vgpus: int, replicas: int, memory_mib: int, headroom_mib: int
) -> Optional[int]:
    """Pinned device memory for ``vgpus`` of ``replicas`` in MiB; None for no limit."""
    if isinstance(policy, int):
        # A fixed value is per vGPU: a pod of n vGPUs gets n times it.
        return policy * vgpus
    if policy == "none":
        return None
    return max(1, proportional_memory_mib(memory_mib, headroom_mib, vgpus, replicas))


def grant(served: ServedGpu, vgpus: int, mps: Optional[MpsGrantPolicy]) -> ContainerGrant:
    """What a container holding ``vgpus`` of ``served`` needs: its GPU and, with MPS,
    the pipe directory and its per-client limits."""
    envs = {"NVIDIA_VISIBLE_DEVICES": served.gpu.uuid}
    annotations = {"vgpu.eks.amazonaws.com/gpu-uuid": served.gpu.uuid}
    if mps is None or served.pipe_dir is None:
        return ContainerGrant(envs=envs, annotations=annotations)
    envs["CUDA_MPS_PIPE_DIRECTORY"] = mps.container_pipe_dir
    mounts = [MountGrant(mps.container_pipe_dir, served.pipe_dir, mps.pipe_dir_read_only)]
    if mps.share_host_shm:
        mounts.append(MountGrant("/dev/shm", "/dev/shm", read_only=False))
    threads = thread_percentage(mps.thread_limit, vgpus, served.replicas)
    if threads is not None:
        envs["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(threads)
    memory = memory_limit_mib(
        mps.memory_limit, vgpus, served.replicas, served.gpu.memory_mib, mps.memory_headroom_mib
    )
    if memory is not None:
        # The container sees only its GPU, so it is device 0 there.
        envs["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"0={memory}M"
    return ContainerGrant(envs=envs, mounts=tuple(mounts), annotations=annotations)


def pipe_dir_for(pipe_root: str, gpu_uuid: str) -> str:
    """The host pipe directory of a GPU's MPS daemon."""
    return os.path.join(pipe_root, gpu_uuid)
