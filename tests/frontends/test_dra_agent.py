"""The whole agent in DRA mode (dra.enabled): built by the composition root on simulated
GPUs, with the DRA kubelet stand-in on a real registry directory and an in-memory API
server, and once with the real Kubernetes client against the stand-in API server over HTTP.
No device plugin is served."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Callable

import pytest

from tests.harness import WAIT_S, AgentRun, make_config, wait_until
from vgpu_agent.config.dra import DraConfig
from vgpu_agent.config.schema import Config
from vgpu_agent.frontends.dra.kubeapi import KubeResourceApi
from vgpu_agent.frontends.dra.types import AllocatedDevice, ClaimRef, SemVer
from vgpu_agent.model.commands import SimulateAction, SimulateCommand
from vgpu_agent.standins.apiserver.server import ApiServerStandIn
from vgpu_agent.standins.dra_kubelet import DraKubeletStandin
from vgpu_agent.standins.resourceapi import InMemoryResourceApi
from vgpu_agent.standins.simulated import simulated_uuid

DRIVER = "vgpu.example.com"
NODE = "node-e2e"
UID = "5e5e5e5e-1111-2222-3333-444455556666"


@dataclass
class DraRun:
    """An agent in DRA mode, its DRA kubelet and its API server."""

    run: AgentRun
    config: Config
    api: InMemoryResourceApi
    kubelet: DraKubeletStandin


@pytest.fixture
def dra_run(short_tmp_dir: str, run_agent: Callable[..., AgentRun]) -> Iterator[DraRun]:
    """The agent registered with the stand-in kubelet, its slice published."""
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
    config = replace(config, mps=replace(config.mps, max_vgpus_per_container=1))
    api = InMemoryResourceApi()
    kubelet = DraKubeletStandin(config.dra.registry_dir, wipe_slices=lambda: api.wipe_node(NODE))
    kubelet.start()
    run = run_agent(config, kubelet=False, make_resource_api=lambda _config: api)
    kubelet.wait_for_registration(1, WAIT_S)
    api.wait_for_slice(DRIVER, NODE, lambda s: len(s.devices) == 8, WAIT_S)
    yield DraRun(run, config, api, kubelet)
    kubelet.stop()


def _device(api: InMemoryResourceApi, gpu_index: int) -> str:
    current = api.slice_of(DRIVER, NODE)
    assert current is not None
    return next(d.name for d in current.devices if d.attributes["index"] == gpu_index)


def test_the_agent_serves_dra_and_no_device_plugin(dra_run: DraRun) -> None:
    """In DRA mode the node's shares are in the slice and no device plugin socket exists."""
    assert not os.path.exists(dra_run.config.plugin.socket_path)
    wait_until(lambda: dra_run.run.agent.registered, WAIT_S, "the agent to count the registration")
    dra_run.run.status_seen("registered with kubelet")
    published = dra_run.api.slice_of(DRIVER, NODE)
    assert published is not None
    assert len(published.devices) == 8
    assert {d.attributes["driverVersion"] for d in published.devices} == {SemVer("580.95.5")}


def test_a_claim_is_prepared_into_a_cdi_spec_and_a_sick_gpu_leaves_the_slice(
    dra_run: DraRun,
) -> None:
    """A claim prepared through the kubelet gets its GPU, pipe directory and limits in its
    CDI spec; an XID on the simulated GPU takes its shares out of the slice."""
    device = _device(dra_run.api, 1)
    dra_run.api.add_claim("ns", "c", UID, [AllocatedDevice("gpu", DRIVER, NODE, device)])
    claim = ClaimRef("ns", "c", UID)
    answer = dra_run.kubelet.prepare(DRIVER, [claim])[UID]
    assert answer.error == ""
    spec_path = f"{dra_run.config.dra.cdi_dir}/{DRIVER}-claim-{UID}.json"
    with open(spec_path, encoding="utf-8") as stream:
        spec = json.load(stream)
    edits = spec["devices"][0]["containerEdits"]
    gpu = simulated_uuid(1)
    assert f"NVIDIA_VISIBLE_DEVICES={gpu}" in edits["env"]
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=25" in edits["env"]
    assert edits["mounts"][0]["hostPath"] == dra_run.config.mps.pipe_dir(gpu)
    before = dra_run.api.slice_of(DRIVER, NODE)
    assert before is not None
    dra_run.run.agent.submit(SimulateCommand(SimulateAction.XID, "1", 79))
    sick = dra_run.api.wait_for_slice(DRIVER, NODE, lambda s: len(s.devices) == 4, WAIT_S)
    assert sick.generation > before.generation
    assert {d.attributes["uuid"] for d in sick.devices} == {simulated_uuid(0)}
    assert dra_run.kubelet.unprepare(DRIVER, [claim]) == {UID: ""}
    assert not os.path.exists(spec_path)


def test_two_shares_on_a_one_share_node_are_refused(dra_run: DraRun) -> None:
    """The device plugin's ceiling holds in DRA mode, with its message."""
    current = dra_run.api.slice_of(DRIVER, NODE)
    assert current is not None
    two = [d.name for d in current.devices if d.attributes["index"] == 0][:2]
    dra_run.api.add_claim(
        "ns", "big", UID, [AllocatedDevice("gpu", DRIVER, NODE, name) for name in two]
    )
    answer = dra_run.kubelet.prepare(DRIVER, [ClaimRef("ns", "big", UID)])[UID]
    assert "asks for 2 vGPUs, but this node gives a container at most 1" in answer.error


def test_kubelet_restart_and_lost_socket_bring_registration_and_slice_back(
    dra_run: DraRun,
) -> None:
    """A kubelet restart wipes the slice and the agent republishes it; a deleted
    registration socket is served and registered again."""
    dra_run.kubelet.restart()
    dra_run.kubelet.wait_for_registration(1, WAIT_S)
    dra_run.api.wait_for_slice(DRIVER, NODE, lambda s: len(s.devices) == 8, WAIT_S)
    os.unlink(dra_run.config.dra.registration_socket_path)
    dra_run.kubelet.wait_for_registration(2, WAIT_S)
    wait_until(lambda: dra_run.run.agent.registrations >= 2, WAIT_S, "a second registration")


def test_a_clean_stop_deletes_the_slice(dra_run: DraRun) -> None:
    """Stopping the agent deletes the node's slice and exits 0."""
    assert dra_run.run.stop() == 0
    assert dra_run.api.slice_of(DRIVER, NODE) is None
    assert (DRIVER, NODE) in dra_run.api.deletions
    assert not os.path.exists(dra_run.config.dra.registration_socket_path)


# -- with the real API client and the stand-in API server over HTTP ------------------------------

NODE_TOKEN = "e2e-node-token"  # noqa: S105 - a token of the in-process stand-in only


def _pool(server: ApiServerStandIn) -> tuple[int, list[dict[str, Any]]]:
    """The node's pool generation and devices as the API server stores them."""
    specs = [
        body["spec"]
        for body in server.slices().values()
        if body["spec"]["driver"] == DRIVER and body["spec"]["nodeName"] == NODE
    ]
    if not specs:
        return -1, []
    return specs[0]["pool"]["generation"], [d for spec in specs for d in spec.get("devices") or []]


def test_the_agent_with_the_kubernetes_client_against_the_stand_in_api_server(
    short_tmp_dir: str, run_agent: Callable[..., AgentRun]
) -> None:
    """frontend = dra, the real client as system:node:<node> against the strict stand-in API
    server, the stand-in kubelet: slice published, claim prepared into its CDI spec, an XID
    visible in the slice, the slice deleted at stop."""
    server = ApiServerStandIn(tokens={NODE_TOKEN: f"system:node:{NODE}"}, anonymous_user=None)
    server.start()
    try:
        server.add_node(NODE)
        client = KubeResourceApi.for_server(server.url, token=NODE_TOKEN)
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
        kubelet = DraKubeletStandin(config.dra.registry_dir)
        kubelet.start()
        run = run_agent(config, kubelet=False, make_resource_api=lambda _config: client)
        kubelet.wait_for_registration(1, WAIT_S)
        wait_until(lambda: len(_pool(server)[1]) == 8, WAIT_S, "8 devices in the node's slice")
        generation, devices = _pool(server)
        on_gpu1 = next(d for d in devices if d["attributes"]["index"] == {"int": 1})
        assert on_gpu1["attributes"]["uuid"] == {"string": simulated_uuid(1)}
        assert on_gpu1["capacity"]["memory"] == {"value": "20389Mi"}
        uid = server.add_claim(
            "ns",
            "c",
            node=NODE,
            results=[AllocatedDevice("gpu", DRIVER, NODE, on_gpu1["name"])],
        )
        answer = kubelet.prepare(DRIVER, [ClaimRef("ns", "c", uid)])[uid]
        assert answer.error == ""
        assert answer.devices[0]["cdi_device_ids"] == [f"{DRIVER}/vgpu={uid}"]
        with open(f"{config.dra.cdi_dir}/{DRIVER}-claim-{uid}.json", encoding="utf-8") as spec:
            edits = json.load(spec)["devices"][0]["containerEdits"]
        assert f"NVIDIA_VISIBLE_DEVICES={simulated_uuid(1)}" in edits["env"]
        assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=20389M" in edits["env"]
        # A claim no pod of this node references: the Node authorizer says 403, per claim.
        foreign = kubelet.prepare(DRIVER, [ClaimRef("ns", "gone", "6a6a6a6a-0000-4000-8000-1")])
        assert "403 Forbidden" in foreign["6a6a6a6a-0000-4000-8000-1"].error
        run.agent.submit(SimulateCommand(SimulateAction.XID, "1", 79))
        wait_until(lambda: len(_pool(server)[1]) == 4, WAIT_S, "GPU 1's shares leaving the slice")
        sick_generation, sick = _pool(server)
        assert sick_generation > generation
        assert all(d["attributes"]["index"] == {"int": 0} for d in sick)
        assert run.stop() == 0
        assert _pool(server) == (-1, [])
        kubelet.stop()
        client.close()
    finally:
        server.stop()


def test_an_agent_without_the_kubelets_registry_waits_and_says_which_setting(
    short_tmp_dir: str, run_agent: Callable[..., AgentRun], caplog: pytest.LogCaptureFixture
) -> None:
    """No registry directory yet: the status line names the DRA driver and waits for the
    kubelet; the log's advice names dra.registry_dir, not the device plugin's directory."""
    config = make_config(
        short_tmp_dir,
        dra=DraConfig(
            enabled=True,
            driver_name=DRIVER,
            node_name=NODE,
            registry_dir=f"{short_tmp_dir}/no-kubelet-yet",
            plugins_dir=f"{short_tmp_dir}/plugins",
            cdi_dir=f"{short_tmp_dir}/cdi",
        ),
    )
    api = InMemoryResourceApi()
    run = run_agent(config, kubelet=False, make_resource_api=lambda _config: api)
    line = run.status_seen("waiting for kubelet")
    assert f"as DRA driver {DRIVER}" in line
    assert not os.path.exists(config.dra.registration_socket_path)
    wait_until(
        lambda: any("set dra.registry_dir" in record.getMessage() for record in caplog.records),
        WAIT_S,
        "the advice to set dra.registry_dir",
    )
    registration = [r for r in caplog.records if r.name == "vgpu_agent.agent.registration"]
    assert not any("plugin.plugin_dir" in record.getMessage() for record in registration)
