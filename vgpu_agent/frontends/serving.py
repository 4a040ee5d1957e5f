"""What every kubelet frontend's gRPC side shares: unix socket targets and options, the
tolerant request deserializer, and clearing and listening on a server socket.

The device plugin and the DRA plugin each serve gRPC on unix sockets in a kubelet
directory; the PodResources client and the stand-ins dial them. The rules for doing so
(no proxy, no retries, the message size, what a request that does not parse becomes, when a
socket file in the way may be removed) are one set, kept here.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Any, Callable

from vgpu_agent.host.sockets import socket_answers
from vgpu_agent.model.errors import AgentError

log = logging.getLogger(__name__)

#: Channel options for a local unix socket.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # A local unix socket: never route through an HTTP proxy from the environment.
    ("grpc.enable_http_proxy", 0),
    # A refused registration must fail now, not be retried behind our back.
    ("grpc.enable_retries", 0),
)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024

#: Server options of the frontends' gRPC servers.
SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # The kubelet is on the same host: no keepalive pings are needed to notice a dead peer
    # (the kernel closes the socket), and every ping would wake the process, whose idle CPU
    # should stay near zero.
    ("grpc.keepalive_time_ms", 2 * 60 * 60 * 1000),
)


def unix_target(path: str) -> str:
    """The gRPC target for the unix socket at ``path``."""
    return f"unix://{os.path.abspath(path)}"


class UnparseableRequest:
    """Stands in for a request whose bytes are not a valid message (an id that is not
    UTF-8, broken framing), so the RPC can refuse it as INVALID_ARGUMENT; gRPC's own
    handling would answer INTERNAL and log a traceback for every such request (it treats
    a deserializer's None as its own failure)."""

    def __init__(self, message_name: str, error: str) -> None:
        self.message_name = message_name
        self.error = error


def tolerant(message_type: Any) -> Callable[[bytes], Any]:
    """A request deserializer that hands a request that does not parse to the servicer as
    an :class:`UnparseableRequest`."""

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception as exc:  # DecodeError: its class differs per protobuf runtime
            return UnparseableRequest(message_type.DESCRIPTOR.full_name, str(exc))

    return parse


def remove_stale_socket(path: str, info: os.stat_result, refusal: str, busy_hint: str) -> None:
    """Remove the socket file at ``path`` (``info``: its lstat) that nobody serves on any
    more; raise AgentError ``"<refusal>: ..."`` when it is not a socket, or when a process
    still answers on it (``busy_hint`` says what to do)."""
    if not stat.S_ISSOCK(info.st_mode):
        raise AgentError(f"{refusal}: a file that is not a socket is in the way; remove it")
    if socket_answers(path):
        raise AgentError(f"{refusal}: {busy_hint}")
    log.info("removing stale socket %s", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise AgentError(f"cannot remove stale socket {path}: {exc.strerror or exc}") from exc


def listen_on_unix_socket(server: Any, path: str, unusable_hint: str) -> None:
    """Add the unix socket ``path`` to the gRPC ``server``; AgentError when it cannot be
    bound (``unusable_hint`` says what to check)."""
    try:
        port = server.add_insecure_port(unix_target(path))
    except RuntimeError as exc:  # newer grpcio raises, older ones return 0
        raise AgentError(f"cannot listen on unix socket {path}: {exc}") from exc
    if port == 0:
        raise AgentError(f"cannot listen on unix socket {path} ({unusable_hint})")
