"""The DRA part of `vgpu-agent demo`: the same simulated GPUs served as a DRA kubelet plugin.

A second agent (``dra.enabled``) runs in its own directory against the DRA kubelet stand-in
and an API server stand-in: it registers through the plugin registry directory, publishes
the node's ResourceSlice, prepares a claim into a CDI spec, withdraws a sick GPU's shares
from the slice, unprepares the claim and deletes the slice when it stops.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable

from vgpu_agent.config.dra import DraConfig
from vgpu_agent.config.schema import Config
from vgpu_agent.frontends.dra.types import (
    AllocatedDevice,
    AttributeValue,
    ClaimRef,
    NodeSlice,
    ResourceApi,
    SemVer,
)
from vgpu_agent.host.systemd import Notifier
from vgpu_agent.model.commands import SimulateAction, SimulateCommand
from vgpu_agent.runtime.compose import build_agent
from vgpu_agent.standins.dra_kubelet import DraKubeletStandin
from vgpu_agent.standins.resourceapi import InMemoryResourceApi

Echo = Callable[[str], None]
WAIT_S = 10.0
DEMO_NODE = "demo-node"
DEMO_CLAIM = ("ml", "trainer-0-vgpu")


def dra_config(base: Config, root: str) -> Config:
    """``base`` in DRA mode, every path under ``root``."""
    return replace(
        base,
        agent=replace(base.agent, state_dir=f"{root}/state"),
        plugin=replace(base.plugin, plugin_dir=f"{root}/device-plugins"),
        dra=DraConfig(
            enabled=True,
            node_name=DEMO_NODE,
            registry_dir=f"{root}/plugins_registry",
            plugins_dir=f"{root}/plugins",
            cdi_dir=f"{root}/cdi",
        ),
        source="<demo, DRA mode>",
    )


@contextmanager
def api_server() -> Iterator[
    tuple[ResourceApi, Callable[[str, str, list[AllocatedDevice]], str], Callable[[], None]]
]:
    """The API server the demo's agent talks to: (the client, add an allocated claim and
    return its uid, wipe the node's slices)."""
    api = InMemoryResourceApi()
    counter = [0]

    def add_claim(namespace: str, name: str, results: list[AllocatedDevice]) -> str:
        counter[0] += 1
        uid = f"0000c1a1-0000-4000-8000-{counter[0]:012d}"
        api.add_claim(namespace, name, uid, results)
        return uid

    yield api, add_claim, lambda: api.wipe_node(DEMO_NODE)


def _wait_for_slice(api: ResourceApi, driver: str, check: Callable[[NodeSlice], bool]) -> NodeSlice:
    assert isinstance(api, InMemoryResourceApi)  # noqa: S101 - the demo's own API server
    return api.wait_for_slice(driver, DEMO_NODE, check, WAIT_S)


def run_dra_demo(base: Config, root: str, echo: Echo) -> None:
    """Run the DRA part in ``root``, printing what happens; raises when a step fails."""
    config = dra_config(base, root)
    driver = config.dra.driver_name
    with api_server() as (api, add_claim, wipe):
        kubelet = DraKubeletStandin(config.dra.registry_dir, wipe_slices=wipe)
        agent = build_agent(config, notifier=Notifier(None), make_resource_api=lambda _config: api)
        thread = threading.Thread(target=agent.run, name="vgpu-agent-dra", daemon=True)
        try:
            echo(f"== DRA mode (dra.enabled = true): a second node, driver {driver}")
            kubelet.start()
            started = time.monotonic()
            thread.start()
            registration = kubelet.wait_for_registration(1, WAIT_S)
            echo(
                f"   the kubelet found {os.path.basename(registration.socket_path)} and registered "
                f"it in {time.monotonic() - started:.2f} s: {registration.service} on "
                f"{registration.endpoint}"
            )
            published = _wait_for_slice(api, driver, lambda s: len(s.devices) == 8)
            _show_slice(published, echo)
            first = published.devices[0]
            results = [AllocatedDevice("vgpu", driver, published.pool, first.name)]
            namespace, name = DEMO_CLAIM
            uid = add_claim(namespace, name, results)
            echo(f"== the scheduler allocated {first.name} to ResourceClaim {namespace}/{name}")
            answer = kubelet.prepare(driver, [ClaimRef(namespace, name, uid)])[uid]
            if answer.error:
                raise RuntimeError(f"NodePrepareResources failed: {answer.error}")
            for device in answer.devices:
                echo(
                    f"== NodePrepareResources -> {device['device_name']}: CDI "
                    f"{', '.join(device['cdi_device_ids'])}"
                )
            spec_path = os.path.join(config.dra.cdi_dir, f"{driver}-claim-{uid}.json")
            _show_spec(spec_path, echo)
            echo(f"== simulating XID 79 on GPU {first.attributes['index']}")
            agent.submit(SimulateCommand(SimulateAction.XID, str(first.attributes["index"]), 79))
            sick = _wait_for_slice(api, driver, lambda s: len(s.devices) == 4)
            echo(
                f"   ResourceSlice: pool generation {sick.generation}, {len(sick.devices)} devices "
                "(the sick GPU's shares withdrawn)"
            )
            healed = _wait_for_slice(api, driver, lambda s: len(s.devices) == 8)
            echo(f"   healed: pool generation {healed.generation}, {len(healed.devices)} devices")
            errors = kubelet.unprepare(driver, [ClaimRef(namespace, name, uid)])
            gone = not os.path.exists(spec_path)
            echo(f"== NodeUnprepareResources -> {errors[uid] or 'ok'}; CDI spec removed: {gone}")
        finally:
            agent.request_stop("demo finished")
            thread.join(timeout=WAIT_S)
            kubelet.stop()
        left = isinstance(api, InMemoryResourceApi) and api.slice_of(driver, DEMO_NODE)
        state = "is still there" if left else "deleted"
        echo(f"== the agent stopped: the node's ResourceSlice {state}")


def _show_slice(published: NodeSlice, echo: Echo) -> None:
    echo(
        f"== ResourceSlice of node {published.node_name}: pool {published.pool}, generation "
        f"{published.generation}, {len(published.devices)} devices"
    )
    for device in published.devices[:2]:
        attributes = ", ".join(
            f"{key}={_shown(value)}" for key, value in sorted(device.attributes.items())
        )
        echo(f"   {device.name}: {attributes}")
    echo(f"   ... and {len(published.devices) - 2} more")


def _show_spec(path: str, echo: Echo) -> None:
    with open(path, encoding="utf-8") as stream:
        spec = json.load(stream)
    echo(f"== CDI spec {os.path.basename(path)} (kind {spec['kind']}):")
    for device in spec["devices"]:
        edits = device["containerEdits"]
        for variable in edits.get("env", []):
            echo(f"   env   {variable}")
        for mount in edits.get("mounts", []):
            echo(
                f"   mount {mount['hostPath']} -> {mount['containerPath']} "
                f"({','.join(mount['options'])})"
            )


def _shown(value: AttributeValue) -> str:
    return value.text if isinstance(value, SemVer) else str(value)
