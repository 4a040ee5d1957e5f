"""Every CLI command, run as a real process, against what goes wrong (issue 7, item 9): a
missing, unreadable or invalid config, no GPU, no agent running, no permission. Each gives
a one-line error (doctor: its report) and a non-zero exit, never a traceback."""

from __future__ import annotations

import ctypes.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click
import pytest

from tests.cli_process import Result, run_cli, run_cli_exec
from tests.harness import make_config
from vgpu_agent.host.systemd import Notifier
from vgpu_agent.ops.cli.root import cli
from vgpu_agent.runtime.compose import build_agent
from vgpu_agent.standins.kubelet import KubeletStandin

EXIT_CONFIG = 78
TIMEOUT_S = 60.0
SOME_UUID = "GPU-11111111-2222-3333-4444-555555555555"
#: `demo` takes no config: it runs on its own simulated GPUs and stand-in kubelet.
TAKES_NO_CONFIG = {"demo"}

#: Every command with the arguments it needs; the config comes from --config.
COMMANDS: dict[str, list[str]] = {
    "run": ["run"],
    "config check": ["config", "check"],
    "config show": ["config", "show"],
    "gpus": ["gpus"],
    "gpus apply-compute-mode": ["gpus", "apply-compute-mode"],
    "gpus set-compute-mode": ["gpus", "set-compute-mode", "default"],
    "gpus restore-compute-mode": ["gpus", "restore-compute-mode", "/nonexistent/record.json"],
    "status": ["status"],
    "health reset": ["health", "reset", "0"],
    "simulate xid": ["simulate", "xid", "0", "79"],
    "simulate ecc": ["simulate", "ecc", "0"],
    "simulate lose": ["simulate", "lose", "0"],
    "simulate recover": ["simulate", "recover", "0"],
    "simulate mps-down": ["simulate", "mps-down", "0"],
    "simulate mps-up": ["simulate", "mps-up", "0"],
    "simulate mps-client": ["simulate", "mps-client", "0", "4242", "512"],
    "mps apply-defaults": ["mps", "apply-defaults", SOME_UUID],
    "mps exec-daemon": ["mps", "exec-daemon", SOME_UUID],
    "mps quit": ["mps", "quit", SOME_UUID],
    "mps start": ["mps", "start"],
    "mps status": ["mps", "status"],
    "mps stop": ["mps", "stop"],
    "mps unit-request": ["mps", "unit-request"],
    "doctor": ["doctor"],
}
#: Commands that talk to the running agent.
AGENT_COMMANDS = ["status", "health reset"] + [
    name for name in COMMANDS if name.startswith("simulate")
]
#: Commands that open the GPU backend.
GPU_COMMANDS = [
    "gpus",
    "gpus apply-compute-mode",
    "gpus restore-compute-mode",
    "gpus set-compute-mode",
    "mps apply-defaults",
    "mps start",
    "mps status",
    "mps stop",
]


def vgpu_agent(*args: str, as_nobody: bool = False, timeout_s: float = TIMEOUT_S) -> Result:
    """Run ``vgpu-agent ARGS`` as a process (as user nobody if asked), forked from a server
    that has imported the package (:mod:`tests.cli_process`)."""
    return run_cli(*args, as_nobody=as_nobody, timeout_s=timeout_s)


@dataclass(frozen=True)
class Job:
    """One CLI invocation: its arguments, and whether it runs as user nobody."""

    args: tuple[str, ...]
    as_nobody: bool = False


def run_all(jobs: dict[str, Job]) -> dict[str, Result]:
    """Run independent CLI processes four at a time (they mostly wait for imports)."""
    with futures.ThreadPoolExecutor(max_workers=4) as pool:
        running = {
            name: pool.submit(vgpu_agent, *job.args, as_nobody=job.as_nobody)
            for name, job in jobs.items()
        }
        return {name: future.result() for name, future in running.items()}


def assert_one_line_error(result: Result, *words: str) -> None:
    """Non-zero exit, one line on stderr naming the problem, nothing on stdout, no traceback."""
    assert result.code != 0, result.describe()
    assert "Traceback" not in result.stdout + result.stderr, result.describe()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.describe()
    assert lines[0].startswith("vgpu-agent: "), result.describe()
    for word in words:
        assert word in lines[0], result.describe()


@pytest.mark.parametrize(
    "args",
    [
        ("--config", "/nonexistent/config.toml", "status"),
        ("--config", "/nonexistent/config.toml", "doctor"),
        ("--version",),
        ("no-such-command",),
    ],
    ids=["config-error", "doctor", "version", "usage-error"],
)
def test_forked_cli_answers_like_the_installed_entry_point(args: tuple[str, ...]) -> None:
    """The forked CLI of these tests gives what a fresh `python -m vgpu_agent` gives: the
    same exit status, stdout and stderr, for an error, a report, an answer and a usage error."""
    forked = vgpu_agent(*args)
    fresh = run_cli_exec(*args)
    assert forked == fresh, f"{forked.describe()}\n--- fresh:\n{fresh.describe()}"
    assert "Traceback" not in forked.stderr


def test_every_command_is_covered() -> None:
    """The table above names every command `vgpu-agent --help` offers (so a new command
    must be added here, and gets these tests)."""

    def walk(group: click.Group, prefix: str) -> Iterator[str]:
        for name, command in group.commands.items():
            path = f"{prefix}{name}"
            if isinstance(command, click.Group):
                if command.invoke_without_command:
                    yield path
                yield from walk(command, f"{path} ")
            else:
                yield path

    assert isinstance(cli, click.Group)
    assert set(walk(cli, "")) == set(COMMANDS) | TAKES_NO_CONFIG


# -- bad configs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadConfig:
    """A config path that cannot be used, and words the error must contain."""

    name: str
    make: Callable[[Path], Path]
    words: tuple[str, ...]
    as_nobody: bool = False


def _missing(root: Path) -> Path:
    return root / "absent.toml"


def _directory(root: Path) -> Path:
    (root / "config.d").mkdir()
    return root / "config.d"


def _bad_toml(root: Path) -> Path:
    path = root / "syntax.toml"
    path.write_text("[gpus\nreplicas_per_gpu = 4\n")
    return path


def _bad_value(root: Path) -> Path:
    path = root / "value.toml"
    path.write_text("[gpus]\nreplicas_per_gpu = 'many'\n")
    return path


def _root_only(root: Path) -> Path:
    path = root / "secret.toml"
    path.write_text('[gpus]\nbackend = "simulated"\n')
    path.chmod(0o600)
    root.chmod(0o755)
    return path


BAD_CONFIGS = [
    BadConfig("missing", _missing, ("absent.toml",)),
    BadConfig("directory", _directory, ("config.d", "is a directory")),
    BadConfig("bad-toml", _bad_toml, ("syntax.toml", "not valid TOML")),
    BadConfig("bad-value", _bad_value, ("value.toml", "gpus.replicas_per_gpu")),
    BadConfig("unreadable", _root_only, ("secret.toml", "Permission denied"), as_nobody=True),
]


@pytest.fixture(scope="module")
def bad_config_results(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[BadConfig], dict[str, Result]]:
    """Every command with a bad config, run (four at a time) once per bad config, when the
    first test of that config asks; the tests of one config share a test worker."""
    results: dict[str, dict[str, Result]] = {}

    def results_for(bad: BadConfig) -> dict[str, Result]:
        if bad.name not in results:
            path = str(bad.make(tmp_path_factory.mktemp(bad.name)))
            argvs = {name: ("--config", path, *args) for name, args in COMMANDS.items()}
            argvs["config check PATH"] = ("config", "check", path)
            results[bad.name] = run_all(
                {name: Job(argv, bad.as_nobody) for name, argv in argvs.items()}
            )
        return results[bad.name]

    return results_for


@pytest.mark.parametrize(
    "bad",
    [
        # One xdist group per config: its commands run once, in one worker.
        pytest.param(bad, id=bad.name, marks=pytest.mark.xdist_group(f"bad-config-{bad.name}"))
        for bad in BAD_CONFIGS
    ],
)
@pytest.mark.parametrize("command", [*COMMANDS, "config check PATH"])
def test_bad_config(
    bad_config_results: Callable[[BadConfig], dict[str, Result]], bad: BadConfig, command: str
) -> None:
    """A missing, directory, unparseable, invalid or unreadable config: exit 78 and one
    line naming the file and the problem (doctor: its report, with the config failing)."""
    if bad.as_nobody and shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed: cannot run as another user")
    if bad.as_nobody and os.geteuid() != 0:
        pytest.skip("only root can run a command as nobody")
    result = bad_config_results(bad)[command]
    if command == "doctor":
        assert result.code != 0, result.describe()
        assert "Traceback" not in result.stdout + result.stderr
        assert "[FAIL] config" in result.stdout, result.describe()
        assert all(word in result.stdout for word in bad.words), result.describe()
        return
    assert result.code == EXIT_CONFIG, result.describe()
    assert_one_line_error(result, "config error", *bad.words)


# -- no GPU, no agent, no permission ------------------------------------------------------------


def _write_config(root: Path, backend: str, **mps: str) -> Path:
    """A usable config of ``backend`` with everything under ``root``."""
    extra = "".join(f'{key} = "{value}"\n' for key, value in mps.items())
    path = root / f"{backend}.toml"
    path.write_text(
        f'[agent]\nstate_dir = "{root}/state"\n'
        f'[plugin]\nplugin_dir = "{root}/dp"\n'
        f'[gpus]\nbackend = "{backend}"\n'
        f'[mps]\npipe_root = "{root}/pipe/mps"\nlog_root = "{root}/log"\n{extra}'
    )
    return path


NO_NVML = ctypes.util.find_library("nvidia-ml") is None


@pytest.mark.skipif(not NO_NVML, reason="this machine has an NVIDIA driver")
def test_no_gpu(tmp_path: Path) -> None:
    """With the NVML backend on a machine without a driver, every command that needs the
    GPU says so in one line (doctor: in its report) and exits non-zero."""
    config = _write_config(tmp_path, "nvml", daemon_thread_limit="proportional")
    jobs = {
        name: Job(("--config", str(config), *COMMANDS[name])) for name in [*GPU_COMMANDS, "doctor"]
    }
    results = run_all(jobs)
    for name in GPU_COMMANDS:
        assert_one_line_error(results[name], "NVML", "driver")
    doctor = results["doctor"]
    assert doctor.code != 0
    assert "[FAIL] driver" in doctor.stdout
    assert "Traceback" not in doctor.stdout + doctor.stderr


@pytest.mark.skipif(not NO_NVML, reason="this machine has an NVIDIA driver")
def test_run_without_gpu_waits_for_the_driver(tmp_path: Path) -> None:
    """`run` without a driver does not exit into a restart loop: it waits, says why, and
    stops cleanly (exit 0) on SIGTERM."""
    config = _write_config(tmp_path, "nvml")
    env = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
    process = subprocess.Popen(
        [sys.executable, "-m", "vgpu_agent", "--config", str(config), "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    waiting = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if "retrying" in line:
                waiting.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert waiting.wait(TIMEOUT_S), "".join(lines)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(TIMEOUT_S)
        if process.stderr is not None:
            process.stderr.close()
    output = "".join(lines)
    assert "opening the GPU backend failed" in output
    assert "driver" in output
    assert "Traceback" not in output


def test_no_agent_running(tmp_path: Path) -> None:
    """Commands for the running agent, with none running (no socket, or a socket left by
    a killed agent): one line saying the agent is not running, exit 1 (`status`: 5, its
    code for not-running)."""
    config = _write_config(tmp_path, "simulated")
    jobs = {name: Job(("--config", str(config), *COMMANDS[name])) for name in AGENT_COMMANDS}
    for name, result in run_all(jobs).items():
        assert result.code == (5 if name == "status" else 1), name
        assert_one_line_error(result, "the agent is not running", "control.sock")
    (tmp_path / "state").mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "state" / "control.sock"))
    stale.close()  # the file of a killed agent: nobody listens
    assert_one_line_error(
        vgpu_agent("--config", str(config), "status"), "the agent is not running", "killed"
    )


@pytest.fixture
def running_agent(short_tmp_dir: str) -> Iterator[Path]:
    """An agent serving simulated GPUs in this process; yields its config file. The
    directories are open to other users, the control socket is root's (0600)."""
    root = Path(short_tmp_dir)
    root.chmod(0o755)
    config_path = _write_config(root, "simulated")
    config_path.chmod(0o644)
    config = make_config(short_tmp_dir)
    standin = KubeletStandin(config.plugin.plugin_dir)
    standin.start()
    agent = build_agent(config, notifier=Notifier(None))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        assert agent.ready.wait(TIMEOUT_S)
        deadline = time.monotonic() + TIMEOUT_S
        while not (root / "state" / "control.sock").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield config_path
    finally:
        agent.request_stop()
        thread.join(TIMEOUT_S)
        standin.stop()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)
def test_no_permission(running_agent: Path, short_tmp_dir: str) -> None:
    """As an unprivileged user: the control socket of a running agent, and MPS
    directories under a root-owned directory, are refused in one line each."""
    root = Path(short_tmp_dir)
    # Real daemons (a stand-in program): simulated ones need no directories.
    real = root / "real"
    (real / "pipe").mkdir(mode=0o755, parents=True)  # root's: nobody cannot create in it
    real.chmod(0o755)
    real_daemons = _write_config(real, "simulated", control_binary="/bin/true")
    real_daemons.chmod(0o644)
    config = ("--config", str(running_agent))
    jobs = {
        name: Job((*config, *COMMANDS[name]), as_nobody=True) for name in ("status", "health reset")
    }
    jobs["mps start"] = Job(("--config", str(real_daemons), *COMMANDS["mps start"]), as_nobody=True)
    results = run_all(jobs)
    assert_one_line_error(results["status"], "permission denied", "run as root")
    assert_one_line_error(results["health reset"], "permission denied", "run as root")
    assert_one_line_error(results["mps start"], "Permission denied", "run the agent as root")
    # As root, the same agent answers.
    answer = vgpu_agent("--config", str(running_agent), "status")
    assert answer.code == 0, answer.describe()
    assert "registered with kubelet" in answer.stdout or "serving" in answer.stdout
