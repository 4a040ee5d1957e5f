"""The DRA frontend's pure and file parts: the node's slice, per-claim CDI specs, and
preparing/unpreparing claims against an in-memory API server, in real temp directories."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.builders import gpu_uuid, make_inventory, vgpu_id
from vgpu_agent.frontends.dra.cdi import CdiSpecs, claim_spec, valid_claim_uid
from vgpu_agent.frontends.dra.claims import ClaimPreparer, PreparedClaims, base_request
from vgpu_agent.frontends.dra.slices import (
    DeviceNames,
    device_name,
    is_dns_label,
    node_slice,
    semantic_version,
)
from vgpu_agent.frontends.dra.types import AllocatedDevice, ClaimAllocation, ClaimRef, SemVer
from vgpu_agent.model.devices import InvalidRequestError, MpsGrantPolicy, check_request_size
from vgpu_agent.model.node import Node
from vgpu_agent.standins.resourceapi import InMemoryResourceApi

DRIVER = "vgpu.example.com"
NODE = "node-a"
KIND = f"{DRIVER}/vgpu"
UID = "0c4f6d8e-1111-2222-3333-444455556666"
OTHER_UID = "9a9a9a9a-1111-2222-3333-444455556666"
POLICY = MpsGrantPolicy(pipe_dir_read_only=True, max_vgpus_per_container=1)


def share_name(index: int, replica: int) -> str:
    """The slice device name of share ``replica`` of test GPU ``index``."""
    names = DeviceNames.of(make_inventory((4, 4)))
    return next(
        name for name, vgpu in names.vgpu_by_name.items() if vgpu == vgpu_id(index, replica)
    )


def ours(*shares: tuple[int, int], request: str = "gpu", pool: str = NODE) -> list[AllocatedDevice]:
    """Allocation results of our driver for (GPU index, replica) shares."""
    return [AllocatedDevice(request, DRIVER, pool, share_name(i, r)) for i, r in shares]


@dataclass
class Env:
    """A node of two 4-share GPUs, an in-memory API server, a CDI and a state directory."""

    node: Node
    api: InMemoryResourceApi
    cdi_dir: Path
    state_dir: Path

    def preparer(self) -> ClaimPreparer:
        """A preparer as the agent builds one (a new one reads the record again)."""
        return ClaimPreparer(
            self.node,
            self.api,
            CdiSpecs(str(self.cdi_dir), DRIVER),
            PreparedClaims(str(self.state_dir)),
            driver=DRIVER,
            pool=NODE,
            cdi_kind=KIND,
        )

    def spec(self, uid: str = UID) -> dict[str, Any]:
        """The CDI spec written for a claim."""
        path = self.cdi_dir / f"{DRIVER}-claim-{uid}.json"
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded


@pytest.fixture
def env(tmp_path: Path) -> Env:
    """A fresh node, API server and directories."""
    node = Node(make_inventory((4, 4)), grant_policy=POLICY)
    return Env(node, InMemoryResourceApi(), tmp_path / "cdi", tmp_path / "state")


# -- the slice ---------------------------------------------------------------------------------


def test_slice_has_a_device_per_share_with_the_gpu_attributes() -> None:
    """Each share is a device named by a DNS label, with the GPU's and the share's attributes."""
    inventory = make_inventory((4, 4), numa_nodes=(0, 1))
    result = node_slice(
        inventory,
        driver=DRIVER,
        node_name=NODE,
        generation=3,
        policy=MpsGrantPolicy(),
        driver_version="580.95.05",
    )
    assert (result.driver, result.node_name, result.pool, result.generation) == (
        DRIVER,
        NODE,
        NODE,
        3,
    )
    assert len(result.devices) == inventory.vgpu_count == 8
    assert all(is_dns_label(device.name) for device in result.devices)
    assert len({device.name for device in result.devices}) == 8
    first = result.devices[0]
    assert first.name == f"{gpu_uuid(0).lower()}-vgpu-0"
    assert first.attributes == {
        "uuid": gpu_uuid(0),
        "index": 0,
        "model": "NVIDIA A10G",
        "memoryMiB": 24_576,
        "computeCapability": SemVer("8.6.0"),
        "driverVersion": SemVer("580.95.5"),
        "shares": 4,
        "numaNode": 0,
        "shareThreadPercentage": "25",
        "shareMemoryMiB": 6144,
        "share": 0,
    }
    assert first.capacity == {"memory": "6Gi"}  # 6144Mi, as the API server writes it


def test_slice_leaves_out_the_shares_of_an_unhealthy_gpu() -> None:
    """An Unhealthy GPU's shares are not offered, like the device plugin's allocatable."""
    inventory = make_inventory((4, 4), unhealthy={1: ("xid 79",)})
    result = node_slice(inventory, driver=DRIVER, node_name=NODE, generation=1, policy=None)
    assert {device.attributes["uuid"] for device in result.devices} == {gpu_uuid(0)}
    assert len(result.devices) == 4
    assert "shareMemoryMiB" not in result.devices[0].attributes  # no MPS, no share limits


@pytest.mark.parametrize(
    ("text", "expected"),
    [("580.95.05", "580.95.5"), ("9.0", "9.0.0"), ("535", "535.0.0"), ("r570.1.2.3", "570.1.2")],
    ids=["leading-zero", "two-parts", "one-part", "prefix-and-extra"],
)
def test_versions_become_semantic_versions(text: str, expected: str) -> None:
    """Driver versions are semantic versions as DRA wants them: three numbers, no leading 0."""
    assert semantic_version(text) == SemVer(expected)


def test_a_uuid_that_makes_no_label_is_named_by_index() -> None:
    """A GPU whose UUID does not make a DNS label gets an index-based name."""
    inventory = make_inventory((2,))
    served = inventory.gpus[0]
    assert device_name(served, 1, by_index=True) == "gpu0-vgpu-1"
    long_uuid = served.__class__(
        gpu=served.gpu.__class__(**{**served.gpu.__dict__, "uuid": "GPU-" + "a" * 70}),
        replicas=2,
    )
    assert device_name(long_uuid, 1) == "gpu0-vgpu-1"


# -- CDI -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uid", "valid"),
    [(UID, True), ("../../etc/x", False), ("", False), ("a/b", False), ("a" * 129, False)],
    ids=["uuid", "traversal", "empty", "slash", "too-long"],
)
def test_only_uid_like_claim_uids_name_files(uid: str, valid: bool) -> None:
    """A claim uid reaches a file name only when it is letters, digits and '-'."""
    assert valid_claim_uid(uid) is valid


# -- prepare -------------------------------------------------------------------------------------


def test_prepare_writes_the_claims_cdi_spec_with_allocates_grant(env: Env) -> None:
    """The claim's spec holds what Allocate would grant the same vGPU: GPU, pipe dir
    read-only, limits from the same functions."""
    env.api.add_claim("ns", "claim", UID, ours((1, 2)))
    answer = env.preparer().prepare([ClaimRef("ns", "claim", UID)])[UID]
    assert answer.error == ""
    (device,) = answer.devices
    assert (device.request_names, device.pool, device.device) == (
        ("gpu",),
        NODE,
        share_name(1, 2),
    )
    assert device.cdi_device_ids == (f"{KIND}={UID}",)
    granted = env.node.allocate([vgpu_id(1, 2)]).grant
    spec = env.spec()
    assert spec == claim_spec(KIND, UID, granted)
    assert spec["cdiVersion"] == "0.5.0"
    assert spec["kind"] == KIND
    (cdi_device,) = spec["devices"]
    assert cdi_device["name"] == UID
    env_vars = dict(item.split("=", 1) for item in cdi_device["containerEdits"]["env"])
    assert env_vars == {
        "NVIDIA_VISIBLE_DEVICES": gpu_uuid(1),
        "CUDA_MPS_PIPE_DIRECTORY": "/run/nvidia-mps",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=6144M",
    }
    (mount,) = cdi_device["containerEdits"]["mounts"]
    assert mount["hostPath"] == f"/run/nvidia-mps/{gpu_uuid(1)}"
    assert mount["containerPath"] == "/run/nvidia-mps"
    assert "ro" in mount["options"]
    assert not [name for name in os.listdir(env.cdi_dir) if name.startswith(".")]


def test_prepare_is_idempotent_and_asks_the_api_server_once(env: Env) -> None:
    """A second prepare of the same claim answers the same from the record."""
    env.api.add_claim("ns", "claim", UID, ours((0, 0)))
    preparer = env.preparer()
    first = preparer.prepare([ClaimRef("ns", "claim", UID)])
    second = preparer.prepare([ClaimRef("ns", "claim", UID)])
    assert first == second
    assert env.api.claim_reads == 1


def test_prepared_claims_survive_an_agent_restart(env: Env) -> None:
    """After a restart the record answers prepare (spec rewritten if gone) and unprepare
    removes what the old agent wrote."""
    env.api.add_claim("ns", "claim", UID, ours((0, 1)))
    first = env.preparer().prepare([ClaimRef("ns", "claim", UID)])
    env.api.delete_claim("ns", "claim")
    spec_path = env.cdi_dir / f"{DRIVER}-claim-{UID}.json"
    spec_path.unlink()
    restarted = env.preparer()
    assert restarted.prepare([ClaimRef("ns", "claim", UID)]) == first
    assert spec_path.exists()
    assert restarted.prepared_uids == [UID]
    assert env.preparer().unprepare([ClaimRef("ns", "claim", UID)]) == {UID: ""}
    assert not spec_path.exists()
    assert env.preparer().prepared_uids == []


def test_unprepare_is_idempotent(env: Env) -> None:
    """Unpreparing twice, or a claim never prepared here, succeeds."""
    env.api.add_claim("ns", "claim", UID, ours((0, 0)))
    preparer = env.preparer()
    preparer.prepare([ClaimRef("ns", "claim", UID)])
    assert preparer.unprepare([ClaimRef("ns", "claim", UID)]) == {UID: ""}
    assert preparer.unprepare([ClaimRef("ns", "claim", UID)]) == {UID: ""}
    assert preparer.unprepare([ClaimRef("ns", "other", OTHER_UID)]) == {OTHER_UID: ""}


def test_a_claim_over_the_ceiling_is_refused_with_the_device_plugins_message(env: Env) -> None:
    """Two shares on a node allowing one: refused with the message Allocate gives."""
    env.api.add_claim("ns", "claim", UID, ours((0, 0), (0, 1)))
    answer = env.preparer().prepare([ClaimRef("ns", "claim", UID)])[UID]
    with pytest.raises(InvalidRequestError) as expected:
        check_request_size(2, POLICY)
    assert str(expected.value) in answer.error
    assert "ns/claim" in answer.error
    assert not env.cdi_dir.exists() or not os.listdir(env.cdi_dir)


def test_a_claim_within_a_raised_ceiling_gets_the_limits_of_its_shares(tmp_path: Path) -> None:
    """With mps.max_vgpus_per_container = 2 a two-share claim gets two shares' limits."""
    node = Node(make_inventory((4, 4)), grant_policy=MpsGrantPolicy(max_vgpus_per_container=2))
    env = Env(node, InMemoryResourceApi(), tmp_path / "cdi", tmp_path / "state")
    env.api.add_claim("ns", "claim", UID, ours((0, 0), (0, 1)))
    answer = env.preparer().prepare([ClaimRef("ns", "claim", UID)])[UID]
    assert answer.error == ""
    assert len(answer.devices) == 2
    edits = env.spec()["devices"][0]["containerEdits"]
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50" in edits["env"]
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=12288M" in edits["env"]


def test_cdi_strategy_adds_the_toolkits_gpu_device(tmp_path: Path) -> None:
    """With plugin.device_list_strategy = "cdi" the answer also names nvidia.com/gpu=<UUID>."""
    node = Node(make_inventory((4, 4)), grant_policy=POLICY, device_list_strategy="cdi")
    env = Env(node, InMemoryResourceApi(), tmp_path / "cdi", tmp_path / "state")
    env.api.add_claim("ns", "claim", UID, ours((1, 0)))
    (device,) = env.preparer().prepare([ClaimRef("ns", "claim", UID)])[UID].devices
    assert device.cdi_device_ids == (f"{KIND}={UID}", f"nvidia.com/gpu={gpu_uuid(1)}")


def test_subrequest_results_answer_for_their_request(env: Env) -> None:
    """A result of subrequest "gpu/small" is reported for request "gpu"."""
    env.api.add_claim("ns", "claim", UID, ours((0, 0), request="gpu/small"))
    (device,) = env.preparer().prepare([ClaimRef("ns", "claim", UID)])[UID].devices
    assert device.request_names == ("gpu",)
    assert base_request("plain") == "plain"


def _setup_bad(env: Env, case: str) -> ClaimRef:
    """Make the API server hold what ``case`` needs; the claim the kubelet names."""
    if case == "empty-uid":
        return ClaimRef("ns", "bad", "")
    if case == "unknown-claim":
        return ClaimRef("ns", "bad", OTHER_UID)
    if case == "not-allocated":
        env.api.add_claim("ns", "bad", OTHER_UID, allocated=False)
    elif case == "other-driver":
        env.api.add_claim(
            "ns", "bad", OTHER_UID, [AllocatedDevice("gpu", "gpu.nvidia.com", NODE, "gpu-0")]
        )
    elif case == "uid-mismatch":
        env.api.add_claim("ns", "bad", "77777777-1111-2222-3333-444455556666", ours((1, 0)))
    elif case == "other-node":
        env.api.add_claim("ns", "bad", OTHER_UID, ours((1, 0), pool="node-b"))
    elif case == "unknown-device":
        env.api.add_claim(
            "ns", "bad", OTHER_UID, [AllocatedDevice("gpu", DRIVER, NODE, "gpu9-vgpu-0")]
        )
    elif case == "spans-gpus":
        env.node.set_grant_policy(MpsGrantPolicy(max_vgpus_per_container=2))
        env.api.add_claim("ns", "bad", OTHER_UID, ours((0, 1), (1, 1)))
    elif case == "unhealthy-gpu":
        env.node.serve(make_inventory((4, 4), unhealthy={1: ("xid 79",)}))
        env.api.add_claim("ns", "bad", OTHER_UID, ours((1, 1)))
    elif case == "path-uid":
        return ClaimRef("ns", "bad", "../../../etc/passwd")
    return ClaimRef("ns", "bad", OTHER_UID)


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("empty-uid", "without a uid"),
        ("unknown-claim", "has no such claim"),
        ("not-allocated", "not allocated yet"),
        ("other-driver", "none of its devices is allocated from driver vgpu.example.com"),
        ("uid-mismatch", "deleted and created again"),
        ("other-node", "belongs to another node"),
        ("unknown-device", "device gpu9-vgpu-0 is not served by this node"),
        ("spans-gpus", "spans 2 physical GPUs"),
        ("unhealthy-gpu", "is unhealthy (xid 79)"),
        ("path-uid", "is not a Kubernetes uid"),
    ],
    ids=lambda value: value if " " not in value else "",
)
def test_a_bad_claim_gets_its_own_error_and_the_good_one_is_prepared(
    env: Env, case: str, words: str
) -> None:
    """One bad claim in a request fails alone, with a message naming the problem."""
    env.api.add_claim("ns", "good", UID, ours((0, 0)))
    bad = _setup_bad(env, case)
    answers = env.preparer().prepare([bad, ClaimRef("ns", "good", UID)])
    assert words in answers[bad.uid].error
    assert answers[bad.uid].devices == ()
    assert answers[UID].error == ""
    assert len(answers[UID].devices) == 1


def test_an_api_server_failure_is_that_claims_error(env: Env) -> None:
    """The API server failing is reported per claim, saying so."""
    env.api.fail_get = "connection refused"
    answer = env.preparer().prepare([ClaimRef("ns", "claim", UID)])[UID]
    assert "reading it from the API server failed: connection refused" in answer.error


def test_unprepare_refuses_a_uid_that_is_no_uid(env: Env) -> None:
    """Unprepare never turns a hostile uid into a path."""
    errors = env.preparer().unprepare([ClaimRef("ns", "x", "../x")])
    assert "is not a Kubernetes uid" in errors["../x"]


def test_a_broken_record_is_ignored(tmp_path: Path) -> None:
    """A record file that is not JSON is set aside: the agent starts with no claims."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "dra-prepared-claims.json").write_text("{not json")
    assert PreparedClaims(str(state)).uids == []


def test_a_cdi_directory_that_cannot_be_written_is_that_claims_error(env: Env) -> None:
    """A CDI directory that is a file fails the claim with the path and what to check."""
    env.cdi_dir.parent.mkdir(parents=True, exist_ok=True)
    env.cdi_dir.write_text("a file")
    env.api.add_claim("ns", "claim", UID, ours((0, 0)))
    answer = env.preparer().prepare([ClaimRef("ns", "claim", UID)])[UID]
    assert f"writing the CDI spec {env.cdi_dir}/" in answer.error
    assert "check that dra.cdi_dir exists" in answer.error
    assert env.preparer().prepared_uids == []


def test_a_state_directory_that_cannot_be_written_is_that_claims_error(env: Env) -> None:
    """The record cannot be written: the claim fails naming the record and agent.state_dir."""
    env.state_dir.parent.mkdir(parents=True, exist_ok=True)
    env.state_dir.write_text("a file")
    env.api.add_claim("ns", "claim", UID, ours((0, 0)))
    answer = env.preparer().prepare([ClaimRef("ns", "claim", UID)])[UID]
    assert "recording prepared DRA claims" in answer.error
    assert "check agent.state_dir" in answer.error
    assert os.listdir(env.cdi_dir) == []  # no spec left that no record knows
    preparer = env.preparer()
    again = preparer.prepare([ClaimRef("ns", "claim", UID)])[UID]
    assert "recording prepared DRA claims" in again.error  # not answered from memory
    assert preparer.prepared_uids == []


def test_a_spec_path_taken_by_a_directory_fails_prepare_and_unprepare(env: Env) -> None:
    """A directory where the claim's spec goes: prepare fails leaving no temporary file,
    unprepare fails naming the path."""
    blocked = env.cdi_dir / f"{DRIVER}-claim-{UID}.json"
    blocked.mkdir(parents=True)
    env.api.add_claim("ns", "claim", UID, ours((0, 0)))
    answer = env.preparer().prepare([ClaimRef("ns", "claim", UID)])[UID]
    assert f"writing the CDI spec {blocked}" in answer.error
    assert sorted(os.listdir(env.cdi_dir)) == [blocked.name]
    errors = env.preparer().unprepare([ClaimRef("ns", "claim", UID)])
    assert f"removing the CDI spec {blocked}" in errors[UID]


class _CrashingApi(InMemoryResourceApi):
    """An API client with a bug: it raises something that is not a DraApiError."""

    def get_claim(self, namespace: str, name: str) -> ClaimAllocation:
        if name == "crash":
            raise KeyError("status")
        return super().get_claim(namespace, name)


class _CrashingSpecs(CdiSpecs):
    """A spec store with a bug on removal."""

    def remove(self, claim_uid: str) -> None:
        if claim_uid == OTHER_UID:
            raise TypeError("unexpected")
        super().remove(claim_uid)


def test_a_bug_in_one_claim_fails_only_that_claim(tmp_path: Path) -> None:
    """An unexpected exception while preparing or unpreparing one claim becomes that
    claim's error; the other claim of the call is served."""
    api = _CrashingApi()
    node = Node(make_inventory((4, 4)), grant_policy=POLICY)
    preparer = ClaimPreparer(
        node,
        api,
        _CrashingSpecs(str(tmp_path / "cdi"), DRIVER),
        PreparedClaims(str(tmp_path / "state")),
        driver=DRIVER,
        pool=NODE,
        cdi_kind=KIND,
    )
    api.add_claim("ns", "good", UID, ours((0, 0)))
    answers = preparer.prepare([ClaimRef("ns", "crash", OTHER_UID), ClaimRef("ns", "good", UID)])
    assert "vgpu-agent failed: KeyError" in answers[OTHER_UID].error
    assert answers[UID].error == ""
    errors = preparer.unprepare([ClaimRef("ns", "crash", OTHER_UID), ClaimRef("ns", "good", UID)])
    assert "vgpu-agent failed: TypeError: unexpected" in errors[OTHER_UID]
    assert errors[UID] == ""
