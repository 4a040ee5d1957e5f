"""The whole agent in DRA mode (dra.enabled): built by the composition root on simulated
GPUs, with the DRA kubelet stand-in on a real registry directory and an in-memory API
server. No device plugin is served."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Callable

import pytest

from tests.harness import WAIT_S, AgentRun, make_config, wait_until
from vgpu_agent.config.dra import DraConfig
from vgpu_agent.config.schema import Config
from vgpu_agent.frontends.dra.types import AllocatedDevice, ClaimRef, SemVer
from vgpu_agent.model.commands import SimulateAction, SimulateCommand
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
