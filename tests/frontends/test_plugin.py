"""The DevicePlugin service over its real unix socket: every RPC, bad requests, lifecycle."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional

import grpc
import pytest

from vgpu_agent.frontends._proto import deviceplugin_pb2 as pb
from vgpu_agent.frontends.deviceplugin.server import (
    PluginServer,
    PluginServicer,
    device_plugin_stub,
)
from vgpu_agent.model.devices import HealthReason, Inventory, MpsGrantPolicy, VGpu
from vgpu_agent.model.errors import AgentError
from vgpu_agent.model.node import Allocation, Node

#: Generous: a change normally arrives within milliseconds.
PROMPT_S = 5.0


@dataclass
class Served:
    """A plugin server under test and a client connected to it."""

    state: Node
    servicer: PluginServicer
    server: PluginServer
    stub: Any

    def allocate(self, *containers: list[str]) -> pb.AllocateResponse:
        request = pb.AllocateRequest(
            container_requests=[pb.ContainerAllocateRequest(devices_ids=ids) for ids in containers]
        )
        response: pb.AllocateResponse = self.stub.Allocate(request, timeout=PROMPT_S)
        return response

    def preferred(self, available: list[str], must_include: list[str], size: int) -> list[str]:
        request = pb.PreferredAllocationRequest(
            container_requests=[
                pb.ContainerPreferredAllocationRequest(
                    available_deviceIDs=available,
                    must_include_deviceIDs=must_include,
                    allocation_size=size,
                )
            ]
        )
        response: pb.PreferredAllocationResponse = self.stub.GetPreferredAllocation(
            request, timeout=PROMPT_S
        )
        return list(response.container_responses[0].deviceIDs)


def vgpu(inventory: Inventory, gpu_index: int, replica: int) -> str:
    """The id of a vGPU of ``inventory``."""
    return inventory.gpus[gpu_index].vgpu_ids[replica]


@contextmanager
def serve(
    socket_dir: str,
    inventory: Inventory,
    mps_policy: Optional[MpsGrantPolicy] = None,
    max_streams: int = 12,
) -> Iterator[Served]:
    """Start a plugin server on ``socket_dir``/vgpu.sock and connect a client to it."""
    state = Node(inventory, mps_policy)
    servicer = PluginServicer(state, max_streams=max_streams)
    server = PluginServer(os.path.join(socket_dir, "vgpu.sock"), servicer)
    server.start()
    channel = grpc.insecure_channel(f"unix://{server.socket_path}")
    try:
        yield Served(state, servicer, server, device_plugin_stub(channel))
    finally:
        channel.close()
        server.stop()


@pytest.fixture
def inventory(inventory_factory: Callable[..., Inventory]) -> Inventory:
    """Two GPUs of four vGPUs; GPU 0 on NUMA node 1, GPU 1 with no known node."""
    return inventory_factory(replicas=(4, 4), numa_nodes=(1, None))


@pytest.fixture
def served(short_tmp_dir: str, inventory: Inventory) -> Iterator[Served]:
    """A plugin server with the proportional MPS policy."""
    with serve(short_tmp_dir, inventory, MpsGrantPolicy()) as running:
        yield running


def assert_still_serving(served: Served) -> None:
    """A valid Allocate still succeeds."""
    inventory = served.state.inventory()
    response = served.allocate([vgpu(inventory, 0, 0)])
    assert len(response.container_responses) == 1


def test_get_device_plugin_options(served: Served) -> None:
    """The plugin needs no PreStartContainer and offers GetPreferredAllocation."""
    options = served.stub.GetDevicePluginOptions(pb.Empty(), timeout=PROMPT_S)
    assert options.pre_start_required is False
    assert options.get_preferred_allocation_available is True


def test_list_and_watch_sends_full_list_with_topology(served: Served, inventory: Inventory) -> None:
    """The first message lists every vGPU, healthy, with its NUMA node when known."""
    stream = served.stub.ListAndWatch(pb.Empty(), timeout=PROMPT_S)
    first = next(stream)
    stream.cancel()
    assert [d.ID for d in first.devices] == inventory.gpus[0].vgpu_ids + inventory.gpus[1].vgpu_ids
    assert {d.health for d in first.devices} == {"Healthy"}
    assert [[n.ID for n in d.topology.nodes] for d in first.devices] == [[1]] * 4 + [[]] * 4


def test_list_and_watch_sends_update_after_health_change(
    served: Served, inventory: Inventory
) -> None:
    """A health flip in the state reaches an open stream as a new full list, promptly."""
    stream = served.stub.ListAndWatch(pb.Empty(), timeout=PROMPT_S)
    next(stream)
    gpu_uuid = inventory.gpus[1].gpu.uuid
    served.state.update(
        lambda inv: inv.with_reason(gpu_uuid, HealthReason.xid_fault(79), present=True)
    )
    second = next(stream)
    served.state.update(
        lambda inv: inv.with_reason(gpu_uuid, HealthReason.xid_fault(79), present=False)
    )
    third = next(stream)
    stream.cancel()
    assert [d.health for d in second.devices] == ["Healthy"] * 4 + ["Unhealthy"] * 4
    assert {d.health for d in third.devices} == {"Healthy"}


def test_list_and_watch_streams_get_every_change(served: Served, inventory: Inventory) -> None:
    """Several streams each receive the change."""
    streams = [served.stub.ListAndWatch(pb.Empty(), timeout=PROMPT_S) for _ in range(3)]
    for stream in streams:
        next(stream)
    served.state.serve(
        inventory.with_reason(
            inventory.gpus[0].gpu.uuid, HealthReason.mps_down("mps down"), present=True
        )
    )
    for stream in streams:
        assert next(stream).devices[0].health == "Unhealthy"
        stream.cancel()


def test_list_and_watch_ends_when_server_stops(served: Served) -> None:
    """Stopping the server ends an open stream at once instead of leaving it hanging."""
    stream = served.stub.ListAndWatch(pb.Empty(), timeout=PROMPT_S)
    next(stream)
    started = time.monotonic()
    served.server.stop(grace_s=PROMPT_S)
    with pytest.raises((StopIteration, grpc.RpcError)):
        next(stream)
    assert time.monotonic() - started < PROMPT_S


def test_list_and_watch_ends_when_state_closes(served: Served) -> None:
    """Closing the state (shutdown) ends the streams cleanly."""
    stream = served.stub.ListAndWatch(pb.Empty(), timeout=PROMPT_S)
    next(stream)
    served.state.close()
    with pytest.raises(StopIteration):
        next(stream)


def test_list_and_watch_releases_cancelled_streams(served: Served) -> None:
    """A client that goes away frees its stream slot."""
    stream = served.stub.ListAndWatch(pb.Empty(), timeout=PROMPT_S)
    next(stream)
    assert served.servicer.open_streams == 1
    stream.cancel()
    deadline = time.monotonic() + PROMPT_S
    while served.servicer.open_streams and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.servicer.open_streams == 0


def test_too_many_streams_are_refused_and_unary_calls_still_served(
    short_tmp_dir: str, inventory: Inventory
) -> None:
    """Streams beyond the limit get RESOURCE_EXHAUSTED; Allocate keeps working."""
    with serve(short_tmp_dir, inventory, max_streams=2) as served:
        streams = [served.stub.ListAndWatch(pb.Empty(), timeout=PROMPT_S) for _ in range(2)]
        for stream in streams:
            next(stream)
        extra = served.stub.ListAndWatch(pb.Empty(), timeout=PROMPT_S)
        with pytest.raises(grpc.RpcError) as raised:
            next(extra)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert_still_serving(served)
        for stream in streams:
            stream.cancel()


class BrokenInventory(Inventory):
    """A fake inventory that fails when asked for its vGPUs."""

    def vgpus(self) -> list[VGpu]:
        raise RuntimeError("inventory broke")


def test_list_and_watch_failure_inside_is_internal(
    short_tmp_dir: str, inventory: Inventory
) -> None:
    """An unexpected error while streaming becomes INTERNAL with a message; the server lives."""
    with serve(short_tmp_dir, BrokenInventory(inventory.gpus)) as served:
        with pytest.raises(grpc.RpcError) as raised:
            next(served.stub.ListAndWatch(pb.Empty(), timeout=PROMPT_S))
        assert raised.value.code() == grpc.StatusCode.INTERNAL
        assert "ListAndWatch: RuntimeError: inventory broke" in raised.value.details()
        assert served.servicer.open_streams == 0
        assert_still_serving(served)


def test_node_ignores_an_equal_inventory(inventory: Inventory) -> None:
    """Setting the same inventory again is no change: the version stays."""
    state = Node(inventory)
    state.serve(Inventory(inventory.gpus))
    assert state.version == 0
    state.update(
        lambda inv: inv.with_reason(inv.gpus[0].gpu.uuid, HealthReason.xid_fault(48), present=True)
    )
    assert state.version == 1


def test_node_wait_returns_on_change(inventory: Inventory) -> None:
    """A waiter wakes with the new version when another thread changes the state."""
    state = Node(inventory)
    changed = inventory.with_reason(
        inventory.gpus[0].gpu.uuid, HealthReason.xid_fault(48), present=True
    )
    timer = threading.Timer(0.05, state.serve, args=(changed,))
    timer.start()
    version, seen = state.wait_for_change(0, timeout_s=PROMPT_S)
    timer.join()
    assert (version, seen) == (1, changed)


def test_node_wait_times_out_unchanged(inventory: Inventory) -> None:
    """Without a change the wait returns the same version after the timeout."""
    state = Node(inventory)
    assert state.wait_for_change(0, timeout_s=0.01) == (0, inventory)


@pytest.mark.parametrize(
    ("free", "must_include", "size", "expected"),
    [
        # GPU 0 has 2 free, GPU 1 has 4 free: 2 fit best on GPU 0.
        ([(0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)], [], 2, [(0, 2), (0, 3)]),
        # 3 do not fit on GPU 0 any more.
        ([(0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)], [], 3, [(1, 0), (1, 1), (1, 2)]),
        # A must-include id pins the GPU even where another fits better.
        ([(0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)], [(1, 3)], 2, [(1, 3), (1, 0)]),
        # More than any GPU has: as many as fit on the freest GPU (the kubelet fills the rest).
        ([(0, 3), (1, 1), (1, 2)], [], 5, [(1, 1), (1, 2)]),
    ],
    ids=["best-fit", "bigger-request-moves", "must-include-pins-gpu", "size-over-available"],
)
def test_get_preferred_allocation(  # noqa: PLR0917 - one argument per table column
    served: Served,
    inventory: Inventory,
    free: list[tuple[int, int]],
    must_include: list[tuple[int, int]],
    size: int,
    expected: list[tuple[int, int]],
) -> None:
    """The hint packs the request onto one GPU, best fit, honouring must-include ids."""
    chosen = served.preferred(
        [vgpu(inventory, *at) for at in free], [vgpu(inventory, *at) for at in must_include], size
    )
    assert chosen == [vgpu(inventory, *at) for at in expected]


@pytest.mark.parametrize(
    ("available", "must_include", "size", "message"),
    [
        (["GPU-x::0"], [], 0, "allocation size must be at least 1"),
        (["GPU-x::0"], ["GPU-x::1"], 1, "not among the available ids"),
        (["G" * 64], [], 1, "device ids are at most 63"),
        ([f"GPU-x::{n}" for n in range(10_001)], [], 1, "at most 10000 are accepted"),
        (["GPU-x::0"], [], 20_000, "larger than 10000"),
    ],
    ids=["size-zero", "must-include-unavailable", "overlong-id", "too-many-ids", "huge-size"],
)
def test_get_preferred_allocation_refuses_bad_requests(
    served: Served, available: list[str], must_include: list[str], size: int, message: str
) -> None:
    """Bad hints requests get INVALID_ARGUMENT with a readable reason."""
    with pytest.raises(grpc.RpcError) as raised:
        served.preferred(available, must_include, size)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()
    assert_still_serving(served)


def test_allocate_with_mps_policy(served: Served, inventory: Inventory) -> None:
    """Allocate returns the GPU, the MPS pipe directory mount and proportional limits."""
    ids = [vgpu(inventory, 1, 0), vgpu(inventory, 1, 3)]
    response = served.allocate(ids)
    (container,) = response.container_responses
    served_gpu = inventory.gpus[1]
    assert dict(container.envs) == {
        "NVIDIA_VISIBLE_DEVICES": served_gpu.gpu.uuid,
        "CUDA_MPS_PIPE_DIRECTORY": "/run/nvidia-mps",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={served_gpu.gpu.memory_mib // 2}M",
    }
    assert [(m.container_path, m.host_path, m.read_only) for m in container.mounts] == [
        ("/run/nvidia-mps", served_gpu.pipe_dir, False)
    ]
    assert dict(container.annotations) == {"vgpu.eks.amazonaws.com/gpu-uuid": served_gpu.gpu.uuid}


def test_allocate_without_mps(short_tmp_dir: str, inventory: Inventory) -> None:
    """Without an MPS policy a container gets only its GPU."""
    with serve(short_tmp_dir, inventory, mps_policy=None) as served:
        (container,) = served.allocate([vgpu(inventory, 0, 1)]).container_responses
        assert dict(container.envs) == {"NVIDIA_VISIBLE_DEVICES": inventory.gpus[0].gpu.uuid}
        assert list(container.mounts) == []


def test_allocate_follows_a_reloaded_mps_policy(served: Served, inventory: Inventory) -> None:
    """A grant policy set on the node applies to the next Allocate."""
    served.state.set_grant_policy(MpsGrantPolicy(thread_limit="none", memory_limit=4096))
    (container,) = served.allocate([vgpu(inventory, 0, 0)]).container_responses
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in container.envs
    assert container.envs["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=4096M"


def test_allocate_answers_every_container(served: Served, inventory: Inventory) -> None:
    """Each container request gets its own response, in order."""
    response = served.allocate([vgpu(inventory, 0, 0)], [vgpu(inventory, 1, 0)])
    assert [c.envs["NVIDIA_VISIBLE_DEVICES"] for c in response.container_responses] == [
        inventory.gpus[0].gpu.uuid,
        inventory.gpus[1].gpu.uuid,
    ]


@pytest.mark.parametrize(
    ("containers", "message"),
    [
        ([["GPU-00000009-aaaa-bbbb-cccc-dddddddddddd::0"]], "unknown vGPU id"),
        ([["GPU-00000000-aaaa-bbbb-cccc-dddddddddddd::7"]], "unknown vGPU id"),
        ([["not-a-vgpu"]], "is not a vGPU id of this plugin"),
        (
            [["GPU-00000000-aaaa-bbbb-cccc-dddddddddddd::1"] * 2],
            "vGPU ids requested more than once",
        ),
        (
            [["GPU-00000001-aaaa-bbbb-cccc-dddddddddddd::0"]],
            "is unhealthy (xid 79); delete the pod",
        ),
        (
            [
                [
                    "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd::0",
                    "GPU-00000002-aaaa-bbbb-cccc-dddddddddddd::0",
                ]
            ],
            "spans 2 physical GPUs",
        ),
        ([[]], "the request names no vGPU ids"),
        ([], "holds no container requests"),
        ([["GPU-00000000-aaaa-bbbb-cccc-dddddddddddd::" + "1" * 30]], "device ids are at most 63"),
        ([[f"g::{n}" for n in range(100_000)]], "holds 100000 device ids; at most 10000"),
        ([[f"g::{n}" for n in range(6_000)]] * 2, "holds 12000 device ids; at most 10000"),
        (
            [
                ["GPU-00000000-aaaa-bbbb-cccc-dddddddddddd::1"],
                ["GPU-00000000-aaaa-bbbb-cccc-dddddddddddd::2"],
                ["GPU-00000000-aaaa-bbbb-cccc-dddddddddddd::1"],
            ],
            "vGPU GPU-00000000-aaaa-bbbb-cccc-dddddddddddd::1 is asked for by containers 1 "
            "and 3 of one Allocate request",
        ),
    ],
    ids=[
        "unknown-gpu",
        "unknown-replica",
        "malformed",
        "duplicate",
        "unhealthy",
        "spanning-gpus",
        "empty-container",
        "no-containers",
        "overlong-id",
        "100k-ids",
        "too-many-ids-in-total",
        "same-vgpu-in-two-containers",
    ],
)
def test_allocate_refuses_bad_requests(
    short_tmp_dir: str,
    inventory_factory: Callable[..., Inventory],
    containers: list[list[str]],
    message: str,
) -> None:
    """Bad Allocate requests get INVALID_ARGUMENT with a message for kubectl describe pod,
    and the server keeps serving."""
    node = inventory_factory(replicas=(4, 4, 4))
    node = node.with_reason(node.gpus[1].gpu.uuid, HealthReason.xid_fault(79), present=True)
    with serve(short_tmp_dir, node, MpsGrantPolicy()) as served:
        with pytest.raises(grpc.RpcError) as raised:
            served.allocate(*containers)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in raised.value.details()
        assert_still_serving(served)


class BrokenNode(Node):
    """A node whose Allocate fails with an error no request can cause (a bug)."""

    def allocate(self, vgpu_ids: list[str]) -> Allocation:
        """Fail unexpectedly."""
        raise RuntimeError("the node broke")


def test_allocate_failure_inside_is_internal(short_tmp_dir: str, inventory: Inventory) -> None:
    """An unexpected error while answering becomes INTERNAL with a message; the server lives."""
    server = PluginServer(
        os.path.join(short_tmp_dir, "vgpu.sock"), PluginServicer(BrokenNode(inventory))
    )
    server.start()
    try:
        with grpc.insecure_channel(f"unix://{server.socket_path}") as channel:
            stub = device_plugin_stub(channel)
            request = pb.AllocateRequest(
                container_requests=[
                    pb.ContainerAllocateRequest(devices_ids=[vgpu(inventory, 0, 0)])
                ]
            )
            with pytest.raises(grpc.RpcError) as raised:
                stub.Allocate(request, timeout=PROMPT_S)
            assert raised.value.code() == grpc.StatusCode.INTERNAL
            details = raised.value.details()
            assert "vgpu-agent failed to answer Allocate: RuntimeError: the node broke" in details
            options = stub.GetDevicePluginOptions(pb.Empty(), timeout=PROMPT_S)
            assert options.get_preferred_allocation_available
    finally:
        server.stop()


def test_pre_start_container_answers_empty(served: Served, inventory: Inventory) -> None:
    """PreStartContainer succeeds with an empty response."""
    request = pb.PreStartContainerRequest(devices_ids=[vgpu(inventory, 0, 0)])
    response = served.stub.PreStartContainer(request, timeout=PROMPT_S)
    assert response == pb.PreStartContainerResponse()


def bind_dead_socket(path: str) -> None:
    """Leave a unix socket file at ``path`` that nobody listens on (a crashed process)."""
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()


def test_start_removes_a_stale_socket(short_tmp_dir: str, inventory: Inventory) -> None:
    """A socket file left by a dead process is replaced and served."""
    path = os.path.join(short_tmp_dir, "vgpu.sock")
    bind_dead_socket(path)
    server = PluginServer(path, PluginServicer(Node(inventory)))
    server.start()
    try:
        assert server.socket_exists()
        with grpc.insecure_channel(f"unix://{path}") as channel:
            options = device_plugin_stub(channel).GetDevicePluginOptions(
                pb.Empty(), timeout=PROMPT_S
            )
        assert options.get_preferred_allocation_available
    finally:
        server.stop()


def test_start_refuses_a_socket_served_by_another_process(served: Served) -> None:
    """A second server on a live socket fails with a clear error and leaves the first alone."""
    second = PluginServer(served.server.socket_path, served.servicer)
    with pytest.raises(AgentError, match="another process is serving on that socket"):
        second.start()
    assert served.server.socket_exists()
    assert_still_serving(served)


def test_start_refuses_a_file_in_the_way(short_tmp_dir: str, inventory: Inventory) -> None:
    """A regular file at the socket path is not deleted: the error says to remove it."""
    path = os.path.join(short_tmp_dir, "vgpu.sock")
    with open(path, "w", encoding="utf-8") as in_the_way:
        in_the_way.write("not a socket")
    server = PluginServer(path, PluginServicer(Node(inventory)))
    with pytest.raises(AgentError, match="not a socket is in the way"):
        server.start()
    assert os.path.isfile(path)


def test_start_refuses_an_overlong_socket_path(short_tmp_dir: str, inventory: Inventory) -> None:
    """A socket path over the unix limit fails with an error naming the limit."""
    path = os.path.join(short_tmp_dir, "d" * 120, "vgpu.sock")
    server = PluginServer(path, PluginServicer(Node(inventory)))
    with pytest.raises(AgentError, match="at most 107 bytes"):
        server.start()


def test_stop_removes_the_socket(served: Served) -> None:
    """Stopping removes our socket file; stopping twice is harmless."""
    path = served.server.socket_path
    served.server.stop()
    served.server.stop()
    assert not os.path.exists(path)
    assert not served.server.socket_exists()


def test_socket_exists_notices_deletion(served: Served) -> None:
    """Deleting the socket (as a restarting kubelet does) is seen by socket_exists."""
    assert served.server.socket_exists()
    os.unlink(served.server.socket_path)
    assert not served.server.socket_exists()


def test_stop_leaves_a_socket_that_is_not_ours(served: Served) -> None:
    """If our socket was replaced by someone else's, stop does not delete theirs."""
    path = served.server.socket_path
    os.unlink(path)
    bind_dead_socket(path)
    assert not served.server.socket_exists()
    served.server.stop()
    assert os.path.exists(path)


def test_servicer_serves_again_after_a_server_restart(
    short_tmp_dir: str, inventory: Inventory
) -> None:
    """One servicer behind a new server (as after a kubelet restart) streams normally."""
    servicer = PluginServicer(Node(inventory))
    path = os.path.join(short_tmp_dir, "vgpu.sock")
    for _ in range(2):
        server = PluginServer(path, servicer)
        server.start()
        try:
            with grpc.insecure_channel(f"unix://{path}") as channel:
                stream = device_plugin_stub(channel).ListAndWatch(pb.Empty(), timeout=PROMPT_S)
                assert len(next(stream).devices) == 8
                stream.cancel()
        finally:
            server.stop()
