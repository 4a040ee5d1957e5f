"""The DRA plugin over real unix sockets: registration with the DRA kubelet stand-in,
NodePrepareResources/NodeUnprepareResources of both API versions, the slice publisher
(generations, health, kubelet restart, clean stop), against an in-memory API server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tests.builders import gpu_uuid, make_inventory, vgpu_id
from tests.frontends.test_kubelet import _Output
from tests.harness import wait_until
from vgpu_agent.config.dra import DraConfig
from vgpu_agent.frontends._proto import dra_v1beta1_pb2
from vgpu_agent.frontends._proto import pluginregistration_pb2 as reg_pb
from vgpu_agent.frontends.dra.plugin import DraPlugin
from vgpu_agent.frontends.dra.publisher import GenerationStore, SlicePublisher
from vgpu_agent.frontends.dra.server import DraServer
from vgpu_agent.frontends.dra.slices import DeviceNames
from vgpu_agent.frontends.dra.types import AllocatedDevice, ClaimRef, NodeSlice
from vgpu_agent.model.devices import HealthReason, Inventory, MpsGrantPolicy
from vgpu_agent.model.errors import AgentError, RegistrationError
from vgpu_agent.model.node import Node
from vgpu_agent.standins.dra_kubelet import DraKubeletStandin
from vgpu_agent.standins.resourceapi import InMemoryResourceApi

DRIVER = "vgpu.example.com"
NODE = "node-a"
UID = "0c4f6d8e-1111-2222-3333-444455556666"
WAIT_S = 10.0


def share_name(inventory: Inventory, index: int, replica: int) -> str:
    """The slice device name of a share."""
    names = DeviceNames.of(inventory).vgpu_by_name
    return next(name for name, vgpu in names.items() if vgpu == vgpu_id(index, replica))


@dataclass
class Served:
    """A DRA plugin serving its sockets, a kubelet stand-in and an in-memory API server."""

    plugin: DraPlugin
    node: Node
    api: InMemoryResourceApi
    kubelet: DraKubeletStandin
    dra: DraConfig
    endpoint: Any


@pytest.fixture
def served(short_tmp_dir: str) -> Iterator[Served]:
    """The plugin served and registered with the stand-in kubelet."""
    dra = DraConfig(
        enabled=True,
        driver_name=DRIVER,
        registry_dir=f"{short_tmp_dir}/reg",
        plugins_dir=f"{short_tmp_dir}/plugins",
        cdi_dir=f"{short_tmp_dir}/cdi",
    )
    node = Node(make_inventory((4, 4)), grant_policy=MpsGrantPolicy(pipe_dir_read_only=True))
    api = InMemoryResourceApi()
    plugin = DraPlugin(
        node,
        api,
        dra,
        node_name=NODE,
        state_dir=f"{short_tmp_dir}/state",
        driver_version=lambda: "580.95.05",
        publish_retry_initial_s=0.05,
    )
    kubelet = DraKubeletStandin(dra.registry_dir, wipe_slices=lambda: api.wipe_node(NODE))
    kubelet.start()
    endpoint = plugin.serve()
    plugin.register(lambda: False)
    kubelet.wait_for_registration(1, WAIT_S)
    yield Served(plugin, node, api, kubelet, dra, endpoint)
    kubelet.stop()
    node.close()
    endpoint.stop()


def test_the_kubelet_registers_the_plugin_from_its_registration_socket(served: Served) -> None:
    """GetInfo names a DRAPlugin for the driver on the endpoint, v1 first; the kubelet
    accepts it and the agent sees the acceptance."""
    registration = served.kubelet.wait_for_registration(1, WAIT_S)
    assert registration.driver == DRIVER
    assert registration.endpoint == served.dra.plugin_socket_path
    assert registration.service == "v1.DRAPlugin"
    assert registration.socket_path == f"{served.dra.registry_dir}/{DRIVER}-reg.sock"
    assert served.plugin.status.snapshot() == (1, 0)
    with grpc.insecure_channel(f"unix://{registration.socket_path}") as channel:
        info = channel.unary_unary(
            "/pluginregistration.Registration/GetInfo",
            request_serializer=reg_pb.InfoRequest.SerializeToString,
            response_deserializer=reg_pb.PluginInfo.FromString,
        )(reg_pb.InfoRequest(), timeout=5)
    assert (info.type, list(info.supported_versions)) == (
        "DRAPlugin",
        ["v1.DRAPlugin", "v1beta1.DRAPlugin"],
    )


def test_a_claim_is_prepared_and_unprepared_through_the_kubelet(served: Served) -> None:
    """NodePrepareResources answers the claim's devices and CDI id; its spec file exists
    until NodeUnprepareResources."""
    inventory = served.node.inventory()
    device = share_name(inventory, 1, 3)
    served.api.add_claim("ns", "c", UID, [AllocatedDevice("gpu", DRIVER, NODE, device)])
    claim = ClaimRef("ns", "c", UID)
    answers = served.kubelet.prepare(DRIVER, [claim])
    assert answers[UID].error == ""
    assert answers[UID].devices == (
        {
            "request_names": ["gpu"],
            "pool_name": NODE,
            "device_name": device,
            "cdi_device_ids": [f"{DRIVER}/vgpu={UID}"],
        },
    )
    spec_path = f"{served.dra.cdi_dir}/{DRIVER}-claim-{UID}.json"
    assert os.path.exists(spec_path)
    assert served.kubelet.unprepare(DRIVER, [claim]) == {UID: ""}
    assert not os.path.exists(spec_path)


def test_the_v1beta1_service_answers_like_v1(served: Served) -> None:
    """A kubelet speaking v1beta1 gets the same per-claim answers."""
    served.api.add_claim(
        "ns",
        "c",
        UID,
        [AllocatedDevice("gpu", DRIVER, NODE, share_name(served.node.inventory(), 0, 0))],
    )
    pb: Any = dra_v1beta1_pb2
    with grpc.insecure_channel(f"unix://{served.dra.plugin_socket_path}") as channel:
        prepare = channel.unary_unary(
            "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodePrepareResources",
            request_serializer=pb.NodePrepareResourcesRequest.SerializeToString,
            response_deserializer=pb.NodePrepareResourcesResponse.FromString,
        )
        response = prepare(
            pb.NodePrepareResourcesRequest(
                claims=[
                    pb.Claim(namespace="ns", name="c", uid=UID),
                    pb.Claim(namespace="ns", name="gone", uid="x-1"),
                ]
            ),
            timeout=5,
        )
    assert response.claims[UID].error == ""
    assert list(response.claims[UID].devices[0].cdi_device_ids) == [f"{DRIVER}/vgpu={UID}"]
    assert "has no such claim" in response.claims["x-1"].error


def test_a_request_that_does_not_parse_is_invalid_argument(served: Served) -> None:
    """Bytes that are no request message are refused as INVALID_ARGUMENT, not INTERNAL."""
    with grpc.insecure_channel(f"unix://{served.dra.plugin_socket_path}") as channel:
        call = channel.unary_unary("/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources")
        with pytest.raises(grpc.RpcError) as failure:
            call(b"\xff\xff\xff", timeout=5)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_slice_is_published_and_follows_health(served: Served) -> None:
    """The node's slice holds every share; a GPU turning Unhealthy drops its shares at a
    higher pool generation, and healing brings them back."""
    first = served.api.wait_for_slice(DRIVER, NODE, lambda s: len(s.devices) == 8, WAIT_S)
    assert first.pool == NODE
    reason = HealthReason.xid_fault(79)
    served.node.set_health(gpu_uuid(1), reason, True)
    sick = served.api.wait_for_slice(DRIVER, NODE, lambda s: len(s.devices) == 4, WAIT_S)
    assert sick.generation > first.generation
    assert {d.attributes["uuid"] for d in sick.devices} == {gpu_uuid(0)}
    served.node.set_health(gpu_uuid(1), reason, False)
    healed = served.api.wait_for_slice(DRIVER, NODE, lambda s: len(s.devices) == 8, WAIT_S)
    assert healed.generation > sick.generation


def test_the_slice_is_republished_after_a_kubelet_restart(served: Served) -> None:
    """A restarting kubelet wipes the node's slices and registers the plugin again; the
    plugin publishes the slice again."""
    served.api.wait_for_slice(DRIVER, NODE, timeout_s=WAIT_S)
    served.kubelet.restart()
    served.kubelet.wait_for_registration(1, WAIT_S)
    again = served.api.wait_for_slice(DRIVER, NODE, timeout_s=WAIT_S)
    assert len(again.devices) == 8
    assert served.plugin.status.snapshot()[0] == 2


def test_a_clean_stop_deletes_the_slices_and_the_sockets(served: Served) -> None:
    """Closing the node (the agent stopping) and stopping the endpoint deletes the slice
    and removes both sockets."""
    served.api.wait_for_slice(DRIVER, NODE, timeout_s=WAIT_S)
    served.node.close()
    served.endpoint.stop()
    assert served.api.slice_of(DRIVER, NODE) is None
    assert (DRIVER, NODE) in served.api.deletions
    assert not os.path.exists(served.dra.registration_socket_path)
    assert not os.path.exists(served.dra.plugin_socket_path)


def test_registration_fails_when_the_kubelet_refuses(short_tmp_dir: str) -> None:
    """A refusal from the kubelet ends the wait with the kubelet's reason."""
    dra = DraConfig(
        driver_name=DRIVER, registry_dir=f"{short_tmp_dir}/r", plugins_dir=f"{short_tmp_dir}/p"
    )
    plugin = DraPlugin(
        Node(make_inventory((1,))),
        InMemoryResourceApi(),
        dra,
        node_name=NODE,
        state_dir=short_tmp_dir,
    )
    plugin.status.record(False, "no handler registered for plugin type: X")
    with pytest.raises(RegistrationError, match="the kubelet refused: no handler"):
        plugin.status.wait_after((0, 0), 1.0, lambda: False, "registering")
    with pytest.raises(RegistrationError, match="did not call within"):
        plugin.status.wait_after(plugin.status.snapshot(), 0.05, lambda: False, "registering")


# -- the publisher alone --------------------------------------------------------------------


def _build(inventory: Inventory, generation: int) -> NodeSlice:
    from vgpu_agent.frontends.dra.slices import node_slice

    return node_slice(inventory, driver=DRIVER, node_name=NODE, generation=generation, policy=None)


def test_a_failed_publish_is_retried_and_generations_continue_after_a_restart(
    short_tmp_dir: str,
) -> None:
    """The publisher retries until the API server takes the slice; a new publisher (an
    agent restart) continues from the recorded generation."""
    node = Node(make_inventory((2,)))
    api = InMemoryResourceApi()
    api.fail_publish = "the server is unavailable"
    store = GenerationStore(short_tmp_dir)
    publisher = SlicePublisher(
        node, api, _build, driver=DRIVER, node_name=NODE, generations=store, retry_initial_s=0.02
    )
    publisher.start()
    wait_until(lambda: publisher.publishes == 0 and api.published == [], 1.0)
    api.fail_publish = None
    first = api.wait_for_slice(DRIVER, NODE, timeout_s=WAIT_S)
    publisher.stop()
    assert api.deletions == []  # not a clean stop: the node is open
    again = SlicePublisher(node, api, _build, driver=DRIVER, node_name=NODE, generations=store)
    again.start()
    wait_until(lambda: again.publishes >= 1, WAIT_S, "the second publisher's first publish")
    assert api.published[-1].generation == first.generation + 1
    node.close()
    again.stop()
    assert api.deletions == [(DRIVER, NODE)]


# -- the sockets ----------------------------------------------------------------------------


def _server(directory: str) -> DraServer:
    return DraServer(f"{directory}/reg/d-reg.sock", f"{directory}/plugins/d/dra.sock", [])


def test_serving_refuses_a_file_in_the_way(short_tmp_dir: str) -> None:
    """A regular file where a socket goes is not removed: the error says to remove it."""
    os.makedirs(f"{short_tmp_dir}/plugins/d")
    with open(f"{short_tmp_dir}/plugins/d/dra.sock", "w") as stray:
        stray.write("not a socket")
    with pytest.raises(AgentError, match="a file that is not a socket is in the way"):
        _server(short_tmp_dir).start()


def test_serving_refuses_a_socket_another_process_serves(short_tmp_dir: str) -> None:
    """A second server on live sockets is refused; the first keeps its sockets."""
    first = _server(short_tmp_dir)
    first.start()
    try:
        with pytest.raises(AgentError, match="another process serves there"):
            _server(short_tmp_dir).start()
        assert first.socket_exists()
    finally:
        first.stop()
    assert not os.path.exists(first.plugin_socket)


def test_a_stale_socket_is_replaced(short_tmp_dir: str) -> None:
    """A socket nobody listens on (a crashed agent's) is removed and served anew."""
    os.makedirs(f"{short_tmp_dir}/plugins/d")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(f"{short_tmp_dir}/plugins/d/dra.sock")
    stale.close()
    server = _server(short_tmp_dir)
    server.start()
    try:
        assert server.socket_exists()
    finally:
        server.stop()


def test_a_socket_path_too_long_is_refused(short_tmp_dir: str) -> None:
    """A path over the unix socket limit is refused with the limit named."""
    server = DraServer(f"{short_tmp_dir}/{'r' * 120}/x-reg.sock", f"{short_tmp_dir}/p.sock", [])
    with pytest.raises(AgentError, match="at most 107 bytes"):
        server.start()


def test_bad_registration_and_oversized_requests_are_invalid_argument(served: Served) -> None:
    """A RegistrationStatus that does not parse, and a request of too many claims, are
    INVALID_ARGUMENT."""
    registration = served.dra.registration_socket_path
    with grpc.insecure_channel(f"unix://{registration}") as channel:
        notify = channel.unary_unary("/pluginregistration.Registration/NotifyRegistrationStatus")
        with pytest.raises(grpc.RpcError) as bad_status:
            notify(b"\xff\xff", timeout=5)
    assert bad_status.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    too_many = [ClaimRef("ns", f"c{n}", f"u-{n}") for n in range(1001)]
    with pytest.raises(grpc.RpcError) as oversized:
        served.kubelet.unprepare(DRIVER, too_many)
    assert oversized.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1000" in str(oversized.value.details())


def test_the_plugin_sees_the_registry_directory_and_survives_a_failing_driver_version(
    short_tmp_dir: str,
) -> None:
    """No registry directory (no kubelet) is no identity; a driver version that cannot be
    read leaves the attribute out; the kubelet's refusal ends the registration wait."""

    def broken_version() -> str:
        raise RuntimeError("NVML is gone")

    dra = DraConfig(
        driver_name=DRIVER, registry_dir=f"{short_tmp_dir}/r", plugins_dir=f"{short_tmp_dir}/p"
    )
    plugin = DraPlugin(
        Node(make_inventory((2,))),
        InMemoryResourceApi(),
        dra,
        node_name=NODE,
        state_dir=short_tmp_dir,
        driver_version=broken_version,
    )
    assert plugin.registry_identity() is None
    os.makedirs(dra.registry_dir)
    assert plugin.registry_identity() is not None
    built = plugin.build_slice(plugin.node.inventory(), 1)
    assert all("driverVersion" not in device.attributes for device in built.devices)
    endpoint = plugin.serve()
    try:
        with grpc.insecure_channel(f"unix://{dra.registration_socket_path}") as channel:
            channel.unary_unary(
                "/pluginregistration.Registration/NotifyRegistrationStatus",
                request_serializer=reg_pb.RegistrationStatus.SerializeToString,
                response_deserializer=reg_pb.RegistrationStatusResponse.FromString,
            )(reg_pb.RegistrationStatus(plugin_registered=False, error="no handler"), timeout=5)
        assert plugin.status.snapshot() == (0, 1)
        with pytest.raises(RegistrationError, match="the kubelet refused: no handler"):
            plugin.register(lambda: False)
    finally:
        plugin.node.close()
        endpoint.stop()


def test_after_a_registration_a_late_wipe_is_repaired_quickly(short_tmp_dir: str) -> None:
    """A starting kubelet's wipe may land after it registered us: for a while after each
    registration the slice is republished often, so it comes back without a resync wait."""
    node = Node(make_inventory((2,)))
    api = InMemoryResourceApi()
    publisher = SlicePublisher(
        node,
        api,
        _build,
        driver=DRIVER,
        node_name=NODE,
        generations=GenerationStore(short_tmp_dir),
        resync_interval_s=3600.0,
        fast_resync_s=0.05,
        fast_resync_for_s=30.0,
    )
    publisher.start()
    first = api.wait_for_slice(DRIVER, NODE, timeout_s=WAIT_S)
    publisher.republish()
    wait_until(lambda: publisher.publishes >= 2, WAIT_S, "the republish")
    api.wipe_node(NODE)  # the kubelet's late startup wipe
    again = api.wait_for_slice(DRIVER, NODE, timeout_s=5.0)
    assert again.generation == first.generation  # the same content, no new generation
    node.close()
    publisher.stop()


def test_the_dra_kubelet_standin_runs_as_a_program(short_tmp_dir: str) -> None:
    """`python3 -m vgpu_agent.standins.dra_kubelet` registers a plugin whose socket appears,
    registers it again after SIGHUP (a kubelet restart) and exits 0 on SIGTERM."""
    dra = DraConfig(
        driver_name=DRIVER, registry_dir=f"{short_tmp_dir}/r", plugins_dir=f"{short_tmp_dir}/p"
    )
    node = Node(make_inventory((2,)))
    plugin = DraPlugin(node, InMemoryResourceApi(), dra, node_name=NODE, state_dir=short_tmp_dir)
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vgpu_agent.standins.dra_kubelet",
            "--registry-dir",
            dra.registry_dir,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as process:
        output = _Output(process)
        endpoint = None
        try:
            output.read_until("watching")
            endpoint = plugin.serve()
            output.read_until(f"registered {DRIVER} service=v1.DRAPlugin")
            process.send_signal(signal.SIGHUP)
            output.read_until("restarted")
            output.read_until(f"registered {DRIVER} service=v1.DRAPlugin")
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=WAIT_S) == 0
            output.read_until("stopped")
        finally:
            if process.poll() is None:
                process.kill()
            node.close()
            if endpoint is not None:
                endpoint.stop()
    assert plugin.status.snapshot() == (2, 0)
