"""The command line: output and exit codes, with no traceback for any error a person meets."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from tests.builders import write_fake_control
from tests.cli_process import run_cli_exec
from vgpu_agent.ops.cli.root import cli

SIMULATED = """
version = 1
[agent]
state_dir = "{state}"
[gpus]
backend = "simulated"
replicas_per_gpu = 4
[gpus.replicas_by_model]
"A10G" = 7
[simulated]
count = 2
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A config using the simulated backend, its state dir in tmp_path."""
    path = tmp_path / "config.toml"
    path.write_text(SIMULATED.format(state=tmp_path / "state"))
    return path


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the CLI in-process; returns exit code, stdout and stderr."""
    runner = CliRunner(mix_stderr=False)
    result = runner.invoke(cli, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_config_check_ok(config_file: Path) -> None:
    """A valid file is reported ok with its path."""
    code, out, _ = invoke("config", "check", str(config_file))
    assert code == 0
    assert f"{config_file}: ok" in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version = 2\n", "version"),
        ("[gpus]\nreplicas_per_gpu = 0\n", "gpus.replicas_per_gpu"),
        ("[gpus]\nbogus = 1\n", "gpus.bogus"),
        ("[gpus\n", "config.toml"),
    ],
    ids=["version", "out-of-range", "unknown-key", "syntax"],
)
def test_config_check_bad(tmp_path: Path, text: str, expected: str) -> None:
    """A bad file gives one line naming the problem and exit code 78, no traceback."""
    path = tmp_path / "config.toml"
    path.write_text(text)
    code, _, err = invoke("config", "check", str(path))
    assert code == 78
    assert expected in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_config_check_missing_named_file(tmp_path: Path) -> None:
    """A named config that does not exist is an error naming the path."""
    missing = tmp_path / "nope.toml"
    code, _, err = invoke("--config", str(missing), "config", "check")
    assert code == 78
    assert str(missing) in err


def test_config_show_round_trips(config_file: Path, tmp_path: Path) -> None:
    """`config show` prints the effective config, which parses back to the same values."""
    code, out, _ = invoke("--config", str(config_file), "config", "show")
    assert code == 0
    assert "replicas_per_gpu = 4" in out
    shown = tmp_path / "shown.toml"
    shown.write_text(out)
    code, _, _ = invoke("config", "check", str(shown))
    assert code == 0


def test_gpus_lists_simulated(config_file: Path) -> None:
    """`gpus` shows each simulated GPU with its compute mode and vGPU count."""
    code, out, _ = invoke("--config", str(config_file), "gpus")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("IDX")
    assert len(lines) == 3
    assert all("default" in line and line.rstrip().endswith("4") for line in lines[1:])


def test_gpus_simulate_flag_overrides_count() -> None:
    """`gpus --simulate 3` shows three simulated GPUs with no config file."""
    code, out, _ = invoke("gpus", "--simulate", "3", env={"VGPU_CONFIG": ""})
    assert code == 0
    assert len(out.strip().splitlines()) == 4


def test_set_compute_mode_on_simulated(config_file: Path) -> None:
    """`gpus set-compute-mode` reports the change it made and read back."""
    code, out, _ = invoke(
        "--config", str(config_file), "gpus", "set-compute-mode", "exclusive_process", "1"
    )
    assert code == 0
    assert "default -> exclusive_process" in out


def test_set_compute_mode_unknown_gpu(config_file: Path) -> None:
    """Naming a GPU that does not exist is a one-line error."""
    code, _, err = invoke("--config", str(config_file), "gpus", "set-compute-mode", "default", "9")
    assert code == 1
    assert "no such GPU: 9" in err


def test_apply_compute_mode_unchanged(tmp_path: Path) -> None:
    """With compute_mode unchanged, apply-compute-mode touches nothing and says so."""
    path = tmp_path / "c.toml"
    path.write_text('[gpus]\nbackend = "simulated"\ncompute_mode = "unchanged"\n')
    code, out, _ = invoke("--config", str(path), "gpus", "apply-compute-mode")
    assert code == 0
    assert "unchanged" in out


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("health", "reset", "0"),
        ("simulate", "xid", "0", "79"),
        ("simulate", "mps-down", "0"),
    ],
    ids=["status", "health-reset", "simulate-xid", "simulate-mps-down"],
)
def test_commands_without_agent(config_file: Path, args: tuple[str, ...]) -> None:
    """Commands that need the running agent say it is not running, in one line (exit 1;
    `status` 5, its code for not-running)."""
    code, _, err = invoke("--config", str(config_file), *args)
    assert code == (5 if args == ("status",) else 1)
    assert "the agent is not running" in err
    assert "Traceback" not in err


def test_run_bad_config_exits_78(tmp_path: Path) -> None:
    """`run` with a bad config exits 78 (systemd then does not restart it) with one line."""
    path = tmp_path / "c.toml"
    path.write_text("[plugin]\nresource_name = 'no-slash'\n")
    code, _, err = invoke("--config", str(path), "run")
    assert code == 78
    assert "plugin.resource_name" in err


def fake_control_program(root: Path) -> Path:
    """An executable standing in for nvidia-cuda-mps-control (tests/fakes)."""
    return write_fake_control(root / "fakectl")


def test_mps_start_status_stop(short_tmp_dir: str) -> None:
    """`mps start`, `status` and `stop` drive each served GPU's daemon (a stand-in program)."""
    root = Path(short_tmp_dir)
    fake = fake_control_program(root)
    config = root / "c.toml"
    config.write_text(
        f'[gpus]\nbackend = "simulated"\n[mps]\nmanager = "direct"\ncontrol_binary = "{fake}"\n'
        f'pipe_root = "{root}/p"\nlog_root = "{root}/l"\n'
    )
    try:
        # In its own process, as a person runs it: the daemons outlive the command.
        started = run_cli_exec("--config", str(config), "mps", "start")
        assert started.code == 0, started.stderr
        assert started.stdout.count("MPS daemon answers") == 2
        code, out, _ = invoke("--config", str(config), "mps", "status")
        assert (code, out.count(": answers")) == (0, 2)
        code, out, _ = invoke("--config", str(config), "mps", "stop", "0")
        assert code == 0
        code, out, _ = invoke("--config", str(config), "mps", "status")
        assert code == 1
        assert "not running" in out.splitlines()[0]
        assert ": answers" in out.splitlines()[1]
    finally:
        invoke("--config", str(config), "mps", "stop")
    code, out, _ = invoke("--config", str(config), "mps", "status")
    assert (code, out.count("not running")) == (1, 2)


def test_mps_quit_missing_binary(tmp_path: Path) -> None:
    """A missing MPS control program is a one-line error saying what to install."""
    config = tmp_path / "c.toml"
    config.write_text('[mps]\ncontrol_binary = "/nonexistent/mps-control"\n')
    code, _, err = invoke("--config", str(config), "mps", "quit", "GPU-1")
    assert code == 1
    assert "/nonexistent/mps-control" in err
    assert "Traceback" not in err


def test_mps_daemon_defaults(short_tmp_dir: str) -> None:
    """Cooperative with mps.daemon_*_limit set: the daemon gets those as its defaults."""
    root = Path(short_tmp_dir)
    fake = fake_control_program(root)
    config = root / "c.toml"
    config.write_text(
        '[gpus]\nbackend = "simulated"\nreplicas_per_gpu = 4\n[simulated]\ncount = 1\n'
        f'[mps]\nmanager = "direct"\ncontrol_binary = "{fake}"\npipe_root = "{root}/p"\n'
        f'log_root = "{root}/l"\nconfinement = "cooperative"\n'
        'daemon_thread_limit = "proportional"\ndaemon_memory_limit = 1024\n'
    )
    try:
        started = run_cli_exec("--config", str(config), "mps", "start")
        assert started.code == 0, started.stderr
        assert "set_default_active_thread_percentage 25" in started.stdout
        assert "set_default_device_pinned_mem_limit 0 1024M" in started.stdout
        gpu_uuid = started.stdout.split()[2].rstrip(":")
        from vgpu_agent.config.parse import load
        from vgpu_agent.mps.control import control_command

        pipe_dir = f"{root}/p/{gpu_uuid}"
        mps_config = load(str(config)).mps
        assert control_command(mps_config, pipe_dir, "get_default_active_thread_percentage") == (
            "25.0"
        )
        code, out, _ = invoke("--config", str(config), "mps", "apply-defaults", gpu_uuid)
        assert code == 0
        assert out.count("set_default") == 2
    finally:
        invoke("--config", str(config), "mps", "stop")


def test_apply_defaults_confines_a_daemon_restarted_without_its_ceiling(
    short_tmp_dir: str,
) -> None:
    """`mps apply-defaults` (the unit's ExecStartPost), default config: a daemon restarted
    outside the agent gets the enforced ceiling (12.5% and 1/8 of the memory for 1 of 8)
    and its pipe directory locked down again (log FIFO and lock file root-only)."""
    root = Path(short_tmp_dir)
    fake = fake_control_program(root)
    config = root / "c.toml"
    config.write_text(
        '[gpus]\nbackend = "simulated"\nreplicas_per_gpu = 8\n[simulated]\ncount = 1\n'
        "memory_mib = 81559\n"
        f'[mps]\nmanager = "direct"\ncontrol_binary = "{fake}"\npipe_root = "{root}/p"\n'
        f'log_root = "{root}/l"\n'
    )
    from vgpu_agent.config.parse import load
    from vgpu_agent.mps.control import control_command, wait_until_answers
    from vgpu_agent.mps.directories import daemon_pid

    mps_config = load(str(config)).mps
    try:
        started = run_cli_exec("--config", str(config), "mps", "start")
        assert started.code == 0, started.stderr
        assert "set_default_active_thread_percentage 12.5" in started.stdout
        gpu_uuid = started.stdout.split()[2].rstrip(":")
        pipe_dir = Path(f"{root}/p/{gpu_uuid}")
        # What systemd's Restart=always does: the daemon goes, a new one starts bare.
        pid = daemon_pid(str(pipe_dir))
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        restarted = subprocess.Popen(
            [str(fake), "-d", "-M"], env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir)}
        )
        assert restarted.wait(timeout=30) == 0
        wait_for(lambda: daemon_pid(str(pipe_dir)) not in (None, pid))
        wait_until_answers(mps_config, str(pipe_dir))
        bare = control_command(mps_config, str(pipe_dir), "get_default_active_thread_percentage")
        assert bare == "100.0"
        assert stat.S_IMODE((pipe_dir / "log").stat().st_mode) == 0o777

        code, out, err = invoke("--config", str(config), "mps", "apply-defaults", gpu_uuid)

        assert code == 0, err
        assert "set_default_active_thread_percentage 12.5" in out
        assert "set_default_device_pinned_mem_limit 0 10194M" in out
        assert control_command(
            mps_config, str(pipe_dir), "get_default_active_thread_percentage"
        ) == ("12.5")
        assert control_command(
            mps_config, str(pipe_dir), "get_default_device_pinned_mem_limit 0"
        ) == ("9G")  # whole GiB, rounded down, as driver 580 prints it
        assert stat.S_IMODE((pipe_dir / "log").stat().st_mode) == 0o600
        assert stat.S_IMODE((pipe_dir / "control_lock").stat().st_mode) == 0o600
        assert stat.S_IMODE((pipe_dir / "control").stat().st_mode) == 0o666
    finally:
        invoke("--config", str(config), "mps", "stop")


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_apply_defaults_in_cooperative_mode_only_locks_down(short_tmp_dir: str) -> None:
    """Cooperative with no daemon_*_limit: `mps apply-defaults` sets no ceiling (the daemon
    keeps all SMs) but still locks the pipe directory down."""
    root = Path(short_tmp_dir)
    fake = fake_control_program(root)
    gpu_uuid = "GPU-00000000-0000-4000-8000-00000000c00b"
    pipe_dir = root / "p" / gpu_uuid
    pipe_dir.mkdir(parents=True)
    config = root / "c.toml"
    config.write_text(
        '[gpus]\nbackend = "simulated"\n'
        f'[[simulated.gpus]]\nuuid = "{gpu_uuid}"\n'
        f'[mps]\nmanager = "external"\ncontrol_binary = "{fake}"\npipe_root = "{root}/p"\n'
        f'log_root = "{root}/l"\nconfinement = "cooperative"\n'
    )
    from vgpu_agent.config.parse import load
    from vgpu_agent.mps.control import control_command, wait_until_answers

    mps_config = load(str(config)).mps
    started = subprocess.run(
        [str(fake), "-d", "-M"],
        env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir)},
        check=False,
        timeout=30,
    )
    assert started.returncode == 0
    try:
        wait_until_answers(mps_config, str(pipe_dir))
        code, out, err = invoke("--config", str(config), "mps", "apply-defaults", gpu_uuid)
        assert code == 0, err
        assert "set_default" not in out
        assert "locked down" in out
        assert stat.S_IMODE((pipe_dir / "log").stat().st_mode) == 0o600
        answer = control_command(mps_config, str(pipe_dir), "get_default_active_thread_percentage")
        assert answer == "100.0"
    finally:
        control_command(mps_config, str(pipe_dir), "quit")
