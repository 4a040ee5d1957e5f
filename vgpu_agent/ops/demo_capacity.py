"""The consumable-capacity part of `vgpu-agent demo`: a node whose API server offers
consumable capacity and device taints (Kubernetes 1.36 defaults).

A third agent (``dra.enabled``, a ceiling of two shares) runs against the DRA kubelet
stand-in and the stand-in API server over HTTP with both feature gates on, as the node's
identity (``system:node:<node>``). It finds out what the server keeps, publishes each GPU once
as a device claims share; two claims on one GPU are prepared, one in the claim form (a
ResourceClaim asking for an amount of memory and compute) and one in the extended-resource
form (what the scheduler makes for a pod asking for ``eks.amazonaws.com/vgpu: 1``), each
with its own MPS limits; an XID taints the GPU's device, a health reset clears it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace
from typing import Any, Callable

from vgpu_agent.config.dra import DraConfig
from vgpu_agent.config.schema import Config
from vgpu_agent.frontends.dra.capacity import COMPUTE_SHARES, MEMORY
from vgpu_agent.frontends.dra.kubeapi import KubeResourceApi
from vgpu_agent.frontends.dra.types import AllocatedDevice, ClaimRef
from vgpu_agent.host.systemd import Notifier
from vgpu_agent.model.commands import HealthResetCommand, SimulateAction, SimulateCommand
from vgpu_agent.runtime.compose import build_agent
from vgpu_agent.standins.apiserver.server import ApiServerStandIn
from vgpu_agent.standins.dra_kubelet import DraKubeletStandin

Echo = Callable[[str], None]
WAIT_S = 10.0
DEMO_NODE = "demo-node-capacity"
DEMO_TOKEN = "demo-node-capacity-token"  # noqa: S105 - the demo's own stand-in token
#: The two claims, and the shareIDs the scheduler gave their shares of the GPU.
CLAIM_FORM = ("ml", "trainer-0-vgpu")
EXTENDED_FORM = ("ml", "infer-0-extended-resources")
SHARE_IDS = ("5b0c1a8e-0000-4000-8000-0000000000a1", "5b0c1a8e-0000-4000-8000-0000000000a2")


def capacity_config(base: Config, root: str) -> Config:
    """``base`` in DRA mode with a ceiling of two shares, every path under ``root``."""
    return replace(
        base,
        agent=replace(base.agent, state_dir=f"{root}/state"),
        plugin=replace(base.plugin, plugin_dir=f"{root}/device-plugins"),
        mps=replace(base.mps, max_vgpus_per_container=2),
        dra=DraConfig(
            enabled=True,
            node_name=DEMO_NODE,
            registry_dir=f"{root}/plugins_registry",
            plugins_dir=f"{root}/plugins",
            cdi_dir=f"{root}/cdi",
        ),
        source="<demo, DRA mode with consumable capacity>",
    )


def _devices(server: ApiServerStandIn) -> list[dict[str, Any]]:
    """The devices of the node's slices as the API server stores them (JSON)."""
    return [
        device
        for stored in server.slices().values()
        if stored["spec"].get("nodeName") == DEMO_NODE
        for device in stored["spec"].get("devices") or []
    ]


def _wait(
    server: ApiServerStandIn, what: str, check: Callable[[list[dict[str, Any]]], bool]
) -> float:
    """Wait until the stored devices pass ``check``; the seconds it took."""
    started = time.monotonic()
    while not check(_devices(server)):
        if time.monotonic() - started > WAIT_S:
            raise TimeoutError(f"the node's ResourceSlices never showed {what}: {_devices(server)}")
        time.sleep(0.01)
    return time.monotonic() - started


def run_capacity_demo(base: Config, root: str, echo: Echo) -> None:
    """Run the consumable-capacity part in ``root``, printing what happens; raises when a
    step fails."""
    config = capacity_config(base, root)
    driver = config.dra.driver_name
    server = ApiServerStandIn(
        tokens={DEMO_TOKEN: f"system:node:{DEMO_NODE}"},
        anonymous_user=None,
        consumable_capacity=True,
        device_taints=True,
    )
    server.start()
    server.add_node(DEMO_NODE)
    client = KubeResourceApi.for_server(server.url, token=DEMO_TOKEN)
    kubelet = DraKubeletStandin(config.dra.registry_dir)
    agent = build_agent(config, notifier=Notifier(None), make_resource_api=lambda _config: client)
    thread = threading.Thread(target=agent.run, name="vgpu-agent-capacity", daemon=True)
    try:
        echo(
            "== DRA with consumable capacity: a third node; its API server (the stand-in over "
            "HTTP) keeps allowMultipleAllocations and device taints, as 1.36 does by default"
        )
        kubelet.start()
        thread.start()
        kubelet.wait_for_registration(1, WAIT_S)
        _wait(server, "two GPU devices", lambda devices: len(devices) == 2)
        dry_runs = sum(1 for query in server.queries if query.get("dryRun") == "All")
        echo(f"   found out by {dry_runs} dry-run create (nothing stored): one device per GPU")
        devices = _devices(server)
        _show_devices(devices, echo)
        gpu = devices[1]
        memory_policy = gpu["capacity"][MEMORY]["requestPolicy"]
        compute_policy = gpu["capacity"][COMPUTE_SHARES]["requestPolicy"]
        claim_form = {
            MEMORY: memory_policy["validRange"]["max"],
            COMPUTE_SHARES: compute_policy["validRange"]["max"],
        }
        extended_form = {
            MEMORY: memory_policy["default"],
            COMPUTE_SHARES: compute_policy["default"],
        }
        echo(
            "== the claim form (packaging/dra/example-capacity-pod.yaml): a ResourceClaim asks "
            "for an amount; the scheduler rounds it up to whole shares and records"
        )
        echo(f"   consumedCapacity {_amounts(claim_form)} of {gpu['name']}")
        echo(
            "== the extended-resource form (packaging/dra/example-extended-pod.yaml with "
            "deviceclass-extended.yaml): a pod asks for eks.amazonaws.com/vgpu: 1, unchanged;"
        )
        echo(f"   the scheduler's claim for it consumed the defaults, {_amounts(extended_form)}")
        refs = []
        for (namespace, name), consumed, share_id in (
            (CLAIM_FORM, claim_form, SHARE_IDS[0]),
            (EXTENDED_FORM, extended_form, SHARE_IDS[1]),
        ):
            result = AllocatedDevice("vgpu", driver, DEMO_NODE, gpu["name"], consumed, share_id)
            # The stand-in checks each result against the slice, as the API server would.
            uid = server.add_claim(namespace, name, node=DEMO_NODE, results=[result])
            refs.append(ClaimRef(namespace, name, uid))
        answers = kubelet.prepare(driver, refs)
        uuid = gpu["attributes"]["uuid"]["string"]
        echo(f"== NodePrepareResources for both, on the same GPU {uuid}:")
        for ref in refs:
            if answers[ref.uid].error:
                raise RuntimeError(f"NodePrepareResources failed: {answers[ref.uid].error}")
            limits = _limits(os.path.join(config.dra.cdi_dir, f"{driver}-claim-{ref.uid}.json"))
            echo(f"   {ref.namespace}/{ref.name}: {limits}")
        index = str(gpu["attributes"]["index"]["int"])
        echo(f"== simulating XID 79 on GPU {index}: its device stays in the slice, tainted")
        agent.submit(SimulateCommand(SimulateAction.XID, index, 79))
        took_s = _wait(server, "the taint", lambda devices: bool(devices[1].get("taints")))
        for taint in _devices(server)[1]["taints"]:
            echo(
                f"   taint {taint['key']}={taint['value']}:{taint['effect']} (added "
                f"{taint['timeAdded']}) stored {took_s:.2f} s after the XID"
            )
        agent.submit(HealthResetCommand(index))
        took_s = _wait(server, "no taint", lambda devices: not devices[1].get("taints"))
        echo(f"== vgpu-agent health reset {index}: taint removed {took_s:.2f} s later")
        kubelet.unprepare(driver, refs)
    finally:
        agent.request_stop("demo finished")
        thread.join(timeout=WAIT_S)
        kubelet.stop()
        left = _devices(server)
        client.close()
        server.stop()
    echo(
        f"== the agent stopped: the node's ResourceSlice {'is still there' if left else 'deleted'}"
    )


def _amounts(consumed: dict[str, str]) -> str:
    return ", ".join(f"{name} {amount}" for name, amount in sorted(consumed.items()))


def _show_devices(devices: list[dict[str, Any]], echo: Echo) -> None:
    for device in devices:
        capacities = []
        for name, capacity in sorted(device["capacity"].items()):
            policy = capacity["requestPolicy"]
            valid = policy["validRange"]
            capacities.append(
                f"{name} {capacity['value']} (a claim: default {policy['default']}, step "
                f"{valid['step']}, at most {valid['max']})"
            )
        echo(f"   {device['name']}: {'; '.join(capacities)}")


def _limits(spec_path: str) -> str:
    with open(spec_path, encoding="utf-8") as stream:
        spec = json.load(stream)
    env = spec["devices"][0]["containerEdits"]["env"]
    shown = [
        variable for variable in env if variable.startswith("CUDA_MPS_") and "PIPE" not in variable
    ]
    return ", ".join(shown)
