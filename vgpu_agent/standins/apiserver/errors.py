"""The stand-in API server's error answers: an HTTP code with the ``Status`` object the API
server sends with it, worded as the real server words them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

from vgpu_agent.standins.apiserver.schema import RESOURCE_GROUP


class ApiStatusError(Exception):
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


def not_found(resource: str, name: str, group: str = RESOURCE_GROUP) -> ApiStatusError:
    """No such object (details name it)."""
    qualified = f"{resource}.{group}" if group else resource
    return ApiStatusError(
        404,
        "NotFound",
        f'{qualified} "{name}" not found',
        {"name": name, "group": group, "kind": resource},
    )


def invalid(kind: str, name: str, causes: Sequence[str]) -> ApiStatusError:
    """Validation refused the object, for each of ``causes``."""
    return ApiStatusError(
        422,
        "Invalid",
        f'{kind} "{name}" is invalid: {"; ".join(causes)}',
        {"name": name, "group": RESOURCE_GROUP, "kind": kind},
    )


def forbidden(
    user: str, verb: str, resource: str, name: str, reason: str, *, namespace: str = ""
) -> ApiStatusError:
    """The authorizer's refusal, worded as the API server words it."""
    group = "" if resource == "nodes" else RESOURCE_GROUP
    qualified = f"{resource}.{group}" if group else resource
    subject = f'{qualified} "{name}"' if name else qualified
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    return ApiStatusError(
        403,
        "Forbidden",
        f'{subject} is forbidden: User "{user}" cannot {verb} resource "{resource}" in API '
        f'group "{group}" {scope}: {reason}',
        {"name": name, "group": group, "kind": resource},
    )


def method_not_allowed(method: str) -> ApiStatusError:
    """A path that is served, with a method it is not."""
    return ApiStatusError(
        405,
        "MethodNotAllowed",
        f"the server does not allow this method on the requested resource ({method})",
    )


def path_not_found() -> ApiStatusError:
    """A path the server does not serve."""
    # What the API server sends for a path it does not serve: no details.
    return ApiStatusError(404, "NotFound", "the server could not find the requested resource")
