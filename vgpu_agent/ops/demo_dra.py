"""The DRA part of `vgpu-agent demo`: the same simulated GPUs served as a DRA kubelet plugin.

A second agent (``dra.enabled``) runs in its own directory against the DRA kubelet stand-in
and the stand-in API server (over HTTP, the agent with the node's identity): it registers
through the plugin registry directory, publishes the node's ResourceSlice, prepares a claim
into a CDI spec, withdraws a sick GPU's shares from the slice, unprepares the claim and
deletes the slice when it stops.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from vgpu_agent.config.dra import DraConfig
from vgpu_agent.config.schema import Config
from vgpu_agent.frontends.dra.kubeapi import KubeResourceApi
from vgpu_agent.frontends.dra.types import AllocatedDevice, ClaimRef
from vgpu_agent.host.systemd import Notifier
from vgpu_agent.model.commands import SimulateAction, SimulateCommand
from vgpu_agent.runtime.compose import build_agent
from vgpu_agent.standins.apiserver.server import ApiServerStandIn
from vgpu_agent.standins.dra_kubelet import DraKubeletStandin

Echo = Callable[[str], None]
WAIT_S = 10.0
DEMO_NODE = "demo-node"
DEMO_CLAIM = ("ml", "trainer-0-vgpu")
#: The bearer token that makes the agent system:node:<DEMO_NODE> at the stand-in.
DEMO_TOKEN = "demo-node-token"  # noqa: S105 - a token of the in-process stand-in only


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


@dataclass(frozen=True)
class PublishedPool:
    """The node's pool as the API server holds it: its generation and devices (JSON)."""

    generation: int
    devices: tuple[dict[str, Any], ...]


class DemoApiServer:
    """The stand-in API server over HTTP, the agent's client to it with the node's identity
    (``system:node:<node>``, held by the Node authorizer's rules), and what the demo reads."""

    def __init__(self) -> None:
        self.server = ApiServerStandIn(
            tokens={DEMO_TOKEN: f"system:node:{DEMO_NODE}"}, anonymous_user=None
        )

    def __enter__(self) -> DemoApiServer:
        self.server.start()
        self.server.add_node(DEMO_NODE)
        self.client = KubeResourceApi.for_server(self.server.url, token=DEMO_TOKEN)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.client.close()
        self.server.stop()

    def pool(self, driver: str) -> Optional[PublishedPool]:
        """The node's pool of ``driver``, None when it has no slice."""
        slices = [
            body["spec"]
            for body in self.server.slices().values()
            if body["spec"].get("driver") == driver and body["spec"].get("nodeName") == DEMO_NODE
        ]
        if not slices:
            return None
        devices = tuple(device for spec in slices for device in spec.get("devices") or [])
        return PublishedPool(slices[0]["pool"]["generation"], devices)

    def wait_for_pool(self, driver: str, devices: int) -> PublishedPool:
        """Wait until the node's pool holds ``devices`` devices."""
        deadline = time.monotonic() + WAIT_S
        while True:
            pool = self.pool(driver)
            if pool is not None and len(pool.devices) == devices:
                return pool
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the node's ResourceSlices never held {devices} devices: {pool}"
                )
            time.sleep(0.02)


def run_dra_demo(base: Config, root: str, echo: Echo) -> None:
    """Run the DRA part in ``root``, printing what happens; raises when a step fails."""
    config = dra_config(base, root)
    driver = config.dra.driver_name
    with DemoApiServer() as api:
        kubelet = DraKubeletStandin(config.dra.registry_dir)
        agent = build_agent(
            config, notifier=Notifier(None), make_resource_api=lambda _config: api.client
        )
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
            echo(
                f"   API server stand-in on {api.server.url}, the agent as system:node:{DEMO_NODE}"
            )
            published = api.wait_for_pool(driver, 8)
            _show_pool(published, echo)
            first = published.devices[0]
            index = first["attributes"]["index"]["int"]
            results = [AllocatedDevice("vgpu", driver, DEMO_NODE, first["name"])]
            namespace, name = DEMO_CLAIM
            uid = api.server.add_claim(namespace, name, node=DEMO_NODE, results=results)
            echo(
                f"== the scheduler allocated {first['name']} to ResourceClaim {namespace}/{name} "
                f"of a pod on {DEMO_NODE}"
            )
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
            echo(f"== simulating XID 79 on GPU {index}")
            agent.submit(SimulateCommand(SimulateAction.XID, str(index), 79))
            sick = api.wait_for_pool(driver, 4)
            echo(
                f"   ResourceSlice: pool generation {sick.generation}, {len(sick.devices)} devices "
                "(the sick GPU's shares withdrawn)"
            )
            healed = api.wait_for_pool(driver, 8)
            echo(f"   healed: pool generation {healed.generation}, {len(healed.devices)} devices")
            errors = kubelet.unprepare(driver, [ClaimRef(namespace, name, uid)])
            gone = not os.path.exists(spec_path)
            echo(f"== NodeUnprepareResources -> {errors[uid] or 'ok'}; CDI spec removed: {gone}")
        finally:
            agent.request_stop("demo finished")
            thread.join(timeout=WAIT_S)
            kubelet.stop()
        left = api.pool(driver) is not None
        state = "is still there" if left else "deleted"
        echo(f"== the agent stopped: the node's ResourceSlice {state}")


def _show_pool(published: PublishedPool, echo: Echo) -> None:
    echo(
        f"== ResourceSlice of node {DEMO_NODE}: pool {DEMO_NODE}, generation "
        f"{published.generation}, {len(published.devices)} devices"
    )
    for device in published.devices[:2]:
        attributes = ", ".join(
            f"{key}={next(iter(value.values()))}"
            for key, value in sorted(device.get("attributes", {}).items())
        )
        echo(f"   {device['name']}: {attributes}")
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
