"""The pure device model: vGPU ids, inventories and health, Allocate validation, the
preferred-allocation policy and what a container is granted."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.builders import (
    all_ids,
    gpu_uuid,
    ids_of,
    make_gpu,
    make_inventory,
    make_served,
    vgpu_id,
)
from vgpu_agent.model.devices import (
    HEALTHY,
    MAX_DEVICE_ID_LENGTH,
    UNHEALTHY,
    CdiDeviceGrant,
    Ceiling,
    ContainerGrant,
    HealthReason,
    InvalidRequestError,
    Inventory,
    LimitPolicy,
    MountGrant,
    MpsGrantPolicy,
    VGpu,
    enforced_ceiling,
    grant,
    make_vgpu_id,
    memory_limit_mib,
    parse_vgpu_id,
    percentage_text,
    pipe_dir_for,
    preferred_allocation,
    thread_percentage,
    validate_allocation,
)
from vgpu_agent.model.errors import VgpuError

REAL_UUID = "GPU-3f2a9c1e-8b7d-4e6f-a5c4-1b2d3e4f5a6b"
#: The pre-R470 MIG device UUID form, the longest UUID NVML hands out.
LEGACY_MIG_UUID = f"MIG-{REAL_UUID}/14/0"

# -- vGPU ids ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uuid", "replica"),
    [
        (REAL_UUID, 0),
        (REAL_UUID, 7),
        (REAL_UUID, 47),
        (f"MIG-{REAL_UUID[4:]}", 3),
        (LEGACY_MIG_UUID, 47),
        ("GPU-0", 10),
    ],
    ids=["first", "middle", "last-volta-replica", "mig", "legacy-mig", "short-uuid"],
)
def test_vgpu_id_round_trip(uuid: str, replica: int) -> None:
    """parse_vgpu_id gives back exactly the UUID and replica make_vgpu_id encoded."""
    assert parse_vgpu_id(make_vgpu_id(uuid, replica)) == (uuid, replica)


@pytest.mark.parametrize(
    "uuid", [REAL_UUID, f"MIG-{REAL_UUID[4:]}", LEGACY_MIG_UUID], ids=["gpu", "mig", "legacy-mig"]
)
def test_vgpu_ids_fit_the_kubelet_limit_for_real_uuids(uuid: str) -> None:
    """Ids of real UUID lengths stay within 63 characters up to the largest MPS replica."""
    assert len(make_vgpu_id(uuid, 47)) <= MAX_DEVICE_ID_LENGTH


def test_vgpu_id_longer_than_the_limit_is_refused() -> None:
    """A UUID too long for a 63-character id is refused with the limit in the message."""
    with pytest.raises(ValueError, match="63 characters"):
        make_vgpu_id("GPU-" + "x" * 60, 1)


@pytest.mark.parametrize(
    "bad_id",
    [
        "",
        REAL_UUID,
        f"{REAL_UUID}:3",
        f"{REAL_UUID}::",
        "::3",
        f"{REAL_UUID}::a",
        f"{REAL_UUID}::-1",
        f"{REAL_UUID}::+1",
        f"{REAL_UUID}:: 1",
        f"{REAL_UUID}::1 ",
        f"{REAL_UUID}::1.0",
        f"{REAL_UUID}::\u0663",
        f"{REAL_UUID}::\uff13",
        f"{REAL_UUID}::\u00b2",
        f"{REAL_UUID}::01",
        f"{REAL_UUID}::00",
    ],
    ids=[
        "empty",
        "no-separator",
        "single-colon",
        "empty-replica",
        "empty-uuid",
        "letter-replica",
        "negative-replica",
        "plus-sign",
        "leading-space",
        "trailing-space",
        "decimal",
        "arabic-indic-digit",
        "fullwidth-digit",
        "superscript-digit",
        "leading-zero",
        "double-zero",
    ],
)
def test_malformed_vgpu_ids_are_rejected_readably(bad_id: str) -> None:
    """Malformed ids raise InvalidRequestError that quotes the id and the expected form."""
    with pytest.raises(InvalidRequestError) as caught:
        parse_vgpu_id(bad_id)
    message = str(caught.value)
    assert repr(bad_id) in message
    assert "expected '<GPU UUID>::<n>'" in message


def test_long_malformed_id_is_shortened_in_the_message() -> None:
    """A huge malformed id is cut in the message, so an error stays readable."""
    with pytest.raises(InvalidRequestError) as caught:
        parse_vgpu_id("x" * 10_000)
    assert len(str(caught.value)) < 200
    assert "..." in str(caught.value)


def test_invalid_request_error_is_one_of_ours() -> None:
    """InvalidRequestError belongs to the agent's hierarchy (so no bare traceback)."""
    assert issubclass(InvalidRequestError, VgpuError)


@pytest.mark.no_cover  # a property search: the example tests hold the coverage
@settings(max_examples=300, deadline=None)
@given(
    uuid=st.text(
        alphabet=st.characters(blacklist_characters=":", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=40,
    ),
    replica=st.integers(min_value=0, max_value=10_000),
)
def test_vgpu_id_round_trip_property(uuid: str, replica: int) -> None:
    """Any colon-free UUID and replica survive make then parse unchanged."""
    assert parse_vgpu_id(make_vgpu_id(uuid, replica)) == (uuid, replica)


@pytest.mark.no_cover  # a property search: the example tests hold the coverage
@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_parse_vgpu_id_never_raises_anything_else(text: str) -> None:
    """Arbitrary text parses to a canonical id or raises InvalidRequestError, nothing else."""
    try:
        uuid, replica = parse_vgpu_id(text)
    except InvalidRequestError:
        return
    assert make_vgpu_id(uuid, replica) == text


def test_pipe_dir_for_joins_root_and_uuid() -> None:
    """A GPU's pipe directory is its UUID under the pipe root."""
    assert pipe_dir_for("/run/nvidia-mps", REAL_UUID) == f"/run/nvidia-mps/{REAL_UUID}"


# -- inventory and health ----------------------------------------------------------------


def test_inventory_vgpus_carry_health_and_numa() -> None:
    """vgpus() lists every replica, GPU by GPU, with its GPU's health and NUMA node."""
    inventory = make_inventory((2, 3), numa_nodes=(0, 1), unhealthy={1: ("xid 79",)})
    assert inventory.vgpus() == [
        VGpu(vgpu_id(0, 0), gpu_uuid(0), 0, HEALTHY, 0),
        VGpu(vgpu_id(0, 1), gpu_uuid(0), 1, HEALTHY, 0),
        VGpu(vgpu_id(1, 0), gpu_uuid(1), 0, UNHEALTHY, 1),
        VGpu(vgpu_id(1, 1), gpu_uuid(1), 1, UNHEALTHY, 1),
        VGpu(vgpu_id(1, 2), gpu_uuid(1), 2, UNHEALTHY, 1),
    ]
    assert inventory.vgpu_count == 5
    assert inventory.unhealthy_vgpu_count == 3


def test_inventory_without_numa_reports_none() -> None:
    """A GPU whose NUMA node is unknown gives its vGPUs numa_node None."""
    assert {vgpu.numa_node for vgpu in make_inventory((2,)).vgpus()} == {None}


def test_empty_inventory() -> None:
    """An inventory with no GPUs serves nothing and finds nothing."""
    inventory = Inventory()
    assert inventory.vgpus() == []
    assert inventory.vgpu_count == 0
    assert inventory.unhealthy_vgpu_count == 0
    assert inventory.get(REAL_UUID) is None


def test_inventory_get_by_uuid() -> None:
    """get() finds a served GPU by UUID and gives None for others."""
    inventory = make_inventory((1, 2))
    served = inventory.get(gpu_uuid(1))
    assert served is not None
    assert served.replicas == 2
    assert inventory.get(REAL_UUID) is None


def test_replace_does_not_share_the_uuid_index() -> None:
    """A copy made by dataclasses.replace looks GPUs up in its own GPUs, not the old ones."""
    inventory = make_inventory((1, 2))
    smaller = dataclasses.replace(inventory, gpus=inventory.gpus[:1])
    assert smaller.get(gpu_uuid(1)) is None
    assert inventory.get(gpu_uuid(1)) is not None


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([("xid 79", True)], ("xid 79",)),
        ([("xid 79", True), ("xid 79", True)], ("xid 79",)),
        ([("xid 79", True), ("GPU lost", True)], ("xid 79", "GPU lost")),
        ([("xid 79", True), ("GPU lost", True), ("xid 79", False)], ("GPU lost",)),
        ([("xid 79", True), ("xid 79", False)], ()),
        ([("xid 79", False)], ()),
    ],
    ids=["add", "add-twice", "two-reasons", "remove-one-of-two", "remove-last", "remove-absent"],
)
def test_with_reason(steps: list[tuple[str, bool]], expected: tuple[str, ...]) -> None:
    """Reasons are added once and removed independently; no reason means Healthy."""
    typed = {"xid 79": HealthReason.xid_fault(79), "GPU lost": HealthReason.lost()}
    inventory = make_inventory((2, 2))
    for reason, present in steps:
        inventory = inventory.with_reason(gpu_uuid(1), typed[reason], present)
    served = inventory.get(gpu_uuid(1))
    assert served is not None
    assert tuple(served.reason_texts) == expected
    assert served.healthy is (not expected)
    assert inventory.unhealthy_vgpu_count == (2 if expected else 0)
    assert inventory.gpus[0].healthy


def test_with_reason_leaves_the_original_alone() -> None:
    """with_reason returns a new inventory; the original keeps its health."""
    inventory = make_inventory((2,))
    changed = inventory.with_reason(gpu_uuid(0), HealthReason.xid_fault(79), True)
    assert inventory.gpus[0].healthy
    served = changed.get(gpu_uuid(0))
    assert served is not None
    assert not served.healthy


def test_with_reason_for_an_unknown_gpu_changes_nothing() -> None:
    """A reason for a GPU the inventory does not serve leaves it equal."""
    inventory = make_inventory((2,))
    assert inventory.with_reason(REAL_UUID, HealthReason.xid_fault(79), True) == inventory


# -- validate_allocation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_ids", "expected_gpu"),
    [
        (ids_of((0, 0)), 0),
        (ids_of((1, 3), (1, 0), (1, 2)), 1),
        (ids_of((1, 0), (1, 1), (1, 2), (1, 3)), 1),
    ],
    ids=["one-id", "several-ids", "whole-gpu"],
)
def test_validate_allocation_ok(request_ids: list[str], expected_gpu: int) -> None:
    """Valid ids on one healthy GPU return that GPU."""
    served = validate_allocation(make_inventory((4, 4)), request_ids)
    assert served.gpu.uuid == gpu_uuid(expected_gpu)


@pytest.mark.parametrize(
    ("request_ids", "message_parts"),
    [
        ([], ["names no vGPU ids"]),
        ([vgpu_id(5, 0)], ["unknown vGPU id", gpu_uuid(5), "delete the pod"]),
        ([vgpu_id(0, 4)], ["unknown vGPU id", f"{gpu_uuid(0)}::4"]),
        ([vgpu_id(0, 1), vgpu_id(0, 1)], ["more than once", vgpu_id(0, 1)]),
        ([f"{gpu_uuid(0)}::1", f"{gpu_uuid(0)}::01"], ["not a vGPU id", "::01"]),
        ([vgpu_id(2, 0)], ["unhealthy", "xid 79; GPU lost", "delete the pod"]),
        (ids_of((0, 0), (1, 0)), ["spans 2 physical GPUs", gpu_uuid(0), gpu_uuid(1)]),
        (["nvidia0"], ["'nvidia0' is not a vGPU id"]),
        ([vgpu_id(0, 0), "garbage"], ["'garbage' is not a vGPU id"]),
    ],
    ids=[
        "empty",
        "unknown-gpu",
        "replica-out-of-range",
        "duplicate",
        "leading-zero-alias",
        "unhealthy-carries-reasons",
        "spans-gpus",
        "foreign-id",
        "one-malformed-among-good",
    ],
)
def test_validate_allocation_rejects(request_ids: list[str], message_parts: list[str]) -> None:
    """Bad requests raise InvalidRequestError whose message explains the problem."""
    inventory = make_inventory((4, 4, 2), unhealthy={2: ("xid 79", "GPU lost")})
    with pytest.raises(InvalidRequestError) as caught:
        validate_allocation(inventory, request_ids)
    for part in message_parts:
        assert part in str(caught.value)


# -- preferred_allocation ------------------------------------------------------------------

Pair = tuple[int, int]


def free(index: int, *replicas: int) -> list[Pair]:
    """(GPU, replica) pairs of free vGPUs on one GPU."""
    return [(index, replica) for replica in replicas]


@pytest.mark.parametrize(
    ("counts", "unhealthy", "available", "must_include", "size", "expected"),
    [
        (
            (4, 4, 4),
            (),
            free(0, 0, 1, 2, 3) + free(1, 2, 3) + free(2, 1, 2, 3),
            [],
            2,
            free(1, 2, 3),
        ),
        (
            (4, 4, 4),
            (),
            free(0, 0, 1, 2, 3) + free(1, 2, 3) + free(2, 1, 2, 3),
            [],
            3,
            free(2, 1, 2, 3),
        ),
        (
            (4, 4, 4),
            (),
            free(0, 0, 1, 2, 3) + free(1, 3) + free(2, 1, 2, 3),
            [],
            1,
            free(1, 3),
        ),
        ((4, 4), (), free(0, 2, 3) + free(1, 0, 1), [], 2, free(0, 2, 3)),
        ((4, 4), (), free(0, 0, 1, 2, 3) + free(1, 0, 1, 2, 3), [], 4, free(0, 0, 1, 2, 3)),
        (
            (4, 4),
            (),
            free(0, 0, 1, 2, 3) + free(1, 2, 3),
            [(0, 2)],
            2,
            [(0, 2), (0, 0)],
        ),
        ((4, 4), (), free(0, 0, 1, 2, 3), [(0, 1), (0, 3)], 2, [(0, 1), (0, 3)]),
        ((4, 4), (), free(0, 1, 2, 3) + free(1, 1, 2), [], 4, free(0, 1, 2, 3)),
        ((4, 4), (), free(0, 1, 2) + free(1, 1, 2, 3), [], 4, free(1, 1, 2, 3)),
        ((4, 4), (), free(0, 1, 2) + free(1, 1, 2, 3), [(0, 1)], 4, free(0, 1, 2)),
        ((4, 4), (0,), free(0, 3) + free(1, 0, 1, 2), [], 1, free(1, 0)),
        ((4, 4), (0, 1), free(0, 3) + free(1, 0, 1, 2), [], 1, []),
        ((4, 4), (0,), free(0, 3) + free(1, 0, 1, 2), [(0, 3)], 2, [(0, 3)]),
        (
            (3, 3),
            (),
            free(0, 0, 1, 2) + free(1, 0, 1, 2),
            [(0, 0), (1, 0)],
            3,
            [(0, 0), (1, 0), (0, 1)],
        ),
        (
            (3, 3, 3),
            (),
            free(0, 0, 1, 2) + free(1, 0, 1, 2) + free(2, 0, 1, 2),
            [(0, 0), (1, 0), (2, 0)],
            4,
            [(0, 0), (1, 0), (2, 0), (0, 1)],
        ),
    ],
    ids=[
        "best-fit-fewest-free",
        "best-fit-skips-too-small",
        "best-fit-size-one",
        "tie-goes-to-lower-index",
        "whole-gpu",
        "must-include-pins-gpu",
        "must-include-fills-request",
        "too-big-spread-hint-most-free",
        "too-big-spread-hint-later-gpu",
        "too-big-with-pin-stays-on-pinned",
        "unhealthy-gpu-skipped",
        "every-gpu-unhealthy",
        "pin-on-unhealthy-gpu",
        "pins-on-two-gpus-all-kept",
        "pins-on-three-gpus-never-over-size",
    ],
)
def test_preferred_allocation(  # noqa: PLR0917 - one argument per table column
    counts: tuple[int, ...],
    unhealthy: tuple[int, ...],
    available: list[Pair],
    must_include: list[Pair],
    size: int,
    expected: list[Pair],
) -> None:
    """Best fit on one healthy GPU, honouring must-include ids; a hint when nothing fits."""
    inventory = make_inventory(counts, unhealthy=dict.fromkeys(unhealthy, ("xid 79",)))
    assert preferred_allocation(
        inventory, ids_of(*available), ids_of(*must_include), size
    ) == ids_of(*expected)


def test_preferred_allocation_ignores_foreign_available_ids() -> None:
    """Available ids that are not ours (or malformed) are skipped, not an error."""
    inventory = make_inventory((2,))
    available = ["nvidia0", vgpu_id(7, 0), *all_ids(inventory)]
    assert preferred_allocation(inventory, available, [], 1) == [vgpu_id(0, 0)]


@pytest.mark.parametrize(
    ("must_include", "size", "message"),
    [
        ([], 0, "at least 1, got 0"),
        ([], -2, "at least 1, got -2"),
        ([(1, 0)], 1, "is not among the available ids"),
        ([(0, 0), (0, 1)], 1, "2 must-include ids exceed the allocation size 1"),
    ],
    ids=["size-zero", "size-negative", "must-include-not-available", "must-include-over-size"],
)
def test_preferred_allocation_rejects(must_include: list[Pair], size: int, message: str) -> None:
    """Impossible requests raise InvalidRequestError naming the problem."""
    inventory = make_inventory((2, 2))
    with pytest.raises(InvalidRequestError, match=message):
        preferred_allocation(inventory, ids_of(*free(0, 0, 1)), ids_of(*must_include), size)


def test_preferred_allocation_rejects_malformed_must_include() -> None:
    """A malformed must-include id (even if "available") is an InvalidRequestError."""
    inventory = make_inventory((2,))
    with pytest.raises(InvalidRequestError, match="not a vGPU id"):
        preferred_allocation(inventory, ["junk", *all_ids(inventory)], ["junk"], 1)


@st.composite
def allocation_cases(
    draw: st.DrawFn,
) -> tuple[Inventory, list[str], list[str], int]:
    """A random node, free set, must-include subset and size."""
    counts = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    unhealthy = draw(st.sets(st.integers(0, len(counts) - 1)))
    inventory = make_inventory(counts, unhealthy=dict.fromkeys(unhealthy, ("xid 79",)))
    ids = all_ids(inventory)
    available = draw(st.lists(st.sampled_from(ids), unique=True, min_size=1))
    must_include = draw(st.lists(st.sampled_from(available), unique=True, max_size=3))
    size = draw(st.integers(max(len(must_include), 1), len(ids) + 1))
    return inventory, available, must_include, size


@pytest.mark.no_cover  # a property search: the example tests hold the coverage
@settings(max_examples=300, deadline=None)
@given(allocation_cases())
def test_preferred_allocation_invariants(
    case: tuple[Inventory, list[str], list[str], int],
) -> None:
    """Any answer holds every must-include id, only available ids, no repeats, at most
    ``size`` ids, and lies on one GPU whenever one healthy GPU could hold the request."""
    inventory, available, must_include, size = case
    answer = preferred_allocation(inventory, available, must_include, size)
    assert set(must_include) <= set(answer)
    assert set(answer) <= set(available)
    assert len(answer) == len(set(answer))
    assert len(answer) <= size
    pinned = {parse_vgpu_id(vgpu)[0] for vgpu in must_include}
    fits = [
        served
        for served in inventory.gpus
        if served.healthy
        and len(pinned - {served.gpu.uuid}) == 0
        and sum(vgpu in set(available) for vgpu in served.vgpu_ids) >= size
    ]
    if fits:
        assert len(answer) == size
        assert len({parse_vgpu_id(vgpu)[0] for vgpu in answer}) == 1
        free_counts = {
            served.gpu.uuid: sum(vgpu in set(available) for vgpu in served.vgpu_ids)
            for served in fits
        }
        chosen = parse_vgpu_id(answer[0])[0]
        assert free_counts[chosen] == min(free_counts.values())


# -- grant ---------------------------------------------------------------------------------

MPS = MpsGrantPolicy(container_pipe_dir="/run/nvidia-mps", memory_headroom_mib=0)


def test_grant_without_mps_gives_only_the_gpu() -> None:
    """With no MPS policy a container gets its GPU and nothing else."""
    served = make_served(0, 4)
    assert grant(served, 2, None) == ContainerGrant(
        envs={"NVIDIA_VISIBLE_DEVICES": gpu_uuid(0)},
        annotations={"vgpu.eks.amazonaws.com/gpu-uuid": gpu_uuid(0)},
    )


def test_grant_without_a_pipe_dir_gives_only_the_gpu() -> None:
    """A GPU with no MPS daemon (no pipe dir) grants only the GPU, even with a policy."""
    result = grant(make_served(0, 4, pipe_root=None), 2, MPS)
    assert result.envs == {"NVIDIA_VISIBLE_DEVICES": gpu_uuid(0)}
    assert result.mounts == ()


def test_grant_with_mps_sets_pipe_dir_limits_and_mount() -> None:
    """With MPS the container gets the pipe directory env and mount and both limits."""
    served = make_served(1, 4, pipe_root="/run/vgpu/mps", memory_mib=24_000)
    result = grant(served, 1, MPS)
    assert result.envs == {
        "NVIDIA_VISIBLE_DEVICES": gpu_uuid(1),
        "CUDA_MPS_PIPE_DIRECTORY": "/run/nvidia-mps",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=6000M",
    }
    assert result.mounts == (
        MountGrant("/run/nvidia-mps", f"/run/vgpu/mps/{gpu_uuid(1)}", read_only=False),
    )
    assert result.annotations == {"vgpu.eks.amazonaws.com/gpu-uuid": gpu_uuid(1)}


@pytest.mark.parametrize(
    ("policy", "expected_mounts"),
    [
        (
            MpsGrantPolicy(container_pipe_dir="/mps", share_host_shm=True),
            (
                MountGrant("/mps", f"/pipes/{gpu_uuid(0)}", False),
                MountGrant("/dev/shm", "/dev/shm", False),
            ),
        ),
        (
            MpsGrantPolicy(container_pipe_dir="/mps", pipe_dir_read_only=True),
            (MountGrant("/mps", f"/pipes/{gpu_uuid(0)}", True),),
        ),
    ],
    ids=["share-host-shm", "read-only-pipe-dir"],
)
def test_grant_mounts(policy: MpsGrantPolicy, expected_mounts: tuple[MountGrant, ...]) -> None:
    """share_host_shm adds /dev/shm; pipe_dir_read_only makes the pipe mount read-only."""
    assert grant(make_served(0, 4, pipe_root="/pipes"), 1, policy).mounts == expected_mounts


@pytest.mark.parametrize(
    ("thread_limit", "memory_limit", "headroom_mib", "vgpus", "threads", "memory"),
    [
        ("proportional", "proportional", 0, 1, "25", "0=6144M"),
        ("proportional", "proportional", 0, 3, "75", "0=18432M"),
        ("proportional", "proportional", 0, 4, "100", "0=24576M"),
        ("proportional", "proportional", 576, 1, "25", "0=6000M"),
        ("none", "none", 0, 2, None, None),
        (30, 4096, 0, 2, "60", "0=8192M"),
        ("none", "proportional", 1000, 2, None, "0=11788M"),
    ],
    ids=[
        "one-of-four",
        "three-of-four",
        "whole-gpu",
        "headroom",
        "no-limits",
        "fixed-limits",
        "memory-only",
    ],
)
def test_grant_limits(  # noqa: PLR0917 - one argument per table column
    thread_limit: LimitPolicy,
    memory_limit: LimitPolicy,
    headroom_mib: int,
    vgpus: int,
    threads: Optional[str],
    memory: Optional[str],
) -> None:
    """Thread and memory limits follow the policy; "none" leaves the env var out."""
    policy = MpsGrantPolicy(
        thread_limit=thread_limit, memory_limit=memory_limit, memory_headroom_mib=headroom_mib
    )
    envs = grant(make_served(0, 4, memory_mib=24_576), vgpus, policy).envs
    assert envs.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE") == threads
    assert envs.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT") == memory


@pytest.mark.parametrize(
    ("policy", "vgpus", "replicas", "expected"),
    [
        ("proportional", 1, 8, "12.5"),
        ("proportional", 1, 16, "6.25"),
        ("proportional", 1, 3, "33.33"),
        ("proportional", 2, 3, "66.66"),
        ("proportional", 3, 3, "100"),
        ("proportional", 1, 48, "2.08"),
        ("proportional", 1, 10, "10"),
        ("proportional", 1, 200, "0.5"),
        ("proportional", 1, 20000, "0.01"),
        ("proportional", 7, 7, "100"),
        ("none", 1, 4, None),
        (50, 1, 4, "50"),
        (30, 2, 4, "60"),
        (40, 3, 4, "100"),
    ],
    ids=[
        "one-of-8-keeps-the-half",
        "one-of-16-keeps-the-quarter",
        "third-floors-to-hundredths",
        "two-thirds-floors-to-hundredths",
        "all",
        "one-of-48",
        "whole-number-without-decimals",
        "half-a-percent",
        "min-one-hundredth",
        "seven-of-seven",
        "none",
        "fixed",
        "fixed-per-vgpu",
        "fixed-capped-at-100",
    ],
)
def test_thread_percentage(
    policy: LimitPolicy, vgpus: int, replicas: int, expected: Optional[str]
) -> None:
    """Proportional is n*100/R floored to hundredths (fractions kept, at least 0.01); none
    is no limit; a number is per vGPU; printed without trailing zeros."""
    percentage = thread_percentage(policy, vgpus, replicas)
    assert (None if percentage is None else percentage_text(percentage)) == expected


def test_proportional_shares_never_add_up_to_more_than_the_gpu() -> None:
    """R one-vGPU shares together are at most 100% and lose less than 1% to rounding."""
    for replicas in range(1, 49):
        share = thread_percentage("proportional", 1, replicas)
        assert share is not None
        assert 99 < share * replicas <= 100, replicas


@pytest.mark.parametrize(
    ("policy", "vgpus", "replicas", "memory_mib", "headroom_mib", "expected"),
    [
        ("proportional", 1, 4, 24_576, 0, 6144),
        ("proportional", 1, 3, 10_000, 0, 3333),
        ("proportional", 2, 4, 24_576, 4_576, 10_000),
        ("proportional", 1, 4, 1_000, 5_000, 1),
        ("none", 1, 4, 24_576, 0, None),
        (2048, 3, 4, 24_576, 1_000, 6144),
    ],
    ids=["quarter", "floors", "headroom", "headroom-over-memory-min-one", "none", "fixed"],
)
def test_memory_limit_mib(  # noqa: PLR0917 - one argument per table column
    policy: LimitPolicy,
    vgpus: int,
    replicas: int,
    memory_mib: int,
    headroom_mib: int,
    expected: Optional[int],
) -> None:
    """Proportional is (memory - headroom) * n / R (floored, at least 1); none; or n times a
    fixed number per vGPU."""
    assert memory_limit_mib(policy, vgpus, replicas, memory_mib, headroom_mib) == expected


def test_make_gpu_builder_defaults() -> None:
    """The builder's GPU has a real-length UUID and the requested fields."""
    gpu = make_gpu(3, memory_mib=81_559, numa_node=1)
    assert len(gpu.uuid) == len(REAL_UUID)
    assert (gpu.index, gpu.memory_mib, gpu.numa_node) == (3, 81_559, 1)


# -- confinement: the device list a pod cannot forge, the ceiling, the size limit ----------


@pytest.mark.parametrize(
    ("strategy", "envs", "mounts", "cdi_devices"),
    [
        ("envvar", {"NVIDIA_VISIBLE_DEVICES": gpu_uuid(0)}, (), ()),
        (
            "volume-mounts",
            {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"},
            (MountGrant(f"/var/run/nvidia-container-devices/{gpu_uuid(0)}", "/dev/null", True),),
            (),
        ),
        (
            "cdi",
            {"NVIDIA_VISIBLE_DEVICES": "void"},
            (),
            (CdiDeviceGrant(f"nvidia.com/gpu={gpu_uuid(0)}"),),
        ),
    ],
    ids=["envvar", "volume-mounts", "cdi"],
)
def test_grant_names_the_gpu_as_the_strategy_says(
    strategy: str,
    envs: dict[str, str],
    mounts: tuple[MountGrant, ...],
    cdi_devices: tuple[CdiDeviceGrant, ...],
) -> None:
    """envvar names the GPU in NVIDIA_VISIBLE_DEVICES; volume-mounts in a /dev/null mount
    under the toolkit's directory; cdi as the CDI device nvidia.com/gpu=<UUID>."""
    result = grant(make_served(0, 4, pipe_root=None), 1, None, strategy)
    assert (result.envs, result.mounts, result.cdi_devices) == (envs, mounts, cdi_devices)


def test_grant_keeps_the_device_list_mount_beside_the_mps_mount() -> None:
    """With volume-mounts and MPS, the container gets both the device mount and the pipe dir."""
    result = grant(make_served(0, 4, pipe_root="/pipes"), 1, MPS, "volume-mounts")
    assert [mount.container_path for mount in result.mounts] == [
        f"/var/run/nvidia-container-devices/{gpu_uuid(0)}",
        "/run/nvidia-mps",
    ]
    assert result.envs["CUDA_MPS_PIPE_DIRECTORY"] == "/run/nvidia-mps"


def test_grant_refuses_an_unknown_strategy() -> None:
    """A strategy the config cannot produce is a programming error naming it."""
    with pytest.raises(ValueError, match="'nvml'"):
        grant(make_served(0, 4), 1, None, "nvml")


@pytest.mark.parametrize(
    ("limit", "vgpus", "refused"),
    [(1, 1, False), (1, 2, True), (2, 2, False), (2, 3, True), (None, 4, False)],
    ids=["one-of-one", "two-over-one", "two-of-two", "three-over-two", "cooperative-any"],
)
def test_grant_refuses_more_vgpus_than_a_container_may_hold(
    limit: Optional[int], vgpus: int, refused: bool
) -> None:
    """Enforced confinement refuses requests above mps.max_vgpus_per_container and says
    what to do; without a limit (cooperative) any size is granted."""
    policy = MpsGrantPolicy(max_vgpus_per_container=limit)
    served = make_served(0, 4, pipe_root="/pipes")
    if not refused:
        assert grant(served, vgpus, policy).envs["CUDA_MPS_PIPE_DIRECTORY"]
        return
    with pytest.raises(InvalidRequestError) as caught:
        grant(served, vgpus, policy)
    message = str(caught.value)
    assert f"asks for {vgpus} vGPUs" in message
    assert f"request at most {limit}" in message
    assert "raise mps.max_vgpus_per_container" in message


@pytest.mark.parametrize(
    ("max_vgpus", "replicas", "memory_mib", "headroom_mib", "expected"),
    [
        (1, 8, 81_559, 0, Ceiling(Decimal("12.5"), 10_194)),
        (1, 16, 143_771, 0, Ceiling(Decimal("6.25"), 8_985)),
        (2, 8, 81_920, 1_920, Ceiling(Decimal(25), 20_000)),
        (1, 3, 3_000, 0, Ceiling(Decimal("33.33"), 1_000)),
        (6, 4, 4_000, 0, Ceiling(Decimal(100), 4_000)),
    ],
    ids=["one-of-8", "one-of-16", "two-of-8-headroom", "one-of-3", "more-than-the-gpu"],
)
def test_enforced_ceiling(
    max_vgpus: int, replicas: int, memory_mib: int, headroom_mib: int, expected: Ceiling
) -> None:
    """The enforced ceiling is max_vgpus_per_container vGPUs' share of SMs and memory, at
    most the whole GPU."""
    assert enforced_ceiling(max_vgpus, replicas, memory_mib, headroom_mib) == expected


@pytest.mark.parametrize(
    ("ceiling", "text"),
    [
        (Ceiling(Decimal("12.5"), 10_194), "12.5% of the SMs, 10194 MiB"),
        (Ceiling(None, 512), "512 MiB"),
        (Ceiling(), "none"),
    ],
    ids=["both", "memory-only", "none"],
)
def test_ceiling_describes_itself(ceiling: Ceiling, text: str) -> None:
    """status and doctor show a ceiling as one short phrase."""
    assert ceiling.describe() == text
    assert ceiling.empty is (text == "none")
