"""The DRA resource health stream the kubelet reads into pod status: every device of the
slice's layout with its GPU's health, over the plugin's real socket, again at each change."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tests.builders import gpu_uuid, make_inventory
from vgpu_agent.config.dra import DraConfig
from vgpu_agent.frontends._proto import dra_health_v1alpha1_pb2 as health_pb
from vgpu_agent.frontends.dra.health import HEALTH_SERVICE, device_health
from vgpu_agent.frontends.dra.plugin import DraPlugin
from vgpu_agent.frontends.dra.types import ApiFeatures
from vgpu_agent.model.devices import HealthReason, MpsGrantPolicy
from vgpu_agent.model.node import Node
from vgpu_agent.standins.resourceapi import InMemoryResourceApi

DRIVER = "vgpu.example.com"
NODE = "node-h"
WAIT_S = 10.0


@pytest.mark.parametrize(
    ("consumable", "expected"),
    [(False, [True] * 4 + [False] * 4), (True, [True, False])],
    ids=["shares", "capacity"],
)
def test_every_device_of_the_layout_has_its_gpus_health(
    consumable: bool, expected: list[bool]
) -> None:
    """Share devices or GPU devices, sick ones included (they may have left the slice)."""
    inventory = make_inventory((4, 4), unhealthy={1: ("xid 79",)})
    health = device_health(inventory, consumable_capacity=consumable)
    assert [healthy for _, healthy in health] == expected
    assert len({name for name, _ in health}) == len(expected)


@dataclass
class Stream:
    """A served plugin and the kubelet's health stream from its endpoint socket."""

    plugin: DraPlugin
    node: Node
    api: InMemoryResourceApi
    responses: Iterator[Any]


@pytest.fixture
def stream(short_tmp_dir: str) -> Iterator[Stream]:
    """The plugin serving; the health stream called as the kubelet calls it."""
    dra = DraConfig(
        enabled=True,
        driver_name=DRIVER,
        registry_dir=f"{short_tmp_dir}/reg",
        plugins_dir=f"{short_tmp_dir}/plugins",
        cdi_dir=f"{short_tmp_dir}/cdi",
    )
    node = Node(make_inventory((4, 4)), grant_policy=MpsGrantPolicy(max_vgpus_per_container=2))
    api = InMemoryResourceApi(ApiFeatures(consumable_capacity=True, device_taints=True))
    # Unreachable at first: the slice's layout is not known yet (a device per share).
    api.fail_publish = "connection refused"
    plugin = DraPlugin(
        node,
        api,
        dra,
        node_name=NODE,
        state_dir=f"{short_tmp_dir}/state",
        publish_retry_initial_s=0.05,
    )
    endpoint = plugin.serve()
    channel = grpc.insecure_channel(f"unix://{dra.plugin_socket_path}")
    call = channel.unary_stream(
        f"/{HEALTH_SERVICE}/NodeWatchResources",
        request_serializer=health_pb.NodeWatchResourcesRequest.SerializeToString,
        response_deserializer=health_pb.NodeWatchResourcesResponse.FromString,
    )(health_pb.NodeWatchResourcesRequest(), timeout=WAIT_S)
    yield Stream(plugin, node, api, call)
    call.cancel()
    channel.close()
    node.close()
    endpoint.stop()


def summary(response: Any) -> list[tuple[str, str, int]]:
    """(pool, device, health) of each device of a response."""
    return [(d.device.pool_name, d.device.device_name, d.health) for d in response.devices]


def test_the_stream_follows_health_and_the_layout(stream: Stream) -> None:
    """All healthy shares at first; a sick GPU's devices turn UNHEALTHY and back; once the
    API server is found to offer consumable capacity, one device per GPU."""
    first = next(stream.responses)
    assert len(first.devices) == 8
    assert {pool for pool, _, _ in summary(first)} == {NODE}
    assert {health for _, _, health in summary(first)} == {health_pb.HEALTHY}
    assert all(d.last_updated_time > 0 for d in first.devices)

    stream.node.set_health(gpu_uuid(0), HealthReason.lost(), True)
    sick = next(stream.responses)
    assert [health for _, _, health in summary(sick)] == [health_pb.UNHEALTHY] * 4 + [
        health_pb.HEALTHY
    ] * 4
    stream.node.set_health(gpu_uuid(0), HealthReason.lost(), False)
    assert {health for _, _, health in summary(next(stream.responses))} == {health_pb.HEALTHY}

    stream.api.fail_publish = None
    regrouped = next(stream.responses)
    published = stream.api.wait_for_slice(DRIVER, NODE, timeout_s=WAIT_S)
    assert [name for _, name, _ in summary(regrouped)] == [d.name for d in published.devices]
    assert len(regrouped.devices) == 2
