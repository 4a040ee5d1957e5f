"""The stand-in API server's identities and what each may do.

Requests carry a bearer token mapped to a user name by ``tokens``; without a token they are
``anonymous_user`` (``None`` makes that a 401). A user named ``system:node:<name>`` gets what
the Node authorizer and the NodeRestriction admission plugin give a node (docs/dra.md): its
own slices, list only with its ``spec.nodeName`` selector, get of the claims of its pods and
of its Node; anything else is a 403 with the real server's wording. Any other user may do
everything: each check here passes when the node name is ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from vgpu_agent.standins.apiserver.errors import ApiStatusError, forbidden
from vgpu_agent.standins.apiserver.schema import RESOURCE_GROUP

NODE_USER_PREFIX = "system:node:"


def authenticate(
    headers: Mapping[str, str], tokens: Mapping[str, str], anonymous_user: Optional[str]
) -> str:
    """The user a request comes from (``headers`` with lower-case names), or a 401."""
    authorization = headers.get("authorization", "")
    if authorization.startswith("Bearer "):
        user = tokens.get(authorization[len("Bearer ") :])
        if user is not None:
            return user
    elif anonymous_user is not None:
        return anonymous_user
    raise ApiStatusError(401, "Unauthorized", "Unauthorized")


def node_of(user: str) -> Optional[str]:
    """The node a ``system:node:<name>`` user is, ``None`` for any other user."""
    return user[len(NODE_USER_PREFIX) :] if user.startswith(NODE_USER_PREFIX) else None


def check_own_slice(
    user: str,
    node_name: Optional[str],
    verb: str,
    name: str,
    stored: Optional[Mapping[str, Any]],
) -> None:
    """The Node authorizer: a node reaches a named slice only when its nodeName is the node."""
    if node_name is None:
        return
    if stored is None or stored["spec"].get("nodeName") != node_name:
        raise forbidden(
            user,
            verb,
            "resourceslices",
            name,
            f"no relationship found between node '{node_name}' and this object",
        )


def check_node_selector(
    user: str,
    node_name: Optional[str],
    verb: str,
    requirements: Sequence[tuple[str, str, str]],
) -> None:
    """The Node authorizer: a node lists (or deletes a collection of) slices only with its own
    ``spec.nodeName`` field selector."""
    if node_name is not None and ("spec.nodeName", "=", node_name) not in requirements:
        raise forbidden(
            user,
            verb,
            "resourceslices",
            "",
            "can only list/watch/deletecollection resourceslices with nodeName field selector",
        )


def check_created_for_node(node_name: Optional[str], body: Mapping[str, Any], name: str) -> None:
    """NodeRestriction: a node creates only slices of its own nodeName (the authorizer allowed
    the create without seeing the object)."""
    if node_name is not None and body.get("spec", {}).get("nodeName") != node_name:
        raise ApiStatusError(
            403,
            "Forbidden",
            f'resourceslices.{RESOURCE_GROUP} "{name}" is forbidden: can only create '
            "ResourceSlice with the same NodeName as the requesting node",
            {"name": name, "group": RESOURCE_GROUP, "kind": "resourceslices"},
        )


def check_claim_of_node(
    user: str, node_name: Optional[str], namespace: str, name: str, claim_node: Optional[str]
) -> None:
    """The Node authorizer: a node gets a claim only when a pod on it (``claim_node``, where the
    pod that references it runs) references it."""
    if node_name is not None and claim_node != node_name:
        raise forbidden(
            user,
            "get",
            "resourceclaims",
            name,
            f"no relationship found between node '{node_name}' and this object",
            namespace=namespace,
        )


def check_own_node(user: str, node_name: Optional[str], name: str) -> None:
    """The Node authorizer: a node reads only its own Node object."""
    if node_name is not None and name != node_name:
        raise forbidden(
            user,
            "get",
            "nodes",
            name,
            f"node '{node_name}' cannot read '{name}', only its own Node object",
        )
