"""Starting ``vgpu-mps@<uuid>.service`` for an agent that may not talk to systemd itself.

The long-running agent runs in a sandbox that cannot reach systemd (no D-Bus, no
``/run/systemd/private``), so it cannot start, stop or change units. To start a GPU's MPS
unit it connects to ``vgpu-mps-units.socket`` (``/run/vgpu-mps-units.sock``, root only)
and sends one line, ``start <gpu-uuid>``. systemd starts one ``vgpu-mps-units@.service``
per connection (``Accept=yes``); it runs :func:`handle_request` as root without any
capability, in a sandbox of its own, which:

- accepts exactly one verb (``start``) and one well-formed NVIDIA GPU UUID,
- checks that the node's config serves that GPU (read from the config file, never from
  the request),
- runs ``systemctl start vgpu-mps@<uuid>.service`` and answers ``ok`` or
  ``error <one line>``.

So whoever takes over the agent can at most start the MPS daemon of a GPU the config
already serves. See docs/systemd.md.
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import stat
import subprocess
import time
from typing import BinaryIO, Callable, Optional

from vgpu_agent.model.errors import MpsError, VgpuError

#: The socket ``vgpu-mps-units.socket`` listens on.
REQUEST_SOCKET = "/run/vgpu-mps-units.sock"
UNIT_TEMPLATE = "vgpu-mps@{gpu_uuid}.service"
#: A physical GPU's UUID as NVML prints it (lower-case hex; MIG devices are not served).
GPU_UUID_PATTERN = re.compile(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: Longer requests are refused unread: a verb, a space and a UUID fit with room to spare.
MAX_REQUEST_BYTES = 128
VERBS = ("start",)
#: How long the helper waits for the request line. The agent sends it as soon as it is
#: connected; a connection that stays silent this long is not the agent, and must not hold
#: a helper (and one of the socket's MaxConnections) for the unit's whole RuntimeMaxSec.
REQUEST_READ_TIMEOUT_S = 5.0


def parse_request(line: bytes) -> tuple[str, str]:
    """``(verb, gpu_uuid)`` from one request line; MpsError naming what is wrong."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise MpsError("request is not ASCII") from None
    words = text.rstrip("\n").split(" ")
    if len(words) != 2:
        raise MpsError(f"request must be '<verb> <gpu-uuid>', got {text.strip()[:60]!r}")
    verb, gpu_uuid = words
    if verb not in VERBS:
        raise MpsError(f"unknown verb {verb[:20]!r} (only {', '.join(VERBS)})")
    if GPU_UUID_PATTERN.fullmatch(gpu_uuid) is None:
        raise MpsError(f"{gpu_uuid[:60]!r} is not a GPU UUID (GPU-xxxxxxxx-xxxx-...)")
    return verb, gpu_uuid


def read_request(request: BinaryIO, timeout_s: float = REQUEST_READ_TIMEOUT_S) -> bytes:
    """The request line (at most MAX_REQUEST_BYTES + 1 bytes, so an overlong one shows);
    MpsError when no whole line arrives within ``timeout_s``. A stream without a file
    descriptor (a test's buffer) is read as it is."""
    try:
        fd = request.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return request.readline(MAX_REQUEST_BYTES + 1)
    deadline = time.monotonic() + timeout_s
    data = b""
    while b"\n" not in data and len(data) <= MAX_REQUEST_BYTES:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise MpsError(
                f"no complete request line within {timeout_s:g} s "
                "(a request is one line: 'start <gpu-uuid>' and a newline)"
            )
        chunk = os.read(fd, MAX_REQUEST_BYTES + 1 - len(data))
        if not chunk:
            break  # the client closed its side: what came is the request
        data += chunk
    line, newline, _rest = data.partition(b"\n")
    return line + newline


def start_unit(gpu_uuid: str, systemctl: str = "systemctl", timeout_s: float = 60.0) -> None:
    """``systemctl start vgpu-mps@<uuid>.service``; MpsError with systemctl's words if it fails."""
    unit = UNIT_TEMPLATE.format(gpu_uuid=gpu_uuid)
    try:
        completed = subprocess.run(
            [systemctl, "start", unit],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except FileNotFoundError:
        raise MpsError(f"starting {unit}: {systemctl} not found") from None
    except subprocess.TimeoutExpired:
        raise MpsError(
            f"starting {unit}: systemctl did not return within {timeout_s:g} s"
        ) from None
    if completed.returncode != 0:
        output = (completed.stderr or completed.stdout).decode("utf-8", "replace").strip()
        raise MpsError(
            f"starting {unit}: {output or f'systemctl exit {completed.returncode}'} "
            f"(see systemctl status {unit} and journalctl -u {unit})"
        )


def handle_request(
    request: BinaryIO,
    reply: BinaryIO,
    served_uuids: Callable[[], set[str]],
    start: Callable[[str], None] = start_unit,
    read_timeout_s: float = REQUEST_READ_TIMEOUT_S,
) -> Optional[str]:
    """Answer one request from ``request`` on ``reply`` (the accepted connection); None
    when the unit was started, else why not. ``served_uuids`` lists the GPUs the config
    serves; it is asked only for a well-formed request."""
    try:
        line = read_request(request, read_timeout_s)
        if len(line) > MAX_REQUEST_BYTES:
            raise MpsError(f"request longer than {MAX_REQUEST_BYTES} bytes")
        _verb, gpu_uuid = parse_request(line)
        if gpu_uuid not in served_uuids():
            raise MpsError(f"GPU {gpu_uuid} is not served by this node's config")
        start(gpu_uuid)
    except VgpuError as exc:
        problem = str(exc).replace("\n", " ")
        reply.write(f"error {problem}\n".encode("utf-8", "replace"))
        reply.flush()
        return problem
    reply.write(b"ok\n")
    reply.flush()
    return None


def request_start(
    gpu_uuid: str, socket_path: str = REQUEST_SOCKET, timeout_s: float = 60.0
) -> None:
    """Ask ``vgpu-mps-units.socket`` to start the GPU's MPS unit; MpsError with its answer."""
    unit = UNIT_TEMPLATE.format(gpu_uuid=gpu_uuid)
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(timeout_s)
    try:
        try:
            connection.connect(socket_path)
            connection.sendall(f"start {gpu_uuid}\n".encode("ascii"))
            answer = _read_line(connection)
        except socket.timeout:
            raise MpsError(
                f"starting {unit}: no answer on {socket_path} within {timeout_s:g} s "
                "(see journalctl -u 'vgpu-mps-units@*')"
            ) from None
        except OSError as exc:
            hint = (
                "is vgpu-mps-units.socket running? systemctl start vgpu-mps-units.socket"
                if exc.errno in (errno.ENOENT, errno.ECONNREFUSED)
                else "see journalctl -u 'vgpu-mps-units@*'"
            )
            raise MpsError(
                f"starting {unit} through {socket_path}: {exc.strerror} ({hint})"
            ) from None
    finally:
        connection.close()
    if answer == "ok":
        return
    if answer.startswith("error "):
        raise MpsError(answer[len("error ") :])
    raise MpsError(
        f"starting {unit}: unexpected answer {answer[:80]!r} on {socket_path} "
        "(see journalctl -u 'vgpu-mps-units@*')"
    )


def _read_line(connection: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n") and len(data) < 4096:
        chunk = connection.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace").strip()


def request_socket_available(socket_path: Optional[str] = REQUEST_SOCKET) -> bool:
    """Whether the request socket exists (the packaged units are installed and started)."""
    if socket_path is None:
        return False
    try:
        return stat.S_ISSOCK(os.stat(socket_path).st_mode)
    except OSError:
        return False
