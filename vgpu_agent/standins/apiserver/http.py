"""The stand-in API server's HTTP side: requests in, JSON answers out.

Real HTTP on loopback (the standard library's threading HTTP server); what a request means
is decided by whatever :attr:`Handler.server_standin` is (the
:class:`~vgpu_agent.standins.apiserver.server.ApiServerStandIn`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Optional, Protocol


class Answering(Protocol):
    """What answers a request: the HTTP code and the JSON body."""

    def handle(
        self, method: str, target: str, headers: Mapping[str, str], body: Optional[bytes]
    ) -> tuple[int, dict[str, Any]]:
        """Answer one request (``headers`` with lower-case names)."""
        ...


class Handler(BaseHTTPRequestHandler):
    """Turns HTTP requests into :meth:`ApiServerStandIn.handle` calls."""

    server_standin: Answering
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
