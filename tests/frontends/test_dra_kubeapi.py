"""The DRA frontend's API-server client (lightkube) against the stand-in API server over real
HTTP: publishing, republishing and deleting the node's ResourceSlices, reading claims, the
node's own identity, kubeconfig files, and every error turned into one clear DraApiError."""

from __future__ import annotations

import http.server
import json
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from vgpu_agent.frontends.dra import kubeapi
from vgpu_agent.frontends.dra.kubeapi import (
    CONFLICT_ATTEMPTS,
    MAX_DEVICES_PER_SLICE,
    KubeResourceApi,
    slice_name,
)
from vgpu_agent.frontends.dra.types import (
    AllocatedDevice,
    AttributeValue,
    ClaimNotFoundError,
    DraApiError,
    NodeSlice,
    ResourceApi,
    SemVer,
    SliceDevice,
)
from vgpu_agent.standins.apiserver.server import ApiServerStandIn

DRIVER = "vgpu.eks.amazonaws.com"
NODE = "ip-10-0-1-2.us-west-2.compute.internal"
OTHER_NODE = "ip-10-0-9-9.us-west-2.compute.internal"
NODE_TOKEN = "node-token"  # noqa: S105 - a test token
SLICE = f"{NODE}-vgpu-eks-amazonaws-com"


def share(gpu: int, index: int, **attributes: AttributeValue) -> SliceDevice:
    """One vGPU of a GPU, with a memory capacity."""
    return SliceDevice(
        name=f"gpu-{gpu}-vgpu-{index}",
        attributes={"uuid": f"GPU-{gpu:08d}", "index": gpu, **attributes},
        capacity={"memory": "10194Mi"},
    )


def node_slice(
    devices: tuple[SliceDevice, ...], generation: int = 1, node: str = NODE
) -> NodeSlice:
    """The node's pool of ``devices`` at ``generation``."""
    return NodeSlice(
        driver=DRIVER, node_name=node, pool=node, generation=generation, devices=devices
    )


@pytest.fixture
def server() -> Iterator[ApiServerStandIn]:
    """A stand-in API server knowing the node (and another), the node's token mapped to its
    identity; requests without a token act as an administrator."""
    with ApiServerStandIn(tokens={NODE_TOKEN: f"system:node:{NODE}"}) as standin:
        standin.add_node(NODE)
        standin.add_node(OTHER_NODE)
        yield standin


@pytest.fixture
def api(server: ApiServerStandIn) -> Iterator[KubeResourceApi]:
    """The client acting as the node itself (system:node:<NODE>)."""
    client = KubeResourceApi.for_server(server.url, token=NODE_TOKEN)
    yield client
    client.close()


def writes(server: ApiServerStandIn) -> list[tuple[str, str]]:
    """The requests that changed something."""
    return [request for request in server.requests if request[0] != "GET"]


def test_it_is_a_resource_api(api: KubeResourceApi) -> None:
    """KubeResourceApi satisfies the ResourceApi Protocol the kubelet half is written against."""
    resource_api: ResourceApi = api
    assert resource_api is api


# -- publishing -------------------------------------------------------------------------------


def test_publish_creates_the_node_slice_in_dra_form(
    server: ApiServerStandIn, api: KubeResourceApi
) -> None:
    """The first publish creates one slice named after node and driver, owned by the Node,
    with the pool, the node, and each attribute as exactly one typed DRA value."""
    device = share(0, 0, mps=True, driverVersion=SemVer("580.95.5"), model="H100")
    api.publish_slice(node_slice((device, share(0, 1))))

    slices = server.slices()
    assert list(slices) == [SLICE]
    stored = slices[SLICE]
    assert stored["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "name": NODE,
            "uid": server.node_uid(NODE),
            "controller": True,
        }
    ]
    spec = stored["spec"]
    assert spec["driver"] == DRIVER
    assert spec["nodeName"] == NODE
    assert spec["pool"] == {"name": NODE, "generation": 1, "resourceSliceCount": 1}
    assert [d["name"] for d in spec["devices"]] == ["gpu-0-vgpu-0", "gpu-0-vgpu-1"]
    assert spec["devices"][0]["attributes"] == {
        "uuid": {"string": "GPU-00000000"},
        "index": {"int": 0},
        "mps": {"bool": True},
        "driverVersion": {"version": "580.95.5"},
        "model": {"string": "H100"},
    }
    assert spec["devices"][0]["capacity"] == {"memory": {"value": "10194Mi"}}
    assert stored["metadata"]["generation"] == 1


def test_republish_with_a_new_generation_updates_the_slice(
    server: ApiServerStandIn, api: KubeResourceApi
) -> None:
    """A new pool generation (a GPU went unhealthy: fewer devices) replaces the slice in
    place: same object, new devices and generation, a new resourceVersion."""
    api.publish_slice(node_slice((share(0, 0), share(1, 0)), generation=1))
    first = server.slices()[SLICE]

    api.publish_slice(node_slice((share(0, 0),), generation=2))

    second = server.slices()[SLICE]
    assert second["metadata"]["uid"] == first["metadata"]["uid"]
    assert second["spec"]["pool"]["generation"] == 2
    assert [d["name"] for d in second["spec"]["devices"]] == ["gpu-0-vgpu-0"]
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    assert second["metadata"]["generation"] == 2
    assert ("PUT", f"/apis/resource.k8s.io/v1/resourceslices/{SLICE}") in writes(server)


def test_republishing_the_same_slice_writes_nothing(
    server: ApiServerStandIn, api: KubeResourceApi
) -> None:
    """Publishing what is already there reads and stops: no update, no new resourceVersion."""
    devices = (share(0, 0, mps=True),)
    api.publish_slice(node_slice(devices))
    version = server.slices()[SLICE]["metadata"]["resourceVersion"]
    before = len(writes(server))

    api.publish_slice(node_slice(devices))

    assert len(writes(server)) == before
    assert server.slices()[SLICE]["metadata"]["resourceVersion"] == version


def test_a_node_registered_again_gets_its_slices_reowned(
    server: ApiServerStandIn, api: KubeResourceApi
) -> None:
    """A Node deleted and registered again (a new uid) owns the slices at the next publish,
    so the garbage collector does not take them for orphans."""
    api.publish_slice(node_slice((share(0, 0),)))
    new_uid = server.add_node(NODE)
    api.publish_slice(node_slice((share(0, 0),)))
    assert server.slices()[SLICE]["metadata"]["ownerReferences"][0]["uid"] == new_uid


def test_an_unregistered_node_is_named(server: ApiServerStandIn) -> None:
    """Publishing for a node the kubelet has not registered says so (seen by an identity
    that may read any Node: a node's own identity gets a 403 for any other name)."""
    admin = KubeResourceApi.for_server(server.url)
    try:
        with pytest.raises(DraApiError) as caught:
            admin.publish_slice(node_slice((share(0, 0),), node="not-registered"))
    finally:
        admin.close()
    assert str(caught.value) == (
        "reading Node not-registered (the owner of its ResourceSlices): no such Node: the "
        "kubelet has not registered this node (yet), or the node name given to the agent is "
        "not the kubelet's"
    )


def test_an_empty_pool_is_published_without_devices(
    server: ApiServerStandIn, api: KubeResourceApi
) -> None:
    """A node with no servable GPU still publishes its pool, with no devices."""
    api.publish_slice(node_slice(()))

    spec = server.slices()[SLICE]["spec"]
    assert "devices" not in spec
    assert spec["pool"]["resourceSliceCount"] == 1


def test_more_devices_than_one_slice_holds_are_split_and_shrunk_back(
    server: ApiServerStandIn, api: KubeResourceApi
) -> None:
    """Over 128 devices (8 GPUs x 20 vGPUs) go into several slices of one pool, each counting
    them all; when the pool shrinks again the extra slice is deleted."""
    many = tuple(share(gpu, index) for gpu in range(8) for index in range(20))
    api.publish_slice(node_slice(many))

    slices = server.slices()
    assert sorted(slices) == [SLICE, f"{SLICE}-1"]
    assert [len(slices[name]["spec"]["devices"]) for name in (SLICE, f"{SLICE}-1")] == [
        MAX_DEVICES_PER_SLICE,
        160 - MAX_DEVICES_PER_SLICE,
    ]
    assert {s["spec"]["pool"]["resourceSliceCount"] for s in slices.values()} == {2}

    api.publish_slice(node_slice(many[:10], generation=2))

    slices = server.slices()
    assert list(slices) == [SLICE]
    assert slices[SLICE]["spec"]["pool"] == {
        "name": NODE,
        "generation": 2,
        "resourceSliceCount": 1,
    }


def test_a_stale_slice_of_the_node_is_removed(
    server: ApiServerStandIn, api: KubeResourceApi
) -> None:
    """A slice of this node and driver under another name (left by an older agent) goes."""
    server.put_slice(
        {
            "metadata": {"name": "leftover"},
            "spec": {
                "driver": DRIVER,
                "nodeName": NODE,
                "pool": {"name": NODE, "generation": 0, "resourceSliceCount": 1},
            },
        }
    )
    api.publish_slice(node_slice((share(0, 0),)))
    assert list(server.slices()) == [SLICE]


def test_update_conflicts_are_retried_from_a_fresh_read(
    server: ApiServerStandIn, api: KubeResourceApi
) -> None:
    """Another writer changing the slice between read and write (409) costs a retry, not an
    error."""
    api.publish_slice(node_slice((share(0, 0),)))
    server.inject_conflicts(CONFLICT_ATTEMPTS - 1)

    api.publish_slice(node_slice((share(0, 1),), generation=2))

    assert server.slices()[SLICE]["spec"]["pool"]["generation"] == 2
    puts = [request for request in writes(server) if request[0] == "PUT"]
    assert len(puts) == CONFLICT_ATTEMPTS


def test_endless_conflicts_end_in_a_clear_error(
    server: ApiServerStandIn, api: KubeResourceApi
) -> None:
    """A slice that keeps changing under us fails after the retries, saying so."""
    api.publish_slice(node_slice((share(0, 0),)))
    server.inject_conflicts(CONFLICT_ATTEMPTS)

    with pytest.raises(DraApiError) as caught:
        api.publish_slice(node_slice((share(0, 1),), generation=2))

    message = str(caught.value)
    assert message.startswith(f"publishing ResourceSlice {SLICE}: 409 Conflict: ")
    assert f"tried {CONFLICT_ATTEMPTS} times" in message


def test_a_slice_the_server_finds_invalid_is_a_clear_error(api: KubeResourceApi) -> None:
    """The server's 422 (two devices of one name) names the slice, the cause and whose bug."""
    with pytest.raises(DraApiError) as caught:
        api.publish_slice(node_slice((share(0, 0), share(0, 0))))
    message = str(caught.value)
    assert message.startswith(f"publishing ResourceSlice {SLICE}: 422 Invalid: ")
    assert 'spec.devices[1].name: Duplicate value: "gpu-0-vgpu-0"' in message
    assert "a bug in the agent" in message


# -- deleting -----------------------------------------------------------------------------------


def test_delete_slices_removes_only_this_node_and_driver(
    server: ApiServerStandIn, api: KubeResourceApi
) -> None:
    """A clean stop deletes the node's slices of our driver; another node's and another
    driver's stay."""
    admin = KubeResourceApi.for_server(server.url)
    try:
        admin.publish_slice(node_slice((share(0, 0),), node=OTHER_NODE))
        admin.publish_slice(
            NodeSlice(driver="gpu.nvidia.com", node_name=NODE, pool=NODE, generation=1, devices=())
        )
    finally:
        admin.close()
    many = tuple(share(gpu, index) for gpu in range(2) for index in range(70))
    api.publish_slice(node_slice(many))
    assert len(server.slices()) == 4

    api.delete_slices(DRIVER, NODE)

    assert sorted(server.slices()) == [
        f"{NODE}-gpu-nvidia-com",
        f"{OTHER_NODE}-vgpu-eks-amazonaws-com",
    ]
    api.delete_slices(DRIVER, NODE)  # nothing left: no error


# -- claims --------------------------------------------------------------------------------------


def test_get_claim_reads_the_allocation_of_every_driver(
    server: ApiServerStandIn, api: KubeResourceApi
) -> None:
    """An allocated claim of a pod on this node comes back with its uid and every result (the
    caller keeps its driver's)."""
    results = [
        AllocatedDevice(request="vgpu", driver=DRIVER, pool=NODE, device="gpu-0-vgpu-3"),
        AllocatedDevice(request="nic", driver="net.example.com", pool="p", device="eth1"),
    ]
    uid = server.add_claim("team-a", "train-vgpu-x7k2", node=NODE, results=results)

    claim = api.get_claim("team-a", "train-vgpu-x7k2")

    assert claim.ref.uid == uid
    assert (claim.ref.namespace, claim.ref.name) == ("team-a", "train-vgpu-x7k2")
    assert claim.allocated
    assert claim.devices == tuple(results)


def test_an_unallocated_claim_says_so(server: ApiServerStandIn, api: KubeResourceApi) -> None:
    """A claim without status.allocation reads as not allocated, with no devices."""
    server.add_claim("team-a", "pending", node=NODE)
    claim = api.get_claim("team-a", "pending")
    assert not claim.allocated
    assert claim.devices == ()


def test_a_missing_claim_is_claim_not_found(server: ApiServerStandIn, api: KubeResourceApi) -> None:
    """A claim of a pod on this node that was deleted raises ClaimNotFoundError naming it."""
    server.add_claim("team-a", "gone", node=NODE, results=[])
    server.remove_claim("team-a", "gone")
    with pytest.raises(ClaimNotFoundError) as caught:
        api.get_claim("team-a", "gone")
    assert str(caught.value).startswith("reading ResourceClaim team-a/gone: not found")


# -- the node's own identity ------------------------------------------------------------------


def test_the_node_identity_suffices_for_everything_the_agent_does(
    server: ApiServerStandIn, api: KubeResourceApi
) -> None:
    """As system:node:<name>, under the Node authorizer's rules, the agent publishes, lists,
    deletes its slices and reads its pods' claims (the credentials finding, exercised)."""
    server.add_claim("team-a", "mine", node=NODE, results=[])
    api.publish_slice(node_slice((share(0, 0),)))
    api.publish_slice(node_slice((share(0, 1),), generation=2))
    assert api.get_claim("team-a", "mine").allocated
    api.delete_slices(DRIVER, NODE)
    assert server.slices() == {}


def test_publishing_for_another_node_is_a_clear_403(api: KubeResourceApi) -> None:
    """NodeRestriction's refusal names the slice, the status and where to read about it."""
    with pytest.raises(DraApiError) as caught:
        api.publish_slice(node_slice((share(0, 0),), node=OTHER_NODE))
    message = str(caught.value)
    # The Node object of another node is the first thing the node may not read.
    assert message.startswith(f"reading Node {OTHER_NODE} (the owner of its ResourceSlices): ")
    assert "403 Forbidden" in message
    assert f'User "system:node:{NODE}" cannot get resource "nodes"' in message
    assert "system:node:<node name>" in message
    assert "see docs/dra.md" in message


def test_a_claim_of_a_pod_on_another_node_is_forbidden(
    server: ApiServerStandIn, api: KubeResourceApi
) -> None:
    """The Node authorizer hides claims of other nodes' pods: a 403, not ClaimNotFoundError."""
    server.add_claim("team-a", "theirs", node=OTHER_NODE, results=[])
    with pytest.raises(DraApiError) as caught:
        api.get_claim("team-a", "theirs")
    assert not isinstance(caught.value, ClaimNotFoundError)
    assert str(caught.value).startswith("reading ResourceClaim team-a/theirs: 403 Forbidden: ")
    assert "no relationship found between node" in str(caught.value)


def test_a_refused_token_is_a_clear_401(server: ApiServerStandIn) -> None:
    """Credentials the server does not accept name the cause (expired certificate or token)."""
    api = KubeResourceApi.for_server(server.url, token="expired")  # noqa: S106 - a test token
    try:
        with pytest.raises(DraApiError) as caught:
            api.get_claim("team-a", "any")
    finally:
        api.close()
    message = str(caught.value)
    assert message.startswith("reading ResourceClaim team-a/any: 401 Unauthorized")
    assert "expired client certificate or token" in message


# -- servers that cannot help -------------------------------------------------------------------


def test_a_cluster_without_resource_v1_is_named() -> None:
    """A 404 for the API itself (Kubernetes before 1.34) is not ClaimNotFoundError: it says
    what is missing."""
    with ApiServerStandIn(serves_resource_v1=False) as server:
        api = KubeResourceApi.for_server(server.url)
        try:
            with pytest.raises(DraApiError) as caught:
                api.get_claim("team-a", "any")
        finally:
            api.close()
    assert not isinstance(caught.value, ClaimNotFoundError)
    assert "does not serve resource.k8s.io/v1: DRA needs Kubernetes 1.34" in str(caught.value)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_server_is_a_clear_error() -> None:
    """Nothing listening: the error names the action and the server's address."""
    url = f"http://127.0.0.1:{free_port()}"
    api = KubeResourceApi.for_server(url, timeout_s=2.0)
    try:
        with pytest.raises(DraApiError) as caught:
            api.delete_slices(DRIVER, NODE)
    finally:
        api.close()
    message = str(caught.value)
    assert message.startswith(f"listing the ResourceSlices of driver {DRIVER} on node {NODE}: ")
    assert f"cannot reach the API server at {url}" in message


class _HtmlErrorHandler(http.server.BaseHTTPRequestHandler):
    """A proxy in front of the API server, answering every request with an HTML 502."""

    def do_GET(self) -> None:
        body = b"<html><body>502 Bad Gateway</body></html>"
        self.send_response(502)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Quiet."""


def test_an_error_that_is_not_a_status_is_named() -> None:
    """A proxy's HTML error page becomes a DraApiError, not a JSON traceback."""
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HtmlErrorHandler)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        api = KubeResourceApi.for_server(f"http://127.0.0.1:{proxy.server_address[1]}")
        try:
            with pytest.raises(DraApiError) as caught:
                api.get_claim("team-a", "any")
        finally:
            api.close()
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert str(caught.value) == (
        "reading ResourceClaim team-a/any: the API server at "
        f"http://127.0.0.1:{proxy.server_address[1]} answered 502 Bad Gateway with a body "
        "that is not a Kubernetes Status (a proxy in between?)"
    )


# -- kubeconfig files --------------------------------------------------------------------------


def write_kubeconfig(
    path: Path, server_url: str, user: Optional[dict[str, Any]], context: bool = True
) -> Path:
    """A kubeconfig like the kubelet's: one cluster, one user, one current context."""
    config: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "eks", "cluster": {"server": server_url}}],
        "contexts": [{"name": "kubelet", "context": {"cluster": "eks", "user": "kubelet"}}],
        "users": [{"name": "kubelet", "user": user}] if user is not None else [],
    }
    if context:
        config["current-context"] = "kubelet"
    if user is None:
        del config["contexts"][0]["context"]["user"]
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_from_kubeconfig_uses_the_node_token(server: ApiServerStandIn, tmp_path: Path) -> None:
    """A kubeconfig file with the node's token acts as the node."""
    path = write_kubeconfig(tmp_path / "kubeconfig", server.url, {"token": NODE_TOKEN})
    api = kubeapi.from_kubeconfig(path)
    try:
        api.publish_slice(node_slice((share(0, 0),)))
    finally:
        api.close()
    assert list(server.slices()) == [SLICE]


def test_refused_credentials_are_read_again_from_the_kubeconfig(
    server: ApiServerStandIn, tmp_path: Path
) -> None:
    """A 401 makes the client read the kubeconfig again once (the kubelet rotated its
    credentials since the agent started) and the request goes through."""
    path = write_kubeconfig(tmp_path / "kubeconfig", server.url, {"token": "rotated-away"})
    api = KubeResourceApi.from_kubeconfig(path)
    write_kubeconfig(path, server.url, {"token": NODE_TOKEN})
    server.add_claim("team-a", "mine", node=NODE, results=[])
    try:
        assert api.get_claim("team-a", "mine").allocated
        api.publish_slice(node_slice((share(0, 0),)))
    finally:
        api.close()
    assert list(server.slices()) == [SLICE]


def exec_user(token_script: str) -> dict[str, Any]:
    """A kubeconfig user whose token comes from a credential plugin, as on EKS nodes
    (aws-iam-authenticator / aws eks get-token), played by a Python one-liner."""
    return {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": sys.executable,
            "args": ["-c", token_script],
        }
    }


def test_from_kubeconfig_runs_an_exec_credential_plugin(
    server: ApiServerStandIn, tmp_path: Path
) -> None:
    """The token of an exec credential plugin (the EKS kubelet's kind) is used."""
    credential = json.dumps(
        {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "kind": "ExecCredential",
            "status": {"token": NODE_TOKEN},
        }
    )
    path = write_kubeconfig(
        tmp_path / "kubeconfig", server.url, exec_user(f"print({credential!r})")
    )
    server.add_claim("team-a", "mine", node=NODE, results=[])
    api = KubeResourceApi.from_kubeconfig(path)
    try:
        assert api.get_claim("team-a", "mine").allocated
    finally:
        api.close()


def test_a_failing_credential_plugin_is_named(server: ApiServerStandIn, tmp_path: Path) -> None:
    """A credential plugin that fails names the kubeconfig and the plugin's complaint."""
    path = write_kubeconfig(
        tmp_path / "kubeconfig",
        server.url,
        exec_user("import sys; sys.exit('no IMDS credentials')"),
    )
    api = KubeResourceApi.from_kubeconfig(path)
    try:
        with pytest.raises(DraApiError) as caught:
            api.get_claim("team-a", "any")
    finally:
        api.close()
    message = str(caught.value)
    assert f"getting the node's credentials from {path} failed" in message
    assert "no IMDS credentials" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "not found (give the node's kubelet kubeconfig)"),
        ("clusters: [unclosed", "not a kubeconfig"),
        ("just text", "not a kubeconfig"),
        ("no-context", "No current context set"),
        ("no-user", "its context names no user"),
    ],
    ids=["missing", "bad-yaml", "not-a-mapping", "no-current-context", "no-user"],
)
def test_unusable_kubeconfigs_are_named(
    tmp_path: Path, content: Optional[str], expected: str
) -> None:
    """Each unusable kubeconfig is an error naming the file and what is wrong with it."""
    path = tmp_path / "kubeconfig"
    if content == "no-context":
        write_kubeconfig(path, "http://127.0.0.1:1", {"token": "t"}, context=False)
    elif content == "no-user":
        write_kubeconfig(path, "http://127.0.0.1:1", None)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DraApiError) as caught:
        KubeResourceApi.from_kubeconfig(path)
    assert str(caught.value).startswith(f"reading the kubeconfig {path}: ")
    assert expected in str(caught.value)


def test_a_missing_client_certificate_is_named(tmp_path: Path) -> None:
    """A kubeconfig naming certificate files that are not there fails when it is read."""
    path = write_kubeconfig(
        tmp_path / "kubeconfig",
        "https://127.0.0.1:1",
        {
            "client-certificate": str(tmp_path / "kubelet-client-current.pem"),
            "client-key": str(tmp_path / "kubelet-client-current.pem"),
        },
    )
    with pytest.raises(DraApiError) as caught:
        KubeResourceApi.from_kubeconfig(path)
    assert str(caught.value).startswith(f"reading the kubeconfig {path}: ")


# -- names ----------------------------------------------------------------------------------------


def test_slice_names_are_deterministic_and_short_enough() -> None:
    """Node and driver make the name; a name over 253 characters is cut and hashed, stably."""
    assert slice_name("n1", DRIVER) == "n1-vgpu-eks-amazonaws-com"
    assert slice_name("n1", DRIVER, 2) == "n1-vgpu-eks-amazonaws-com-2"
    long_node = "a" * 250
    name = slice_name(long_node, DRIVER)
    assert len(name) == 253
    assert name == slice_name(long_node, DRIVER)
    assert name != slice_name(long_node, DRIVER, 1)
