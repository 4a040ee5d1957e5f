"""Consumable capacity in the DRA frontend: quantities, a GPU as one shared device with
request policies that follow the share size and the ceiling, consumed capacity turned into
a claim's MPS limits, and two claims of different sizes prepared on one GPU."""

from __future__ import annotations

import json
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import pytest

from tests.builders import gpu_uuid, make_inventory, make_served
from vgpu_agent.frontends.dra.capacity import (
    COMPUTE_SHARES,
    MEMORY,
    Consumed,
    ShareSizes,
    binary_quantity,
    capacity_grant,
    consumed,
    mib_quantity,
    parse_quantity,
    share_sizes,
)
from vgpu_agent.frontends.dra.cdi import CdiSpecs
from vgpu_agent.frontends.dra.claims import ClaimPreparer, PreparedClaims
from vgpu_agent.frontends.dra.slices import DeviceNames, gpu_device_name, node_slice
from vgpu_agent.frontends.dra.types import (
    AllocatedDevice,
    ApiFeatures,
    CapacityPolicy,
    ClaimRef,
    DeviceTaint,
)
from vgpu_agent.model.devices import InvalidRequestError, Inventory, LimitPolicy, MpsGrantPolicy
from vgpu_agent.model.node import Node
from vgpu_agent.standins.resourceapi import InMemoryResourceApi

DRIVER = "vgpu.example.com"
NODE = "node-a"
KIND = f"{DRIVER}/vgpu"
SMALL_UID = "0c4f6d8e-1111-2222-3333-444455556666"
BIG_UID = "9a9a9a9a-1111-2222-3333-444455556666"
SHARE_A = "5b0c1a8e-0000-4000-8000-000000000001"
SHARE_B = "5b0c1a8e-0000-4000-8000-000000000002"
#: Two shares per claim at most: the enforced ceiling of mps.max_vgpus_per_container = 2.
POLICY = MpsGrantPolicy(pipe_dir_read_only=True, max_vgpus_per_container=2)
CAPACITY = ApiFeatures(consumable_capacity=True, device_taints=True)


# -- quantities ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("20Gi", 20 * 1024**3),
        ("6144Mi", 6144 * 1024**2),
        ("1500M", 1_500_000_000),
        ("2", 2),
        ("250m", Fraction(1, 4)),
        ("1e3", 1000),
        ("1.5Gi", 3 * 1024**3 // 2),
        ("+3k", 3000),
        ("-1", -1),
    ],
    ids=["Gi", "Mi", "M", "plain", "milli", "exponent", "fraction", "plus", "minus"],
)
def test_quantities_parse_exactly(text: str, value: Fraction) -> None:
    """Kubernetes quantities become exact numbers, suffix by suffix."""
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "Gi", "1.2.3", "5 Gi", "3X", "1Gb"])
def test_a_non_quantity_is_refused_naming_it(text: str) -> None:
    """Text that is not a quantity is a ValueError quoting it."""
    with pytest.raises(ValueError, match="quantit"):
        parse_quantity(text)


@pytest.mark.parametrize(
    ("amount_bytes", "text"),
    [
        (6144 * 1024**2, "6Gi"),
        (20389 * 1024**2, "20389Mi"),
        (1536 * 1024**2, "1536Mi"),
        (1024**4, "1Ti"),
        (1000, "1000"),
        (0, "0"),
    ],
)
def test_bytes_are_written_in_the_api_servers_canonical_form(amount_bytes: int, text: str) -> None:
    """The largest binary suffix that divides the amount, as the API server writes it back."""
    assert binary_quantity(amount_bytes) == text
    assert parse_quantity(text) == amount_bytes
    if amount_bytes % (1024 * 1024) == 0:
        assert mib_quantity(amount_bytes // (1024 * 1024)) == text


# -- a GPU as one shared device ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (POLICY, ShareSizes(4, 6144, 2, memory_enforced=True, threads_enforced=True)),
        (
            MpsGrantPolicy(max_vgpus_per_container=1),
            ShareSizes(4, 6144, 1, memory_enforced=True, threads_enforced=True),
        ),
        (MpsGrantPolicy(), ShareSizes(4, 6144, 4, memory_enforced=True, threads_enforced=True)),
        (
            MpsGrantPolicy(memory_limit=4096, thread_limit="none", max_vgpus_per_container=8),
            ShareSizes(4, 4096, 4, memory_enforced=True, threads_enforced=False),
        ),
        (
            MpsGrantPolicy(memory_limit="none", memory_headroom_mib=576),
            ShareSizes(4, 6000, 4, memory_enforced=False, threads_enforced=True),
        ),
        (None, ShareSizes(4, 6144, 4, memory_enforced=False, threads_enforced=False)),
    ],
    ids=["enforced-2", "enforced-1", "cooperative", "fixed", "no-memory-limit", "no-mps"],
)
def test_share_sizes_follow_the_grant_policy_and_ceiling(
    policy: Optional[MpsGrantPolicy], expected: ShareSizes
) -> None:
    """One share is what Allocate grants one vGPU; the ceiling is the enforced maximum
    (capped at the GPU), the whole GPU without one; an unlimited kind is scheduled only."""
    assert share_sizes(make_served(0, 4), policy) == expected


def test_each_gpu_is_one_shared_device_with_request_policies() -> None:
    """With consumable capacity, each served GPU is one device that allows multiple
    allocations, with memory and compute capacities whose policies default and step by one
    share and stop at the ceiling (so the scheduler places nothing the daemon refuses)."""
    result = node_slice(
        make_inventory((4, 4)),
        driver=DRIVER,
        node_name=NODE,
        generation=1,
        policy=POLICY,
        features=CAPACITY,
    )
    assert [device.name for device in result.devices] == [
        gpu_device_name(make_served(0)),
        gpu_device_name(make_served(1)),
    ]
    device = result.devices[0]
    assert device.name == "gpu-00000000-aaaa-bbbb-cccc-dddddddddddd"
    assert device.allow_multiple_allocations
    assert device.capacity == {MEMORY: "24Gi", COMPUTE_SHARES: "4"}
    assert device.capacity_policies == {
        MEMORY: CapacityPolicy(default="6Gi", min="6Gi", max="12Gi", step="6Gi"),
        COMPUTE_SHARES: CapacityPolicy(default="1", min="1", max="2", step="1"),
    }
    assert device.attributes["uuid"] == gpu_uuid(0)
    assert device.attributes["shares"] == 4
    assert device.attributes["shareThreadPercentage"] == "25"
    assert "share" not in device.attributes
    assert device.taints == ()


def test_without_the_features_the_slice_is_the_share_devices_of_before() -> None:
    """An API server that drops the new fields gets a device per share and no taints."""
    result = node_slice(
        make_inventory((4, 4), unhealthy={1: ("xid 79",)}),
        driver=DRIVER,
        node_name=NODE,
        generation=1,
        policy=POLICY,
    )
    assert len(result.devices) == 4
    assert not any(device.allow_multiple_allocations for device in result.devices)
    assert {device.attributes["uuid"] for device in result.devices} == {gpu_uuid(0)}


@pytest.mark.parametrize("consumable", [True, False], ids=["capacity", "shares"])
def test_a_sick_gpu_stays_in_the_slice_with_taints_where_they_are_kept(consumable: bool) -> None:
    """With device taints, the sick GPU's devices stay, each with the cause as a taint."""
    result = node_slice(
        make_inventory((4, 4), unhealthy={1: ("xid 79",)}),
        driver=DRIVER,
        node_name=NODE,
        generation=1,
        policy=POLICY,
        features=ApiFeatures(consumable_capacity=consumable, device_taints=True),
    )
    sick = [device for device in result.devices if device.attributes["uuid"] == gpu_uuid(1)]
    assert len(sick) == (1 if consumable else 4)
    for device in sick:
        assert device.taints == (DeviceTaint(f"{DRIVER}/xid", "79", "NoSchedule"),)
    healthy = [device for device in result.devices if device.attributes["uuid"] == gpu_uuid(0)]
    assert all(device.taints == () for device in healthy)


def test_capacity_device_names_fall_back_to_the_index_when_uuids_collide() -> None:
    """Two GPUs whose UUIDs make the same label are named by index, all of them."""
    first = make_served(0)
    second = make_served(1)
    second = replace(second, gpu=replace(second.gpu, uuid=first.gpu.uuid.lower()))
    inventory = Inventory((first, second))
    assert set(DeviceNames.of(inventory).gpu_by_name) == {"gpu0", "gpu1"}


# -- consumed capacity -> MPS limits ---------------------------------------------------------------


def result(consumed_capacity: dict[str, str], share_id: str = SHARE_A) -> AllocatedDevice:
    """One allocation result on test GPU 0's shared device."""
    return AllocatedDevice(
        "gpu", DRIVER, NODE, gpu_device_name(make_served(0)), consumed_capacity, share_id
    )


SIZES = share_sizes(make_served(0, 4), POLICY)


@pytest.mark.parametrize(
    ("results", "expected"),
    [
        ([result({MEMORY: "6Gi", COMPUTE_SHARES: "1"})], Consumed(1, 6144)),
        ([result({MEMORY: "12Gi", COMPUTE_SHARES: "2"})], Consumed(2, 12288)),
        (
            [result({f"{DRIVER}/memory": "12Gi", f"{DRIVER}/computeShares": "1"})],
            Consumed(1, 12288),
        ),
        ([result({MEMORY: "6Gi", COMPUTE_SHARES: "1"})] * 2, Consumed(2, 12288)),
        ([result({MEMORY: "6442450944", COMPUTE_SHARES: "1500m"})], Consumed(1, 6144)),
        ([result({})], Consumed(1, 6144, defaulted=True)),
        (
            [result({MEMORY: "12Gi", COMPUTE_SHARES: "1", "other.example.com/x": "9"})],
            Consumed(1, 12288),
        ),
    ],
    ids=["one-share", "two-shares", "qualified", "two-results", "rounded-down", "none", "foreign"],
)
def test_consumed_capacity_becomes_shares_and_mib(
    results: list[AllocatedDevice], expected: Consumed
) -> None:
    """Names with or without the driver's domain count; results add up; amounts round down;
    a result without consumedCapacity takes the policy's default of one share."""
    assert consumed(results, DRIVER, SIZES) == expected


@pytest.mark.parametrize(
    ("consumed_capacity", "message"),
    [
        ({MEMORY: "18Gi", COMPUTE_SHARES: "1"}, "at most 2 share(s) (12288 MiB"),
        ({MEMORY: "6Gi", COMPUTE_SHARES: "3"}, "mps.max_vgpus_per_container"),
        ({MEMORY: "512Ki", COMPUTE_SHARES: "1"}, "less than one share"),
        ({MEMORY: "6Gi", COMPUTE_SHARES: "500m"}, "less than one share"),
        ({MEMORY: "six", COMPUTE_SHARES: "1"}, "consumedCapacity memory: 'six' is not"),
    ],
    ids=["memory-over-ceiling", "compute-over-ceiling", "tiny-memory", "tiny-compute", "garbage"],
)
def test_consumed_capacity_outside_the_policy_is_refused(
    consumed_capacity: dict[str, str], message: str
) -> None:
    """More than the ceiling, less than a share or not a quantity: refused with what to do."""
    with pytest.raises(InvalidRequestError) as raised:
        consumed([result(consumed_capacity)], DRIVER, SIZES)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("amount", "threads", "memory"),
    [(Consumed(1, 6144), "25", "0=6144M"), (Consumed(2, 10000), "50", "0=10000M")],
    ids=["one-share", "two-compute-shares-less-memory"],
)
def test_a_claim_gets_limits_for_what_it_consumed(
    amount: Consumed, threads: str, memory: str
) -> None:
    """The thread percentage is Allocate's for that many shares; the memory limit is the
    memory consumed, whatever the compute."""
    granted = capacity_grant(make_served(0, 4), amount, POLICY)
    assert granted.envs["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == threads
    assert granted.envs["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == memory
    assert granted.envs["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid(0)


@pytest.mark.parametrize(
    ("memory_limit", "thread_limit", "present"),
    [
        ("none", "proportional", {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"}),
        ("proportional", "none", {"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"}),
    ],
    ids=["no-memory-limit", "no-thread-limit"],
)
def test_an_unlimited_kind_is_only_scheduled(
    memory_limit: LimitPolicy, thread_limit: LimitPolicy, present: set[str]
) -> None:
    """A limit policy of none sets no variable of that kind: the amount is scheduled only."""
    policy = MpsGrantPolicy(memory_limit=memory_limit, thread_limit=thread_limit)
    granted = capacity_grant(make_served(0, 4), Consumed(2, 12288), policy)
    limits = {name for name in granted.envs if name.startswith("CUDA_MPS_") and "LIMIT" in name}
    limits |= {name for name in granted.envs if name.endswith("THREAD_PERCENTAGE")}
    assert limits == present


def test_a_claim_on_a_sick_gpu_is_refused() -> None:
    """An unhealthy GPU grants nothing, with its causes in the message."""
    with pytest.raises(InvalidRequestError, match="is unhealthy \\(xid 79\\)"):
        capacity_grant(make_served(0, 4, reasons=("xid 79",)), Consumed(1, 6144), POLICY)


# -- two claims of different sizes on one GPU, prepared ------------------------------------------


@pytest.fixture
def capacity_env(tmp_path: Path) -> tuple[ClaimPreparer, InMemoryResourceApi, Path]:
    """A preparer over two 4-share GPUs of 24 GiB, a ceiling of 2 shares."""
    node = Node(make_inventory((4, 4)), grant_policy=POLICY)
    api = InMemoryResourceApi()
    cdi_dir = tmp_path / "cdi"
    preparer = ClaimPreparer(
        node,
        api,
        CdiSpecs(str(cdi_dir), DRIVER),
        PreparedClaims(str(tmp_path / "state")),
        driver=DRIVER,
        pool=NODE,
        cdi_kind=KIND,
    )
    return preparer, api, cdi_dir


def spec_env(cdi_dir: Path, uid: str) -> list[str]:
    """The environment of a claim's CDI spec."""
    spec: dict[str, Any] = json.loads((cdi_dir / f"{DRIVER}-claim-{uid}.json").read_text())
    env: list[str] = spec["devices"][0]["containerEdits"]["env"]
    return env


def test_two_claims_of_different_sizes_on_one_gpu_get_their_own_amounts(
    capacity_env: tuple[ClaimPreparer, InMemoryResourceApi, Path],
) -> None:
    """One GPU's device, two claims: each CDI spec carries the amount that claim consumed."""
    preparer, api, cdi_dir = capacity_env
    api.add_claim("ns", "small", SMALL_UID, [result({MEMORY: "6Gi", COMPUTE_SHARES: "1"})])
    api.add_claim("ns", "big", BIG_UID, [result({MEMORY: "12Gi", COMPUTE_SHARES: "2"}, SHARE_B)])
    answers = preparer.prepare([ClaimRef("ns", "small", SMALL_UID), ClaimRef("ns", "big", BIG_UID)])
    assert {uid: answer.error for uid, answer in answers.items()} == {SMALL_UID: "", BIG_UID: ""}
    device = gpu_device_name(make_served(0))
    assert [d.device for d in answers[SMALL_UID].devices] == [device]
    assert [d.device for d in answers[BIG_UID].devices] == [device]
    small, big = spec_env(cdi_dir, SMALL_UID), spec_env(cdi_dir, BIG_UID)
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=6144M" in small
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=25" in small
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=12288M" in big
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50" in big
    assert f"NVIDIA_VISIBLE_DEVICES={gpu_uuid(0)}" in small
    assert f"NVIDIA_VISIBLE_DEVICES={gpu_uuid(0)}" in big


def test_a_claim_over_the_ceiling_is_refused_and_others_still_prepare(
    capacity_env: tuple[ClaimPreparer, InMemoryResourceApi, Path],
) -> None:
    """A claim that consumed three shares on a two-share node fails alone, with the message."""
    preparer, api, cdi_dir = capacity_env
    api.add_claim("ns", "small", SMALL_UID, [result({MEMORY: "6Gi", COMPUTE_SHARES: "1"})])
    api.add_claim("ns", "big", BIG_UID, [result({MEMORY: "18Gi", COMPUTE_SHARES: "3"}, SHARE_B)])
    answers = preparer.prepare([ClaimRef("ns", "small", SMALL_UID), ClaimRef("ns", "big", BIG_UID)])
    assert answers[SMALL_UID].error == ""
    assert "this node gives a claim at most 2 share(s)" in answers[BIG_UID].error
    assert not (cdi_dir / f"{DRIVER}-claim-{BIG_UID}.json").exists()


def test_a_claim_spanning_two_gpus_is_refused(
    capacity_env: tuple[ClaimPreparer, InMemoryResourceApi, Path],
) -> None:
    """Capacity of two GPUs in one claim cannot be one MPS client's share."""
    preparer, api, _ = capacity_env
    other = AllocatedDevice(
        "gpu", DRIVER, NODE, gpu_device_name(make_served(1)), {MEMORY: "6Gi"}, SHARE_B
    )
    api.add_claim("ns", "wide", SMALL_UID, [result({MEMORY: "6Gi"}), other])
    answer = preparer.prepare([ClaimRef("ns", "wide", SMALL_UID)])[SMALL_UID]
    assert "span 2 physical GPUs" in answer.error


def test_a_claim_without_consumed_capacity_is_held_to_one_share(
    capacity_env: tuple[ClaimPreparer, InMemoryResourceApi, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A scheduler without the feature records no amounts: the claim gets the policy's
    default, one share, and the log says why."""
    preparer, api, cdi_dir = capacity_env
    api.add_claim("ns", "whole", SMALL_UID, [result({}, share_id="")])
    assert preparer.prepare([ClaimRef("ns", "whole", SMALL_UID)])[SMALL_UID].error == ""
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=6144M" in spec_env(cdi_dir, SMALL_UID)
    assert "carries no consumedCapacity" in caplog.text


def test_a_claim_mixing_a_gpu_device_and_a_share_is_refused(
    capacity_env: tuple[ClaimPreparer, InMemoryResourceApi, Path],
) -> None:
    """Results on a shared GPU device and on a share device cannot come from one slice."""
    preparer, api, _ = capacity_env
    share = DeviceNames.of(make_inventory((4, 4))).vgpu_by_name
    share_device = next(iter(share))
    mixed = [result({MEMORY: "6Gi"}), AllocatedDevice("gpu", DRIVER, NODE, share_device)]
    api.add_claim("ns", "mixed", SMALL_UID, mixed)
    answer = preparer.prepare([ClaimRef("ns", "mixed", SMALL_UID)])[SMALL_UID]
    assert f"device {share_device} is not a device of this node's GPUs" in answer.error
