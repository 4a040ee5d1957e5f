"""A daemon's MPS clients against the stand-in control program: listing each server's
clients, ending one with ``terminate_client`` (and reading the list back), and the errors
that name the client, the GPU and the daemon's answer."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.builders import standin_mps_config
from tests.mps.test_mps import GPU
from vgpu_agent.config.schema import MpsConfig
from vgpu_agent.model.errors import MpsError
from vgpu_agent.mps.clients import client_pids, end_client, server_of, terminate_client
from vgpu_agent.mps.control import control_command, server_pids
from vgpu_agent.mps.daemons import DirectMpsDaemons


@dataclass
class Daemon:
    """A stand-in daemon for GPU with a server, and what it was told."""

    config: MpsConfig
    pipe_dir: str
    command_log: Path

    def control(self, command: str) -> str:
        """Send the daemon one control command."""
        return control_command(self.config, self.pipe_dir, command)

    def server(self) -> int:
        """The daemon's one server."""
        (pid,) = server_pids(self.config, self.pipe_dir)
        return pid

    def commands(self) -> list[str]:
        """Every command the daemon received, in order."""
        return self.command_log.read_text(encoding="utf-8").splitlines()


@pytest.fixture
def daemon(short_tmp_dir: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    """The stand-in daemon of GPU, started by the direct manager, with a server (as the
    agent starts it) and clients 4242 and 4343 connected."""
    root = Path(short_tmp_dir)
    command_log = root / "commands"
    monkeypatch.setenv("FAKE_MPS_COMMAND_LOG", str(command_log))
    config = standin_mps_config(root)
    daemons = DirectMpsDaemons(config, start_timeout_s=10.0, stop_timeout_s=5.0)
    info = daemons.start(GPU)
    started = Daemon(config, info.pipe_dir, command_log)
    started.control("start_server -uid 0")
    server = started.server()
    for pid in (4242, 4343):
        started.control(f"fake_add_client {server} {pid}")
    yield started
    daemons.stop_all()
    pid_file = Path(info.pipe_dir) / "nvidia-cuda-mps-control.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_servers_clients_are_listed_and_found(daemon: Daemon) -> None:
    """get_client_list gives each client pid; server_of finds the server holding a client,
    and None for a pid no server lists."""
    server = daemon.server()
    assert client_pids(daemon.config, daemon.pipe_dir, server) == [4242, 4343]
    assert server_of(daemon.config, daemon.pipe_dir, 4343) == server
    assert server_of(daemon.config, daemon.pipe_dir, 9999) is None
    assert f"get_client_list {server}" in daemon.commands()


def test_end_client_terminates_it_on_its_server(daemon: Daemon) -> None:
    """end_client sends terminate_client to the client's server, which lists it no more;
    the other client stays."""
    server = daemon.server()
    assert end_client(daemon.config, GPU.uuid, 4343) == f"MPS server {server}"
    assert f"terminate_client {server} 4343" in daemon.commands()
    assert client_pids(daemon.config, daemon.pipe_dir, server) == [4242]
    assert end_client(daemon.config, GPU.uuid, 4343) is None, "gone: nothing to end"
    assert daemon.commands().count(f"terminate_client {server} 4343") == 1


def test_a_refused_end_names_the_client_and_the_daemons_answer(daemon: Daemon) -> None:
    """A client the server still lists after terminate_client is a failed end: MpsError
    with the client, the GPU and the daemon's answer (after the settle time)."""
    daemon.control("fake_refuse_terminate 1")
    waited: list[float] = []
    now = [0.0]

    def sleep(seconds: float) -> None:
        waited.append(seconds)
        now[0] += seconds

    with pytest.raises(MpsError) as caught:
        end_client(daemon.config, GPU.uuid, 4242, settle_s=0.2, clock=lambda: now[0], sleep=sleep)
    message = str(caught.value)
    assert message.startswith(f"ending MPS client 4242 on GPU {GPU.uuid}: terminate_client "), (
        message
    )
    assert "answered 'Failed to terminate client 4242 (stand-in refusal)'" in message
    assert "the server still lists the client after 0.2 s" in message
    assert waited, "it read the list again before giving up"
    daemon.control("fake_refuse_terminate 0")
    assert end_client(daemon.config, GPU.uuid, 4242) is not None


def test_a_daemon_that_does_not_answer_fails_the_end(daemon: Daemon) -> None:
    """No daemon: the error names the client and the GPU and says the daemon is not
    running."""
    daemon.control("quit")
    with pytest.raises(MpsError, match=rf"ending MPS client 4242 on GPU {GPU.uuid}: .*not running"):
        end_client(daemon.config, GPU.uuid, 4242)


def test_an_answer_that_is_no_list_of_pids_is_an_error(daemon: Daemon) -> None:
    """get_client_list for a server the daemon does not know answers words, not pids: an
    MpsError quoting them, never a pid read from text."""
    with pytest.raises(MpsError, match=r"get_client_list 5 answered 'Server 5 not found'"):
        client_pids(daemon.config, daemon.pipe_dir, 5)


def test_terminate_client_passes_the_answer_on(daemon: Daemon) -> None:
    """terminate_client returns what the daemon said: nothing when it ended the client."""
    server = daemon.server()
    assert terminate_client(daemon.config, daemon.pipe_dir, server, 4242) == ""
    assert "not found" in terminate_client(daemon.config, daemon.pipe_dir, server, 4242)


def test_a_slow_daemon_times_out_with_the_configured_timeout(daemon: Daemon) -> None:
    """The commands use mps.control_timeout_s: a stopped daemon is reported in that time."""
    pid_file = Path(daemon.pipe_dir) / "nvidia-cuda-mps-control.pid"
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        config = replace(daemon.config, control_timeout_s=0.3)
        with pytest.raises(MpsError, match=r"not answering within 0\.3 s"):
            end_client(config, GPU.uuid, 4242)
    finally:
        os.kill(pid, signal.SIGCONT)
