"""The stand-in API server's validation: of request bodies, field selectors, ResourceSlices
and the allocation results tests add.

Request bodies are decoded strictly (:mod:`vgpu_agent.standins.apiserver.schema`). Objects
are validated like the API server does for the rules the agent could break (names, exactly
one node selection, at most 128 devices, one value per attribute); with the feature gates on,
request policies against the capacity, taint keys, values and effects, at most 64 devices in
a slice with taints.

Allocation results are checked against the stored slices as the scheduler's writes are held:
a result on a device that allows multiple allocations needs a ``shareID`` and a
``consumedCapacity`` within each capacity's request policy, and the claims on that device
together may not consume more than it has; a device that does not may be allocated to one
claim only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any, Optional

from vgpu_agent.frontends.dra.capacity import parse_quantity
from vgpu_agent.standins.apiserver.errors import ApiStatusError, invalid
from vgpu_agent.standins.apiserver.schema import RESOURCE_SLICE_FIELDS, strict_decoding_errors

MAX_DEVICES_PER_SLICE = 128
#: ResourceSliceMaxDevicesWithAdvancedFeatures: the limit when any device has taints.
MAX_TAINTED_DEVICES_PER_SLICE = 64
#: DeviceTaintsMaxLength, ResourceSliceMaxAttributesAndCapacitiesPerDevice.
MAX_TAINTS_PER_DEVICE = 16
MAX_ATTRIBUTES_AND_CAPACITIES = 32
TAINT_EFFECTS = ("None", "NoSchedule", "NoExecute")
_LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_SLICE_FIELD_LABELS = ("spec.nodeName", "spec.driver", "metadata.name")


# -- requests ------------------------------------------------------------------------------------


def decode_body(body: Optional[bytes]) -> dict[str, Any]:
    """A request body as a JSON object, or a 400."""
    try:
        value = json.loads(body or b"")
    except ValueError as error:
        raise ApiStatusError(400, "BadRequest", f"the body is not JSON: {error}") from error
    if not isinstance(value, dict):
        raise ApiStatusError(400, "BadRequest", "the body is not a JSON object")
    return value


def strictly_decoded(body: Mapping[str, Any]) -> None:
    """A 400 naming every field of ``body`` that ``resource.k8s.io/v1`` has not."""
    errors = strict_decoding_errors(body, RESOURCE_SLICE_FIELDS)
    if errors:
        raise ApiStatusError(
            400,
            "BadRequest",
            'ResourceSlice in version "v1" cannot be handled as a ResourceSlice: strict '
            f"decoding error: {', '.join(errors)}",
        )


def field_requirements(selector: str) -> list[tuple[str, str, str]]:
    """A ``fieldSelector`` as (field, ``=`` or ``!=``, value) requirements, or a 400."""
    requirements = []
    for term in filter(None, selector.split(",")):
        match = re.fullmatch(r"([^=!]+?)(==|=|!=)(.*)", term)
        if not match:
            raise ApiStatusError(400, "BadRequest", f"invalid field selector: {term!r}")
        field, operator, value = match.groups()
        if field not in _SLICE_FIELD_LABELS:
            raise ApiStatusError(400, "BadRequest", f'field label not supported: "{field}"')
        requirements.append((field, "!=" if operator == "!=" else "=", value))
    return requirements


def field_matches(stored: Mapping[str, Any], requirement: tuple[str, str, str]) -> bool:
    """Whether a stored slice meets one requirement of :func:`field_requirements`."""
    field, operator, value = requirement
    section, key = field.split(".")
    actual = str(stored.get(section, {}).get(key) or "")
    return (actual == value) == (operator == "=")


# -- ResourceSlices --------------------------------------------------------------------------------


def validate_slice(body: Mapping[str, Any], name: str) -> None:
    """The API server's validation, for the rules a publishing node could break."""
    causes: list[str] = []
    if not name:
        causes.append("metadata.name: Required value: name or generateName is required")
    elif len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        causes.append(f'metadata.name: Invalid value: "{name}": must be a DNS subdomain')
    spec = body.get("spec")
    if not isinstance(spec, dict):
        raise invalid("ResourceSlice", name, ["spec: Required value"])
    if not spec.get("driver"):
        causes.append("spec.driver: Required value")
    pool = spec.get("pool") or {}
    if not pool.get("name"):
        causes.append("spec.pool.name: Required value")
    if pool.get("generation", -1) < 0:
        causes.append("spec.pool.generation: Invalid value: must be greater than or equal to 0")
    if pool.get("resourceSliceCount", 0) <= 0:
        causes.append("spec.pool.resourceSliceCount: Invalid value: must be greater than 0")
    selections = [
        key
        for key in ("nodeName", "nodeSelector", "allNodes", "perDeviceNodeSelection")
        if spec.get(key)
    ]
    if len(selections) != 1:
        causes.append(
            "spec: Invalid value: exactly one of `nodeName`, `nodeSelector`, `allNodes`, "
            f"`perDeviceNodeSelection` is required, got {selections or 'none'}"
        )
    devices = spec.get("devices") or []
    tainted = any(device.get("taints") for device in devices)
    most = MAX_TAINTED_DEVICES_PER_SLICE if tainted else MAX_DEVICES_PER_SLICE
    if len(devices) > most:
        causes.append(
            f"spec.devices: Too many: {len(devices)}: must have at most {most} items"
            + (" (a device has taints)" if tainted else "")
        )
    seen: set[str] = set()
    for index, device in enumerate(devices):
        device_name = device.get("name", "")
        if device_name in seen:
            causes.append(f'spec.devices[{index}].name: Duplicate value: "{device_name}"')
        seen.add(device_name)
        for attribute, value in (device.get("attributes") or {}).items():
            if len(value) != 1:
                causes.append(
                    f"spec.devices[{index}].attributes[{attribute}]: Invalid value: exactly one "
                    "value must be specified"
                )
        causes.extend(_device_feature_errors(f"spec.devices[{index}]", device))
    if causes:
        raise invalid("ResourceSlice", name, causes)


def _quantity(text: Any, where: str, causes: list[str]) -> Optional[Fraction]:
    try:
        return parse_quantity(str(text))
    except ValueError:
        causes.append(f"{where}: Invalid value: {json.dumps(text)}: not a quantity")
        return None


def _device_feature_errors(where: str, device: Mapping[str, Any]) -> list[str]:
    """Validation of a device's taints, capacities and request policies."""
    causes: list[str] = []
    attributes = device.get("attributes") or {}
    capacities = device.get("capacity") or {}
    if len(attributes) + len(capacities) > MAX_ATTRIBUTES_AND_CAPACITIES:
        causes.append(
            f"{where}: Too many: attributes and capacities must be at most "
            f"{MAX_ATTRIBUTES_AND_CAPACITIES} together"
        )
    taints = device.get("taints") or []
    if len(taints) > MAX_TAINTS_PER_DEVICE:
        causes.append(f"{where}.taints: Too many: must have at most {MAX_TAINTS_PER_DEVICE}")
    for number, taint in enumerate(taints):
        at = f"{where}.taints[{number}]"
        key = str(taint.get("key", ""))
        prefix, _, name = key.rpartition("/")
        if (
            not name
            or len(name) > 63
            or not _LABEL_NAME.fullmatch(name)
            or (prefix and not _DNS_SUBDOMAIN.fullmatch(prefix))
        ):
            causes.append(f"{at}.key: Invalid value: {json.dumps(key)}: must be a label name")
        label_value = str(taint.get("value", ""))
        if len(label_value) > 63 or not _LABEL_VALUE.fullmatch(label_value):
            causes.append(
                f"{at}.value: Invalid value: {json.dumps(label_value)}: must be a label value"
            )
        if taint.get("effect") not in TAINT_EFFECTS:
            causes.append(
                f"{at}.effect: Unsupported value: {json.dumps(taint.get('effect'))}: "
                f"supported values: {', '.join(TAINT_EFFECTS)}"
            )
    for name, capacity in capacities.items():
        at = f"{where}.capacity[{name}]"
        value = _quantity(capacity.get("value"), f"{at}.value", causes)
        policy = capacity.get("requestPolicy")
        if policy is None:
            continue
        if not device.get("allowMultipleAllocations"):
            causes.append(
                f"{at}.requestPolicy: Forbidden: only for a device with "
                "allowMultipleAllocations: true"
            )
        causes.extend(_policy_errors(f"{at}.requestPolicy", policy, value))
    return causes


def _policy_errors(at: str, policy: Mapping[str, Any], value: Optional[Fraction]) -> list[str]:
    """A CapacityRequestPolicy checked against its capacity ``value``."""
    causes: list[str] = []
    if "validRange" in policy and "validValues" in policy:
        causes.append(f"{at}: Invalid value: validRange and validValues are exclusive")
    default = _quantity(policy["default"], f"{at}.default", causes) if "default" in policy else None
    valid_range = policy.get("validRange")
    if valid_range is None:
        return causes
    if default is None:
        causes.append(f"{at}.default: Required value: needed with validRange")
    if "min" not in valid_range:
        causes.append(f"{at}.validRange.min: Required value")
        return causes
    low = _quantity(valid_range["min"], f"{at}.validRange.min", causes)
    high = (
        _quantity(valid_range["max"], f"{at}.validRange.max", causes)
        if "max" in valid_range
        else None
    )
    step = (
        _quantity(valid_range["step"], f"{at}.validRange.step", causes)
        if "step" in valid_range
        else None
    )
    if low is None:
        return causes
    if value is not None and low > value:
        causes.append(f"{at}.validRange.min: Invalid value: more than the capacity")
    if high is not None and (high < low or (value is not None and high > value)):
        causes.append(f"{at}.validRange.max: Invalid value: below min or above the capacity")
    if default is not None and (default < low or (high is not None and default > high)):
        causes.append(f"{at}.default: Invalid value: outside validRange")
    if step is not None:
        if step <= 0:
            causes.append(f"{at}.validRange.step: Invalid value: must be positive")
            return causes
        if value is not None and low + step > value:
            causes.append(f"{at}.validRange.step: Invalid value: min + step exceeds the capacity")
        for label, amount in (("max", high), ("default", default)):
            if amount is not None and amount % step != 0:
                causes.append(f"{at}.{label}: Invalid value: not a multiple of validRange.step")
    return causes


# -- allocation results ----------------------------------------------------------------------------


def _results_of(claim: Mapping[str, Any]) -> list[dict[str, Any]]:
    allocation = claim.get("status", {}).get("allocation") or {}
    results: list[dict[str, Any]] = allocation.get("devices", {}).get("results") or []
    return results


def _consumed(result: Mapping[str, Any], driver: str, name: str) -> Optional[Fraction]:
    consumed = result.get("consumedCapacity") or {}
    texts = [consumed[key] for key in (name, f"{driver}/{name}") if key in consumed]
    return sum((parse_quantity(text) for text in texts), Fraction(0)) if texts else None


def _consumption_errors(
    where: str,
    result: Mapping[str, Any],
    device: Mapping[str, Any],
    others: Sequence[Mapping[str, Any]],
) -> list[str]:
    """A result on a device that allows multiple allocations: its shareID, and its
    consumedCapacity within each request policy and, with the others', the capacity."""
    causes: list[str] = []
    if not _UUID.fullmatch(str(result.get("shareID", ""))):
        causes.append(f"{where}.shareID: Invalid value: must be a UUID for a shared device")
    driver = str(result["driver"])
    for name, capacity in (device.get("capacity") or {}).items():
        at = f"{where}.consumedCapacity[{name}]"
        try:
            amount = _consumed(result, driver, name)
        except ValueError as error:
            causes.append(f"{at}: Invalid value: {error}")
            continue
        if amount is None:
            causes.append(f"{at}: Required value: every capacity of the device is recorded")
            continue
        value = parse_quantity(str(capacity["value"]))
        valid_range = (capacity.get("requestPolicy") or {}).get("validRange") or {}
        low = parse_quantity(str(valid_range["min"])) if "min" in valid_range else None
        high = parse_quantity(str(valid_range["max"])) if "max" in valid_range else None
        step = parse_quantity(str(valid_range["step"])) if "step" in valid_range else None
        if (low is not None and amount < low) or (high is not None and amount > high):
            causes.append(f"{at}: Invalid value: outside the request policy's validRange")
        elif low is not None and step is not None and (amount - low) % step != 0:
            causes.append(f"{at}: Invalid value: not min + n * step of the request policy")
        used = sum((_consumed(other, driver, name) or Fraction(0) for other in others), Fraction(0))
        if used + amount > value:
            causes.append(
                f"{at}: Invalid value: the device's claims would consume more than its "
                f"capacity {capacity['value']}"
            )
    return causes


def _allocated_device(
    slices: Mapping[str, Mapping[str, Any]], driver: str, pool: str, device: str
) -> Optional[dict[str, Any]]:
    """The device of the pool's newest generation, as stored."""
    found: Optional[dict[str, Any]] = None
    newest = -1
    for stored in slices.values():
        spec = stored["spec"]
        if spec.get("driver") != driver or spec.get("pool", {}).get("name") != pool:
            continue
        generation = spec["pool"].get("generation", 0)
        for candidate in spec.get("devices") or []:
            if candidate.get("name") == device and generation > newest:
                found, newest = candidate, generation
    return found


def allocation_errors(
    key: tuple[str, str],
    claim: Mapping[str, Any],
    *,
    slices: Mapping[str, Mapping[str, Any]],
    claims: Mapping[tuple[str, str], Mapping[str, Any]],
) -> list[str]:
    """What the API server and the scheduler's rules say of a claim's results, checked
    against the stored ``slices`` and the other ``claims``' allocations (by namespace and
    name; ``key`` is the claim's own)."""
    causes: list[str] = []
    results = claim["status"]["allocation"]["devices"]["results"]
    for index, result in enumerate(results):
        where = f"status.allocation.devices.results[{index}]"
        device = _allocated_device(slices, result["driver"], result["pool"], result["device"])
        if device is None:
            if "consumedCapacity" in result or "shareID" in result:
                causes.append(
                    f"{where}: no device {result['device']} in pool {result['pool']} of "
                    f"driver {result['driver']} to consume capacity of"
                )
            continue
        others = [
            other
            for other_key, other_claim in claims.items()
            if other_key != key
            for other in _results_of(other_claim)
            if (other["driver"], other["pool"], other["device"])
            == (result["driver"], result["pool"], result["device"])
        ] + [other for other in results[:index] if other["device"] == result["device"]]
        if not device.get("allowMultipleAllocations"):
            if "consumedCapacity" in result or "shareID" in result:
                causes.append(
                    f"{where}: device {result['device']} does not allow multiple "
                    "allocations: no shareID or consumedCapacity"
                )
            if others:
                causes.append(f"{where}: device {result['device']} is already allocated")
            continue
        causes.extend(_consumption_errors(where, result, device, others))
    return causes
