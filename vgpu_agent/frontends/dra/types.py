"""The values the DRA frontend's two halves share, and the API server boundary.

The kubelet side (prepare/unprepare, registration) and the API-server side (ResourceSlices,
ResourceClaims) meet only through these types: plain frozen dataclasses, no client library
types, so each half is tested with the other replaced by a fake behind :class:`ResourceApi`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional, Protocol, Union

from vgpu_agent.model.errors import VgpuError


class DraApiError(VgpuError):
    """The API server could not be asked, or refused (the message names the object and why)."""


class ClaimNotFoundError(DraApiError):
    """The ResourceClaim named in a prepare request does not exist (any more)."""


@dataclass(frozen=True)
class SemVer:
    """A DRA ``version`` attribute (semantic version text, e.g. ``"580.95.5"``)."""

    text: str


#: A device attribute's value: DRA's DeviceAttribute holds exactly one of bool, int,
#: string or version.
AttributeValue = Union[bool, int, str, SemVer]


@dataclass(frozen=True)
class ClaimRef:
    """A claim as the kubelet names it in NodePrepareResources / NodeUnprepareResources."""

    namespace: str
    name: str
    uid: str


@dataclass(frozen=True)
class AllocatedDevice:
    """One entry of a ResourceClaim's ``status.allocation.devices.results``.

    ``consumed_capacity`` (capacity name, with or without the driver's domain -> quantity
    text) and ``share_id`` are set only for a device that allows multiple allocations
    (consumable capacity): what this claim's share of it consumed, and which share it is.
    """

    request: str
    driver: str
    pool: str
    device: str
    consumed_capacity: Mapping[str, str] = field(default_factory=dict)
    share_id: str = ""


@dataclass(frozen=True)
class ClaimAllocation:
    """A ResourceClaim read from the API server: who it is and what was allocated to it.

    ``allocated`` is False while the claim has no ``status.allocation``; ``devices`` holds
    every result, of any driver (the frontend keeps its own driver's).
    """

    ref: ClaimRef
    allocated: bool
    devices: tuple[AllocatedDevice, ...] = ()


@dataclass(frozen=True)
class CapacityPolicy:
    """How claims consume one capacity of a device that allows multiple allocations
    (``requestPolicy`` with a ``validRange``), as quantity texts: a claim that names no
    amount consumes ``default``; one that does is rounded up to ``min + n * step`` and may
    not exceed ``max``."""

    default: str
    min: str
    max: Optional[str] = None
    step: Optional[str] = None


#: DeviceTaint.effect values (resource.k8s.io/v1).
TAINT_NO_SCHEDULE = "NoSchedule"
TAINT_NO_EXECUTE = "NoExecute"


@dataclass(frozen=True)
class DeviceTaint:
    """A taint on a device of the slice: claims that do not tolerate it are not allocated
    the device (``NoSchedule``), and their pods are evicted (``NoExecute``).

    ``time_added`` (RFC 3339) is left to the API server, which stamps it when the taint
    first appears; the client keeps the stamp while the taint stays.
    """

    key: str
    value: str
    effect: str
    time_added: Optional[str] = None


@dataclass(frozen=True)
class SliceDevice:
    """One device of the node's ResourceSlice: a share of a GPU, or (consumable capacity)
    a whole GPU that many claims share.

    ``attributes`` are qualified by the client with the driver name where DRA requires it;
    ``capacity`` maps a capacity name to a Kubernetes quantity text (e.g. ``"10240Mi"``).
    ``allow_multiple_allocations`` lets several claims be allocated the device, each
    consuming part of its capacities as ``capacity_policies`` (by capacity name) say;
    ``taints`` say what is wrong with it.
    """

    name: str
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)
    capacity: Mapping[str, str] = field(default_factory=dict)
    allow_multiple_allocations: bool = False
    capacity_policies: Mapping[str, CapacityPolicy] = field(default_factory=dict)
    taints: tuple[DeviceTaint, ...] = ()


@dataclass(frozen=True)
class NodeSlice:
    """What the node publishes: one pool named after the node, all its devices.

    ``generation`` is the pool generation: it rises on every change (health, reload), so
    the scheduler ignores older slices of the pool.
    """

    driver: str
    node_name: str
    pool: str
    generation: int
    devices: tuple[SliceDevice, ...]


@dataclass(frozen=True)
class ApiFeatures:
    """What the API server keeps of a ResourceSlice beyond the v1 basics (a disabled feature
    gate drops its fields silently, so it is found out, never configured)."""

    #: KEP-5075 (``DRAConsumableCapacity``, beta and on by default in 1.36):
    #: ``allowMultipleAllocations`` and capacity ``requestPolicy`` are kept.
    consumable_capacity: bool = False
    #: KEP-5055 (``DRADeviceTaints``, beta and on by default in 1.36): device ``taints``
    #: are kept.
    device_taints: bool = False


class FeatureProbe(Protocol):
    """An API server that can say which slice features it keeps (optional beside
    :class:`ResourceApi`). Errors are :class:`DraApiError`."""

    def probe_features(self, driver: str, node_name: str) -> ApiFeatures:
        """Ask the API server which slice features it keeps, without storing anything (a
        dry-run create of a slice of ``driver`` on ``node_name`` that uses them all)."""
        ...


class ResourceApi(Protocol):
    """The API server, as the DRA frontend uses it. Errors are :class:`DraApiError`."""

    def get_claim(self, namespace: str, name: str) -> ClaimAllocation:
        """Read one ResourceClaim (``resource.k8s.io/v1``)."""
        ...

    def publish_slice(self, node_slice: NodeSlice) -> None:
        """Create or replace the node's ResourceSlice(s) for the driver so they hold exactly
        ``node_slice`` (devices, pool generation)."""
        ...

    def delete_slices(self, driver: str, node_name: str) -> None:
        """Delete every ResourceSlice of ``driver`` on ``node_name`` (a clean stop)."""
        ...
