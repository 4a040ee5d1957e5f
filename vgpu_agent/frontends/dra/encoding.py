"""The node's ResourceSlices and the claims of its pods as lightkube's ``resource.k8s.io/v1``
models: our values (:mod:`vgpu_agent.frontends.dra.types`) written as the models the
API-server client (:mod:`vgpu_agent.frontends.dra.kubeapi`) sends, and read back from the
ones it receives. Pure: no I/O, no client; beside ``kubeapi`` the only module that imports
lightkube (its models only).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Optional, Union

from lightkube.models.resource_v1 import (
    Device,
    ResourcePool,
    ResourceSliceSpec,
)
from lightkube.models.resource_v1 import (
    DeviceTaint as KubeDeviceTaint,
)
from lightkube.resources.resource_v1 import ResourceClaim, ResourceSlice

from vgpu_agent.frontends.dra.types import (
    AllocatedDevice,
    AttributeValue,
    CapacityPolicy,
    ClaimAllocation,
    ClaimRef,
    NodeSlice,
    SemVer,
    SliceDevice,
)


def slice_spec(
    node_slice: NodeSlice, devices: Sequence[SliceDevice], *, slice_count: int
) -> ResourceSliceSpec:
    """The spec of one of the node's ``slice_count`` slices of ``node_slice``'s pool, holding
    ``devices``."""
    return ResourceSliceSpec(
        driver=node_slice.driver,
        nodeName=node_slice.node_name,
        pool=ResourcePool(
            name=node_slice.pool,
            generation=node_slice.generation,
            resourceSliceCount=slice_count,
        ),
        # Left out when empty, as the API server sends it back (omitempty).
        devices=[_device(device) for device in devices] or None,
    )


def _device(device: SliceDevice) -> Device:
    # The models type attributes and capacity as plain dicts (string keys, any values):
    # lightkube serializes what is inside as it is, so the values are written in JSON form.
    return Device(
        name=device.name,
        attributes={name: _attribute(value) for name, value in device.attributes.items()} or None,
        capacity={
            name: _capacity(quantity, device.capacity_policies.get(name))
            for name, quantity in device.capacity.items()
        }
        or None,
        # Left out unless set, as the API server sends it back (omitempty).
        allowMultipleAllocations=True if device.allow_multiple_allocations else None,
        taints=[
            KubeDeviceTaint(
                key=taint.key,
                value=taint.value or None,
                effect=taint.effect,
                timeAdded=_time(taint.time_added),
            )
            for taint in device.taints
        ]
        or None,
    )


def _capacity(quantity: str, policy: Optional[CapacityPolicy]) -> dict[str, Any]:
    """A DeviceCapacity: its value and, for a shared device, its request policy."""
    if policy is None:
        return {"value": quantity}
    valid_range = {"min": policy.min, "max": policy.max, "step": policy.step}
    return {
        "value": quantity,
        "requestPolicy": {
            "default": policy.default,
            "validRange": {key: value for key, value in valid_range.items() if value is not None},
        },
    }


def _time(text: Optional[str]) -> Optional[datetime]:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def keep_taint_times(
    spec: ResourceSliceSpec, existing: Optional[ResourceSliceSpec]
) -> ResourceSliceSpec:
    """``spec`` with each taint's timeAdded taken from the same taint (key, value, effect) of
    the same device in the slice as stored: the API server stamps a taint when it first
    appears, and a NoExecute toleration counts its seconds from that stamp, so republishing
    must not move it (nor rewrite an unchanged slice)."""
    if existing is None or not existing.devices or not spec.devices:
        return spec
    stamps = {
        (device.name, taint.key, taint.value, taint.effect): taint.timeAdded
        for device in existing.devices
        for taint in device.taints or []
        if taint.timeAdded is not None
    }
    for device in spec.devices:
        for taint in device.taints or []:
            if taint.timeAdded is None:
                taint.timeAdded = stamps.get((device.name, taint.key, taint.value, taint.effect))
    return spec


def _attribute(value: AttributeValue) -> dict[str, Union[bool, int, str]]:
    """A DeviceAttribute: exactly one of bool, int, string and version."""
    # bool first: a bool is also an int.
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, SemVer):
        return {"version": value.text}
    return {"string": value}


def same_slice(existing: ResourceSlice, wanted: ResourceSlice) -> bool:
    """Whether ``existing`` already holds ``wanted``'s spec and owner (no write needed)."""
    # The models are dataclasses: == compares every field, nested models included.
    existing_owners = existing.metadata.ownerReferences if existing.metadata else None
    wanted_owners = wanted.metadata.ownerReferences if wanted.metadata else None
    return bool(existing.spec == wanted.spec and existing_owners == wanted_owners)


def claim_allocation(claim: ResourceClaim, namespace: str, name: str) -> ClaimAllocation:
    """A ResourceClaim as read: its uid and its allocation results of every driver."""
    uid = (claim.metadata.uid if claim.metadata else None) or ""
    ref = ClaimRef(namespace=namespace, name=name, uid=uid)
    allocation = claim.status.allocation if claim.status else None
    if allocation is None:
        return ClaimAllocation(ref=ref, allocated=False)
    results = allocation.devices.results if allocation.devices else None
    return ClaimAllocation(
        ref=ref,
        allocated=True,
        devices=tuple(
            AllocatedDevice(
                request=result.request,
                driver=result.driver,
                pool=result.pool,
                device=result.device,
                consumed_capacity={
                    str(name): str(quantity)
                    for name, quantity in (result.consumedCapacity or {}).items()
                },
                share_id=result.shareID or "",
            )
            for result in results or []
        ),
    )
