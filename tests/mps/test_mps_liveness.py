"""MPS liveness of real (stand-in) daemons: the quick /proc check and the full control command."""

from __future__ import annotations

import os
import signal
import socket
import time

from tests.harness import wait_until
from tests.mps.test_mps import GPU, FakeMps, direct, fake_mps  # noqa: F401 - fixtures
from vgpu_agent.model.daemons import QuickCheck, check_now
from vgpu_agent.mps.daemons import DirectMpsDaemons
from vgpu_agent.mps.liveness import LivenessProber, process_state, quick_check


def test_process_state_of_self_and_gone() -> None:
    """process_state reads a live process's state and None for a pid that does not exist."""
    assert process_state(os.getpid()) in ("R", "S")
    assert process_state(2**22 + 12345) is None


def test_quick_check_sees_stopped_daemon_at_once(
    fake_mps: FakeMps,  # noqa: F811 - fixture
    direct: DirectMpsDaemons,  # noqa: F811 - fixture
) -> None:
    """A SIGSTOPped daemon is reported by the cheap check, without waiting for a timeout."""
    info = direct.start(GPU)
    assert info.pid is not None
    pipe_dir = str(fake_mps.pipe_dir())
    assert quick_check(pipe_dir) is None
    os.kill(info.pid, signal.SIGSTOP)
    try:
        time.sleep(0.1)
        started = time.monotonic()
        problem = quick_check(pipe_dir)
        assert problem is not None
        assert "stopped" in problem
        assert time.monotonic() - started < 0.5
    finally:
        os.kill(info.pid, signal.SIGCONT)
    assert quick_check(pipe_dir) is None


def test_quick_check_passes_a_hung_daemon_and_the_full_check_catches_it(
    fake_mps: FakeMps,  # noqa: F811 - fixture
    direct: DirectMpsDaemons,  # noqa: F811 - fixture
) -> None:
    """A running daemon that does not answer passes the quick check (which never asks it);
    the full check asks and reports it, and passes once it answers again."""
    info = direct.start(GPU)
    assert info.pid is not None
    pipe_dir = str(fake_mps.pipe_dir())
    prober = LivenessProber(fake_mps.config)
    assert prober.full(pipe_dir) is None
    # Make the control socket path answer nothing: replace it with a socket nobody accepts on.
    control = os.path.join(pipe_dir, "control")
    os.rename(control, control + ".real")
    try:
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.bind(control)
        try:
            assert prober.quick(pipe_dir) == QuickCheck()
            assert direct.quick_check(GPU.uuid) == QuickCheck()
            assert prober.full(pipe_dir) is not None
            assert direct.full_check(GPU.uuid) is not None
        finally:
            silent.close()
            os.unlink(control)
    finally:
        os.rename(control + ".real", control)
    assert prober.full(pipe_dir) is None
    assert check_now(direct, GPU.uuid) is None


def test_killed_daemon_leaves_the_quick_check_unsure_and_the_full_check_says_so(
    fake_mps: FakeMps,  # noqa: F811 - fixture
    direct: DirectMpsDaemons,  # noqa: F811 - fixture
) -> None:
    """A killed daemon's pid file names a gone process: the quick check asks for a full
    check now, and that reports the daemon not running (exited, to the manager that
    started it)."""
    info = direct.start(GPU)
    assert info.pid is not None
    pipe_dir = str(fake_mps.pipe_dir())
    prober = LivenessProber(fake_mps.config)
    pid: int = info.pid
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: process_state(pid) in (None, "Z"), what="the daemon to die")
    assert prober.quick(pipe_dir) == QuickCheck(unsure=True)
    problem = prober.full(pipe_dir)
    assert problem is not None
    assert "is not running" in problem
    wait_until(lambda: direct.quick_check(GPU.uuid).unsure, what="the exit to be seen")
    assert "exited with status" in (direct.full_check(GPU.uuid) or "")


def test_direct_daemon_replaced_after_death_is_healthy(
    fake_mps: FakeMps,  # noqa: F811 - fixture
    direct: DirectMpsDaemons,  # noqa: F811 - fixture
) -> None:
    """When the daemon the agent started dies and another one is started on its pipe
    directory, the checks report the GPU alive again."""
    info = direct.start(GPU)
    assert info.pid is not None
    os.kill(info.pid, signal.SIGKILL)
    wait_until(lambda: "exited" in (check_now(direct, GPU.uuid) or ""), what="the kill to be seen")
    other = DirectMpsDaemons(fake_mps.config)
    try:
        other.start(GPU)
        assert check_now(direct, GPU.uuid) is None
        assert direct.quick_check(GPU.uuid) == QuickCheck(), "the new daemon serves the GPU"
    finally:
        other.stop_all()


def test_stale_pid_file_does_not_fail_a_live_daemon(
    fake_mps: FakeMps,  # noqa: F811 - fixture
    direct: DirectMpsDaemons,  # noqa: F811 - fixture
) -> None:
    """A pid file naming a process that is gone, beside a daemon that answers, is not a
    dead daemon: the quick check is unsure, and the full check asks the daemon."""
    info = direct.start(GPU)
    assert info.pid is not None
    pid_file = fake_mps.pipe_dir() / "nvidia-cuda-mps-control.pid"
    pid_file.write_text(str(2**22 + 4321))
    prober = LivenessProber(fake_mps.config)
    assert "is not running" in (quick_check(str(fake_mps.pipe_dir())) or "")
    assert prober.quick(str(fake_mps.pipe_dir())) == QuickCheck(unsure=True)
    assert prober.full(str(fake_mps.pipe_dir())) is None
    assert check_now(direct, GPU.uuid) is None
