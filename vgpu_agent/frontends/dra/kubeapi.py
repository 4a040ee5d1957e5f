"""The API-server half of the DRA frontend: the node's ResourceSlices and the claims of its pods.

:class:`KubeResourceApi` implements :class:`~vgpu_agent.frontends.dra.types.ResourceApi` over
``resource.k8s.io/v1`` (Kubernetes 1.34 and later) with lightkube. This is the only module
of the agent that imports lightkube's client or httpx (:mod:`.encoding` writes our values as
lightkube's models and reads them back, nothing more); every error they raise is translated
here, once, into :class:`DraApiError` naming the action, the object and what to do.

Credentials: the agent acts as the node itself, with the kubelet's kubeconfig. The Node
authorizer and the NodeRestriction admission plugin let a node create, read, update and
delete the ResourceSlices whose ``spec.nodeName`` is its own, list them only with that field
selector (1.32 and later), read its own Node object and get (only get) the ResourceClaims of
pods bound to it: exactly what this module does, nothing more. docs/dra.md has the source
lines.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Callable, Optional, TypeVar, Union

import httpx
import yaml
from lightkube import ApiError, Client, ConfigError, KubeConfig
from lightkube.config.models import Cluster, User
from lightkube.models.meta_v1 import ObjectMeta, OwnerReference
from lightkube.models.resource_v1 import (
    Device,
    ResourcePool,
    ResourceSliceSpec,
)
from lightkube.models.resource_v1 import (
    DeviceTaint as KubeDeviceTaint,
)
from lightkube.resources.core_v1 import Node
from lightkube.resources.resource_v1 import ResourceClaim, ResourceSlice

from vgpu_agent.frontends.dra.encoding import (
    claim_allocation,
    keep_taint_times,
    same_slice,
    slice_spec,
)
from vgpu_agent.frontends.dra.types import (
    TAINT_NO_SCHEDULE,
    ApiFeatures,
    ClaimAllocation,
    ClaimNotFoundError,
    DraApiError,
    NodeSlice,
    SliceDevice,
)

#: Where the kubelet keeps its kubeconfig on EKS (and kubeadm) nodes.
DEFAULT_KUBECONFIG = "/var/lib/kubelet/kubeconfig"
#: Recorded in the slices' managedFields.
FIELD_MANAGER = "vgpu-agent"
#: The API server refuses a ResourceSlice of more devices (ResourceSliceMaxDevices).
MAX_DEVICES_PER_SLICE = 128
#: ... and of more than this many when any of them has taints
#: (ResourceSliceMaxDevicesWithAdvancedFeatures).
MAX_TAINTED_DEVICES_PER_SLICE = 64
#: How often a write that lost a race (409 Conflict) is tried again from a fresh read.
CONFLICT_ATTEMPTS = 5
#: A ResourceSlice name is a DNS subdomain: at most 253 characters.
_MAX_NAME_LENGTH = 253

_DOCS = "see docs/dra.md"
_Result = TypeVar("_Result")


def slice_name(node_name: str, driver: str, index: int = 0) -> str:
    """The name of the node's ``index``-th ResourceSlice of ``driver``: ``<node>-<driver with
    dots as dashes>`` (``-<index>`` after the first), shortened with a hash when too long."""
    name = f"{node_name}-{driver.replace('.', '-')}"
    if index:
        name = f"{name}-{index}"
    if len(name) <= _MAX_NAME_LENGTH:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{name[: _MAX_NAME_LENGTH - len(digest) - 1].rstrip('-.')}-{digest}"


class KubeResourceApi:
    """The API server through one lightkube client (thread-safe: httpx pools connections).

    Build it with :meth:`from_kubeconfig` (the node's kubelet kubeconfig) or :meth:`for_server`
    (a URL and a bearer token or none: the stand-in API server in tests and the demo).
    ``reconnect``, when given, builds a new client from the credentials' source: a request
    refused with 401 is tried once more through it (the kubelet rotates its client
    certificate, and the kubeconfig names the current one).
    """

    def __init__(
        self,
        client: Client,
        *,
        server: str,
        credentials: str,
        reconnect: Optional[Callable[[], Client]] = None,
    ) -> None:
        self._client = client
        self._server = server
        self._credentials = credentials
        self._reconnect = reconnect

    @classmethod
    def from_kubeconfig(
        cls,
        path: Union[str, os.PathLike[str]] = DEFAULT_KUBECONFIG,
        *,
        context: Optional[str] = None,
        timeout_s: float = 10.0,
    ) -> KubeResourceApi:
        """Use the identity in a kubeconfig (by default the kubelet's) and its current context.

        Raises :class:`DraApiError` when the file cannot be read or names no usable cluster.
        """
        where = f"reading the kubeconfig {os.fspath(path)}"

        def connect() -> tuple[Client, str]:
            return _client_from_kubeconfig(path, context, timeout_s, where)

        client, server = connect()
        return cls(
            client,
            server=server,
            credentials=os.fspath(path),
            reconnect=lambda: connect()[0],
        )

    @classmethod
    def for_server(
        cls,
        base_url: str,
        *,
        token: Optional[str] = None,
        timeout_s: float = 10.0,
        transport: Optional[httpx.BaseTransport] = None,
    ) -> KubeResourceApi:
        """Talk to ``base_url`` with a bearer ``token`` or none (a stand-in API server on
        loopback)."""
        config = KubeConfig.from_one(cluster=Cluster(server=base_url), user=User(token=token))
        client = Client(
            config,
            timeout=httpx.Timeout(timeout_s),
            field_manager=FIELD_MANAGER,
            trust_env=False,
            transport=transport,
        )
        return cls(
            client, server=base_url, credentials="a bearer token" if token else "no credentials"
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    # -- ResourceClaims -----------------------------------------------------------------------

    def get_claim(self, namespace: str, name: str) -> ClaimAllocation:
        """Read one ResourceClaim; its allocation results of every driver."""
        action = f"reading ResourceClaim {namespace}/{name}"

        def read() -> ResourceClaim:
            with self._translated(action, claim=(namespace, name)):
                return self._client.get(ResourceClaim, name, namespace=namespace)

        return claim_allocation(self._reconnecting(read), namespace, name)

    # -- ResourceSlices -----------------------------------------------------------------------

    def publish_slice(self, node_slice: NodeSlice) -> None:
        """Make the node's ResourceSlices of the driver hold exactly ``node_slice``.

        The devices go into as few slices as the API allows (128 devices each), all of the
        one pool with the same generation and ``resourceSliceCount``; slices of the node and
        driver beyond those are deleted, unchanged ones are not written. Each slice is owned
        by the Node object, so the garbage collector removes them with the node. A write
        that loses a race (409) starts again from a fresh list.
        """
        self._reconnecting(lambda: self._publish(node_slice))

    def delete_slices(self, driver: str, node_name: str) -> None:
        """Delete every ResourceSlice of ``driver`` on ``node_name`` (found by field selector)."""

        def delete() -> None:
            for name in self._node_slices(driver, node_name):
                self._delete_slice(name)

        self._reconnecting(delete)

    def _reconnecting(self, operation: Callable[[], _Result]) -> _Result:
        """Run ``operation``; once more with a new client when credentials were refused."""
        try:
            return operation()
        except DraApiError as error:
            cause = error.__cause__
            refused = isinstance(cause, ApiError) and cause.response.status_code == 401
            if not refused or self._reconnect is None:
                raise
        self._client.close()
        self._client = self._reconnect()
        return operation()

    def _publish(self, node_slice: NodeSlice) -> None:
        tainted = any(device.taints for device in node_slice.devices)
        chunks = _chunks(
            node_slice.devices,
            MAX_TAINTED_DEVICES_PER_SLICE if tainted else MAX_DEVICES_PER_SLICE,
        )
        owner = self._node_owner(node_slice.node_name)
        wanted = {
            slice_name(node_slice.node_name, node_slice.driver, index): slice_spec(
                node_slice, devices, slice_count=len(chunks)
            )
            for index, devices in enumerate(chunks)
        }
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                self._reconcile(node_slice, wanted, owner, last=attempt == CONFLICT_ATTEMPTS)
                return
            except _ConflictError:
                continue

    def probe_features(self, driver: str, node_name: str) -> ApiFeatures:
        """Which slice features the API server keeps: a dry-run create (nothing is stored)
        of a one-device slice that allows multiple allocations, has a capacity request
        policy and a taint; a feature whose feature gate is off comes back without its
        fields (the API server drops disabled fields silently)."""
        name = slice_name(node_name, f"{driver}-probe")
        probe = ResourceSlice(
            metadata=ObjectMeta(name=name),
            spec=ResourceSliceSpec(
                driver=driver,
                nodeName=node_name,
                pool=ResourcePool(name=node_name, generation=0, resourceSliceCount=1),
                devices=[
                    Device(
                        name="probe",
                        allowMultipleAllocations=True,
                        capacity={
                            "memory": {
                                "value": "2Mi",
                                "requestPolicy": {
                                    "default": "1Mi",
                                    "validRange": {"min": "1Mi", "max": "2Mi", "step": "1Mi"},
                                },
                            }
                        },
                        taints=[
                            KubeDeviceTaint(
                                key=f"{driver}/probe", value="probe", effect=TAINT_NO_SCHEDULE
                            )
                        ],
                    )
                ],
            ),
        )
        action = (
            f"asking which ResourceSlice fields the API server keeps (a dry-run create of {name})"
        )

        def create() -> ResourceSlice:
            with self._translated(action):
                created: ResourceSlice = self._client.create(probe, dry_run=True)
                return created

        answer = self._reconnecting(create)
        devices = answer.spec.devices or []
        device = devices[0] if devices else None
        if device is None:
            return ApiFeatures()
        policy = (device.capacity or {}).get("memory", {}).get("requestPolicy")
        return ApiFeatures(
            consumable_capacity=bool(device.allowMultipleAllocations) and bool(policy),
            device_taints=bool(device.taints),
        )

    def _reconcile(
        self,
        node_slice: NodeSlice,
        wanted: Mapping[str, ResourceSliceSpec],
        owner: OwnerReference,
        *,
        last: bool,
    ) -> None:
        # One list by field selector, never a get by name: the Node authorizer answers a
        # node's get of a slice it has no edge to (one not created yet) with 403, not 404.
        existing = self._node_slices(node_slice.driver, node_slice.node_name)
        for name, spec in wanted.items():
            current = existing.get(name)
            # The resourceVersion read makes the update conditional: a writer in between
            # turns it into a 409, and we list again.
            version = current.metadata.resourceVersion if current and current.metadata else None
            desired = ResourceSlice(
                metadata=ObjectMeta(name=name, ownerReferences=[owner], resourceVersion=version),
                spec=keep_taint_times(spec, current.spec if current else None),
            )
            with self._translated(f"publishing ResourceSlice {name}", retry_conflict=not last):
                if current is None:
                    self._client.create(desired)
                elif not same_slice(current, desired):
                    self._client.replace(desired)
        for name in existing:
            if name not in wanted:
                self._delete_slice(name)

    def _node_slices(self, driver: str, node_name: str) -> dict[str, ResourceSlice]:
        """The node's slices of ``driver`` by name."""
        action = f"listing the ResourceSlices of driver {driver} on node {node_name}"
        with self._translated(action):
            # The Node authorizer lets a node list only with its own spec.nodeName selector.
            slices = self._client.list(
                ResourceSlice, fields={"spec.nodeName": node_name, "spec.driver": driver}
            )
            return {s.metadata.name: s for s in slices if s.metadata and s.metadata.name}

    def _delete_slice(self, name: str) -> None:
        with self._translated(f"deleting ResourceSlice {name}"):
            try:
                self._client.delete(ResourceSlice, name)
            except ApiError as error:
                if not (error.status.code == 404 and _names_object(error, name)):
                    raise

    def _node_owner(self, node_name: str) -> OwnerReference:
        """An owner reference to the Node, read at every publish: a node deleted and
        registered again has a new uid, and slices owned by the old one would be collected."""
        action = f"reading Node {node_name} (the owner of its ResourceSlices)"
        try:
            with self._translated(action):
                node = self._client.get(Node, node_name)
        except DraApiError as error:
            cause = error.__cause__
            if isinstance(cause, ApiError) and cause.status.code == 404:
                raise DraApiError(
                    f"{action}: no such Node: the kubelet has not registered this node (yet), "
                    "or the node name given to the agent is not the kubelet's"
                ) from cause
            raise
        uid = node.metadata.uid if node.metadata else None
        if not uid:
            raise DraApiError(f"{action}: the API server sent it without a uid")
        return OwnerReference(
            apiVersion="v1", kind="Node", name=node_name, uid=uid, controller=True
        )

    # -- errors ---------------------------------------------------------------------------------

    @contextmanager
    def _translated(
        self,
        action: str,
        *,
        claim: Optional[tuple[str, str]] = None,
        retry_conflict: bool = False,
    ) -> Iterator[None]:
        """Turn lightkube's and httpx's errors into one :class:`DraApiError` naming ``action``."""
        try:
            yield
        except ApiError as error:
            status = error.status
            code = status.code or error.response.status_code
            if code == 409 and retry_conflict:
                raise _ConflictError from error
            if code == 404 and claim is not None and _names_object(error, claim[1]):
                raise ClaimNotFoundError(
                    f"{action}: not found (deleted, or the pod's claim is not created yet)"
                ) from error
            reason = f"{code} {status.reason or error.response.reason_phrase}"
            message = f"{action}: {reason}: {status.message}"
            hint = self._hint(code, error)
            raise DraApiError(f"{message} ({hint})" if hint else message) from error
        except json.JSONDecodeError as error:
            # lightkube reads every error body as a Status; a proxy's HTML page is not one.
            raise DraApiError(
                f"{action}: the API server at {self._server} answered with an error that is "
                f"not a Kubernetes Status (a proxy in between?): {error}"
            ) from error
        except httpx.HTTPStatusError as error:
            # lightkube reads an error body as a Status only when it is JSON.
            raise DraApiError(
                f"{action}: the API server at {self._server} answered "
                f"{error.response.status_code} {error.response.reason_phrase} with a body that "
                "is not a Kubernetes Status (a proxy in between?)"
            ) from error
        except ConfigError as error:
            raise DraApiError(
                f"{action}: getting the node's credentials from {self._credentials} failed: {error}"
            ) from error
        except httpx.TimeoutException as error:
            raise DraApiError(
                f"{action}: the API server at {self._server} did not answer in time "
                f"({type(error).__name__})"
            ) from error
        except httpx.TransportError as error:
            raise DraApiError(
                f"{action}: cannot reach the API server at {self._server}: "
                f"{str(error) or type(error).__name__} (check the node's network and the "
                f"kubeconfig's server)"
            ) from error

    def _hint(self, code: int, error: ApiError) -> str:
        if code == 401:
            return (
                f"the API server refused the credentials of {self._credentials}: an expired "
                f"client certificate or token? {_DOCS}"
            )
        if code == 403:
            return (
                f"the identity in {self._credentials} lacks this permission: the agent must "
                f"use the node's own identity (system:node:<node name>), which the Node "
                f"authorizer allows only its own node's ResourceSlices and the claims of its "
                f"pods; {_DOCS}"
            )
        if code == 404 and not _names_object(error, None):
            return (
                "the API server does not serve resource.k8s.io/v1: DRA needs Kubernetes 1.34 "
                f"or later; {_DOCS}"
            )
        if code == 409:
            return f"another writer kept changing it; tried {CONFLICT_ATTEMPTS} times"
        if code in (400, 422):
            return "the API server refused the object as written: a bug in the agent, report it"
        return ""


def _client_from_kubeconfig(
    path: Union[str, os.PathLike[str]], context: Optional[str], timeout_s: float, where: str
) -> tuple[Client, str]:
    """A client with the kubeconfig's credentials, and the server it names."""
    try:
        config = KubeConfig.from_file(path).get(context_name=context)
    except ConfigError as error:
        raise DraApiError(f"{where}: {error} (give the node's kubelet kubeconfig)") from error
    except (OSError, UnicodeDecodeError) as error:
        raise DraApiError(f"{where}: {error}") from error
    except (yaml.YAMLError, KeyError, TypeError, AttributeError, ValueError) as error:
        # A missing or mistyped section is a KeyError, TypeError or AttributeError inside
        # lightkube's parser.
        raise DraApiError(f"{where}: not a kubeconfig ({type(error).__name__}: {error})") from error
    if config is None:
        raise DraApiError(f"{where}: it has no current-context (name one with context=...)")
    if config.user is None:
        raise DraApiError(f"{where}: its context names no user (the node's credentials)")
    try:
        client = Client(
            config,
            timeout=httpx.Timeout(timeout_s),
            field_manager=FIELD_MANAGER,
            trust_env=False,
        )
    except (ConfigError, OSError, ValueError) as error:
        # Certificates are loaded here: a missing CA or client key file ends up as OSError
        # (ssl.SSLError included).
        raise DraApiError(f"{where}: {error}") from error
    return client, config.cluster.server


def from_kubeconfig(
    path: Union[str, os.PathLike[str]] = DEFAULT_KUBECONFIG,
    *,
    context: Optional[str] = None,
    timeout_s: float = 10.0,
) -> KubeResourceApi:
    """:meth:`KubeResourceApi.from_kubeconfig`, for callers that import this module by name."""
    return KubeResourceApi.from_kubeconfig(path, context=context, timeout_s=timeout_s)


class _ConflictError(Exception):
    """A write lost a race (409): read again and retry."""


def _names_object(error: ApiError, name: Optional[str]) -> bool:
    """Whether a 404 is about one object (``details.name``; any when ``name`` is None), not a
    missing API (the server sends no details for a path it does not serve)."""
    details = error.status.details
    if details is None or not details.name:
        return False
    return name is None or details.name == name


def _chunks(devices: Sequence[SliceDevice], size: int) -> list[tuple[SliceDevice, ...]]:
    # An empty pool is still published (one slice without devices): it tells the scheduler
    # the node has none now, and keeps the pool generation moving.
    return [tuple(devices[i : i + size]) for i in range(0, len(devices), size)] or [()]
