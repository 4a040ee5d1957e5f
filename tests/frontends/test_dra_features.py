"""How the DRA plugin finds out what the API server keeps before it builds a slice: asked
once, retried with the publish when the server cannot be asked, nothing more assumed of an
API that cannot say."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from tests.builders import make_inventory
from tests.harness import WAIT_S, wait_until
from vgpu_agent.config.dra import DraConfig
from vgpu_agent.frontends.dra.plugin import DraPlugin
from vgpu_agent.frontends.dra.types import (
    ApiFeatures,
    ClaimAllocation,
    DraApiError,
    NodeSlice,
    ResourceApi,
)
from vgpu_agent.model.devices import MpsGrantPolicy
from vgpu_agent.model.node import Node
from vgpu_agent.standins.resourceapi import InMemoryResourceApi

DRIVER = "vgpu.example.com"
NODE = "node-f"
BOTH = ApiFeatures(consumable_capacity=True, device_taints=True)


def plugin(tmp_path: Path, api: ResourceApi) -> DraPlugin:
    """A DRA plugin over two 4-share GPUs (GPU 1 sick), not serving."""
    node = Node(
        make_inventory((4, 4), unhealthy={1: ("xid 79",)}),
        grant_policy=MpsGrantPolicy(max_vgpus_per_container=2),
    )
    dra = DraConfig(
        enabled=True,
        driver_name=DRIVER,
        node_name=NODE,
        registry_dir=str(tmp_path / "reg"),
        plugins_dir=str(tmp_path / "plugins"),
        cdi_dir=str(tmp_path / "cdi"),
    )
    return DraPlugin(
        node, api, dra, node_name=NODE, state_dir=str(tmp_path), publish_retry_initial_s=0.01
    )


def test_the_server_is_asked_once_and_its_answer_shapes_every_slice(tmp_path: Path) -> None:
    """One probe; then each GPU is one shared device, the sick one tainted."""
    api = InMemoryResourceApi(BOTH)
    dra = plugin(tmp_path, api)
    first = dra.build_slice(dra.node.inventory(), 1)
    second = dra.build_slice(dra.node.inventory(), 2)
    assert api.probes == 1
    assert dra.features == BOTH
    assert first.devices == second.devices
    assert [device.allow_multiple_allocations for device in first.devices] == [True, True]
    assert [bool(device.taints) for device in first.devices] == [False, True]


def test_a_server_that_cannot_be_asked_is_asked_again(tmp_path: Path) -> None:
    """A failed probe fails the build (the publisher retries it) and is not remembered."""
    api = InMemoryResourceApi(BOTH)
    api.fail_publish = "connection refused"
    dra = plugin(tmp_path, api)
    with pytest.raises(DraApiError, match="connection refused"):
        dra.build_slice(dra.node.inventory(), 1)
    assert dra.features is None
    api.fail_publish = None
    assert len(dra.build_slice(dra.node.inventory(), 1).devices) == 2
    assert api.probes == 2


def test_the_publisher_retries_until_the_server_answers(tmp_path: Path) -> None:
    """The publisher thread keeps going through failed probes and publishes once it can."""
    api = InMemoryResourceApi(BOTH)
    api.fail_publish = "connection refused"
    dra = plugin(tmp_path, api)
    dra.publisher.start()
    try:
        wait_until(lambda: api.probes >= 2, WAIT_S, "the probe to be tried again")
        assert api.slice_of(DRIVER, NODE) is None
        api.fail_publish = None
        published = api.wait_for_slice(DRIVER, NODE, lambda s: len(s.devices) == 2, WAIT_S)
        assert published.devices[1].taints
    finally:
        dra.node.close()
        dra.publisher.stop()


class PlainApi:
    """A ResourceApi that cannot say what it keeps (no probe_features)."""

    def __init__(self) -> None:
        self.published: list[NodeSlice] = []

    def get_claim(self, namespace: str, name: str) -> ClaimAllocation:
        raise DraApiError(f"no claim {namespace}/{name}")

    def publish_slice(self, node_slice: NodeSlice) -> None:
        self.published.append(node_slice)

    def delete_slices(self, driver: str, node_name: str) -> None:
        return None


@pytest.mark.parametrize("make_api", [PlainApi, InMemoryResourceApi], ids=["no-probe", "1.35"])
def test_without_the_features_the_slice_is_share_devices(
    tmp_path: Path, make_api: Callable[[], ResourceApi]
) -> None:
    """An API that cannot say, or says no: a device per share, the sick GPU left out."""
    dra = plugin(tmp_path, make_api())
    built = dra.build_slice(dra.node.inventory(), 1)
    assert dra.features == ApiFeatures()
    assert len(built.devices) == 4
    assert not any(device.allow_multiple_allocations or device.taints for device in built.devices)
