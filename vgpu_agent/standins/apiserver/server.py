"""A stand-in Kubernetes API server for the DRA frontend's tests and the demo.

Real HTTP on loopback (the standard library's threading HTTP server), serving the endpoints
the agent's DRA client uses, with the API server's answers and errors as JSON ``Status``
objects:

- ``resource.k8s.io/v1`` ResourceSlices: create, get, update (conditional on
  ``metadata.resourceVersion``: a stale one is a 409 Conflict), list and deletecollection
  with ``fieldSelector`` (``spec.nodeName``, ``spec.driver``, ``metadata.name``), delete;
- ``resource.k8s.io/v1`` ResourceClaims: get (tests add claims with :meth:`add_claim`);
- ``v1`` Nodes: get (tests add nodes with :meth:`add_node`, the slices' owner).

Request bodies are decoded strictly: a field outside ``resource.k8s.io/v1`` (as of
Kubernetes 1.34, the first release serving it) is a 400 naming the field, as the real server
answers with ``fieldValidation=Strict``. The stand-in is that strict always (the real
default only warns), so a test fails on any field a real server would drop. Objects are
validated like the API server does for the rules the agent could break (names, exactly one
node selection, at most 128 devices, one value per attribute, immutable driver and node).

``serves_resource_v1=False`` plays a cluster older than 1.34: every ``resource.k8s.io`` path
is a 404 without details, as for any path a server does not serve.

Feature gates (``consumable_capacity``, ``device_taints``): off by default, as in Kubernetes
1.34 and 1.35 (on by default from 1.36; tests of those features turn them on). With one
off, its fields (``allowMultipleAllocations`` and
capacity ``requestPolicy``; device ``taints``) are dropped from a slice on create and update
without a word, as the real server drops disabled fields. With them on, they are validated
(request policies against the capacity, taint keys, values and effects, at most 64 devices
in a slice with taints) and a taint without ``timeAdded`` is stamped. ``dryRun=All`` on a
create answers what would be stored and stores nothing.

Allocation results added with :meth:`ApiServerStandIn.add_claim` are checked against the
stored slices as the scheduler's writes are held (:mod:`.validation` says how). Identities
come from bearer tokens, and a node's user gets what the Node authorizer gives a node
(:mod:`.authorization`).
"""

from __future__ import annotations

import copy
import itertools
import re
import threading
import uuid as uuid_module
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from http.server import ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlsplit

from vgpu_agent.frontends.dra.types import AllocatedDevice
from vgpu_agent.standins.apiserver.authorization import (
    authenticate,
    check_claim_of_node,
    check_created_for_node,
    check_node_selector,
    check_own_node,
    check_own_slice,
    node_of,
)
from vgpu_agent.standins.apiserver.errors import (
    ApiStatusError,
    invalid,
    method_not_allowed,
    not_found,
    path_not_found,
)
from vgpu_agent.standins.apiserver.http import Handler
from vgpu_agent.standins.apiserver.schema import (
    DEVICE_REQUEST_ALLOCATION_RESULT_FIELDS,
    RESOURCE_GROUP,
    RESOURCE_VERSION,
    strict_decoding_errors,
)
from vgpu_agent.standins.apiserver.validation import (
    allocation_errors,
    decode_body,
    field_matches,
    field_requirements,
    strictly_decoded,
    validate_slice,
)

_SLICES_PATH = f"/apis/{RESOURCE_GROUP}/{RESOURCE_VERSION}/resourceslices"
_CLAIM_PATH = re.compile(
    rf"/apis/{re.escape(RESOURCE_GROUP)}/{RESOURCE_VERSION}/namespaces/([^/]+)/resourceclaims/([^/]+)"
)
_NODE_PATH = re.compile(r"/api/v1/nodes/([^/]+)")


class ApiServerStandIn:
    """The stand-in API server; ``with ApiServerStandIn() as server:`` serves on ``server.url``.

    Thread-safe: the HTTP threads and the test share the store under one lock.
    """

    def __init__(
        self,
        *,
        tokens: Optional[Mapping[str, str]] = None,
        anonymous_user: Optional[str] = "system:admin",
        serves_resource_v1: bool = True,
        consumable_capacity: bool = False,
        device_taints: bool = False,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self._serves_resource_v1 = serves_resource_v1
        self.consumable_capacity = consumable_capacity
        self.device_taints = device_taints
        self._clock = clock
        self._tokens = dict(tokens or {})
        self._anonymous_user = anonymous_user
        self._lock = threading.Lock()
        self._versions = itertools.count(1)
        self._slices: dict[str, dict[str, Any]] = {}
        self._claims: dict[tuple[str, str], dict[str, Any]] = {}
        self._claim_nodes: dict[tuple[str, str], str] = {}
        self._nodes: dict[str, dict[str, Any]] = {}
        self._conflicts_to_inject = 0
        self.requests: list[tuple[str, str]] = []
        #: Every request's query parameters, in the order of :attr:`requests`.
        self.queries: list[dict[str, str]] = []
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- life -----------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on a free loopback port and serve in a thread."""
        standin = self

        class StandInHandler(Handler):
            server_standin = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), StandInHandler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="apiserver-standin", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> ApiServerStandIn:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` while serving."""
        if self._server is None:
            raise RuntimeError("the stand-in API server is not serving: call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- what tests set up and look at ---------------------------------------------------

    def add_node(self, name: str) -> str:
        """Register a Node object; returns its uid."""
        uid = str(uuid_module.uuid4())
        with self._lock:
            self._nodes[name] = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "uid": uid, "resourceVersion": self._next_version()},
                "spec": {},
            }
        return uid

    def node_uid(self, name: str) -> str:
        """The uid of a Node added with :meth:`add_node`."""
        with self._lock:
            return str(self._nodes[name]["metadata"]["uid"])

    def add_claim(
        self,
        namespace: str,
        name: str,
        *,
        node: Optional[str] = None,
        results: Optional[Sequence[AllocatedDevice]] = None,
    ) -> str:
        """Add a ResourceClaim; returns its uid.

        ``results`` given (even empty) makes it allocated with those device results. ``node``
        is where the pod that references it runs: the Node authorizer lets that node, and
        only it, read it.
        """
        uid = str(uuid_module.uuid4())
        claim: dict[str, Any] = {
            "apiVersion": f"{RESOURCE_GROUP}/{RESOURCE_VERSION}",
            "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": namespace, "uid": uid},
            "spec": {
                "devices": {"requests": [{"name": "vgpu", "exactly": {"deviceClassName": "vgpu"}}]}
            },
            "status": {},
        }
        if results is not None:
            written = [_result_object(result) for result in results]
            errors = [
                error
                for index, result in enumerate(written)
                for error in strict_decoding_errors(
                    result,
                    DEVICE_REQUEST_ALLOCATION_RESULT_FIELDS,
                    f"status.allocation.devices.results[{index}]",
                )
            ]
            if errors:
                raise ValueError(f'ResourceClaim "{name}": {"; ".join(errors)}')
            claim["status"]["allocation"] = {"devices": {"results": written}}
        with self._lock:
            if results is not None:
                causes = allocation_errors(
                    (namespace, name), claim, slices=self._slices, claims=self._claims
                )
                if causes:
                    raise ValueError(
                        f'ResourceClaim "{namespace}/{name}" is invalid: {"; ".join(causes)}'
                    )
            claim["metadata"]["resourceVersion"] = self._next_version()
            self._claims[namespace, name] = claim
            if node is not None:
                self._claim_nodes[namespace, name] = node
        return uid

    def remove_claim(self, namespace: str, name: str) -> None:
        """Delete a ResourceClaim. A pod on a node that still references it keeps that node's
        access: the node's get is then a 404, as in the Node authorizer's graph, which holds
        the names a node's pods reference whether or not the objects exist."""
        with self._lock:
            self._claims.pop((namespace, name), None)

    def slices(self) -> dict[str, dict[str, Any]]:
        """Every stored ResourceSlice by name (copies)."""
        with self._lock:
            return copy.deepcopy(self._slices)

    def put_slice(self, body: Mapping[str, Any]) -> None:
        """Store a ResourceSlice as another writer would (no checks), e.g. a stale one."""
        with self._lock:
            stored = copy.deepcopy(dict(body))
            self._stamp(stored, generation=1)
            self._slices[stored["metadata"]["name"]] = stored

    def inject_conflicts(self, count: int) -> None:
        """Let another writer change the slice before each of the next ``count`` updates, so
        they carry a stale resourceVersion and meet a 409 Conflict."""
        with self._lock:
            self._conflicts_to_inject = count

    # -- request handling (HTTP threads) --------------------------------------------------

    def handle(
        self, method: str, target: str, headers: Mapping[str, str], body: Optional[bytes]
    ) -> tuple[int, dict[str, Any]]:
        """Answer one request (``headers`` with lower-case names): the HTTP code and the JSON
        body."""
        url = urlsplit(target)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        with self._lock:
            self.requests.append((method, url.path))
            self.queries.append(dict(query))
            try:
                user = authenticate(headers, self._tokens, self._anonymous_user)
                return self._route(user, method, url.path, query, body)
            except ApiStatusError as error:
                return error.code, error.status

    def _route(
        self,
        user: str,
        method: str,
        path: str,
        query: Mapping[str, str],
        body: Optional[bytes],
    ) -> tuple[int, dict[str, Any]]:
        node_name = node_of(user)
        path = path.rstrip("/")
        if not self._serves_resource_v1 and path.startswith(f"/apis/{RESOURCE_GROUP}/"):
            raise path_not_found()
        if path == _SLICES_PATH:
            if method == "GET":
                return 200, self._list_slices(user, node_name, query)
            if method == "POST":
                dry_run = query.get("dryRun", "")
                if dry_run not in ("", "All"):
                    raise ApiStatusError(
                        400,
                        "BadRequest",
                        f'Invalid dryRun value: "{dry_run}": supported values: "All"',
                    )
                return 201, self._create_slice(
                    user, node_name, decode_body(body), dry_run=dry_run == "All"
                )
            if method == "DELETE":
                return 200, self._delete_slice_collection(user, node_name, query)
            raise method_not_allowed(method)
        if path.startswith(_SLICES_PATH + "/"):
            name = path[len(_SLICES_PATH) + 1 :]
            if "/" in name:
                raise path_not_found()
            if method == "GET":
                return 200, self._get_slice(user, node_name, "get", name)
            if method == "PUT":
                return 200, self._update_slice(user, node_name, name, decode_body(body))
            if method == "DELETE":
                return 200, self._delete_slice(user, node_name, name)
            raise method_not_allowed(method)
        claim = _CLAIM_PATH.fullmatch(path)
        if claim:
            if method != "GET":
                raise method_not_allowed(method)
            return 200, self._get_claim(user, node_name, claim.group(1), claim.group(2))
        node = _NODE_PATH.fullmatch(path)
        if node:
            if method != "GET":
                raise method_not_allowed(method)
            return 200, self._get_node(user, node_name, node.group(1))
        raise path_not_found()

    # ResourceSlices

    def _get_slice(
        self, user: str, node_name: Optional[str], verb: str, name: str
    ) -> dict[str, Any]:
        check_own_slice(user, node_name, verb, name, self._slices.get(name))
        stored = self._slices.get(name)
        if stored is None:
            raise not_found("resourceslices", name)
        return stored

    def _list_slices(
        self, user: str, node_name: Optional[str], query: Mapping[str, str]
    ) -> dict[str, Any]:
        matching = self._selected_slices(user, node_name, "list", query)
        return {
            "apiVersion": f"{RESOURCE_GROUP}/{RESOURCE_VERSION}",
            "kind": "ResourceSliceList",
            "metadata": {"resourceVersion": str(self._current_version())},
            "items": matching,
        }

    def _selected_slices(
        self, user: str, node_name: Optional[str], verb: str, query: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        requirements = field_requirements(query.get("fieldSelector", ""))
        check_node_selector(user, node_name, verb, requirements)
        return [
            stored
            for _, stored in sorted(self._slices.items())
            if all(field_matches(stored, requirement) for requirement in requirements)
        ]

    def _create_slice(
        self, user: str, node_name: Optional[str], body: dict[str, Any], *, dry_run: bool = False
    ) -> dict[str, Any]:
        strictly_decoded(body)
        self._drop_disabled_fields(body)
        name = str(body.get("metadata", {}).get("name", ""))
        check_created_for_node(node_name, body, name)
        validate_slice(body, name)
        if name in self._slices:
            raise ApiStatusError(
                409,
                "AlreadyExists",
                f'resourceslices.{RESOURCE_GROUP} "{name}" already exists',
                {"name": name, "group": RESOURCE_GROUP, "kind": "resourceslices"},
            )
        stored = copy.deepcopy(dict(body))
        self._stamp(stored, generation=1)
        self._stamp_taints(stored)
        if not dry_run:
            self._slices[name] = stored
        return stored

    def _update_slice(
        self, user: str, node_name: Optional[str], name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        check_own_slice(user, node_name, "update", name, self._slices.get(name))
        strictly_decoded(body)
        self._drop_disabled_fields(body)
        current = self._slices.get(name)
        if current is None:
            # ResourceSlices do not allow create on update.
            raise not_found("resourceslices", name)
        if self._conflicts_to_inject > 0:
            self._conflicts_to_inject -= 1
            current["metadata"]["resourceVersion"] = self._next_version()
        metadata = body.get("metadata", {})
        if metadata.get("name") != name:
            raise ApiStatusError(
                400,
                "BadRequest",
                f"the name of the object ({metadata.get('name')}) does not match the name on "
                f"the URL ({name})",
            )
        wanted_version = metadata.get("resourceVersion")
        if wanted_version and wanted_version != current["metadata"]["resourceVersion"]:
            raise ApiStatusError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on resourceslices.{RESOURCE_GROUP} "{name}": '
                "the object has been modified; please apply your changes to the latest "
                "version and try again",
                {"name": name, "group": RESOURCE_GROUP, "kind": "resourceslices"},
            )
        validate_slice(body, name)
        causes = [
            f"spec.{field}: Invalid value: field is immutable"
            for field in ("driver", "nodeName")
            if body["spec"].get(field) != current["spec"].get(field)
        ]
        if causes:
            raise invalid("ResourceSlice", name, causes)
        stored = copy.deepcopy(dict(body))
        self._stamp_taints(stored)
        generation = current["metadata"]["generation"]
        self._stamp(
            stored,
            generation=generation + 1 if stored["spec"] != current["spec"] else generation,
            uid=current["metadata"]["uid"],
            created=current["metadata"]["creationTimestamp"],
        )
        self._slices[name] = stored
        return stored

    def _delete_slice(self, user: str, node_name: Optional[str], name: str) -> dict[str, Any]:
        check_own_slice(user, node_name, "delete", name, self._slices.get(name))
        stored = self._slices.pop(name, None)
        if stored is None:
            raise not_found("resourceslices", name)
        return stored

    def _delete_slice_collection(
        self, user: str, node_name: Optional[str], query: Mapping[str, str]
    ) -> dict[str, Any]:
        doomed = self._selected_slices(user, node_name, "deletecollection", query)
        for stored in doomed:
            del self._slices[stored["metadata"]["name"]]
        return {
            "apiVersion": f"{RESOURCE_GROUP}/{RESOURCE_VERSION}",
            "kind": "ResourceSliceList",
            "metadata": {"resourceVersion": str(self._current_version())},
            "items": doomed,
        }

    # ResourceClaims and Nodes

    def _get_claim(
        self, user: str, node_name: Optional[str], namespace: str, name: str
    ) -> dict[str, Any]:
        check_claim_of_node(
            user, node_name, namespace, name, self._claim_nodes.get((namespace, name))
        )
        claim = self._claims.get((namespace, name))
        if claim is None:
            raise not_found("resourceclaims", name)
        return claim

    def _get_node(self, user: str, node_name: Optional[str], name: str) -> dict[str, Any]:
        check_own_node(user, node_name, name)
        node = self._nodes.get(name)
        if node is None:
            raise not_found("nodes", name, group="")
        return node

    # feature gates

    def _drop_disabled_fields(self, body: dict[str, Any]) -> None:
        """What the API server does with fields of a disabled feature gate: drop them."""
        spec = body.get("spec")
        devices = spec.get("devices") if isinstance(spec, dict) else None
        for device in devices or []:
            if not isinstance(device, dict):
                continue
            if not self.consumable_capacity:
                device.pop("allowMultipleAllocations", None)
                for capacity in (device.get("capacity") or {}).values():
                    if isinstance(capacity, dict):
                        capacity.pop("requestPolicy", None)
            if not self.device_taints:
                device.pop("taints", None)

    def _stamp_taints(self, stored: dict[str, Any]) -> None:
        """timeAdded on every taint that has none (set automatically on create or update)."""
        now = self._clock().astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        for device in stored.get("spec", {}).get("devices") or []:
            for taint in device.get("taints") or []:
                taint.setdefault("timeAdded", now)

    # bookkeeping

    def _next_version(self) -> str:
        return str(next(self._versions))

    def _current_version(self) -> int:
        # itertools.count has no peek: take one and keep it consumed (versions only rise).
        return int(self._next_version())

    def _stamp(
        self,
        stored: dict[str, Any],
        *,
        generation: int,
        uid: Optional[str] = None,
        created: str = "2026-01-01T00:00:00Z",
    ) -> None:
        metadata = stored.setdefault("metadata", {})
        metadata["uid"] = uid or str(uuid_module.uuid4())
        metadata["resourceVersion"] = self._next_version()
        metadata["generation"] = generation
        metadata["creationTimestamp"] = created
        stored["apiVersion"] = f"{RESOURCE_GROUP}/{RESOURCE_VERSION}"
        stored["kind"] = "ResourceSlice"


def _result_object(result: AllocatedDevice) -> dict[str, Any]:
    """An allocation result as the scheduler writes it."""
    written: dict[str, Any] = {
        "request": result.request,
        "driver": result.driver,
        "pool": result.pool,
        "device": result.device,
    }
    if result.share_id:
        written["shareID"] = result.share_id
    if result.consumed_capacity:
        written["consumedCapacity"] = dict(result.consumed_capacity)
    return written
