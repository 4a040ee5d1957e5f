"""The request socket through which the sandboxed agent has MPS units started: the request
parser, the root-side handler and the agent's client, over real unix sockets."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import pytest

from vgpu_agent.model.errors import ConfigError, MpsError
from vgpu_agent.mps.units import (
    MAX_REQUEST_BYTES,
    handle_request,
    parse_request,
    request_socket_available,
    request_start,
    start_unit,
)

GPU_A = "GPU-11111111-2222-3333-4444-555555555555"
GPU_B = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


@contextmanager
def request_server(
    path: str, served: Callable[[], set[str]], start: Callable[[str], None]
) -> Iterator[list[bool]]:
    """A listener on ``path`` answering each connection with handle_request, as the
    socket-activated unit does; yields the list of results (True: started)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    results: list[bool] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with (
                connection,
                connection.makefile("rb") as reader,
                connection.makefile("wb") as writer,
            ):
                results.append(handle_request(reader, writer, served, start) is None)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield results
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(timeout=5)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"stop " + GPU_A.encode() + b"\n", "unknown verb"),
        (b"start " + GPU_B.upper().encode() + b"\n", "not a GPU UUID"),
        (b"start ../../etc/passwd\n", "not a GPU UUID"),
        (b"start GPU-1111\n", "not a GPU UUID"),
        (b"start MIG-11111111-2222-3333-4444-555555555555\n", "not a GPU UUID"),
        (b"start " + GPU_A.encode() + b".service\n", "not a GPU UUID"),
        (b"start " + GPU_A.encode() + b" extra\n", "must be '<verb> <gpu-uuid>'"),
        (b"start  " + GPU_A.encode() + b"\n", "must be '<verb> <gpu-uuid>'"),
        (b"start\n", "must be '<verb> <gpu-uuid>'"),
        (b"", "must be '<verb> <gpu-uuid>'"),
        ("start GPU-1111\u00e9".encode(), "not ASCII"),
    ],
    ids=[
        "other-verb",
        "upper-case",
        "path",
        "short",
        "mig",
        "unit-suffix",
        "extra-word",
        "two-spaces",
        "no-uuid",
        "empty",
        "not-ascii",
    ],
)
def test_parse_refuses_anything_but_start_and_a_gpu_uuid(line: bytes, problem: str) -> None:
    """Only 'start <lower-case GPU UUID>' passes; everything else is named and refused."""
    with pytest.raises(MpsError, match=problem):
        parse_request(line)


def test_parse_accepts_start_and_a_gpu_uuid() -> None:
    """The one well-formed request parses to its verb and UUID, with or without newline."""
    assert parse_request(f"start {GPU_A}\n".encode()) == ("start", GPU_A)
    assert parse_request(f"start {GPU_B}".encode()) == ("start", GPU_B)


def _handle(line: bytes, served: set[str]) -> tuple[bool, str, list[str]]:
    started: list[str] = []
    reply = io.BytesIO()
    result = handle_request(io.BytesIO(line), reply, lambda: served, started.append)
    return result is None, reply.getvalue().decode(), started


def test_handler_starts_a_served_gpu_and_answers_ok() -> None:
    """A served GPU's unit is started and the answer is 'ok'."""
    assert _handle(f"start {GPU_A}\n".encode(), {GPU_A, GPU_B}) == (True, "ok\n", [GPU_A])


def test_handler_refuses_a_gpu_the_config_does_not_serve() -> None:
    """A well-formed UUID of a GPU the config does not serve starts nothing."""
    result, answer, started = _handle(f"start {GPU_B}\n".encode(), {GPU_A})
    assert (result, started) == (False, [])
    assert answer == f"error GPU {GPU_B} is not served by this node's config\n"


def test_handler_refuses_an_overlong_request_without_asking_the_config() -> None:
    """A request longer than the limit is refused before the config is read."""
    asked: list[bool] = []

    def served() -> set[str]:
        asked.append(True)
        return {GPU_A}

    reply = io.BytesIO()
    line = b"start " + b"x" * MAX_REQUEST_BYTES + b"\n"
    assert handle_request(io.BytesIO(line), reply, served, lambda _uuid: None) is not None
    assert reply.getvalue().startswith(b"error request longer than")
    assert asked == []


def test_handler_answers_a_config_error_as_one_line() -> None:
    """A config that cannot be read is answered as an error line, not a dropped connection."""

    def served() -> set[str]:
        raise ConfigError("/etc/vgpu/config.toml: line 3: bad\nvalue")

    reply = io.BytesIO()
    request = io.BytesIO(f"start {GPU_A}\n".encode())
    assert handle_request(request, reply, served, print) == (
        "/etc/vgpu/config.toml: line 3: bad value"
    )
    assert reply.getvalue() == b"error /etc/vgpu/config.toml: line 3: bad value\n"


def test_handler_passes_on_why_the_unit_did_not_start() -> None:
    """systemctl's failure reaches the agent as the answer."""

    def start(gpu_uuid: str) -> None:
        raise MpsError(f"starting vgpu-mps@{gpu_uuid}.service: Job failed")

    reply = io.BytesIO()
    request = io.BytesIO(f"start {GPU_A}\n".encode())
    assert handle_request(request, reply, lambda: {GPU_A}, start) is not None
    assert reply.getvalue() == f"error starting vgpu-mps@{GPU_A}.service: Job failed\n".encode()


@pytest.mark.parametrize(
    ("sent", "answer"),
    [
        (b"", "error no complete request line within 0.2 s"),
        (f"start {GPU_A}".encode(), "error no complete request line within 0.2 s"),
        (f"start {GPU_A}\n".encode(), "ok"),
    ],
    ids=["silent", "no-newline", "whole-line"],
)
def test_handler_answers_a_connection_that_stays_open(sent: bytes, answer: str) -> None:
    """A client that connects and sends nothing, or a line without its newline, and keeps
    the connection open gets an error answer instead of holding the helper."""
    client, helper = socket.socketpair()
    started: list[str] = []
    with client, helper, helper.makefile("rb") as request, helper.makefile("wb") as reply:
        client.sendall(sent)
        worker = threading.Thread(
            target=handle_request,
            args=(request, reply, lambda: {GPU_A}, started.append),
            kwargs={"read_timeout_s": 0.2},
        )
        worker.start()
        client.settimeout(60)
        try:
            received = client.makefile("rb").readline().decode()
        finally:
            worker.join(60)
    assert received.startswith(answer), received
    assert started == ([GPU_A] if answer == "ok" else [])


def test_client_and_handler_over_a_real_socket(short_tmp_dir: str) -> None:
    """request_start returns on 'ok' and raises the handler's error line otherwise."""
    path = os.path.join(short_tmp_dir, "units.sock")
    started: list[str] = []
    with request_server(path, lambda: {GPU_A}, started.append) as results:
        assert request_socket_available(path)
        request_start(GPU_A, path, timeout_s=5)
        with pytest.raises(MpsError, match=f"GPU {GPU_B} is not served"):
            request_start(GPU_B, path, timeout_s=5)
    assert started == [GPU_A]
    assert results == [True, False]


def test_client_names_a_missing_socket_and_the_unit_to_start(short_tmp_dir: str) -> None:
    """Without the socket unit the error says which unit to start."""
    path = os.path.join(short_tmp_dir, "missing.sock")
    assert not request_socket_available(path)
    assert not request_socket_available(None)
    with pytest.raises(MpsError, match=r"systemctl start vgpu-mps-units\.socket"):
        request_start(GPU_A, path, timeout_s=5)


def test_client_reports_a_connection_closed_without_answer(short_tmp_dir: str) -> None:
    """A helper that dies before answering is reported, not taken for success."""
    path = os.path.join(short_tmp_dir, "mute.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def close_at_once() -> None:
        connection, _ = listener.accept()
        connection.recv(MAX_REQUEST_BYTES)
        connection.close()

    thread = threading.Thread(target=close_at_once, daemon=True)
    thread.start()
    try:
        with pytest.raises(MpsError, match="unexpected answer ''"):
            request_start(GPU_A, path, timeout_s=5)
    finally:
        thread.join(timeout=5)
        listener.close()


def test_regular_file_is_not_a_request_socket(tmp_path: Path) -> None:
    """A file at the socket's path is not taken for the socket."""
    path = tmp_path / "units.sock"
    path.write_text("")
    assert not request_socket_available(str(path))


def _fake_systemctl(tmp_path: Path, exit_code: int) -> Path:
    script = tmp_path / "systemctl"
    script.write_text(
        f'#!/bin/sh\necho "$@" >> "{tmp_path}/calls"\n'
        f'[ {exit_code} -eq 0 ] || {{ echo "Job for $2 failed." >&2; exit {exit_code}; }}\n'
    )
    script.chmod(0o755)
    return script


def test_start_unit_runs_systemctl_start_on_the_template_instance(tmp_path: Path) -> None:
    """start_unit runs 'systemctl start vgpu-mps@<uuid>.service'."""
    start_unit(GPU_A, str(_fake_systemctl(tmp_path, 0)))
    assert (tmp_path / "calls").read_text() == f"start vgpu-mps@{GPU_A}.service\n"


def test_start_unit_reports_systemctls_words(tmp_path: Path) -> None:
    """A failing systemctl is reported with its message and where to look."""
    with pytest.raises(MpsError, match=r"Job for vgpu-mps@.* failed.*journalctl -u vgpu-mps@"):
        start_unit(GPU_A, str(_fake_systemctl(tmp_path, 1)))
    with pytest.raises(MpsError, match="not found"):
        start_unit(GPU_A, str(tmp_path / "no-systemctl"))


def _unit_request(config: Path, request: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "vgpu_agent", "--config", str(config), "mps", "unit-request"],
        input=request,
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("request_line", "problem"),
    [
        (b"start ../../../etc\n", b"is not a GPU UUID"),
        (f"start {GPU_B}\n".encode(), f"GPU {GPU_B} is not served".encode()),
    ],
    ids=["not-a-uuid", "not-served"],
)
def test_unit_request_command_refuses_in_one_line_each_way(
    tmp_path: Path, request_line: bytes, problem: bytes
) -> None:
    """`vgpu-agent mps unit-request` as the socket unit runs it: a refused request is
    answered on stdout (the socket) and logged as one line on stderr (the journal)."""
    config = tmp_path / "config.toml"
    config.write_text(
        f'version = 1\n[gpus]\nbackend = "simulated"\n[[simulated.gpus]]\nuuid = "{GPU_A}"\n'
    )
    result = _unit_request(config, request_line)
    assert result.returncode == 1
    assert result.stdout.startswith(b"error ")
    assert problem in result.stdout
    assert result.stdout.count(b"\n") == 1
    assert result.stderr.startswith(b"vgpu-agent: error: request refused: ")
    assert problem in result.stderr
    assert result.stderr.count(b"\n") == 1


def test_unit_request_command_answers_a_bad_config_on_the_socket(tmp_path: Path) -> None:
    """With a bad config the agent still gets an answer line, and the exit is 78."""
    config = tmp_path / "config.toml"
    config.write_text("[gpus]\nreplicas_per_gpu = 0\n")
    result = _unit_request(config, f"start {GPU_A}\n".encode())
    assert result.returncode == 78
    assert result.stdout.startswith(b"error config error: ")
    assert b"gpus.replicas_per_gpu" in result.stdout
