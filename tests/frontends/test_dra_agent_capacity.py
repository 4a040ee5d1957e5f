"""The whole agent in DRA mode against the stand-in API server over HTTP, as the node's own
identity: the GPUs published as consumable capacity where the server offers it, two claims
of different sizes prepared on one GPU by the DRA kubelet stand-in, and health as device
taints that appear and clear within a second."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Callable

import pytest

from tests.harness import WAIT_S, AgentRun, make_config, wait_until
from vgpu_agent.config.dra import DraConfig
from vgpu_agent.config.schema import Config
from vgpu_agent.frontends.dra.capacity import COMPUTE_SHARES, MEMORY
from vgpu_agent.frontends.dra.kubeapi import KubeResourceApi
from vgpu_agent.frontends.dra.types import AllocatedDevice, ClaimRef, ResourceApi
from vgpu_agent.model.commands import HealthResetCommand, SimulateAction, SimulateCommand
from vgpu_agent.standins.apiserver.server import ApiServerStandIn
from vgpu_agent.standins.dra_kubelet import DraKubeletStandin
from vgpu_agent.standins.simulated import simulated_uuid

DRIVER = "vgpu.example.com"
NODE = "node-cap"
NODE_TOKEN = "node-cap-token"  # noqa: S105 - a test token
SMALL_UID = "0c4f6d8e-1111-2222-3333-444455556666"
BIG_UID = "9a9a9a9a-1111-2222-3333-444455556666"
#: Taints appear and clear as fast as today's health reaches the kubelet.
HEALTH_DEADLINE_S = 1.0
#: The simulated H100 (81559 MiB) in 4 shares: 20389 MiB each.
SHARE_MIB = 81559 // 4


@dataclass
class CapacityRun:
    """An agent in DRA mode, its DRA kubelet and the stand-in API server."""

    run: AgentRun
    config: Config
    server: ApiServerStandIn
    kubelet: DraKubeletStandin
    clients: list[KubeResourceApi]

    def stop(self) -> None:
        """Stop the agent (it deletes its slice), the kubelet, and close the clients."""
        assert self.run.stop() == 0
        self.kubelet.stop()
        for client in self.clients:
            client.close()

    def devices(self) -> list[dict[str, Any]]:
        """The devices of the node's stored slices."""
        return [
            device
            for stored in self.server.slices().values()
            for device in stored["spec"].get("devices") or []
        ]

    def device_of(self, gpu_index: int) -> dict[str, Any]:
        """The stored device of one GPU (consumable capacity: one per GPU)."""
        return next(
            device
            for device in self.devices()
            if device["attributes"]["index"] == {"int": gpu_index}
        )


def start(
    short_tmp_dir: str,
    run_agent: Callable[..., AgentRun],
    server: ApiServerStandIn,
) -> CapacityRun:
    """The agent with a ceiling of 2 shares, XID faults healed only by a reset."""
    config = make_config(
        short_tmp_dir,
        dra=DraConfig(
            enabled=True,
            driver_name=DRIVER,
            node_name=NODE,
            registry_dir=f"{short_tmp_dir}/reg",
            plugins_dir=f"{short_tmp_dir}/plugins",
            cdi_dir=f"{short_tmp_dir}/cdi",
        ),
    )
    config = replace(
        config,
        mps=replace(config.mps, max_vgpus_per_container=2),
        health=replace(config.health, recovery_quiet_period_s=300),
    )
    server.add_node(NODE)
    clients: list[KubeResourceApi] = []

    def make_api(_config: Config) -> ResourceApi:
        clients.append(KubeResourceApi.for_server(server.url, token=NODE_TOKEN))
        return clients[-1]

    kubelet = DraKubeletStandin(config.dra.registry_dir)
    kubelet.start()
    run = run_agent(config, kubelet=False, make_resource_api=make_api)
    kubelet.wait_for_registration(1, WAIT_S)
    return CapacityRun(run, config, server, kubelet, clients)


@pytest.fixture
def capacity_run(short_tmp_dir: str, run_agent: Callable[..., AgentRun]) -> Iterator[CapacityRun]:
    """The agent against a stand-in API server with 1.36's defaults, its slice published."""
    with ApiServerStandIn(
        tokens={NODE_TOKEN: f"system:node:{NODE}"}, consumable_capacity=True, device_taints=True
    ) as server:
        started = start(short_tmp_dir, run_agent, server)
        wait_until(lambda: len(started.devices()) == 2, WAIT_S, "the node's two GPU devices")
        yield started
        started.stop()


def test_each_gpu_is_published_once_with_consumable_capacity(capacity_run: CapacityRun) -> None:
    """Detected, not configured: the server keeps the fields, so each GPU is one shared
    device whose policies step by one share and stop at the 2-share ceiling."""
    device = capacity_run.device_of(1)
    assert device["allowMultipleAllocations"] is True
    assert device["attributes"]["uuid"] == {"string": simulated_uuid(1)}
    assert device["capacity"][MEMORY] == {
        "value": f"{4 * SHARE_MIB}Mi",
        "requestPolicy": {
            "default": f"{SHARE_MIB}Mi",
            "validRange": {
                "min": f"{SHARE_MIB}Mi",
                "max": f"{2 * SHARE_MIB}Mi",
                "step": f"{SHARE_MIB}Mi",
            },
        },
    }
    assert device["capacity"][COMPUTE_SHARES]["requestPolicy"]["validRange"]["max"] == "2"
    assert ("GET", "/api/v1/nodes/" + NODE) in capacity_run.server.requests


def cdi_env(run: CapacityRun, uid: str) -> list[str]:
    """The environment in a claim's CDI spec."""
    with open(f"{run.config.dra.cdi_dir}/{DRIVER}-claim-{uid}.json", encoding="utf-8") as stream:
        spec: dict[str, Any] = json.load(stream)
    env: list[str] = spec["devices"][0]["containerEdits"]["env"]
    return env


def test_the_kubelet_prepares_two_claims_of_different_sizes_on_one_gpu(
    capacity_run: CapacityRun,
) -> None:
    """One share and two shares of GPU 1, allocated as the scheduler writes them (validated
    by the stand-in against the slice): each CDI spec carries its own amount."""
    device = capacity_run.device_of(1)["name"]
    server = capacity_run.server
    small_uid = server.add_claim(
        "ns",
        "small",
        node=NODE,
        results=[
            AllocatedDevice(
                "gpu",
                DRIVER,
                NODE,
                device,
                {MEMORY: f"{SHARE_MIB}Mi", COMPUTE_SHARES: "1"},
                "5b0c1a8e-0000-4000-8000-000000000001",
            )
        ],
    )
    big_uid = server.add_claim(
        "ns",
        "big",
        node=NODE,
        results=[
            AllocatedDevice(
                "gpu",
                DRIVER,
                NODE,
                device,
                {MEMORY: f"{2 * SHARE_MIB}Mi", COMPUTE_SHARES: "2"},
                "5b0c1a8e-0000-4000-8000-000000000002",
            )
        ],
    )
    answers = capacity_run.kubelet.prepare(
        DRIVER, [ClaimRef("ns", "small", small_uid), ClaimRef("ns", "big", big_uid)]
    )
    assert {uid: answer.error for uid, answer in answers.items()} == {small_uid: "", big_uid: ""}
    small, big = cdi_env(capacity_run, small_uid), cdi_env(capacity_run, big_uid)
    assert f"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0={SHARE_MIB}M" in small
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=25" in small
    assert f"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0={2 * SHARE_MIB}M" in big
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50" in big
    for env in (small, big):
        assert f"NVIDIA_VISIBLE_DEVICES={simulated_uuid(1)}" in env


def taints_of(run: CapacityRun, gpu_index: int) -> list[tuple[str, str, str]]:
    """The (key, value, effect) of a GPU's device's taints as stored."""
    return [
        (taint["key"], taint.get("value", ""), taint["effect"])
        for taint in run.device_of(gpu_index).get("taints") or []
    ]


def within_deadline(what: str, check: Callable[[], bool]) -> float:
    """Wait for ``check`` at most HEALTH_DEADLINE_S; the seconds it took."""
    started = time.monotonic()
    wait_until(check, HEALTH_DEADLINE_S, what)
    return time.monotonic() - started


@pytest.mark.parametrize(
    ("sicken", "heal", "taint"),
    [
        (
            SimulateCommand(SimulateAction.XID, "1", 79),
            HealthResetCommand("1"),
            (f"{DRIVER}/xid", "79", "NoSchedule"),
        ),
        (
            SimulateCommand(SimulateAction.LOSE, "1"),
            SimulateCommand(SimulateAction.RECOVER, "1"),
            (f"{DRIVER}/gpu-lost", "true", "NoExecute"),
        ),
        (
            SimulateCommand(SimulateAction.MPS_DOWN, "1"),
            SimulateCommand(SimulateAction.MPS_UP, "1"),
            (f"{DRIVER}/mps-daemon", "down", "NoSchedule"),
        ),
    ],
    ids=["xid-then-reset", "lost-then-back", "daemon-down-then-up"],
)
def test_a_sick_gpu_is_tainted_in_the_slice_and_cleared_when_it_heals(
    capacity_run: CapacityRun, sicken: Any, heal: Any, taint: tuple[str, str, str]
) -> None:
    """The cause appears as a taint on the GPU's device (which stays in the slice) within a
    second, and goes within a second of healing; the other GPU is untouched."""
    capacity_run.run.agent.submit(sicken)
    within_deadline(f"the taint {taint}", lambda: taints_of(capacity_run, 1) == [taint])
    stamped = capacity_run.device_of(1)["taints"][0]
    assert stamped["timeAdded"].endswith("Z")
    assert taints_of(capacity_run, 0) == []
    capacity_run.run.agent.submit(heal)
    within_deadline("the taint to clear", lambda: taints_of(capacity_run, 1) == [])
    assert len(capacity_run.devices()) == 2


def test_a_server_without_the_features_gets_share_devices_and_a_sick_gpu_leaves(
    short_tmp_dir: str, run_agent: Callable[..., AgentRun]
) -> None:
    """Where the gates are off (Kubernetes 1.34/1.35 defaults) the slice is a device per
    share, and an XID takes the GPU's shares out, as before."""
    with ApiServerStandIn(
        tokens={NODE_TOKEN: f"system:node:{NODE}"}, consumable_capacity=False, device_taints=False
    ) as server:
        started = start(short_tmp_dir, run_agent, server)
        wait_until(lambda: len(started.devices()) == 8, WAIT_S, "eight share devices")
        assert not any("allowMultipleAllocations" in device for device in started.devices())
        started.run.agent.submit(SimulateCommand(SimulateAction.XID, "1", 79))
        within_deadline("GPU 1's shares to leave", lambda: len(started.devices()) == 4)
        started.stop()
        assert started.devices() == []
