"""MPS daemon management against a stand-in control program (tests/fakes/fake_mps_control.py)
that serves a real unix socket in a real pipe directory, run as real processes."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.builders import standin_mps_config
from tests.harness import wait_until
from tests.mps.test_mps_units import request_server
from vgpu_agent.config.schema import MpsConfig
from vgpu_agent.model.daemons import check_now
from vgpu_agent.model.errors import MpsError
from vgpu_agent.model.gpu import Gpu
from vgpu_agent.mps.control import (
    MULTI_USER_UNSUPPORTED,
    control_command,
    daemon_command,
    daemon_environment,
    help_supports_multi_user,
    probe_pipe_dir,
    quit_daemon,
    resolve_multi_user,
)
from vgpu_agent.mps.daemons import (
    DirectMpsDaemons,
    ExternalMpsDaemons,
    SystemdMpsDaemons,
    build_mps_daemons,
    secure_pipe_dir,
)
from vgpu_agent.mps.directories import prepare_directories

GPU = Gpu(
    index=0,
    uuid="GPU-11111111-2222-3333-4444-555555555555",
    model="NVIDIA H100 80GB HBM3",
    memory_mib=81559,
    compute_capability=(9, 0),
)
#: The usage text of nvidia-cuda-mps-control from driver 580.159 (lent H200).
HELP_580 = """nvidia-cuda-mps-control [options] [command]
OPTIONS:
  -h,--help                Print this message
  -d,--daemon              Setup the daemon in the background
  -f,--forground           Setup the daemon in the foreground
  -M,--multiuser-server    Enable multi-user mode
  -q,--ready-devices      Prepare the daemon to query devices on startup
"""
HELP_OLD = """nvidia-cuda-mps-control [-d | -f]
  -d   Start the MPS control daemon in background mode
  -f   Start the MPS control daemon in foreground mode
COMMAND:
  set_default_device_pinned_mem_limit <dev> <value>   e.g. -M is not an option here
"""


@dataclass
class FakeMps:
    """A config pointing at the fake control program, and the directory it lives in."""

    root: Path
    config: MpsConfig

    def pipe_dir(self, gpu_uuid: str = GPU.uuid) -> Path:
        """The pipe directory of a GPU."""
        return Path(self.config.pipe_root) / gpu_uuid


@pytest.fixture
def fake_mps(short_tmp_dir: str) -> Iterator[FakeMps]:
    """An MPS config whose control binary is the fake, with pipe/log roots in a temp dir."""
    root = Path(short_tmp_dir)
    config = standin_mps_config(root)
    yield FakeMps(root, config)
    for pipe_dir in Path(config.pipe_root).glob("*"):
        pid_file = pipe_dir / "nvidia-cuda-mps-control.pid"
        if pid_file.exists():
            _kill(int(pid_file.read_text()))


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def direct(fake_mps: FakeMps) -> Iterator[DirectMpsDaemons]:
    """A direct manager on the fake; every daemon it started is quit afterwards."""
    daemons = DirectMpsDaemons(fake_mps.config, start_timeout_s=10.0, stop_timeout_s=5.0)
    yield daemons
    daemons.stop_all()


@pytest.mark.parametrize(
    ("help_text", "supported"),
    [
        (HELP_580, True),
        ("  --multiuser-server       Enable multi-user mode\n", True),
        (HELP_OLD, False),
        ("", False),
    ],
    ids=["driver-580", "long-option-only", "older-driver-mentions-M-in-prose", "empty"],
)
def test_multi_user_support_is_read_from_the_usage_text(help_text: str, supported: bool) -> None:
    """The -M option is detected from the control program's usage text, not assumed."""
    assert help_supports_multi_user(help_text) is supported


@pytest.mark.parametrize(
    ("setting", "help_variant", "expected"),
    [("auto", "", True), ("auto", "long", True), ("auto", "legacy", False), ("off", "", False)],
    ids=["auto-supported", "auto-long-option", "auto-unsupported", "off"],
)
def test_multi_user_setting_resolves_against_the_driver(  # noqa: PLR0917 - fixtures + table
    fake_mps: FakeMps,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    setting: str,
    help_variant: str,
    expected: bool,
) -> None:
    """auto uses -M where the driver offers it; whenever users will queue, the log says so."""
    monkeypatch.setenv("FAKE_MPS_HELP", help_variant)
    config = MpsConfig(control_binary=fake_mps.config.control_binary, multi_user=setting)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="vgpu_agent.mps.daemons"):
        assert resolve_multi_user(config) is expected
    assert ("queue on a GPU" in caplog.text) is (not expected)


def test_multi_user_on_without_driver_support_is_an_error(
    fake_mps: FakeMps, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mps.multi_user = on on a driver without -M fails, naming the setting."""
    monkeypatch.setenv("FAKE_MPS_HELP", "legacy")
    config = MpsConfig(control_binary=fake_mps.config.control_binary, multi_user="on")
    with pytest.raises(MpsError, match=r"mps\.multi_user = on"):
        resolve_multi_user(config)


@pytest.mark.parametrize(
    ("multi_user", "expected"),
    [(True, ["/x/mps-control", "-f", "-M"]), (False, ["/x/mps-control", "-f"])],
    ids=["multi-user", "single-user"],
)
def test_daemon_command_runs_in_the_foreground(multi_user: bool, expected: list[str]) -> None:
    """The unit and the direct manager run the same foreground command line."""
    assert daemon_command(MpsConfig(control_binary="/x/mps-control"), multi_user) == expected


def test_daemon_environment_pins_the_gpu_and_its_directories() -> None:
    """A daemon sees only its GPU and gets its own pipe and log directory."""
    config = MpsConfig(pipe_root="/run/p", log_root="/var/log/l")
    assert daemon_environment(config, GPU.uuid) == {
        "CUDA_VISIBLE_DEVICES": GPU.uuid,
        "CUDA_MPS_PIPE_DIRECTORY": f"/run/p/{GPU.uuid}",
        "CUDA_MPS_LOG_DIRECTORY": f"/var/log/l/{GPU.uuid}",
    }


def test_directories_are_0755_whatever_the_umask(fake_mps: FakeMps) -> None:
    """Pipe and log directories are traversable by any container uid, writable by root only."""
    old_umask = os.umask(0o077)
    try:
        pipe_dir, log_dir = prepare_directories(fake_mps.config, GPU.uuid)
    finally:
        os.umask(old_umask)
    for path in (pipe_dir, log_dir, fake_mps.config.pipe_root, fake_mps.config.log_root):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o755


def test_unusable_pipe_root_names_the_setting(fake_mps: FakeMps) -> None:
    """A pipe root that cannot hold directories fails with the config key to change."""
    blocker = fake_mps.root / "file"
    blocker.write_text("")
    config = MpsConfig(pipe_root=str(blocker), log_root=fake_mps.config.log_root)
    with pytest.raises(MpsError, match=r"mps\.pipe_root"):
        prepare_directories(config, GPU.uuid)


def test_start_runs_a_multi_user_daemon_that_answers(
    fake_mps: FakeMps, direct: DirectMpsDaemons
) -> None:
    """start() launches the daemon with -M on the GPU's pipe dir and returns once it answers."""
    info = direct.start(GPU)
    assert info.pipe_dir == str(fake_mps.pipe_dir())
    assert info.multi_user
    assert not info.reused
    assert info.pid is not None
    assert b"-M" in Path(f"/proc/{info.pid}/cmdline").read_bytes().split(b"\0")
    assert check_now(direct, GPU.uuid) is None
    lock_mode = stat.S_IMODE(os.stat(fake_mps.pipe_dir() / "control_lock").st_mode)
    assert lock_mode == 0o600
    assert stat.S_IMODE(os.stat(fake_mps.pipe_dir() / "control").st_mode) == 0o666


def test_secure_pipe_dir_restricts_a_multi_user_daemons_lock(
    fake_mps: FakeMps, direct: DirectMpsDaemons
) -> None:
    """What the MPS unit's ExecStartPost does: the lock file of a multi-user daemon goes
    back to root-only however it was left; the control socket stays open to clients."""
    direct.start(GPU)
    lock = fake_mps.pipe_dir() / "control_lock"
    lock.chmod(0o666)  # as the real daemon makes it
    assert secure_pipe_dir(fake_mps.config, GPU.uuid, wait_s=5)
    assert stat.S_IMODE(os.stat(lock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(fake_mps.pipe_dir() / "control").st_mode) == 0o666


def test_secure_pipe_dir_leaves_a_single_user_daemon_alone(fake_mps: FakeMps) -> None:
    """A daemon without -M serves its clients' uid: its pipe directory is left as it is."""
    single = DirectMpsDaemons(fake_mps.config, multi_user=False)
    try:
        single.start(GPU)
        lock = fake_mps.pipe_dir() / "control_lock"
        lock.chmod(0o666)
        assert not secure_pipe_dir(fake_mps.config, GPU.uuid, wait_s=5)
        assert stat.S_IMODE(os.stat(lock).st_mode) == 0o666
    finally:
        single.stop_all()


def test_secure_pipe_dir_names_a_daemon_that_never_answers(fake_mps: FakeMps) -> None:
    """No daemon within the wait: an error naming the GPU and the pipe directory."""
    with pytest.raises(MpsError, match=f"GPU {GPU.uuid}'s MPS daemon does not answer on"):
        secure_pipe_dir(fake_mps.config, GPU.uuid, wait_s=0.2)


def test_start_twice_keeps_the_same_daemon(direct: DirectMpsDaemons) -> None:
    """A second start() of a running GPU returns the daemon already there."""
    first = direct.start(GPU)
    assert direct.start(GPU).pid == first.pid


def test_stop_quits_the_daemon(fake_mps: FakeMps, direct: DirectMpsDaemons) -> None:
    """stop() sends quit; afterwards the probe says the daemon is not running."""
    info = direct.start(GPU)
    direct.stop(GPU.uuid)
    assert info.pid is not None
    assert not Path(f"/proc/{info.pid}").exists()
    reason = check_now(direct, GPU.uuid)
    assert reason is not None
    assert "not running" in reason


def test_a_restarted_agent_reuses_the_running_daemon(
    fake_mps: FakeMps, direct: DirectMpsDaemons
) -> None:
    """A new manager finds the answering daemon, keeps it, and does not stop it."""
    first = direct.start(GPU)
    restarted = DirectMpsDaemons(fake_mps.config)
    info = restarted.start(GPU)
    assert info.reused
    assert info.pid == first.pid
    assert info.multi_user
    restarted.stop(GPU.uuid)
    assert check_now(restarted, GPU.uuid) is None


def test_probe_reports_a_killed_daemon(fake_mps: FakeMps, direct: DirectMpsDaemons) -> None:
    """A daemon killed with SIGKILL is reported, by the manager that started it and by others."""
    info = direct.start(GPU)
    assert info.pid is not None
    os.kill(info.pid, signal.SIGKILL)
    wait_until(lambda: "exited" in (check_now(direct, GPU.uuid) or ""), what="the kill to be seen")
    other = check_now(ExternalMpsDaemons(fake_mps.config), GPU.uuid)
    assert other is not None
    assert "Cannot find MPS control daemon process" in other


def test_probe_reports_a_hung_daemon_within_the_timeout(
    fake_mps: FakeMps, direct: DirectMpsDaemons
) -> None:
    """A SIGSTOPped daemon makes the control command give up after control_timeout_s with a
    reason (the managers' probes also see the stopped state at once: test_mps_liveness)."""
    info = direct.start(GPU)
    assert info.pid is not None
    config = MpsConfig(
        pipe_root=fake_mps.config.pipe_root,
        control_binary=fake_mps.config.control_binary,
        control_timeout_s=0.5,
    )
    pipe_dir = str(fake_mps.pipe_dir())
    os.kill(info.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        reason = probe_pipe_dir(config, pipe_dir)
        elapsed_s = time.monotonic() - started
        assert "stopped" in (check_now(ExternalMpsDaemons(config), GPU.uuid) or "")
    finally:
        os.kill(info.pid, signal.SIGCONT)
    assert reason is not None
    assert "not answering within 0.5 s" in reason
    assert elapsed_s < 5.0
    # Resumed, it answers again (on a loaded machine not always within the first 0.5 s).
    deadline = time.monotonic() + 30.0
    while probe_pipe_dir(config, pipe_dir) is not None:
        assert time.monotonic() < deadline, "the resumed daemon never answered"
        time.sleep(0.05)


def test_probe_reports_a_missing_pipe_dir(fake_mps: FakeMps, direct: DirectMpsDaemons) -> None:
    """Deleting the pipe directory is reported as such."""
    info = direct.start(GPU)
    assert info.pid is not None
    for entry in fake_mps.pipe_dir().iterdir():
        entry.unlink()
    fake_mps.pipe_dir().rmdir()
    reason = check_now(direct, GPU.uuid)
    assert reason is not None
    assert "is missing" in reason
    # Nobody can ask it to quit without its socket: kill it rather than wait out stop's timeout.
    os.kill(info.pid, signal.SIGKILL)


def test_a_daemon_that_never_answers_fails_start_and_is_killed(
    fake_mps: FakeMps, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start() gives up after its timeout, kills what it started and says why."""
    monkeypatch.setenv("FAKE_MPS_START_DELAY_S", "30")
    daemons = DirectMpsDaemons(fake_mps.config, start_timeout_s=0.5)
    with pytest.raises(MpsError, match="starting the MPS daemon of GPU") as raised:
        daemons.start(GPU)
    assert "not running" in str(raised.value)
    pid = int((fake_mps.pipe_dir() / "nvidia-cuda-mps-control.pid").read_text())
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), what=f"process {pid} to be gone")


def test_a_daemon_that_exits_at_start_is_reported_with_its_output(fake_mps: FakeMps) -> None:
    """A hung daemon holding the lock makes the new one exit; start() quotes its output."""
    prepare_directories(fake_mps.config, GPU.uuid)
    environment = dict(os.environ, FAKE_MPS_HANG="1")
    environment.update(daemon_environment(fake_mps.config, GPU.uuid))
    hung = subprocess.Popen(
        [fake_mps.config.control_binary, "-f"], env=environment, stdout=subprocess.DEVNULL
    )
    try:
        while not (fake_mps.pipe_dir() / "control").exists():
            time.sleep(0.05)
        config = replace(fake_mps.config, control_timeout_s=0.3)
        with pytest.raises(MpsError, match="already running"):
            DirectMpsDaemons(config, start_timeout_s=5.0).start(GPU)
    finally:
        hung.kill()
        hung.wait()


def test_missing_control_binary_says_what_to_install(fake_mps: FakeMps) -> None:
    """No nvidia-cuda-mps-control: the error says to install it or set mps.control_binary."""
    config = MpsConfig(
        pipe_root=fake_mps.config.pipe_root,
        log_root=fake_mps.config.log_root,
        control_binary=str(fake_mps.root / "missing" / "nvidia-cuda-mps-control"),
    )
    with pytest.raises(MpsError, match=r"install the NVIDIA driver's MPS binaries.*control_binary"):
        DirectMpsDaemons(config).start(GPU)
    with pytest.raises(MpsError, match="was not found"):
        control_command(config, str(fake_mps.pipe_dir()), "get_server_list")


def test_external_daemons_are_only_checked(fake_mps: FakeMps, direct: DirectMpsDaemons) -> None:
    """The external manager refuses a GPU with no daemon, uses a running one, never stops it."""
    external = ExternalMpsDaemons(fake_mps.config)
    with pytest.raises(MpsError, match=r"mps\.manager = external"):
        external.start(GPU)
    started = direct.start(GPU)
    info = external.start(GPU)
    assert info.reused
    assert info.pid == started.pid
    external.stop(GPU.uuid)
    assert check_now(external, GPU.uuid) is None


def _fake_systemctl(fake_mps: FakeMps, exit_code: int = 0) -> Path:
    # Records its arguments, then starts the unit's command (exec_daemon) in the background
    # the way systemd would, detached from the caller.
    script = fake_mps.root / "systemctl"
    config = fake_mps.config
    starter = (
        "import sys; from vgpu_agent.config.schema import MpsConfig; "
        "from vgpu_agent.mps.daemons import exec_daemon; "
        f"exec_daemon(MpsConfig(pipe_root={config.pipe_root!r}, log_root={config.log_root!r}, "
        f"control_binary={config.control_binary!r}), sys.argv[1])"
    )
    body = f"""#!/bin/sh
echo "$@" >> "{fake_mps.root}/systemctl.calls"
if [ {exit_code} -ne 0 ]; then echo "Job for $2 failed." >&2; exit {exit_code}; fi
uuid=${{2#vgpu-mps@}}; uuid=${{uuid%.service}}
setsid "{sys.executable}" -c "{starter}" "$uuid" >/dev/null 2>&1 &
"""
    script.write_text(body)
    script.chmod(0o755)
    return script


def test_systemd_manager_starts_the_unit_and_never_stops_it(fake_mps: FakeMps) -> None:
    """start() runs systemctl start vgpu-mps@<uuid>.service and waits; stop() leaves it."""
    daemons = SystemdMpsDaemons(
        fake_mps.config, systemctl=str(_fake_systemctl(fake_mps)), request_socket=None
    )
    info = daemons.start(GPU)
    calls = (fake_mps.root / "systemctl.calls").read_text().splitlines()
    assert calls == [f"start vgpu-mps@{GPU.uuid}.service"]
    assert info.multi_user
    assert info.pid is not None
    daemons.stop(GPU.uuid)
    assert check_now(daemons, GPU.uuid) is None
    quit_daemon(fake_mps.config, GPU.uuid)
    wait_until(lambda: check_now(daemons, GPU.uuid) is not None, what="the daemon to be gone")


def test_systemd_manager_reports_a_failed_unit(fake_mps: FakeMps) -> None:
    """A unit that fails to start is reported with where to look."""
    daemons = SystemdMpsDaemons(
        fake_mps.config,
        systemctl=str(_fake_systemctl(fake_mps, exit_code=1)),
        request_socket=None,
    )
    with pytest.raises(MpsError, match=r"failed.*journalctl -u vgpu-mps@"):
        daemons.start(GPU)


def test_systemd_manager_goes_through_the_request_socket_when_there(fake_mps: FakeMps) -> None:
    """With the request socket present the unit is started through it, never by systemctl."""
    socket_path = str(fake_mps.root / "units.sock")
    config = fake_mps.config
    units: list[subprocess.Popen[bytes]] = []

    def start(gpu_uuid: str) -> None:
        # What vgpu-mps@<uuid>.service runs, detached as systemd would run it.
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from vgpu_agent.config.schema import MpsConfig; "
                "from vgpu_agent.mps.daemons import exec_daemon; "
                f"exec_daemon(MpsConfig(pipe_root={config.pipe_root!r}, "
                f"log_root={config.log_root!r}, control_binary={config.control_binary!r}), "
                "sys.argv[1])",
                gpu_uuid,
            ],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        units.append(process)

    daemons = SystemdMpsDaemons(
        config, systemctl=str(fake_mps.root / "no-systemctl"), request_socket=socket_path
    )
    with request_server(socket_path, lambda: {GPU.uuid}, start) as results:
        info = daemons.start(GPU)
        other = replace(GPU, index=1, uuid="GPU-99999999-2222-3333-4444-555555555555")
        with pytest.raises(MpsError, match="is not served by this node's config"):
            daemons.start(other)
    assert results == [True, False]
    assert info.pid is not None
    assert check_now(daemons, GPU.uuid) is None
    quit_daemon(config, GPU.uuid)
    assert [unit.wait(timeout=10) for unit in units] == [0]


@pytest.mark.parametrize(
    ("manager", "kind"),
    [
        ("direct", DirectMpsDaemons),
        ("systemd", SystemdMpsDaemons),
        ("external", ExternalMpsDaemons),
    ],
    ids=["direct", "systemd", "external"],
)
def test_build_picks_the_configured_manager(manager: str, kind: type) -> None:
    """build_mps_daemons follows mps.manager."""
    assert isinstance(build_mps_daemons(MpsConfig(manager=manager)), kind)  # type: ignore[arg-type]


def test_unsupported_multi_user_message_is_plain() -> None:
    """The warning names the consequence a person sees: pods of different users queue."""
    assert "different users" in MULTI_USER_UNSUPPORTED
    assert "queue" in MULTI_USER_UNSUPPORTED


def test_a_found_single_user_daemon_is_reported(
    fake_mps: FakeMps, caplog: pytest.LogCaptureFixture
) -> None:
    """A running daemon without -M, found by another manager, is logged as making users queue."""
    single = DirectMpsDaemons(fake_mps.config, multi_user=False)
    try:
        single.start(GPU)
        with caplog.at_level(logging.WARNING, logger="vgpu_agent.mps.daemons"):
            info = ExternalMpsDaemons(fake_mps.config).start(GPU)
        assert not info.multi_user
        assert "will queue on this GPU" in caplog.text
    finally:
        single.stop_all()
