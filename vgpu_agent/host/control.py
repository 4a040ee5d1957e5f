"""The agent's control socket: `vgpu-agent status`, `health reset` and `simulate` talk to
the running agent through it.

One JSON object per line each way, over a unix stream socket that only root can open
(mode 0600). The server parses each request into a typed command
(:mod:`vgpu_agent.model.commands`) and hands it to a callable that runs it on the agent's loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from typing import Any, Callable, Optional

from vgpu_agent.host.sockets import socket_answers
from vgpu_agent.model.commands import ControlCommand, parse_command, to_request
from vgpu_agent.model.errors import AgentError, AgentNotRunningError, VgpuError

log = logging.getLogger(__name__)

#: A request is one small command; anything longer is refused unread.
MAX_REQUEST_BYTES = 64 * 1024
#: A reply grows with the vGPUs served (`status` lists each one, ~60 bytes a vGPU); this
#: only bounds what a broken agent could make the client hold in memory.
MAX_REPLY_BYTES = 64 * 1024 * 1024
CLIENT_TIMEOUT_S = 10.0

Handler = Callable[[ControlCommand], dict[str, Any]]


class ControlServer:
    """Accepts control requests on ``socket_path`` in a background thread."""

    def __init__(self, socket_path: str, handler: Handler) -> None:
        self.socket_path = socket_path
        self._handler = handler
        self._listener: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._inode: Optional[int] = None

    def start(self) -> None:
        """Create the socket (replacing a stale one) and start accepting."""
        directory = os.path.dirname(self.socket_path)
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
            if socket_answers(self.socket_path):
                raise AgentError(
                    f"another vgpu-agent already answers on {self.socket_path}; stop it first "
                    "(systemctl stop vgpu-agent)"
                )
            if os.path.lexists(self.socket_path):
                os.unlink(self.socket_path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o177)
            try:
                listener.bind(self.socket_path)
            finally:
                os.umask(old_umask)
            listener.listen(16)
        except OSError as exc:
            raise AgentError(f"creating the control socket {self.socket_path}: {exc}") from exc
        self._inode = os.stat(self.socket_path).st_ino
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, name="vgpu-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting and remove the socket if it is still ours."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        with contextlib.suppress(OSError):  # not connected: nothing to shut down
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        try:
            if os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)
        except OSError:
            pass  # already gone
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def _serve(self) -> None:
        while True:
            listener = self._listener
            if listener is None:
                return
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(CLIENT_TIMEOUT_S)
            try:
                request = _read_line(conn, MAX_REQUEST_BYTES, "request")
                command = parse_command(_parse_request(request))
            except (ValueError, UnicodeDecodeError) as exc:
                answer = {"ok": False, "error": f"bad request: {exc}"}
            except VgpuError as exc:
                answer = {"ok": False, "error": str(exc)}
            except Exception as exc:  # the control socket must never take the agent down
                log.exception("control request failed")
                answer = {"ok": False, "error": f"internal error: {exc}"}
            else:
                answer = self._run(command)
            with contextlib.suppress(OSError):  # the client went away; nothing to tell it
                conn.sendall(json.dumps(answer).encode() + b"\n")

    def _run(self, command: ControlCommand) -> dict[str, Any]:
        try:
            return self._handler(command)
        except Exception as exc:  # the control socket must never take the agent down
            log.exception("control request failed")
            return {"ok": False, "error": f"internal error: {exc}"}


def _parse_request(text: str) -> dict[str, Any]:
    command = json.loads(text)
    if not isinstance(command, dict):
        raise ValueError("a request is a JSON object")  # noqa: TRY004 - reported as a bad request
    return command


def _read_line(conn: socket.socket, limit_bytes: int, what: str) -> str:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if b"\n" in chunk:
            break
        if size > limit_bytes:
            raise ValueError(f"{what} longer than {limit_bytes} bytes")
    data = b"".join(chunks)
    line = data.split(b"\n", 1)[0]
    if len(line) > limit_bytes:
        raise ValueError(f"{what} longer than {limit_bytes} bytes")
    return line.decode()


def request(socket_path: str, command: ControlCommand) -> dict[str, Any]:
    """Send one command to the running agent; raises AgentError when it cannot be reached."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(CLIENT_TIMEOUT_S)
    try:
        client.connect(socket_path)
        client.sendall(json.dumps(to_request(command)).encode() + b"\n")
        answer = json.loads(_read_line(client, MAX_REPLY_BYTES, "reply"))
    except FileNotFoundError as exc:
        raise AgentNotRunningError(
            f"the agent is not running (no control socket at {socket_path}); "
            "start it with `systemctl start vgpu-agent` or `vgpu-agent run`"
        ) from exc
    except ConnectionRefusedError as exc:
        # The socket file of an agent that was killed: nobody listens on it.
        raise AgentNotRunningError(
            f"the agent is not running (nothing listens on {socket_path}, left by an agent "
            "that was killed); start it with `systemctl start vgpu-agent` or `vgpu-agent run`"
        ) from exc
    except PermissionError as exc:
        raise AgentError(f"cannot open {socket_path}: permission denied (run as root)") from exc
    except (OSError, ValueError) as exc:
        raise AgentError(f"talking to the agent on {socket_path}: {exc}") from exc
    finally:
        client.close()
    if not isinstance(answer, dict):
        raise AgentError(f"the agent on {socket_path} sent a malformed answer")
    return answer
