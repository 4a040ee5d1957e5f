"""The stand-in API server, over raw HTTP: strict decoding, resourceVersion and generation,
update conflicts, field selectors, validation, and the Node authorizer's rules."""

from __future__ import annotations

import copy
import dataclasses
import http.client
import json
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import pytest

from vgpu_agent.standins.apiserver.schema import (
    DEVICE_ATTRIBUTE_FIELDS,
    DEVICE_CAPACITY_FIELDS,
    DEVICE_FIELDS,
    OBJECT_META_FIELDS,
    OWNER_REFERENCE_FIELDS,
    RESOURCE_POOL_FIELDS,
    RESOURCE_SLICE_FIELDS,
    RESOURCE_SLICE_SPEC_FIELDS,
)
from vgpu_agent.standins.apiserver.server import ApiServerStandIn
from vgpu_agent.standins.apiserver.validation import MAX_DEVICES_PER_SLICE

SLICES = "/apis/resource.k8s.io/v1/resourceslices"
DRIVER = "vgpu.eks.amazonaws.com"
NODE_TOKEN = "node-a-token"  # noqa: S105 - a test token


def a_slice(name: str = "node-a-vgpu", node: str = "node-a", **spec: Any) -> dict[str, Any]:
    """A valid ResourceSlice body of one device on ``node``."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name},
        "spec": {
            "driver": DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": [
                {
                    "name": "gpu-0-vgpu-0",
                    "attributes": {"index": {"int": 0}},
                    "capacity": {"memory": {"value": "1Gi"}},
                }
            ],
            **spec,
        },
    }


class Http:
    """Raw JSON requests to the stand-in, optionally with a bearer token."""

    def __init__(self, server: ApiServerStandIn, token: Optional[str] = None) -> None:
        self._server = server
        self._token = token

    def __call__(
        self, method: str, path: str, body: Optional[Mapping[str, Any]] = None
    ) -> tuple[int, dict[str, Any]]:
        """Send one request; the status code and the decoded JSON answer."""
        host, port = self._server.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            data = json.dumps(body).encode() if body is not None else None
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()


@pytest.fixture
def server() -> Iterator[ApiServerStandIn]:
    """A serving stand-in; the token NODE_TOKEN is node-a's identity."""
    with ApiServerStandIn(tokens={NODE_TOKEN: "system:node:node-a"}) as standin:
        yield standin


@pytest.fixture
def admin(server: ApiServerStandIn) -> Http:
    """Requests without a token (an administrator)."""
    return Http(server)


@pytest.fixture
def node_a(server: ApiServerStandIn) -> Http:
    """Requests as system:node:node-a."""
    return Http(server, NODE_TOKEN)


# -- strict decoding -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "field"),
    [
        (lambda body: body, "color"),
        (lambda body: body["metadata"], "nickname"),
        (lambda body: body["spec"], "replicas"),
        (lambda body: body["spec"]["pool"], "size"),
        (lambda body: body["spec"]["devices"][0], "basic"),
        (lambda body: body["spec"]["devices"][0]["attributes"]["index"], "float"),
        (lambda body: body["spec"]["devices"][0]["capacity"]["memory"], "unit"),
    ],
    ids=["top", "metadata", "spec", "pool", "device", "attribute", "capacity"],
)
def test_unknown_fields_are_a_400_naming_them(
    admin: Http, server: ApiServerStandIn, where: Any, field: str
) -> None:
    """Strict decoding: a field outside resource.k8s.io/v1 is refused with its full path,
    and nothing is stored (``basic`` is v1beta1's device wrapper, gone in v1)."""
    body = a_slice()
    where(body)[field] = "x"
    code, status = admin("POST", SLICES, body)
    assert code == 400
    assert status["reason"] == "BadRequest"
    assert status["message"].startswith(
        'ResourceSlice in version "v1" cannot be handled as a ResourceSlice: strict decoding '
        "error: unknown field "
    )
    assert f'.{field}"' in status["message"] or f'"{field}"' in status["message"]
    assert server.slices() == {}


def test_wrong_types_are_a_400(admin: Http) -> None:
    """A string where an integer belongs (and a bool for an int) is refused."""
    body = a_slice()
    body["spec"]["pool"]["generation"] = "1"
    body["spec"]["devices"][0]["attributes"]["index"] = {"int": True}
    code, status = admin("POST", SLICES, body)
    assert code == 400
    assert "spec.pool.generation: expected an integer" in status["message"]
    assert "spec.devices[0].attributes[index].int: expected an integer" in status["message"]


def test_the_schema_names_only_fields_of_the_client_models() -> None:
    """Every field the stand-in accepts exists in lightkube's resource.k8s.io/v1 models (the
    schema is a subset of the real API, not invented)."""
    from lightkube.models import meta_v1, resource_v1

    pairs = [
        (RESOURCE_SLICE_FIELDS, resource_v1.ResourceSlice),
        (RESOURCE_SLICE_SPEC_FIELDS, resource_v1.ResourceSliceSpec),
        (RESOURCE_POOL_FIELDS, resource_v1.ResourcePool),
        (DEVICE_FIELDS, resource_v1.Device),
        (DEVICE_ATTRIBUTE_FIELDS, resource_v1.DeviceAttribute),
        (DEVICE_CAPACITY_FIELDS, resource_v1.DeviceCapacity),
        (OBJECT_META_FIELDS, meta_v1.ObjectMeta),
        (OWNER_REFERENCE_FIELDS, meta_v1.OwnerReference),
    ]
    for schema, model in pairs:
        model_fields = {field.name for field in dataclasses.fields(model)}
        assert set(schema) <= model_fields, (model.__name__, set(schema) - model_fields)
    # The typed hints resolve (the models are what the client sends).
    assert typing.get_type_hints(resource_v1.ResourcePool)["generation"] is int


# -- versions, generations, conflicts -------------------------------------------------------------


def test_create_stamps_and_update_bumps(admin: Http) -> None:
    """Create sets uid, resourceVersion and generation 1; an update with a new spec keeps the
    uid, raises the resourceVersion and the generation; one with the same spec keeps the
    generation."""
    code, created = admin("POST", SLICES, a_slice())
    assert code == 201
    assert created["metadata"]["generation"] == 1
    changed = copy.deepcopy(created)
    changed["spec"]["pool"]["generation"] = 2
    code, updated = admin("PUT", f"{SLICES}/node-a-vgpu", changed)
    assert code == 200
    assert updated["metadata"]["uid"] == created["metadata"]["uid"]
    assert int(updated["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    assert updated["metadata"]["generation"] == 2
    code, same = admin("PUT", f"{SLICES}/node-a-vgpu", updated)
    assert code == 200
    assert same["metadata"]["generation"] == 2


def test_a_stale_resource_version_is_a_409(admin: Http) -> None:
    """An update carrying an old resourceVersion is refused as the real server words it."""
    _, created = admin("POST", SLICES, a_slice())
    admin("PUT", f"{SLICES}/node-a-vgpu", created)  # someone else's write
    code, status = admin("PUT", f"{SLICES}/node-a-vgpu", created)
    assert code == 409
    assert status["reason"] == "Conflict"
    assert "the object has been modified" in status["message"]


def test_create_of_an_existing_name_is_already_exists(admin: Http) -> None:
    """A second create of one name is a 409 AlreadyExists."""
    admin("POST", SLICES, a_slice())
    code, status = admin("POST", SLICES, a_slice())
    assert (code, status["reason"]) == (409, "AlreadyExists")


def test_update_of_a_missing_slice_is_not_found(admin: Http) -> None:
    """ResourceSlices are not created by an update."""
    code, status = admin("PUT", f"{SLICES}/node-a-vgpu", a_slice())
    assert (code, status["reason"]) == (404, "NotFound")
    assert status["details"]["name"] == "node-a-vgpu"


def test_driver_and_node_are_immutable(admin: Http) -> None:
    """An update may not move a slice to another node or driver."""
    _, created = admin("POST", SLICES, a_slice())
    moved = copy.deepcopy(created)
    moved["spec"]["nodeName"] = "node-b"
    code, status = admin("PUT", f"{SLICES}/node-a-vgpu", moved)
    assert (code, status["reason"]) == (422, "Invalid")
    assert "spec.nodeName: Invalid value: field is immutable" in status["message"]


@pytest.mark.parametrize(
    ("change", "cause"),
    [
        (lambda body: body["metadata"].update(name="Not_A_Name"), "metadata.name: Invalid"),
        (lambda body: body["spec"].update(allNodes=True), "exactly one of `nodeName`"),
        (lambda body: body["spec"].pop("nodeName"), "exactly one of `nodeName`"),
        (
            lambda body: body["spec"]["devices"][0]["attributes"]["index"].update(string="0"),
            "exactly one value must be specified",
        ),
        (
            lambda body: body["spec"].update(
                devices=[{"name": f"d{i}"} for i in range(MAX_DEVICES_PER_SLICE + 1)]
            ),
            "spec.devices: Too many: 129",
        ),
        (lambda body: body["spec"]["pool"].update(resourceSliceCount=0), "resourceSliceCount"),
    ],
    ids=["bad-name", "two-node-selections", "no-node-selection", "two-values", "129", "count"],
)
def test_invalid_slices_are_a_422(admin: Http, change: Any, cause: str) -> None:
    """The validation rules a publishing node could break answer 422 Invalid with the cause."""
    body = a_slice()
    change(body)
    code, status = admin("POST", SLICES, body)
    assert (code, status["reason"]) == (422, "Invalid")
    assert cause in status["message"]


# -- lists and deletes ---------------------------------------------------------------------------


def test_field_selectors_list_and_delete_collections(admin: Http, server: ApiServerStandIn) -> None:
    """spec.nodeName and spec.driver select what list and deletecollection touch."""
    admin("POST", SLICES, a_slice("a-vgpu", "node-a"))
    admin("POST", SLICES, a_slice("b-vgpu", "node-b"))
    other = a_slice("a-nvidia", "node-a")
    other["spec"]["driver"] = "gpu.nvidia.com"
    admin("POST", SLICES, other)

    _, listed = admin("GET", f"{SLICES}?fieldSelector=spec.nodeName%3Dnode-a")
    assert [item["metadata"]["name"] for item in listed["items"]] == ["a-nvidia", "a-vgpu"]
    assert listed["kind"] == "ResourceSliceList"
    _, listed = admin("GET", f"{SLICES}?fieldSelector=spec.driver!%3D{DRIVER}")
    assert [item["metadata"]["name"] for item in listed["items"]] == ["a-nvidia"]

    code, _ = admin(
        "DELETE", f"{SLICES}?fieldSelector=spec.nodeName%3Dnode-a,spec.driver%3D{DRIVER}"
    )
    assert code == 200
    assert sorted(server.slices()) == ["a-nvidia", "b-vgpu"]

    code, _ = admin("DELETE", f"{SLICES}/b-vgpu")
    assert code == 200
    code, status = admin("DELETE", f"{SLICES}/b-vgpu")
    assert (code, status["reason"]) == (404, "NotFound")


def test_an_unsupported_field_label_is_a_400(admin: Http) -> None:
    """Only the fields the real server indexes may be selected."""
    code, status = admin("GET", f"{SLICES}?fieldSelector=spec.pool.name%3Dx")
    assert code == 400
    assert 'field label not supported: "spec.pool.name"' in status["message"]


def test_unknown_paths_are_a_404_without_details(admin: Http) -> None:
    """A path the server does not serve is a NotFound without an object name."""
    code, status = admin("GET", "/apis/resource.k8s.io/v1beta9/resourceslices")
    assert code == 404
    assert status["details"] == {}


# -- identities ----------------------------------------------------------------------------------


def test_an_unknown_token_is_a_401(server: ApiServerStandIn) -> None:
    """A token the server does not know is Unauthorized."""
    code, status = Http(server, "forged")("GET", f"{SLICES}/x")
    assert (code, status["reason"]) == (401, "Unauthorized")


def test_no_anonymous_user_makes_a_missing_token_a_401() -> None:
    """With anonymous access off, a request without a token is Unauthorized."""
    with ApiServerStandIn(anonymous_user=None) as server:
        code, _ = Http(server)("GET", f"{SLICES}/x")
    assert code == 401


def test_a_node_works_on_its_own_slices(node_a: Http, server: ApiServerStandIn) -> None:
    """A node creates, lists (with its selector), reads, updates and deletes its own slices."""
    code, created = node_a("POST", SLICES, a_slice())
    assert code == 201
    code, listed = node_a("GET", f"{SLICES}?fieldSelector=spec.nodeName%3Dnode-a")
    assert (code, len(listed["items"])) == (200, 1)
    code, _ = node_a("GET", f"{SLICES}/node-a-vgpu")
    assert code == 200
    code, _ = node_a("PUT", f"{SLICES}/node-a-vgpu", created)
    assert code == 200
    code, _ = node_a("DELETE", f"{SLICES}/node-a-vgpu")
    assert code == 200
    assert server.slices() == {}


CLAIM_PATH = "/apis/resource.k8s.io/v1/namespaces/ns/resourceclaims"
NOT_RELATED = "no relationship found between node 'node-a'"
WITHOUT_SELECTOR = (
    "can only list/watch/deletecollection resourceslices with nodeName field selector"
)
#: (method, path, body, the refusal's words): what a node may not do.
NODE_REFUSALS = [
    pytest.param(
        ("POST", SLICES, a_slice("b-vgpu", "node-b"), "with the same NodeName"),
        id="create-other",
    ),
    pytest.param(("GET", SLICES, None, WITHOUT_SELECTOR), id="list-all"),
    pytest.param(
        ("GET", f"{SLICES}?fieldSelector=spec.nodeName%3Dnode-b", None, WITHOUT_SELECTOR),
        id="list-other",
    ),
    pytest.param(("DELETE", SLICES, None, WITHOUT_SELECTOR), id="deletecollection-all"),
    pytest.param(("GET", f"{SLICES}/b-vgpu", None, NOT_RELATED), id="get-other"),
    pytest.param(("GET", f"{SLICES}/not-created-yet", None, NOT_RELATED), id="get-missing"),
    pytest.param(("DELETE", f"{SLICES}/b-vgpu", None, NOT_RELATED), id="delete-other"),
    pytest.param(("GET", "/api/v1/nodes/node-b", None, "its own Node object"), id="other-node"),
    pytest.param(("GET", f"{CLAIM_PATH}/theirs", None, NOT_RELATED), id="other-claim"),
]


@pytest.mark.parametrize("refusal", NODE_REFUSALS)
def test_a_node_is_held_to_its_own_objects(
    admin: Http,
    node_a: Http,
    server: ApiServerStandIn,
    refusal: tuple[str, str, Optional[dict[str, Any]], str],
) -> None:
    """What the Node authorizer and NodeRestriction refuse a node is a 403 with their words
    (a get of a slice not created yet too: the authorizer has no edge to it)."""
    method, path, body, reason = refusal
    admin("POST", SLICES, a_slice("b-vgpu", "node-b"))
    server.add_node("node-b")
    server.add_claim("ns", "theirs", node="node-b")
    code, status = node_a(method, path, body)
    assert (code, status["reason"]) == (403, "Forbidden")
    assert reason in status["message"]
    assert "b-vgpu" in server.slices()


def test_a_node_reads_its_node_and_its_pods_claims(node_a: Http, server: ApiServerStandIn) -> None:
    """A node gets its own Node and the claims its pods reference (404 once deleted)."""
    uid = server.add_node("node-a")
    server.add_claim("ns", "mine", node="node-a")
    code, node = node_a("GET", "/api/v1/nodes/node-a")
    assert (code, node["metadata"]["uid"]) == (200, uid)
    code, claim = node_a("GET", f"{CLAIM_PATH}/mine")
    assert (code, claim["metadata"]["name"]) == (200, "mine")
    assert "allocation" not in claim["status"]
    server.remove_claim("ns", "mine")
    code, status = node_a("GET", f"{CLAIM_PATH}/mine")
    assert (code, status["details"]["name"]) == (404, "mine")


def test_a_claim_cannot_be_written(admin: Http) -> None:
    """The stand-in serves only what the agent does with claims: get."""
    code, status = admin("DELETE", f"{CLAIM_PATH}/x")
    assert (code, status["reason"]) == (405, "MethodNotAllowed")


def test_url_needs_a_started_server() -> None:
    """Asking for the URL of a stopped stand-in says what to do."""
    with pytest.raises(RuntimeError, match="call start"):
        _ = ApiServerStandIn().url
