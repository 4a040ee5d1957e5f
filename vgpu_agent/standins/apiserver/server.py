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
stored slices as the scheduler's writes are held: a result on a device that allows multiple
allocations needs a ``shareID`` and a ``consumedCapacity`` within each capacity's request
policy, and the claims on that device together may not consume more than it has; a device
that does not may be allocated to one claim only.

Identities: requests carry a bearer token mapped to a user name by ``tokens``; without a
token they are ``anonymous_user`` (``None`` makes that a 401). A user named
``system:node:<name>`` gets what the Node authorizer and the NodeRestriction admission
plugin give a node (docs/dra.md): its own slices, list only with its ``spec.nodeName``
selector, get of the claims of its pods and of its Node; anything else is a 403 with the
real server's wording. Any other user may do everything.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
import uuid as uuid_module
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from fractions import Fraction
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional, Union
from urllib.parse import parse_qs, urlsplit

from vgpu_agent.frontends.dra.capacity import parse_quantity
from vgpu_agent.frontends.dra.types import AllocatedDevice

RESOURCE_GROUP = "resource.k8s.io"
RESOURCE_VERSION = "v1"
MAX_DEVICES_PER_SLICE = 128
#: ResourceSliceMaxDevicesWithAdvancedFeatures: the limit when any device has taints.
MAX_TAINTED_DEVICES_PER_SLICE = 64
#: DeviceTaintsMaxLength, ResourceSliceMaxAttributesAndCapacitiesPerDevice.
MAX_TAINTS_PER_DEVICE = 16
MAX_ATTRIBUTES_AND_CAPACITIES = 32
TAINT_EFFECTS = ("None", "NoSchedule", "NoExecute")
_LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_NODE_USER_PREFIX = "system:node:"
_SLICES_PATH = f"/apis/{RESOURCE_GROUP}/{RESOURCE_VERSION}/resourceslices"
_CLAIM_PATH = re.compile(
    rf"/apis/{re.escape(RESOURCE_GROUP)}/{RESOURCE_VERSION}/namespaces/([^/]+)/resourceclaims/([^/]+)"
)
_NODE_PATH = re.compile(r"/api/v1/nodes/([^/]+)")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_SLICE_FIELD_LABELS = ("spec.nodeName", "spec.driver", "metadata.name")

# -- the strict decoder's schema ----------------------------------------------------------------
# The fields of resource.k8s.io/v1 as Kubernetes 1.34 serves them, for the parts of a
# ResourceSlice the agent writes; parts it never writes (node selectors, taints, counters,
# capacity request policies) are accepted as any JSON. tests/standins/test_apiserver.py
# checks every name here against the lightkube models the client uses.


@dataclass(frozen=True)
class _ListOf:
    item: _Schema


@dataclass(frozen=True)
class _MapOf:
    value: _Schema


class _Any:
    """Any JSON value (a part the agent never writes)."""


_Schema = Union[type, _ListOf, _MapOf, _Any, Mapping[str, Any]]
_ANY = _Any()

OWNER_REFERENCE_FIELDS: Mapping[str, _Schema] = {
    "apiVersion": str,
    "kind": str,
    "name": str,
    "uid": str,
    "controller": bool,
    "blockOwnerDeletion": bool,
}
OBJECT_META_FIELDS: Mapping[str, _Schema] = {
    "name": str,
    "generateName": str,
    "namespace": str,
    "selfLink": str,
    "uid": str,
    "resourceVersion": str,
    "generation": int,
    "creationTimestamp": str,
    "deletionTimestamp": str,
    "deletionGracePeriodSeconds": int,
    "labels": _MapOf(str),
    "annotations": _MapOf(str),
    "ownerReferences": _ListOf(OWNER_REFERENCE_FIELDS),
    "finalizers": _ListOf(str),
    "managedFields": _ANY,
}
DEVICE_ATTRIBUTE_FIELDS: Mapping[str, _Schema] = {
    "bool": bool,
    "int": int,
    "string": str,
    "version": str,
}
CAPACITY_REQUEST_POLICY_RANGE_FIELDS: Mapping[str, _Schema] = {
    "min": str,
    "max": str,
    "step": str,
}
CAPACITY_REQUEST_POLICY_FIELDS: Mapping[str, _Schema] = {
    "default": str,
    "validValues": _ListOf(str),
    "validRange": CAPACITY_REQUEST_POLICY_RANGE_FIELDS,
}
DEVICE_CAPACITY_FIELDS: Mapping[str, _Schema] = {
    "value": str,
    "requestPolicy": CAPACITY_REQUEST_POLICY_FIELDS,
}
DEVICE_TAINT_FIELDS: Mapping[str, _Schema] = {
    "key": str,
    "value": str,
    "effect": str,
    "timeAdded": str,
}
DEVICE_FIELDS: Mapping[str, _Schema] = {
    "name": str,
    "attributes": _MapOf(DEVICE_ATTRIBUTE_FIELDS),
    "capacity": _MapOf(DEVICE_CAPACITY_FIELDS),
    "consumesCounters": _ANY,
    "nodeName": str,
    "nodeSelector": _ANY,
    "allNodes": bool,
    "taints": _ListOf(DEVICE_TAINT_FIELDS),
    "bindsToNode": bool,
    "bindingConditions": _ListOf(str),
    "bindingFailureConditions": _ListOf(str),
    "allowMultipleAllocations": bool,
}
RESOURCE_POOL_FIELDS: Mapping[str, _Schema] = {
    "name": str,
    "generation": int,
    "resourceSliceCount": int,
}
RESOURCE_SLICE_SPEC_FIELDS: Mapping[str, _Schema] = {
    "driver": str,
    "pool": RESOURCE_POOL_FIELDS,
    "nodeName": str,
    "nodeSelector": _ANY,
    "allNodes": bool,
    "perDeviceNodeSelection": bool,
    "devices": _ListOf(DEVICE_FIELDS),
    "sharedCounters": _ANY,
}
#: A ResourceClaim's status.allocation.devices.results[] entry, as the stand-in writes it for
#: :meth:`ApiServerStandIn.add_claim`.
DEVICE_REQUEST_ALLOCATION_RESULT_FIELDS: Mapping[str, _Schema] = {
    "request": str,
    "driver": str,
    "pool": str,
    "device": str,
    "adminAccess": bool,
    "tolerations": _ANY,
    "bindingConditions": _ListOf(str),
    "bindingFailureConditions": _ListOf(str),
    "shareID": str,
    "consumedCapacity": _MapOf(str),
}
RESOURCE_SLICE_FIELDS: Mapping[str, _Schema] = {
    "apiVersion": str,
    "kind": str,
    "metadata": OBJECT_META_FIELDS,
    "spec": RESOURCE_SLICE_SPEC_FIELDS,
}


def strict_decoding_errors(value: Any, schema: _Schema, path: str = "") -> list[str]:
    """What the API server's strict decoder would say of ``value`` (empty when it is fine)."""
    if isinstance(schema, _Any):
        return []
    if isinstance(schema, _ListOf):
        if not isinstance(value, list):
            return [f"{path}: expected an array"]
        return [
            error
            for index, item in enumerate(value)
            for error in strict_decoding_errors(item, schema.item, f"{path}[{index}]")
        ]
    if isinstance(schema, _MapOf):
        if not isinstance(value, dict):
            return [f"{path}: expected an object"]
        return [
            error
            for key, item in value.items()
            for error in strict_decoding_errors(item, schema.value, f"{path}[{key}]")
        ]
    if isinstance(schema, Mapping):
        if not isinstance(value, dict):
            return [f"{path}: expected an object"]
        errors: list[str] = []
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if key not in schema:
                errors.append(f'unknown field "{where}"')
            else:
                errors.extend(strict_decoding_errors(item, schema[key], where))
        return errors
    # bool is an int in Python, not in JSON.
    if schema is int and (isinstance(value, bool) or not isinstance(value, int)):
        return [f"{path}: expected an integer, got {json.dumps(value)}"]
    if not isinstance(value, schema):
        return [f"{path}: expected a {schema.__name__}, got {json.dumps(value)}"]
    return []


# -- answers -------------------------------------------------------------------------------------


class _ApiStatusError(Exception):
    """An error answer: the HTTP code and the Status object the API server sends with it."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: Optional[Mapping[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "details": dict(details or {}),
            "code": code,
        }


def _not_found(resource: str, name: str, group: str = RESOURCE_GROUP) -> _ApiStatusError:
    qualified = f"{resource}.{group}" if group else resource
    return _ApiStatusError(
        404,
        "NotFound",
        f'{qualified} "{name}" not found',
        {"name": name, "group": group, "kind": resource},
    )


def _invalid(kind: str, name: str, causes: Sequence[str]) -> _ApiStatusError:
    return _ApiStatusError(
        422,
        "Invalid",
        f'{kind} "{name}" is invalid: {"; ".join(causes)}',
        {"name": name, "group": RESOURCE_GROUP, "kind": kind},
    )


def _forbidden(
    user: str, verb: str, resource: str, name: str, reason: str, *, namespace: str = ""
) -> _ApiStatusError:
    """The authorizer's refusal, worded as the API server words it."""
    group = "" if resource == "nodes" else RESOURCE_GROUP
    qualified = f"{resource}.{group}" if group else resource
    subject = f'{qualified} "{name}"' if name else qualified
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    return _ApiStatusError(
        403,
        "Forbidden",
        f'{subject} is forbidden: User "{user}" cannot {verb} resource "{resource}" in API '
        f'group "{group}" {scope}: {reason}',
        {"name": name, "group": group, "kind": resource},
    )


# -- the server ------------------------------------------------------------------------------------


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

        class Handler(_Handler):
            server_standin = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
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
                causes = self._allocation_errors((namespace, name), claim)
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
                user = self._authenticate(headers)
                return self._route(user, method, url.path, query, body)
            except _ApiStatusError as error:
                return error.code, error.status

    def _authenticate(self, headers: Mapping[str, str]) -> str:
        authorization = headers.get("authorization", "")
        if authorization.startswith("Bearer "):
            user = self._tokens.get(authorization[len("Bearer ") :])
            if user is not None:
                return user
        elif self._anonymous_user is not None:
            return self._anonymous_user
        raise _ApiStatusError(401, "Unauthorized", "Unauthorized")

    def _route(
        self,
        user: str,
        method: str,
        path: str,
        query: Mapping[str, str],
        body: Optional[bytes],
    ) -> tuple[int, dict[str, Any]]:
        node_name = user[len(_NODE_USER_PREFIX) :] if user.startswith(_NODE_USER_PREFIX) else None
        path = path.rstrip("/")
        if not self._serves_resource_v1 and path.startswith(f"/apis/{RESOURCE_GROUP}/"):
            raise _path_not_found()
        if path == _SLICES_PATH:
            if method == "GET":
                return 200, self._list_slices(user, node_name, query)
            if method == "POST":
                dry_run = query.get("dryRun", "")
                if dry_run not in ("", "All"):
                    raise _ApiStatusError(
                        400,
                        "BadRequest",
                        f'Invalid dryRun value: "{dry_run}": supported values: "All"',
                    )
                return 201, self._create_slice(
                    user, node_name, _decode(body), dry_run=dry_run == "All"
                )
            if method == "DELETE":
                return 200, self._delete_slice_collection(user, node_name, query)
            raise _method_not_allowed(method)
        if path.startswith(_SLICES_PATH + "/"):
            name = path[len(_SLICES_PATH) + 1 :]
            if "/" in name:
                raise _path_not_found()
            if method == "GET":
                return 200, self._get_slice(user, node_name, "get", name)
            if method == "PUT":
                return 200, self._update_slice(user, node_name, name, _decode(body))
            if method == "DELETE":
                return 200, self._delete_slice(user, node_name, name)
            raise _method_not_allowed(method)
        claim = _CLAIM_PATH.fullmatch(path)
        if claim:
            if method != "GET":
                raise _method_not_allowed(method)
            return 200, self._get_claim(user, node_name, claim.group(1), claim.group(2))
        node = _NODE_PATH.fullmatch(path)
        if node:
            if method != "GET":
                raise _method_not_allowed(method)
            return 200, self._get_node(user, node_name, node.group(1))
        raise _path_not_found()

    # ResourceSlices

    def _own_slice(self, user: str, node_name: Optional[str], verb: str, name: str) -> None:
        """The Node authorizer: a node reaches a named slice only when its nodeName is the node."""
        if node_name is None:
            return
        stored = self._slices.get(name)
        if stored is None or stored["spec"].get("nodeName") != node_name:
            raise _forbidden(
                user,
                verb,
                "resourceslices",
                name,
                f"no relationship found between node '{node_name}' and this object",
            )

    def _get_slice(
        self, user: str, node_name: Optional[str], verb: str, name: str
    ) -> dict[str, Any]:
        self._own_slice(user, node_name, verb, name)
        stored = self._slices.get(name)
        if stored is None:
            raise _not_found("resourceslices", name)
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
        requirements = _field_requirements(query.get("fieldSelector", ""))
        if node_name is not None and ("spec.nodeName", "=", node_name) not in requirements:
            raise _forbidden(
                user,
                verb,
                "resourceslices",
                "",
                "can only list/watch/deletecollection resourceslices with nodeName field selector",
            )
        return [
            stored
            for _, stored in sorted(self._slices.items())
            if all(_field_matches(stored, requirement) for requirement in requirements)
        ]

    def _create_slice(
        self, user: str, node_name: Optional[str], body: dict[str, Any], *, dry_run: bool = False
    ) -> dict[str, Any]:
        _strictly_decoded(body)
        self._drop_disabled_fields(body)
        name = str(body.get("metadata", {}).get("name", ""))
        if node_name is not None and body.get("spec", {}).get("nodeName") != node_name:
            # NodeRestriction: the authorizer allowed the create without seeing the object.
            raise _ApiStatusError(
                403,
                "Forbidden",
                f'resourceslices.{RESOURCE_GROUP} "{name}" is forbidden: can only create '
                "ResourceSlice with the same NodeName as the requesting node",
                {"name": name, "group": RESOURCE_GROUP, "kind": "resourceslices"},
            )
        _validate_slice(body, name)
        if name in self._slices:
            raise _ApiStatusError(
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
        self._own_slice(user, node_name, "update", name)
        _strictly_decoded(body)
        self._drop_disabled_fields(body)
        current = self._slices.get(name)
        if current is None:
            # ResourceSlices do not allow create on update.
            raise _not_found("resourceslices", name)
        if self._conflicts_to_inject > 0:
            self._conflicts_to_inject -= 1
            current["metadata"]["resourceVersion"] = self._next_version()
        metadata = body.get("metadata", {})
        if metadata.get("name") != name:
            raise _ApiStatusError(
                400,
                "BadRequest",
                f"the name of the object ({metadata.get('name')}) does not match the name on "
                f"the URL ({name})",
            )
        wanted_version = metadata.get("resourceVersion")
        if wanted_version and wanted_version != current["metadata"]["resourceVersion"]:
            raise _ApiStatusError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on resourceslices.{RESOURCE_GROUP} "{name}": '
                "the object has been modified; please apply your changes to the latest "
                "version and try again",
                {"name": name, "group": RESOURCE_GROUP, "kind": "resourceslices"},
            )
        _validate_slice(body, name)
        causes = [
            f"spec.{field}: Invalid value: field is immutable"
            for field in ("driver", "nodeName")
            if body["spec"].get(field) != current["spec"].get(field)
        ]
        if causes:
            raise _invalid("ResourceSlice", name, causes)
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
        self._own_slice(user, node_name, "delete", name)
        stored = self._slices.pop(name, None)
        if stored is None:
            raise _not_found("resourceslices", name)
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
        if node_name is not None and self._claim_nodes.get((namespace, name)) != node_name:
            raise _forbidden(
                user,
                "get",
                "resourceclaims",
                name,
                f"no relationship found between node '{node_name}' and this object",
                namespace=namespace,
            )
        claim = self._claims.get((namespace, name))
        if claim is None:
            raise _not_found("resourceclaims", name)
        return claim

    def _get_node(self, user: str, node_name: Optional[str], name: str) -> dict[str, Any]:
        if node_name is not None and name != node_name:
            raise _forbidden(
                user,
                "get",
                "nodes",
                name,
                f"node '{node_name}' cannot read '{name}', only its own Node object",
            )
        node = self._nodes.get(name)
        if node is None:
            raise _not_found("nodes", name, group="")
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

    # allocation results

    def _allocated_device(self, driver: str, pool: str, device: str) -> Optional[dict[str, Any]]:
        """The device of the pool's newest generation, as stored."""
        found: Optional[dict[str, Any]] = None
        newest = -1
        for stored in self._slices.values():
            spec = stored["spec"]
            if spec.get("driver") != driver or spec.get("pool", {}).get("name") != pool:
                continue
            generation = spec["pool"].get("generation", 0)
            for candidate in spec.get("devices") or []:
                if candidate.get("name") == device and generation > newest:
                    found, newest = candidate, generation
        return found

    def _allocation_errors(self, key: tuple[str, str], claim: Mapping[str, Any]) -> list[str]:
        """What the API server and the scheduler's rules say of a claim's results, checked
        against the stored slices and the other claims' allocations."""
        causes: list[str] = []
        results = claim["status"]["allocation"]["devices"]["results"]
        for index, result in enumerate(results):
            where = f"status.allocation.devices.results[{index}]"
            device = self._allocated_device(result["driver"], result["pool"], result["device"])
            if device is None:
                if "consumedCapacity" in result or "shareID" in result:
                    causes.append(
                        f"{where}: no device {result['device']} in pool {result['pool']} of "
                        f"driver {result['driver']} to consume capacity of"
                    )
                continue
            others = [
                other
                for other_key, other_claim in self._claims.items()
                if other_key != key
                for other in _results_of(other_claim)
                if (other["driver"], other["pool"], other["device"])
                == (result["driver"], result["pool"], result["device"])
            ] + [other for other in results[:index] if other["device"] == result["device"]]
            if not device.get("allowMultipleAllocations"):
                if "consumedCapacity" in result or "shareID" in result:
                    causes.append(
                        f"{where}: device {result['device']} does not allow multiple "
                        "allocations: no shareID or consumedCapacity"
                    )
                if others:
                    causes.append(f"{where}: device {result['device']} is already allocated")
                continue
            causes.extend(_consumption_errors(where, result, device, others))
        return causes

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


def _decode(body: Optional[bytes]) -> dict[str, Any]:
    try:
        value = json.loads(body or b"")
    except ValueError as error:
        raise _ApiStatusError(400, "BadRequest", f"the body is not JSON: {error}") from error
    if not isinstance(value, dict):
        raise _ApiStatusError(400, "BadRequest", "the body is not a JSON object")
    return value


def _strictly_decoded(body: Mapping[str, Any]) -> None:
    errors = strict_decoding_errors(body, RESOURCE_SLICE_FIELDS)
    if errors:
        raise _ApiStatusError(
            400,
            "BadRequest",
            'ResourceSlice in version "v1" cannot be handled as a ResourceSlice: strict '
            f"decoding error: {', '.join(errors)}",
        )


def _validate_slice(body: Mapping[str, Any], name: str) -> None:
    """The API server's validation, for the rules a publishing node could break."""
    causes: list[str] = []
    if not name:
        causes.append("metadata.name: Required value: name or generateName is required")
    elif len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        causes.append(f'metadata.name: Invalid value: "{name}": must be a DNS subdomain')
    spec = body.get("spec")
    if not isinstance(spec, dict):
        raise _invalid("ResourceSlice", name, ["spec: Required value"])
    if not spec.get("driver"):
        causes.append("spec.driver: Required value")
    pool = spec.get("pool") or {}
    if not pool.get("name"):
        causes.append("spec.pool.name: Required value")
    if pool.get("generation", -1) < 0:
        causes.append("spec.pool.generation: Invalid value: must be greater than or equal to 0")
    if pool.get("resourceSliceCount", 0) <= 0:
        causes.append("spec.pool.resourceSliceCount: Invalid value: must be greater than 0")
    selections = [
        key
        for key in ("nodeName", "nodeSelector", "allNodes", "perDeviceNodeSelection")
        if spec.get(key)
    ]
    if len(selections) != 1:
        causes.append(
            "spec: Invalid value: exactly one of `nodeName`, `nodeSelector`, `allNodes`, "
            f"`perDeviceNodeSelection` is required, got {selections or 'none'}"
        )
    devices = spec.get("devices") or []
    tainted = any(device.get("taints") for device in devices)
    most = MAX_TAINTED_DEVICES_PER_SLICE if tainted else MAX_DEVICES_PER_SLICE
    if len(devices) > most:
        causes.append(
            f"spec.devices: Too many: {len(devices)}: must have at most {most} items"
            + (" (a device has taints)" if tainted else "")
        )
    seen: set[str] = set()
    for index, device in enumerate(devices):
        device_name = device.get("name", "")
        if device_name in seen:
            causes.append(f'spec.devices[{index}].name: Duplicate value: "{device_name}"')
        seen.add(device_name)
        for attribute, value in (device.get("attributes") or {}).items():
            if len(value) != 1:
                causes.append(
                    f"spec.devices[{index}].attributes[{attribute}]: Invalid value: exactly one "
                    "value must be specified"
                )
        causes.extend(_device_feature_errors(f"spec.devices[{index}]", device))
    if causes:
        raise _invalid("ResourceSlice", name, causes)


def _quantity(text: Any, where: str, causes: list[str]) -> Optional[Fraction]:
    try:
        return parse_quantity(str(text))
    except ValueError:
        causes.append(f"{where}: Invalid value: {json.dumps(text)}: not a quantity")
        return None


def _device_feature_errors(where: str, device: Mapping[str, Any]) -> list[str]:
    """Validation of a device's taints, capacities and request policies."""
    causes: list[str] = []
    attributes = device.get("attributes") or {}
    capacities = device.get("capacity") or {}
    if len(attributes) + len(capacities) > MAX_ATTRIBUTES_AND_CAPACITIES:
        causes.append(
            f"{where}: Too many: attributes and capacities must be at most "
            f"{MAX_ATTRIBUTES_AND_CAPACITIES} together"
        )
    taints = device.get("taints") or []
    if len(taints) > MAX_TAINTS_PER_DEVICE:
        causes.append(f"{where}.taints: Too many: must have at most {MAX_TAINTS_PER_DEVICE}")
    for number, taint in enumerate(taints):
        at = f"{where}.taints[{number}]"
        key = str(taint.get("key", ""))
        prefix, _, name = key.rpartition("/")
        if (
            not name
            or len(name) > 63
            or not _LABEL_NAME.fullmatch(name)
            or (prefix and not _DNS_SUBDOMAIN.fullmatch(prefix))
        ):
            causes.append(f"{at}.key: Invalid value: {json.dumps(key)}: must be a label name")
        label_value = str(taint.get("value", ""))
        if len(label_value) > 63 or not _LABEL_VALUE.fullmatch(label_value):
            causes.append(
                f"{at}.value: Invalid value: {json.dumps(label_value)}: must be a label value"
            )
        if taint.get("effect") not in TAINT_EFFECTS:
            causes.append(
                f"{at}.effect: Unsupported value: {json.dumps(taint.get('effect'))}: "
                f"supported values: {', '.join(TAINT_EFFECTS)}"
            )
    for name, capacity in capacities.items():
        at = f"{where}.capacity[{name}]"
        value = _quantity(capacity.get("value"), f"{at}.value", causes)
        policy = capacity.get("requestPolicy")
        if policy is None:
            continue
        if not device.get("allowMultipleAllocations"):
            causes.append(
                f"{at}.requestPolicy: Forbidden: only for a device with "
                "allowMultipleAllocations: true"
            )
        causes.extend(_policy_errors(f"{at}.requestPolicy", policy, value))
    return causes


def _policy_errors(at: str, policy: Mapping[str, Any], value: Optional[Fraction]) -> list[str]:
    """A CapacityRequestPolicy checked against its capacity ``value``."""
    causes: list[str] = []
    if "validRange" in policy and "validValues" in policy:
        causes.append(f"{at}: Invalid value: validRange and validValues are exclusive")
    default = _quantity(policy["default"], f"{at}.default", causes) if "default" in policy else None
    valid_range = policy.get("validRange")
    if valid_range is None:
        return causes
    if default is None:
        causes.append(f"{at}.default: Required value: needed with validRange")
    if "min" not in valid_range:
        causes.append(f"{at}.validRange.min: Required value")
        return causes
    low = _quantity(valid_range["min"], f"{at}.validRange.min", causes)
    high = (
        _quantity(valid_range["max"], f"{at}.validRange.max", causes)
        if "max" in valid_range
        else None
    )
    step = (
        _quantity(valid_range["step"], f"{at}.validRange.step", causes)
        if "step" in valid_range
        else None
    )
    if low is None:
        return causes
    if value is not None and low > value:
        causes.append(f"{at}.validRange.min: Invalid value: more than the capacity")
    if high is not None and (high < low or (value is not None and high > value)):
        causes.append(f"{at}.validRange.max: Invalid value: below min or above the capacity")
    if default is not None and (default < low or (high is not None and default > high)):
        causes.append(f"{at}.default: Invalid value: outside validRange")
    if step is not None:
        if step <= 0:
            causes.append(f"{at}.validRange.step: Invalid value: must be positive")
            return causes
        if value is not None and low + step > value:
            causes.append(f"{at}.validRange.step: Invalid value: min + step exceeds the capacity")
        for label, amount in (("max", high), ("default", default)):
            if amount is not None and amount % step != 0:
                causes.append(f"{at}.{label}: Invalid value: not a multiple of validRange.step")
    return causes


def _results_of(claim: Mapping[str, Any]) -> list[dict[str, Any]]:
    allocation = claim.get("status", {}).get("allocation") or {}
    results: list[dict[str, Any]] = allocation.get("devices", {}).get("results") or []
    return results


def _consumed(result: Mapping[str, Any], driver: str, name: str) -> Optional[Fraction]:
    consumed = result.get("consumedCapacity") or {}
    texts = [consumed[key] for key in (name, f"{driver}/{name}") if key in consumed]
    return sum((parse_quantity(text) for text in texts), Fraction(0)) if texts else None


def _consumption_errors(
    where: str,
    result: Mapping[str, Any],
    device: Mapping[str, Any],
    others: Sequence[Mapping[str, Any]],
) -> list[str]:
    """A result on a device that allows multiple allocations: its shareID, and its
    consumedCapacity within each request policy and, with the others', the capacity."""
    causes: list[str] = []
    if not _UUID.fullmatch(str(result.get("shareID", ""))):
        causes.append(f"{where}.shareID: Invalid value: must be a UUID for a shared device")
    driver = str(result["driver"])
    for name, capacity in (device.get("capacity") or {}).items():
        at = f"{where}.consumedCapacity[{name}]"
        try:
            amount = _consumed(result, driver, name)
        except ValueError as error:
            causes.append(f"{at}: Invalid value: {error}")
            continue
        if amount is None:
            causes.append(f"{at}: Required value: every capacity of the device is recorded")
            continue
        value = parse_quantity(str(capacity["value"]))
        valid_range = (capacity.get("requestPolicy") or {}).get("validRange") or {}
        low = parse_quantity(str(valid_range["min"])) if "min" in valid_range else None
        high = parse_quantity(str(valid_range["max"])) if "max" in valid_range else None
        step = parse_quantity(str(valid_range["step"])) if "step" in valid_range else None
        if (low is not None and amount < low) or (high is not None and amount > high):
            causes.append(f"{at}: Invalid value: outside the request policy's validRange")
        elif low is not None and step is not None and (amount - low) % step != 0:
            causes.append(f"{at}: Invalid value: not min + n * step of the request policy")
        used = sum((_consumed(other, driver, name) or Fraction(0) for other in others), Fraction(0))
        if used + amount > value:
            causes.append(
                f"{at}: Invalid value: the device's claims would consume more than its "
                f"capacity {capacity['value']}"
            )
    return causes


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


def _field_requirements(selector: str) -> list[tuple[str, str, str]]:
    requirements = []
    for term in filter(None, selector.split(",")):
        match = re.fullmatch(r"([^=!]+?)(==|=|!=)(.*)", term)
        if not match:
            raise _ApiStatusError(400, "BadRequest", f"invalid field selector: {term!r}")
        field, operator, value = match.groups()
        if field not in _SLICE_FIELD_LABELS:
            raise _ApiStatusError(400, "BadRequest", f'field label not supported: "{field}"')
        requirements.append((field, "!=" if operator == "!=" else "=", value))
    return requirements


def _field_matches(stored: Mapping[str, Any], requirement: tuple[str, str, str]) -> bool:
    field, operator, value = requirement
    section, key = field.split(".")
    actual = str(stored.get(section, {}).get(key) or "")
    return (actual == value) == (operator == "=")


def _method_not_allowed(method: str) -> _ApiStatusError:
    return _ApiStatusError(
        405,
        "MethodNotAllowed",
        f"the server does not allow this method on the requested resource ({method})",
    )


def _path_not_found() -> _ApiStatusError:
    # What the API server sends for a path it does not serve: no details.
    return _ApiStatusError(404, "NotFound", "the server could not find the requested resource")


class _Handler(BaseHTTPRequestHandler):
    """Turns HTTP requests into :meth:`ApiServerStandIn.handle` calls."""

    server_standin: ApiServerStandIn
    protocol_version = "HTTP/1.1"  # keep-alive, as clients pool connections
    # Headers and body go out in separate writes: with Nagle's algorithm on a kept-alive
    # connection each answer waited for the client's delayed ACK (44 ms per GET measured).
    disable_nagle_algorithm = True

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        code, payload = self.server_standin.handle(
            self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body
        )
        data = json.dumps(payload).encode()
        self.send_response(code, HTTPStatus(code).phrase)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer  # noqa: N815 - http.server's names

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Quiet: tests read :attr:`ApiServerStandIn.requests` instead."""
