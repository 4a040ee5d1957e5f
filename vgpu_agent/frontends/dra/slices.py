"""The node's ResourceSlice, built from the node model: pure values, no I/O.

One pool per node, named after the node. Each served, healthy GPU contributes one device
per share (as many as the device plugin advertises vGPUs, same per-model replicas), named
by a DNS label derived from the GPU UUID and the share's number. An Unhealthy GPU's shares
are left out, so the scheduler allocates only what the node can prepare (the device
plugin's "allocatable = healthy"). :class:`DeviceNames` maps the names back to vGPU ids
when a claim is prepared.

Where the API server offers consumable capacity (:class:`ApiFeatures`, found out by the
publisher), each served GPU is instead one device that claims share, consuming its memory
and compute (:mod:`.capacity`), named ``gpu-<uuid>``; where it keeps device taints, an
Unhealthy GPU's devices stay in the slice with taints that name the cause (:mod:`.taints`)
instead of leaving it.

Attribute names are DRA's unqualified names (C identifiers of at most 32 characters): the
API client qualifies them with the driver name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

from vgpu_agent.frontends.dra.capacity import capacity_device, mib_quantity
from vgpu_agent.frontends.dra.taints import gpu_taints
from vgpu_agent.frontends.dra.types import (
    ApiFeatures,
    AttributeValue,
    NodeSlice,
    SemVer,
    SliceDevice,
)
from vgpu_agent.model.devices import (
    Inventory,
    MpsGrantPolicy,
    ServedGpu,
    make_vgpu_id,
    memory_limit_mib,
    percentage_text,
    thread_percentage,
)

#: A device name is a DNS label: lower-case letters, digits and '-', at most 63.
MAX_DEVICE_NAME_LENGTH = 63
_DNS_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_NOT_LABEL_CHARS_RE = re.compile(r"[^a-z0-9-]+")
_VERSION_PART_RE = re.compile(r"[0-9]+")


def is_dns_label(name: str) -> bool:
    """Whether ``name`` is a DNS label (what DRA requires of a device name)."""
    return len(name) <= MAX_DEVICE_NAME_LENGTH and _DNS_LABEL_RE.fullmatch(name) is not None


def _uuid_label(gpu_uuid: str) -> str:
    return _NOT_LABEL_CHARS_RE.sub("-", gpu_uuid.lower()).strip("-")


def device_name(served: ServedGpu, replica: int, *, by_index: bool = False) -> str:
    """The DNS label of share ``replica`` of ``served``: ``gpu-<uuid>-vgpu-<n>`` lower-cased
    (``GPU-`` UUIDs already start with ``gpu-``), or ``gpu<index>-vgpu-<n>`` when the UUID
    does not make a label (``by_index``, or too long)."""
    label = _uuid_label(served.gpu.uuid)
    if not label.startswith("gpu-"):
        label = f"gpu-{label}"
    name = f"{label}-vgpu-{replica}"
    if by_index or not is_dns_label(name):
        name = f"gpu{served.gpu.index}-vgpu-{replica}"
    return name


def gpu_device_name(served: ServedGpu, *, by_index: bool = False) -> str:
    """The DNS label of ``served`` as one consumable-capacity device: ``gpu-<uuid>``
    lower-cased, or ``gpu<index>`` when the UUID does not make a label (``by_index``)."""
    label = _uuid_label(served.gpu.uuid)
    name = label if label.startswith("gpu-") else f"gpu-{label}"
    if by_index or not is_dns_label(name):
        name = f"gpu{served.gpu.index}"
    return name


@dataclass(frozen=True)
class DeviceNames:
    """Device name <-> vGPU id for every share of an inventory (healthy or not), and
    device name -> GPU UUID for every GPU as a consumable-capacity device."""

    vgpu_by_name: Mapping[str, str]
    gpu_by_name: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, inventory: Inventory) -> DeviceNames:
        """The names of ``inventory``'s shares and GPUs; by GPU index for all of them if
        UUID-derived names would collide."""
        for by_index in (False, True):
            names: dict[str, str] = {}
            for served in inventory.gpus:
                for replica in range(served.replicas):
                    name = device_name(served, replica, by_index=by_index)
                    names[name] = make_vgpu_id(served.gpu.uuid, replica)
            if len(names) == inventory.vgpu_count:
                break
        for by_index in (False, True):
            gpus = {
                gpu_device_name(served, by_index=by_index): served.gpu.uuid
                for served in inventory.gpus
            }
            if len(gpus) == len(inventory.gpus):
                break
        return cls(names, gpus)


def semantic_version(text: str) -> Optional[SemVer]:
    """A driver or compute capability version as DRA's semantic version: three numbers,
    no leading zeros ("580.95.05" -> "580.95.5", "9.0" -> "9.0.0"); None if it has none."""
    parts = _VERSION_PART_RE.findall(text)
    if not parts:
        return None
    numbers = [str(int(part)) for part in parts[:3]]
    numbers += ["0"] * (3 - len(numbers))
    return SemVer(".".join(numbers))


def share_attributes(
    served: ServedGpu, policy: Optional[MpsGrantPolicy]
) -> tuple[dict[str, AttributeValue], dict[str, str]]:
    """What one share of ``served`` gives a claim, as attributes and capacity: its thread
    percentage and pinned memory, computed by the functions Allocate uses."""
    attributes: dict[str, AttributeValue] = {}
    capacity: dict[str, str] = {}
    if policy is None or served.pipe_dir is None:
        return attributes, capacity
    threads = thread_percentage(policy.thread_limit, 1, served.replicas)
    if threads is not None:
        attributes["shareThreadPercentage"] = percentage_text(threads)
    memory = memory_limit_mib(
        policy.memory_limit, 1, served.replicas, served.gpu.memory_mib, policy.memory_headroom_mib
    )
    if memory is not None:
        attributes["shareMemoryMiB"] = memory
        # In the API server's canonical form (6144Mi is stored as 6Gi), so the slice read
        # back compares equal and an unchanged republish writes nothing.
        capacity["memory"] = mib_quantity(memory)
    return attributes, capacity


def node_slice(
    inventory: Inventory,
    *,
    driver: str,
    node_name: str,
    generation: int,
    policy: Optional[MpsGrantPolicy],
    driver_version: str = "",
    features: Optional[ApiFeatures] = None,
) -> NodeSlice:
    """The node's slice: one pool named after the node, with the GPU's attributes, and per
    GPU a device per share or (``features.consumable_capacity``) one shared device. An
    Unhealthy GPU's devices carry taints naming the cause (``features.device_taints``), or
    are left out where the API server would drop the taints."""
    features = features or ApiFeatures()
    names = DeviceNames.of(inventory)
    name_by_vgpu = {vgpu: name for name, vgpu in names.vgpu_by_name.items()}
    name_by_gpu = {gpu_uuid: name for name, gpu_uuid in names.gpu_by_name.items()}
    driver_semver = semantic_version(driver_version) if driver_version else None
    devices = []
    for served in inventory.gpus:
        taints = gpu_taints(driver, served) if features.device_taints else ()
        if not served.healthy and not taints:
            continue
        gpu = served.gpu
        major, minor = gpu.compute_capability
        common: dict[str, AttributeValue] = {
            "uuid": gpu.uuid,
            "index": gpu.index,
            "model": gpu.model,
            "memoryMiB": gpu.memory_mib,
            "computeCapability": SemVer(f"{major}.{minor}.0"),
            "shares": served.replicas,
        }
        if driver_semver is not None:
            common["driverVersion"] = driver_semver
        if gpu.numa_node is not None:
            common["numaNode"] = gpu.numa_node
        share, capacity = share_attributes(served, policy)
        if features.consumable_capacity:
            devices.append(
                capacity_device(name_by_gpu[gpu.uuid], served, policy, {**common, **share}, taints)
            )
            continue
        for replica in range(served.replicas):
            devices.append(
                SliceDevice(
                    name=name_by_vgpu[make_vgpu_id(gpu.uuid, replica)],
                    attributes={**common, **share, "share": replica},
                    capacity=dict(capacity),
                    taints=taints,
                )
            )
    return NodeSlice(
        driver=driver,
        node_name=node_name,
        pool=node_name,
        generation=generation,
        devices=tuple(devices),
    )
