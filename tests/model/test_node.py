"""The node model: health transitions, allocations under the grant policy, GPU lookup, and
the typed control commands that reach it."""

from __future__ import annotations

from typing import Any

import pytest

from tests.builders import gpu_uuid, make_inventory, vgpu_id
from vgpu_agent.agent.describe import status_line
from vgpu_agent.model.commands import (
    ControlCommand,
    HealthResetCommand,
    SimulateAction,
    SimulateCommand,
    StatusCommand,
    parse_command,
    to_request,
)
from vgpu_agent.model.devices import HealthReason, InvalidRequestError, MpsGrantPolicy
from vgpu_agent.model.errors import VgpuError
from vgpu_agent.model.node import Node


def test_set_health_reports_only_real_transitions() -> None:
    """Adding a reason twice, or removing an absent one, is no transition and no version."""
    node = Node(make_inventory((2, 2)))
    xid = HealthReason.xid_fault(79)
    first = node.set_health(gpu_uuid(1), xid, present=True)
    assert first is not None
    assert (first.healthy, first.reason, node.version) == (False, xid, 1)
    assert node.set_health(gpu_uuid(1), xid, present=True) is None
    assert node.set_health(gpu_uuid(0), xid, present=False) is None
    cleared = node.set_health(gpu_uuid(1), xid, present=False)
    assert cleared is not None
    assert (cleared.healthy, node.version) == (True, 2)


def test_set_health_of_an_unserved_gpu_is_ignored() -> None:
    """A change for a GPU the node does not serve (withdrawn meanwhile) changes nothing."""
    node = Node(make_inventory((2,)))
    assert node.set_health(gpu_uuid(5), HealthReason.lost(), present=True) is None
    assert node.version == 0


def test_allocate_follows_the_grant_policy() -> None:
    """An allocation names its GPU and grants what the current policy says."""
    node = Node(make_inventory((4,)))
    plain = node.allocate([vgpu_id(0, 1)])
    assert (plain.gpu_uuid, plain.vgpu_ids) == (gpu_uuid(0), (vgpu_id(0, 1),))
    assert "CUDA_MPS_PIPE_DIRECTORY" not in plain.grant.envs
    node.set_grant_policy(MpsGrantPolicy(thread_limit="proportional", memory_limit="none"))
    limited = node.allocate([vgpu_id(0, 0), vgpu_id(0, 1)])
    assert limited.grant.envs["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"


def test_allocate_refuses_an_unhealthy_vgpu() -> None:
    """An unhealthy vGPU is refused with its reason for kubectl describe pod."""
    node = Node(make_inventory((2,)))
    node.set_health(gpu_uuid(0), HealthReason.xid_fault(48), present=True)
    with pytest.raises(InvalidRequestError, match=r"unhealthy \(xid 48\)"):
        node.allocate([vgpu_id(0, 0)])


@pytest.mark.parametrize("ref", ["1", gpu_uuid(1)], ids=["index", "uuid"])
def test_find_gpu_by_index_or_uuid(ref: str) -> None:
    """A served GPU is found by its index or its UUID."""
    node = Node(make_inventory((2, 2)))
    assert node.find_gpu(ref).gpu.uuid == gpu_uuid(1)


def test_find_gpu_names_the_served_ones() -> None:
    """An unknown GPU is refused, listing what is served."""
    node = Node(make_inventory((2,)))
    with pytest.raises(VgpuError, match=f"no served GPU '7' \\(served: 0={gpu_uuid(0)}\\)"):
        node.find_gpu("7")


@pytest.mark.parametrize(
    ("request_", "command"),
    [
        ({"command": "status"}, StatusCommand()),
        ({"command": "health-reset", "gpu": "0"}, HealthResetCommand("0")),
        ({"command": "health-reset", "gpu": 1}, HealthResetCommand("1")),
        (
            {"command": "simulate", "action": "xid", "gpu": "0", "xid": 79},
            SimulateCommand(SimulateAction.XID, "0", 79),
        ),
        (
            {"command": "simulate", "action": "mps-down", "gpu": "GPU-1"},
            SimulateCommand(SimulateAction.MPS_DOWN, "GPU-1"),
        ),
    ],
    ids=["status", "reset", "reset-by-number", "xid", "mps-down"],
)
def test_parse_command(request_: dict[str, Any], command: ControlCommand) -> None:
    """Each request parses to its typed command, which sends back as an equal request."""
    assert parse_command(request_) == command
    assert parse_command(to_request(command)) == command


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"command": "reboot"}, "unknown control command 'reboot'"),
        ({}, "unknown control command None"),
        ({"command": "health-reset"}, "needs a GPU (UUID or index), got None"),
        ({"command": "health-reset", "gpu": True}, "needs a GPU (UUID or index), got True"),
        ({"command": "simulate", "action": "melt", "gpu": "0"}, "unknown simulate action"),
        ({"command": "simulate", "action": "xid", "gpu": "0"}, "needs an XID number"),
        ({"command": "simulate", "action": "xid", "gpu": "0", "xid": "79"}, "needs an XID"),
    ],
    ids=["unknown", "no-command", "no-gpu", "bool-gpu", "bad-action", "no-xid", "text-xid"],
)
def test_parse_command_refuses(request_: dict[str, Any], message: str) -> None:
    """A bad request is refused with a message that says what is wrong."""
    with pytest.raises(VgpuError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_command(request_)


@pytest.mark.parametrize(
    ("unhealthy", "registered", "waiting_for", "expected"),
    [
        ({}, True, "", "serving 8 vGPUs on 2 GPUs as r/v; registered with kubelet"),
        ({}, False, "kubelet", "serving 8 vGPUs on 2 GPUs as r/v; waiting for kubelet"),
        ({}, False, "", "serving 8 vGPUs on 2 GPUs as r/v"),
        (
            {1: ("xid 79", "GPU lost")},
            True,
            "",
            "serving 8 vGPUs on 2 GPUs as r/v; 4 unhealthy (GPU 1: xid 79, GPU lost); "
            "registered with kubelet",
        ),
    ],
    ids=["registered", "waiting", "between-registrations", "unhealthy"],
)
def test_status_line(
    unhealthy: dict[int, tuple[str, ...]], registered: bool, waiting_for: str, expected: str
) -> None:
    """The status line counts vGPUs, names each unhealthy GPU's causes and the wait."""
    inventory = make_inventory((4, 4), unhealthy=unhealthy)
    line = status_line(inventory, "r/v", registered=registered, waiting_for=waiting_for)
    assert line == expected


def test_status_line_while_waiting_for_the_driver() -> None:
    """Before the GPU backend opens, the status line says what the agent waits for and
    why, not "serving 0 vGPUs"."""
    line = status_line(
        make_inventory(()),
        "r/v",
        registered=False,
        waiting_for="starting",
        waiting_for_driver="initialising NVML: Driver Not Loaded; retrying in 4 s",
    )
    assert (
        line == "waiting for the GPU driver: initialising NVML: Driver Not Loaded; retrying in 4 s"
    )
