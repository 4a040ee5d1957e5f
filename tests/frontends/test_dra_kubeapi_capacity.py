"""Consumable capacity and device taints through the API-server client and the stand-in API
server over real HTTP: what the client writes and reads, how it finds out what the server
keeps, and what the stand-in holds slices and allocation results to."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from tests.builders import make_inventory
from vgpu_agent.frontends.dra.capacity import COMPUTE_SHARES, MEMORY
from vgpu_agent.frontends.dra.kubeapi import MAX_TAINTED_DEVICES_PER_SLICE, KubeResourceApi
from vgpu_agent.frontends.dra.slices import node_slice
from vgpu_agent.frontends.dra.types import (
    AllocatedDevice,
    ApiFeatures,
    DeviceTaint,
    NodeSlice,
    SliceDevice,
)
from vgpu_agent.model.devices import MpsGrantPolicy
from vgpu_agent.standins.apiserver.schema import (
    CAPACITY_REQUEST_POLICY_FIELDS,
    CAPACITY_REQUEST_POLICY_RANGE_FIELDS,
    DEVICE_CAPACITY_FIELDS,
    DEVICE_FIELDS,
    DEVICE_REQUEST_ALLOCATION_RESULT_FIELDS,
    DEVICE_TAINT_FIELDS,
)
from vgpu_agent.standins.apiserver.server import ApiServerStandIn

DRIVER = "vgpu.eks.amazonaws.com"
NODE = "node-a"
NODE_TOKEN = "node-token"  # noqa: S105 - a test token
SLICE = f"{NODE}-vgpu-eks-amazonaws-com"
POLICY = MpsGrantPolicy(pipe_dir_read_only=True, max_vgpus_per_container=2)
BOTH = ApiFeatures(consumable_capacity=True, device_taints=True)
SHARE_IDS = [f"5b0c1a8e-0000-4000-8000-00000000000{n}" for n in range(1, 6)]
START = datetime(2026, 12, 7, 19, 0, tzinfo=timezone.utc)


class Clock:
    """The stand-in's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def standin(
    clock: Clock, *, consumable_capacity: bool = True, device_taints: bool = True
) -> ApiServerStandIn:
    """A stand-in API server with the node, its token and these feature gates."""
    server = ApiServerStandIn(
        tokens={NODE_TOKEN: f"system:node:{NODE}"},
        clock=clock,
        consumable_capacity=consumable_capacity,
        device_taints=device_taints,
    )
    server.start()
    server.add_node(NODE)
    return server


@pytest.fixture
def clock() -> Clock:
    """A clock at START."""
    return Clock()


@pytest.fixture
def server(clock: Clock) -> Iterator[ApiServerStandIn]:
    """The stand-in with Kubernetes 1.36's defaults: consumable capacity and taints kept."""
    server = standin(clock)
    yield server
    server.stop()


@pytest.fixture
def api(server: ApiServerStandIn) -> Iterator[KubeResourceApi]:
    """The client as the node."""
    client = KubeResourceApi.for_server(server.url, token=NODE_TOKEN)
    yield client
    client.close()


def capacity_slice(unhealthy: Any = None, generation: int = 1) -> NodeSlice:
    """The node's slice of two 4-share GPUs as consumable capacity."""
    return node_slice(
        make_inventory((4, 4), unhealthy=unhealthy),
        driver=DRIVER,
        node_name=NODE,
        generation=generation,
        policy=POLICY,
        features=BOTH,
    )


# -- finding out ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gates", "expected"),
    [
        ({}, BOTH),
        (
            {"consumable_capacity": False},
            ApiFeatures(consumable_capacity=False, device_taints=True),
        ),
        ({"device_taints": False}, ApiFeatures(consumable_capacity=True, device_taints=False)),
        ({"consumable_capacity": False, "device_taints": False}, ApiFeatures()),
    ],
    ids=["1.36-defaults", "no-consumable-capacity", "no-taints", "1.35-defaults"],
)
def test_the_client_finds_out_what_the_server_keeps_without_storing_anything(
    clock: Clock, gates: dict[str, bool], expected: ApiFeatures
) -> None:
    """A dry-run create as the node answers which fields survive; nothing is stored."""
    server = standin(clock, **gates)
    client = KubeResourceApi.for_server(server.url, token=NODE_TOKEN)
    try:
        assert client.probe_features(DRIVER, NODE) == expected
        assert server.slices() == {}
        assert server.queries[-1]["dryRun"] == "All"
    finally:
        client.close()
        server.stop()


def test_an_unknown_dry_run_value_is_a_400(server: ApiServerStandIn) -> None:
    """dryRun takes only All, as the real server says."""
    code, status = server.handle(
        "POST", "/apis/resource.k8s.io/v1/resourceslices?dryRun=yes", {}, b"{}"
    )
    assert code == 400
    assert 'Invalid dryRun value: "yes"' in status["message"]


# -- writing and reading the new fields ------------------------------------------------------------


def test_a_capacity_slice_is_stored_in_dra_form(
    server: ApiServerStandIn, api: KubeResourceApi
) -> None:
    """allowMultipleAllocations and each capacity's request policy reach the server as the
    v1 API spells them, and an unchanged republish writes nothing."""
    api.publish_slice(capacity_slice())
    device = server.slices()[SLICE]["spec"]["devices"][0]
    assert device["allowMultipleAllocations"] is True
    assert device["capacity"] == {
        MEMORY: {
            "value": "24Gi",
            "requestPolicy": {
                "default": "6Gi",
                "validRange": {"min": "6Gi", "max": "12Gi", "step": "6Gi"},
            },
        },
        COMPUTE_SHARES: {
            "value": "4",
            "requestPolicy": {"default": "1", "validRange": {"min": "1", "max": "2", "step": "1"}},
        },
    }
    assert "taints" not in device
    before = len(server.requests)
    api.publish_slice(capacity_slice())
    assert [method for method, _ in server.requests[before:]] == ["GET", "GET"]


def test_a_taint_is_stamped_once_and_keeps_its_time_across_republishes(
    server: ApiServerStandIn, api: KubeResourceApi, clock: Clock
) -> None:
    """The server stamps a new taint's timeAdded; republishing the same taint later keeps the
    stamp (NoExecute tolerations count from it), a cleared one is gone."""
    api.publish_slice(capacity_slice({1: ("GPU lost",)}))
    devices = server.slices()[SLICE]["spec"]["devices"]
    assert devices[1]["taints"] == [
        {
            "key": f"{DRIVER}/gpu-lost",
            "value": "true",
            "effect": "NoExecute",
            "timeAdded": "2026-12-07T19:00:00Z",
        }
    ]
    clock.now = START + timedelta(minutes=5)
    api.publish_slice(capacity_slice({1: ("GPU lost", "xid 79")}, generation=2))
    taints = server.slices()[SLICE]["spec"]["devices"][1]["taints"]
    assert {(t["key"], t["timeAdded"]) for t in taints} == {
        (f"{DRIVER}/gpu-lost", "2026-12-07T19:00:00Z"),
        (f"{DRIVER}/xid", "2026-12-07T19:05:00Z"),
    }
    api.publish_slice(capacity_slice(generation=3))
    assert "taints" not in server.slices()[SLICE]["spec"]["devices"][1]


def test_a_slice_with_taints_is_split_at_64_devices(
    server: ApiServerStandIn, api: KubeResourceApi
) -> None:
    """Any tainted device lowers the API's limit to 64 devices a slice: the pool is split."""
    devices = tuple(
        SliceDevice(
            name=f"gpu-{n}",
            taints=(DeviceTaint(f"{DRIVER}/xid", "79", "NoSchedule"),) if n == 0 else (),
        )
        for n in range(MAX_TAINTED_DEVICES_PER_SLICE + 1)
    )
    api.publish_slice(NodeSlice(DRIVER, NODE, NODE, 1, devices))
    stored = server.slices()
    assert sorted(len(s["spec"]["devices"]) for s in stored.values()) == [1, 64]
    assert {s["spec"]["pool"]["resourceSliceCount"] for s in stored.values()} == {2}


def test_consumed_capacity_and_share_id_are_read_from_the_claim(
    server: ApiServerStandIn, api: KubeResourceApi
) -> None:
    """get_claim returns each result's consumedCapacity and shareID as the scheduler wrote them."""
    api.publish_slice(capacity_slice())
    device = server.slices()[SLICE]["spec"]["devices"][0]["name"]
    consumed = {MEMORY: "12Gi", COMPUTE_SHARES: "2"}
    server.add_claim(
        "ns",
        "big",
        node=NODE,
        results=[AllocatedDevice("gpu", DRIVER, NODE, device, consumed, SHARE_IDS[0])],
    )
    (result,) = api.get_claim("ns", "big").devices
    assert result.consumed_capacity == consumed
    assert result.share_id == SHARE_IDS[0]


# -- what the stand-in holds slices to --------------------------------------------------------


@pytest.mark.parametrize(
    ("gates", "kept"),
    [
        ({"consumable_capacity": False}, {"taints"}),
        ({"device_taints": False}, {"allowMultipleAllocations"}),
    ],
    ids=["capacity-off", "taints-off"],
)
def test_a_disabled_feature_gate_drops_its_fields_silently(
    clock: Clock, gates: dict[str, bool], kept: set[str]
) -> None:
    """Like the real server: the write succeeds and the disabled fields are not stored."""
    server = standin(clock, **gates)
    client = KubeResourceApi.for_server(server.url, token=NODE_TOKEN)
    try:
        client.publish_slice(capacity_slice({1: ("xid 79",)}))
        device = server.slices()[SLICE]["spec"]["devices"][1]
        assert {"allowMultipleAllocations", "taints"} & set(device) == kept
        assert ("requestPolicy" in device["capacity"][MEMORY]) is (
            "allowMultipleAllocations" in kept
        )
    finally:
        client.close()
        server.stop()


def one_device_slice(**device: Any) -> dict[str, Any]:
    """A slice body of one device named gpu-0 with ``device``'s fields."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": "s"},
        "spec": {
            "driver": DRIVER,
            "nodeName": NODE,
            "pool": {"name": NODE, "generation": 1, "resourceSliceCount": 1},
            "devices": [{"name": "gpu-0", **device}],
        },
    }


def memory(value: str = "24Gi", **policy: Any) -> dict[str, Any]:
    """A memory capacity with a request policy."""
    return {"memory": {"value": value, "requestPolicy": policy}}


RANGE = {"min": "6Gi", "max": "12Gi", "step": "6Gi"}


@pytest.mark.parametrize(
    ("device", "cause"),
    [
        (
            {"capacity": memory(default="6Gi", validRange=RANGE)},
            "only for a device with allowMultipleAllocations",
        ),
        (
            {"allowMultipleAllocations": True, "capacity": memory(default="5Gi", validRange=RANGE)},
            "default: Invalid value: outside validRange",
        ),
        (
            {
                "allowMultipleAllocations": True,
                "capacity": memory(default="6Gi", validRange={**RANGE, "max": "9Gi"}),
            },
            "max: Invalid value: not a multiple of validRange.step",
        ),
        (
            {
                "allowMultipleAllocations": True,
                "capacity": memory("10Gi", default="6Gi", validRange=RANGE),
            },
            "validRange.max: Invalid value: below min or above the capacity",
        ),
        (
            {"allowMultipleAllocations": True, "capacity": memory(validRange=RANGE)},
            "default: Required value",
        ),
        (
            {"allowMultipleAllocations": True, "capacity": memory(default="six", validRange=RANGE)},
            'default: Invalid value: "six": not a quantity',
        ),
        (
            {"taints": [{"key": f"{DRIVER}/xid", "value": "79", "effect": "PreferNoSchedule"}]},
            "effect: Unsupported value",
        ),
        (
            {"taints": [{"key": "bad key", "value": "79", "effect": "NoSchedule"}]},
            "must be a label name",
        ),
        (
            {"taints": [{"key": f"{DRIVER}/xid", "value": "48,79", "effect": "NoSchedule"}]},
            "must be a label value",
        ),
    ],
    ids=[
        "policy-without-multiple",
        "default-below-min",
        "max-off-step",
        "max-above-capacity",
        "no-default",
        "not-a-quantity",
        "bad-effect",
        "bad-key",
        "bad-value",
    ],
)
def test_invalid_capacity_and_taints_are_a_422(
    server: ApiServerStandIn, device: dict[str, Any], cause: str
) -> None:
    """Request policies are checked against their capacity, taints against the label rules."""
    code, status = server.handle(
        "POST", "/apis/resource.k8s.io/v1/resourceslices", {}, _body(one_device_slice(**device))
    )
    assert code == 422, status
    assert cause in status["message"]


def test_65_devices_with_a_taint_are_a_422(server: ApiServerStandIn) -> None:
    """With a tainted device, a slice holds at most 64 devices."""
    body = one_device_slice(
        taints=[{"key": f"{DRIVER}/xid", "value": "79", "effect": "NoSchedule"}]
    )
    body["spec"]["devices"] += [{"name": f"gpu-{n}"} for n in range(1, 65)]
    code, status = server.handle("POST", "/apis/resource.k8s.io/v1/resourceslices", {}, _body(body))
    assert code == 422
    assert "must have at most 64 items (a device has taints)" in status["message"]


def _body(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def test_the_new_schema_names_only_fields_of_the_client_models() -> None:
    """The request policy, taint and allocation result fields the stand-in accepts exist in
    lightkube's resource.k8s.io/v1 models, the ones the client writes and reads with."""
    from lightkube.models import resource_v1

    pairs = [
        (CAPACITY_REQUEST_POLICY_FIELDS, resource_v1.CapacityRequestPolicy),
        (CAPACITY_REQUEST_POLICY_RANGE_FIELDS, resource_v1.CapacityRequestPolicyRange),
        (DEVICE_TAINT_FIELDS, resource_v1.DeviceTaint),
        (DEVICE_CAPACITY_FIELDS, resource_v1.DeviceCapacity),
        (DEVICE_FIELDS, resource_v1.Device),
        (
            DEVICE_REQUEST_ALLOCATION_RESULT_FIELDS,
            resource_v1.DeviceRequestAllocationResult,
        ),
    ]
    for schema, model in pairs:
        model_fields = {field.name for field in dataclasses.fields(model)}
        assert set(schema) <= model_fields, (model.__name__, set(schema) - model_fields)


# -- what the stand-in holds allocation results to -------------------------------------------------


@pytest.fixture
def shared_device(server: ApiServerStandIn, api: KubeResourceApi) -> str:
    """The name of GPU 0's shared device, published."""
    api.publish_slice(capacity_slice())
    name: str = server.slices()[SLICE]["spec"]["devices"][0]["name"]
    return name


def on(device: str, consumed: dict[str, str], share_id: str = SHARE_IDS[0]) -> AllocatedDevice:
    """A result on ``device`` consuming ``consumed``."""
    return AllocatedDevice("gpu", DRIVER, NODE, device, consumed, share_id)


def test_claims_may_share_a_device_up_to_its_capacity(
    server: ApiServerStandIn, shared_device: str
) -> None:
    """Two shares, then two more fit a 4-share GPU; a fifth share does not."""
    server.add_claim(
        "ns", "a", results=[on(shared_device, {MEMORY: "12Gi", COMPUTE_SHARES: "2"}, SHARE_IDS[0])]
    )
    server.add_claim(
        "ns", "b", results=[on(shared_device, {MEMORY: "12Gi", COMPUTE_SHARES: "2"}, SHARE_IDS[1])]
    )
    with pytest.raises(ValueError, match="would consume more than its capacity 24Gi"):
        server.add_claim(
            "ns",
            "c",
            results=[on(shared_device, {MEMORY: "6Gi", COMPUTE_SHARES: "1"}, SHARE_IDS[2])],
        )


@pytest.mark.parametrize(
    ("consumed", "share_id", "cause"),
    [
        ({MEMORY: "9Gi", COMPUTE_SHARES: "1"}, SHARE_IDS[0], "not min + n * step"),
        (
            {MEMORY: "18Gi", COMPUTE_SHARES: "1"},
            SHARE_IDS[0],
            "outside the request policy's validRange",
        ),
        ({MEMORY: "6Gi"}, SHARE_IDS[0], "consumedCapacity[computeShares]: Required value"),
        ({MEMORY: "6Gi", COMPUTE_SHARES: "1"}, "", "shareID: Invalid value"),
    ],
    ids=["off-step", "over-max", "missing-capacity", "no-share-id"],
)
def test_results_on_a_shared_device_follow_its_policies(
    server: ApiServerStandIn,
    shared_device: str,
    consumed: dict[str, str],
    share_id: str,
    cause: str,
) -> None:
    """Each consumed amount is within its request policy; a shareID names the share."""
    with pytest.raises(ValueError, match=re.escape(cause)):
        server.add_claim("ns", "a", results=[on(shared_device, consumed, share_id)])


def test_a_device_without_multiple_allocations_goes_to_one_claim(
    server: ApiServerStandIn, api: KubeResourceApi
) -> None:
    """A share device is one claim's; it consumes no capacity and has no shareID."""
    api.publish_slice(
        node_slice(make_inventory((4,)), driver=DRIVER, node_name=NODE, generation=1, policy=POLICY)
    )
    device = server.slices()[SLICE]["spec"]["devices"][0]["name"]
    server.add_claim("ns", "a", results=[AllocatedDevice("gpu", DRIVER, NODE, device)])
    with pytest.raises(ValueError, match="is already allocated"):
        server.add_claim("ns", "b", results=[AllocatedDevice("gpu", DRIVER, NODE, device)])
    with pytest.raises(ValueError, match="does not allow multiple allocations"):
        server.add_claim("ns", "c", results=[on(device, {MEMORY: "6Gi"})])
