"""The stand-in API server's strict decoder: the fields of ``resource.k8s.io/v1``.

The fields of resource.k8s.io/v1 as Kubernetes 1.34 serves them, for the parts of a
ResourceSlice the agent writes; parts it never writes (node selectors, taints, counters,
capacity request policies) are accepted as any JSON. tests/standins/test_apiserver.py
checks every name here against the lightkube models the client uses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

RESOURCE_GROUP = "resource.k8s.io"
RESOURCE_VERSION = "v1"


@dataclass(frozen=True)
class _ListOf:
    item: _Schema


@dataclass(frozen=True)
class _MapOf:
    value: _Schema


class _Any:
    """Any JSON value (a part the agent never writes)."""


_Schema = Union[type, _ListOf, _MapOf, _Any, Mapping[str, Any]]
_ANY = _Any()

OWNER_REFERENCE_FIELDS: Mapping[str, _Schema] = {
    "apiVersion": str,
    "kind": str,
    "name": str,
    "uid": str,
    "controller": bool,
    "blockOwnerDeletion": bool,
}
OBJECT_META_FIELDS: Mapping[str, _Schema] = {
    "name": str,
    "generateName": str,
    "namespace": str,
    "selfLink": str,
    "uid": str,
    "resourceVersion": str,
    "generation": int,
    "creationTimestamp": str,
    "deletionTimestamp": str,
    "deletionGracePeriodSeconds": int,
    "labels": _MapOf(str),
    "annotations": _MapOf(str),
    "ownerReferences": _ListOf(OWNER_REFERENCE_FIELDS),
    "finalizers": _ListOf(str),
    "managedFields": _ANY,
}
DEVICE_ATTRIBUTE_FIELDS: Mapping[str, _Schema] = {
    "bool": bool,
    "int": int,
    "string": str,
    "version": str,
}
CAPACITY_REQUEST_POLICY_RANGE_FIELDS: Mapping[str, _Schema] = {
    "min": str,
    "max": str,
    "step": str,
}
CAPACITY_REQUEST_POLICY_FIELDS: Mapping[str, _Schema] = {
    "default": str,
    "validValues": _ListOf(str),
    "validRange": CAPACITY_REQUEST_POLICY_RANGE_FIELDS,
}
DEVICE_CAPACITY_FIELDS: Mapping[str, _Schema] = {
    "value": str,
    "requestPolicy": CAPACITY_REQUEST_POLICY_FIELDS,
}
DEVICE_TAINT_FIELDS: Mapping[str, _Schema] = {
    "key": str,
    "value": str,
    "effect": str,
    "timeAdded": str,
}
DEVICE_FIELDS: Mapping[str, _Schema] = {
    "name": str,
    "attributes": _MapOf(DEVICE_ATTRIBUTE_FIELDS),
    "capacity": _MapOf(DEVICE_CAPACITY_FIELDS),
    "consumesCounters": _ANY,
    "nodeName": str,
    "nodeSelector": _ANY,
    "allNodes": bool,
    "taints": _ListOf(DEVICE_TAINT_FIELDS),
    "bindsToNode": bool,
    "bindingConditions": _ListOf(str),
    "bindingFailureConditions": _ListOf(str),
    "allowMultipleAllocations": bool,
}
RESOURCE_POOL_FIELDS: Mapping[str, _Schema] = {
    "name": str,
    "generation": int,
    "resourceSliceCount": int,
}
RESOURCE_SLICE_SPEC_FIELDS: Mapping[str, _Schema] = {
    "driver": str,
    "pool": RESOURCE_POOL_FIELDS,
    "nodeName": str,
    "nodeSelector": _ANY,
    "allNodes": bool,
    "perDeviceNodeSelection": bool,
    "devices": _ListOf(DEVICE_FIELDS),
    "sharedCounters": _ANY,
}
#: A ResourceClaim's status.allocation.devices.results[] entry, as the stand-in writes it for
#: :meth:`ApiServerStandIn.add_claim`.
DEVICE_REQUEST_ALLOCATION_RESULT_FIELDS: Mapping[str, _Schema] = {
    "request": str,
    "driver": str,
    "pool": str,
    "device": str,
    "adminAccess": bool,
    "tolerations": _ANY,
    "bindingConditions": _ListOf(str),
    "bindingFailureConditions": _ListOf(str),
    "shareID": str,
    "consumedCapacity": _MapOf(str),
}
RESOURCE_SLICE_FIELDS: Mapping[str, _Schema] = {
    "apiVersion": str,
    "kind": str,
    "metadata": OBJECT_META_FIELDS,
    "spec": RESOURCE_SLICE_SPEC_FIELDS,
}


def strict_decoding_errors(value: Any, schema: _Schema, path: str = "") -> list[str]:
    """What the API server's strict decoder would say of ``value`` (empty when it is fine)."""
    if isinstance(schema, _Any):
        return []
    if isinstance(schema, _ListOf):
        if not isinstance(value, list):
            return [f"{path}: expected an array"]
        return [
            error
            for index, item in enumerate(value)
            for error in strict_decoding_errors(item, schema.item, f"{path}[{index}]")
        ]
    if isinstance(schema, _MapOf):
        if not isinstance(value, dict):
            return [f"{path}: expected an object"]
        return [
            error
            for key, item in value.items()
            for error in strict_decoding_errors(item, schema.value, f"{path}[{key}]")
        ]
    if isinstance(schema, Mapping):
        if not isinstance(value, dict):
            return [f"{path}: expected an object"]
        errors: list[str] = []
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if key not in schema:
                errors.append(f'unknown field "{where}"')
            else:
                errors.extend(strict_decoding_errors(item, schema[key], where))
        return errors
    # bool is an int in Python, not in JSON.
    if schema is int and (isinstance(value, bool) or not isinstance(value, int)):
        return [f"{path}: expected an integer, got {json.dumps(value)}"]
    if not isinstance(value, schema):
        return [f"{path}: expected a {schema.__name__}, got {json.dumps(value)}"]
    return []
