"""The pure device model: physical GPUs -> vGPU ids, health, preferred allocation, and
what an Allocate grants a container. No I/O here; everything is plain values.
"""

from __future__ import annotations

import enum
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from decimal import ROUND_FLOOR, Decimal
from typing import Literal, Optional, Union

from vgpu_agent.model.errors import VgpuError
from vgpu_agent.model.gpu import Gpu

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
#: GPU UUIDs never contain ':' so the last "::" splits an id unambiguously.
VGPU_ID_SEPARATOR = "::"
MAX_DEVICE_ID_LENGTH = 63
#: The NVIDIA container toolkit's volume-mount device list: one mount per GPU under this
#: directory, named by UUID, whose host path it ignores (the device plugin convention).
DEVICE_LIST_MOUNT_ROOT = "/var/run/nvidia-container-devices"
DEVICE_LIST_MOUNT_HOST_PATH = "/dev/null"
#: The CDI kind `nvidia-ctk cdi generate` writes; devices are named by index, UUID or all.
CDI_GPU_KIND = "nvidia.com/gpu"
#: Thread percentages are handed out to this precision, rounded down, so that N shares
#: never add up to more than the GPU.
_PERCENTAGE_STEP = Decimal("0.01")
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
#: How every MPS reason about a daemon's ceiling begins: the daemon answers, but does not
#: hold the ceiling (set by vgpu_agent.mps.ceilings and the bring-up).
CEILING_TEXT = f"{_MPS_TEXT} ceiling"


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
    def about_ceiling(self) -> bool:
        """Whether it is an MPS reason about the daemon's ceiling (lost or not set), not
        about a daemon that is down."""
        return self.kind is ReasonKind.MPS and self.text.startswith(CEILING_TEXT)

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
    #: Enforced confinement: the most vGPUs one container may hold (None: no limit).
    max_vgpus_per_container: Optional[int] = None


@dataclass(frozen=True)
class CdiDeviceGrant:
    """A fully qualified CDI device name the runtime injects, e.g. nvidia.com/gpu=GPU-..."""

    name: str


@dataclass(frozen=True)
class ContainerGrant:
    """What Allocate returns for one container."""

    envs: dict[str, str]
    mounts: tuple[MountGrant, ...] = ()
    annotations: dict[str, str] = field(default_factory=dict)
    cdi_devices: tuple[CdiDeviceGrant, ...] = ()


def thread_percentage(policy: LimitPolicy, vgpus: int, replicas: int) -> Optional[Decimal]:
    """CUDA_MPS_ACTIVE_THREAD_PERCENTAGE for ``vgpus`` of ``replicas``; None for no limit.

    Proportional shares keep their fraction (1 of 8 is 12.5, 1 of 16 is 6.25: MPS takes
    fractions), rounded down to hundredths so N shares never exceed the GPU.
    """
    if isinstance(policy, int):
        # A fixed value is per vGPU: a pod of n vGPUs gets n times it.
        return Decimal(min(100, policy * vgpus))
    if policy == "none":
        return None
    share = (Decimal(vgpus) * 100 / Decimal(replicas)).quantize(
        _PERCENTAGE_STEP, rounding=ROUND_FLOOR
    )
    return max(_PERCENTAGE_STEP, min(Decimal(100), share))


def proportional_memory_mib(memory_mib: int, headroom_mib: int, vgpus: int, replicas: int) -> int:
    """``vgpus`` of ``replicas`` equal slices of the GPU's memory less the headroom (MiB)."""
    return (max(memory_mib - headroom_mib, 0) * vgpus) // replicas


def percentage_text(percentage: Decimal) -> str:
    """A thread percentage as MPS reads it: no exponent, no trailing zeros (12.5, 6.25, 25)."""
    text = f"{percentage.quantize(_PERCENTAGE_STEP, rounding=ROUND_FLOOR):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


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


@dataclass(frozen=True)
class Ceiling:
    """The defaults an MPS daemon holds every client to, whatever the client's environment
    says (its own variables can only lower them). None: no ceiling of that kind."""

    thread_percentage: Optional[Decimal] = None
    memory_mib: Optional[int] = None

    @property
    def empty(self) -> bool:
        """Whether there is nothing to hold clients to."""
        return self.thread_percentage is None and self.memory_mib is None

    def describe(self) -> str:
        """One line for status, doctor and logs, e.g. "12.5% of the SMs, 10194 MiB"."""
        parts = []
        if self.thread_percentage is not None:
            parts.append(f"{percentage_text(self.thread_percentage)}% of the SMs")
        if self.memory_mib is not None:
            parts.append(f"{self.memory_mib} MiB")
        return ", ".join(parts) if parts else "none"


def enforced_ceiling(
    max_vgpus_per_container: int, replicas: int, memory_mib: int, headroom_mib: int
) -> Ceiling:
    """The ceiling of enforced confinement: ``max_vgpus_per_container`` vGPUs' share of the
    SMs and of the memory. The one place the enforced thread default is computed."""
    return Ceiling(
        thread_percentage("proportional", max_vgpus_per_container, replicas),
        memory_limit_mib(
            "proportional",
            min(max_vgpus_per_container, replicas),
            replicas,
            memory_mib,
            headroom_mib,
        ),
    )


def check_request_size(vgpus: int, mps: Optional[MpsGrantPolicy]) -> None:
    """Refuse a container asking for more vGPUs than enforced confinement allows."""
    if mps is None or mps.max_vgpus_per_container is None:
        return
    if vgpus > mps.max_vgpus_per_container:
        limit = mps.max_vgpus_per_container
        raise InvalidRequestError(
            f"the container asks for {vgpus} vGPUs, but this node gives a container at most "
            f"{limit} (mps.max_vgpus_per_container = {limit}): request at most {limit}, or "
            "have the node's operator raise mps.max_vgpus_per_container, which also raises "
            "every pod's ceiling on that node to that many shares"
        )


def grant(
    served: ServedGpu,
    vgpus: int,
    mps: Optional[MpsGrantPolicy],
    device_list_strategy: str = "envvar",
) -> ContainerGrant:
    """What a container holding ``vgpus`` of ``served`` needs: its GPU (named as
    ``device_list_strategy`` says) and, with MPS, the pipe directory and its limits."""
    check_request_size(vgpus, mps)
    envs, mounts, cdi_devices = _device_list(served.gpu.uuid, device_list_strategy)
    annotations = {"vgpu.eks.amazonaws.com/gpu-uuid": served.gpu.uuid}
    if mps is None or served.pipe_dir is None:
        return ContainerGrant(envs, tuple(mounts), annotations, cdi_devices)
    envs["CUDA_MPS_PIPE_DIRECTORY"] = mps.container_pipe_dir
    mounts.append(MountGrant(mps.container_pipe_dir, served.pipe_dir, mps.pipe_dir_read_only))
    if mps.share_host_shm:
        mounts.append(MountGrant("/dev/shm", "/dev/shm", read_only=False))
    threads = thread_percentage(mps.thread_limit, vgpus, served.replicas)
    if threads is not None:
        envs["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = percentage_text(threads)
    memory = memory_limit_mib(
        mps.memory_limit, vgpus, served.replicas, served.gpu.memory_mib, mps.memory_headroom_mib
    )
    if memory is not None:
        # The container sees only its GPU, so it is device 0 there.
        envs["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"0={memory}M"
    return ContainerGrant(envs, tuple(mounts), annotations, cdi_devices)


def _device_list(
    gpu_uuid: str, strategy: str
) -> tuple[dict[str, str], list[MountGrant], tuple[CdiDeviceGrant, ...]]:
    """How the container toolkit learns the container's GPU: environment, mounts, CDI."""
    if strategy == "envvar":
        return {"NVIDIA_VISIBLE_DEVICES": gpu_uuid}, [], ()
    if strategy == "volume-mounts":
        # As NVIDIA's device plugin does: the variable names the mount root, so a toolkit
        # that still reads the variable finds no GPU in it; the mounts name the GPU.
        mount = MountGrant(
            f"{DEVICE_LIST_MOUNT_ROOT}/{gpu_uuid}", DEVICE_LIST_MOUNT_HOST_PATH, read_only=True
        )
        return {"NVIDIA_VISIBLE_DEVICES": DEVICE_LIST_MOUNT_ROOT}, [mount], ()
    if strategy == "cdi":
        # "void" overrides the "all" that CUDA images set, for a toolkit that reads it.
        return (
            {"NVIDIA_VISIBLE_DEVICES": "void"},
            [],
            (CdiDeviceGrant(f"{CDI_GPU_KIND}={gpu_uuid}"),),
        )
    raise ValueError(f"unknown device list strategy {strategy!r}")


def pipe_dir_for(pipe_root: str, gpu_uuid: str) -> str:
    """The host pipe directory of a GPU's MPS daemon."""
    return os.path.join(pipe_root, gpu_uuid)
