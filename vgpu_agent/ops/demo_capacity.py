"""The consumable-capacity part of `vgpu-agent demo`: a node whose API server offers
consumable capacity and device taints (Kubernetes 1.36 defaults).

A third agent (``dra.enabled``, a ceiling of two shares) runs against the DRA kubelet
stand-in and an in-memory API server that keeps both features. It publishes each GPU once
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
from typing import Callable

from vgpu_agent.config.dra import DraConfig
from vgpu_agent.config.schema import Config
from vgpu_agent.frontends.dra.capacity import COMPUTE_SHARES, MEMORY
from vgpu_agent.frontends.dra.types import (
    AllocatedDevice,
    ApiFeatures,
    ClaimRef,
    NodeSlice,
    SliceDevice,
)
from vgpu_agent.host.systemd import Notifier
from vgpu_agent.model.commands import HealthResetCommand, SimulateAction, SimulateCommand
from vgpu_agent.runtime.compose import build_agent
from vgpu_agent.standins.dra_kubelet import DraKubeletStandin
from vgpu_agent.standins.resourceapi import InMemoryResourceApi

Echo = Callable[[str], None]
WAIT_S = 10.0
DEMO_NODE = "demo-node-capacity"
#: What the scheduler wrote into the two claims (shareIDs are its UUIDs).
CLAIM_FORM = ("ml", "trainer-0-vgpu", "0000c1a2-0000-4000-8000-000000000001")
EXTENDED_FORM = ("ml", "infer-0-extended-resources", "0000c1a2-0000-4000-8000-000000000002")
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


def run_capacity_demo(base: Config, root: str, echo: Echo) -> None:
    """Run the consumable-capacity part in ``root``, printing what happens; raises when a
    step fails."""
    config = capacity_config(base, root)
    driver = config.dra.driver_name
    api = InMemoryResourceApi(ApiFeatures(consumable_capacity=True, device_taints=True))
    kubelet = DraKubeletStandin(
        config.dra.registry_dir, wipe_slices=lambda: api.wipe_node(DEMO_NODE)
    )
    agent = build_agent(config, notifier=Notifier(None), make_resource_api=lambda _config: api)
    thread = threading.Thread(target=agent.run, name="vgpu-agent-capacity", daemon=True)
    try:
        echo(
            "== DRA with consumable capacity: a third node whose API server keeps "
            "allowMultipleAllocations and device taints (Kubernetes 1.36 defaults)"
        )
        kubelet.start()
        thread.start()
        kubelet.wait_for_registration(1, WAIT_S)
        published = api.wait_for_slice(driver, DEMO_NODE, lambda s: len(s.devices) == 2, WAIT_S)
        _show_slice(published, echo)
        gpu = published.devices[1]
        claim_form = {MEMORY: _capacity_max(gpu, MEMORY), COMPUTE_SHARES: "2"}
        extended_form = {
            MEMORY: gpu.capacity_policies[MEMORY].default,
            COMPUTE_SHARES: gpu.capacity_policies[COMPUTE_SHARES].default,
        }
        echo(
            "== the claim form (packaging/dra/example-capacity-pod.yaml): a ResourceClaim asks "
            "for an amount; the scheduler rounds it up to whole shares and records"
        )
        echo(f"   consumedCapacity {_amounts(claim_form)} of {gpu.name}")
        echo(
            "== the extended-resource form (packaging/dra/example-extended-pod.yaml with "
            "deviceclass-extended.yaml): a pod asks for eks.amazonaws.com/vgpu: 1, unchanged;"
        )
        echo(f"   the scheduler's claim for it consumed the defaults, {_amounts(extended_form)}")
        refs = []
        for (namespace, name, uid), consumed, share_id in (
            (CLAIM_FORM, claim_form, SHARE_IDS[0]),
            (EXTENDED_FORM, extended_form, SHARE_IDS[1]),
        ):
            result = AllocatedDevice("vgpu", driver, published.pool, gpu.name, consumed, share_id)
            api.add_claim(namespace, name, uid, [result])
            refs.append(ClaimRef(namespace, name, uid))
        answers = kubelet.prepare(driver, refs)
        echo(f"== NodePrepareResources for both, on the same GPU {gpu.attributes['uuid']}:")
        for ref in refs:
            if answers[ref.uid].error:
                raise RuntimeError(f"NodePrepareResources failed: {answers[ref.uid].error}")
            limits = _limits(os.path.join(config.dra.cdi_dir, f"{driver}-claim-{ref.uid}.json"))
            echo(f"   {ref.namespace}/{ref.name}: {limits}")
        index = str(gpu.attributes["index"])
        echo(f"== simulating XID 79 on GPU {index}: its device stays in the slice, tainted")
        started = time.monotonic()
        agent.submit(SimulateCommand(SimulateAction.XID, index, 79))
        tainted = api.wait_for_slice(driver, DEMO_NODE, lambda s: bool(s.devices[1].taints), WAIT_S)
        for taint in tainted.devices[1].taints:
            echo(
                f"   taint {taint.key}={taint.value}:{taint.effect} after "
                f"{time.monotonic() - started:.2f} s (new claims stay off it; running pods stay)"
            )
        started = time.monotonic()
        agent.submit(HealthResetCommand(index))
        api.wait_for_slice(driver, DEMO_NODE, lambda s: not s.devices[1].taints, WAIT_S)
        elapsed_s = time.monotonic() - started
        echo(f"== vgpu-agent health reset {index}: taint removed after {elapsed_s:.2f} s")
        kubelet.unprepare(driver, refs)
    finally:
        agent.request_stop("demo finished")
        thread.join(timeout=WAIT_S)
        kubelet.stop()
    state = "is still there" if api.slice_of(driver, DEMO_NODE) else "deleted"
    echo(f"== the agent stopped: the node's ResourceSlice {state}")


def _capacity_max(device: SliceDevice, name: str) -> str:
    policy = device.capacity_policies[name]
    return policy.max or device.capacity[name]


def _amounts(consumed: dict[str, str]) -> str:
    return ", ".join(f"{name} {amount}" for name, amount in sorted(consumed.items()))


def _show_slice(published: NodeSlice, echo: Echo) -> None:
    echo(
        f"== ResourceSlice of node {published.node_name}: pool generation "
        f"{published.generation}, {len(published.devices)} devices, one per GPU"
    )
    for device in published.devices:
        capacities = []
        for name, value in sorted(device.capacity.items()):
            policy = device.capacity_policies[name]
            capacities.append(
                f"{name} {value} (a claim: default {policy.default}, step {policy.step}, "
                f"at most {policy.max})"
            )
        echo(f"   {device.name}: {'; '.join(capacities)}")


def _limits(spec_path: str) -> str:
    with open(spec_path, encoding="utf-8") as stream:
        spec = json.load(stream)
    env = spec["devices"][0]["containerEdits"]["env"]
    shown = [
        variable for variable in env if variable.startswith("CUDA_MPS_") and "PIPE" not in variable
    ]
    return ", ".join(shown)
