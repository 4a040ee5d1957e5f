"""MPS liveness: the cheap /proc check on every probe, the control command now and then."""

from __future__ import annotations

import os
import signal
import time

from tests.harness import wait_until
from tests.test_mps import GPU, FakeMps, direct, fake_mps  # noqa: F401 - fixtures
from vgpu_agent.mps import DirectMpsDaemons, LivenessProber, process_state, quick_check


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


def test_prober_asks_the_daemon_only_every_interval(
    fake_mps: FakeMps,  # noqa: F811 - fixture
    direct: DirectMpsDaemons,  # noqa: F811 - fixture
) -> None:
    """Between full probes a hung (but running) daemon passes; the next full probe catches it."""
    info = direct.start(GPU)
    assert info.pid is not None
    pipe_dir = str(fake_mps.pipe_dir())
    now = [100.0]
    prober = LivenessProber(fake_mps.config, full_interval_s=5.0, clock=lambda: now[0])
    assert prober.probe(pipe_dir) is None  # full probe: the daemon answers
    # Make the control socket path answer nothing: replace it with a socket nobody accepts on.
    control = os.path.join(pipe_dir, "control")
    os.rename(control, control + ".real")
    try:
        import socket

        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.bind(control)
        try:
            now[0] += 1.0
            assert prober.probe(pipe_dir) is None  # cheap check only: still looks alive
            now[0] += 5.0
            problem = prober.probe(pipe_dir)  # full probe due: the command fails
            assert problem is not None
        finally:
            silent.close()
            os.unlink(control)
    finally:
        os.rename(control + ".real", control)
    now[0] += 1.0
    assert prober.probe(pipe_dir) is None


def test_prober_reports_killed_daemon_at_once(
    fake_mps: FakeMps,  # noqa: F811 - fixture
    direct: DirectMpsDaemons,  # noqa: F811 - fixture
) -> None:
    """A killed daemon is reported on the next probe even inside the full-probe interval."""
    info = direct.start(GPU)
    assert info.pid is not None
    pipe_dir = str(fake_mps.pipe_dir())
    prober = LivenessProber(fake_mps.config, full_interval_s=3600.0)
    assert prober.probe(pipe_dir) is None
    os.kill(info.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while process_state(info.pid) not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    problem = prober.probe(pipe_dir)
    assert problem is not None
    assert "is not running" in problem


def test_direct_daemon_replaced_after_death_is_healthy(
    fake_mps: FakeMps,  # noqa: F811 - fixture
    direct: DirectMpsDaemons,  # noqa: F811 - fixture
) -> None:
    """When the daemon the agent started dies and another one is started on its pipe
    directory, the probe reports the GPU alive again."""
    info = direct.start(GPU)
    assert info.pid is not None
    os.kill(info.pid, signal.SIGKILL)
    wait_until(lambda: "exited" in (direct.probe(GPU.uuid) or ""), what="the kill to be seen")
    other = DirectMpsDaemons(fake_mps.config)
    try:
        other.start(GPU)
        assert direct.probe(GPU.uuid) is None
    finally:
        other.stop_all()


def test_stale_pid_file_does_not_fail_a_live_daemon(
    fake_mps: FakeMps,  # noqa: F811 - fixture
    direct: DirectMpsDaemons,  # noqa: F811 - fixture
) -> None:
    """A pid file naming a process that is gone, beside a daemon that answers, is not a
    dead daemon: the prober asks the daemon before saying so."""
    info = direct.start(GPU)
    assert info.pid is not None
    pid_file = fake_mps.pipe_dir() / "nvidia-cuda-mps-control.pid"
    pid_file.write_text(str(2**22 + 4321))
    prober = LivenessProber(fake_mps.config)
    assert "is not running" in (quick_check(str(fake_mps.pipe_dir())) or "")
    assert prober.probe(str(fake_mps.pipe_dir())) is None
    assert direct.probe(GPU.uuid) is None
