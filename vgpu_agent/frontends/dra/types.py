"""The values the DRA frontend's two halves share, and the API server boundary.

The kubelet side (prepare/unprepare, registration) and the API-server side (ResourceSlices,
ResourceClaims) meet only through these types: plain frozen dataclasses, no client library
types, so each half is tested with the other replaced by a fake behind :class:`ResourceApi`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, Union

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
    """One entry of a ResourceClaim's ``status.allocation.devices.results``."""

    request: str
    driver: str
    pool: str
    device: str


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
class SliceDevice:
    """One device of the node's ResourceSlice (a share of a GPU).

    ``attributes`` are qualified by the client with the driver name where DRA requires it;
    ``capacity`` maps a capacity name to a Kubernetes quantity text (e.g. ``"10240Mi"``).
    """

    name: str
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)
    capacity: Mapping[str, str] = field(default_factory=dict)


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
