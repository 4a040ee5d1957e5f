"""An operator's day (issue 13): every answer true about the running agent, every mistake
caught with one line naming the problem and what to do. The CLI runs as real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from tests.cli_process import cli_env
from tests.ops.test_cli_errors import NO_NVML, TIMEOUT_S, assert_one_line_error, vgpu_agent
from vgpu_agent.host import control
from vgpu_agent.model.commands import HealthResetCommand, StatusCommand
from vgpu_agent.model.errors import AgentError
from vgpu_agent.standins.kubelet import KubeletStandin


def write_config(root: Path, body: str = "", *, mps: str = "", name: str = "config.toml") -> Path:
    """A simulated-backend config with every path under ``root``; ``mps`` is added to its
    [mps] table, ``body`` (more of [gpus], then other tables) at the end."""
    path = root / name
    path.write_text(
        f'[agent]\nstate_dir = "{root}/state"\n'
        f'[plugin]\nplugin_dir = "{root}/dp"\n'
        f'[mps]\npipe_root = "{root}/pipe"\nlog_root = "{root}/log"\n{mps}'
        '[gpus]\nbackend = "simulated"\n' + body
    )
    return path


class AgentProcess:
    """`vgpu-agent run` as a process; its stderr collected line by line."""

    def __init__(self, *args: str) -> None:
        env = cli_env()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vgpu_agent", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        """Everything the agent logged so far."""
        with self._changed:
            return "".join(self.lines)

    def wait_for_line(self, *words: str, timeout_s: float = TIMEOUT_S) -> str:
        """The first logged line containing every one of ``words``."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for line in self.lines:
                    if all(word in line for word in words):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line with {words}; logged:\n{''.join(self.lines)}")
                self._changed.wait(min(left, 0.5))

    def exit_code(self, timeout_s: float = TIMEOUT_S) -> int:
        """Wait for the agent to exit on its own; its exit code."""
        code = self.process.wait(timeout_s)
        self._reader.join(timeout_s)
        if self.process.stderr is not None:
            self.process.stderr.close()
        return code

    def stop(self) -> int:
        """SIGTERM, then its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.exit_code()
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.exit_code()


@pytest.fixture
def agents() -> Iterator[Callable[..., AgentProcess]]:
    """Start `vgpu-agent run` processes; each is stopped at the end."""
    started: list[AgentProcess] = []

    def start(*args: str) -> AgentProcess:
        agent = AgentProcess(*args)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    """Poll ``condition`` until true; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def answers(socket_path: Path) -> Callable[[], bool]:
    """Whether an agent answers a status request on ``socket_path``."""

    def check() -> bool:
        try:
            return bool(control.request(str(socket_path), StatusCommand()).get("ok"))
        except AgentError:  # not answering yet
            return False

    return check


@pytest.fixture
def kubelet(short_tmp_dir: str) -> Iterator[Path]:
    """A kubelet stand-in in ``<short_tmp_dir>/dp``; yields the test's root directory."""
    root = Path(short_tmp_dir)
    standin = KubeletStandin(str(root / "dp"))
    standin.start()
    try:
        yield root
    finally:
        standin.stop()


# -- item 7: status of any size ---------------------------------------------------------------


def test_status_of_thousands_of_vgpus(kubelet: Path, agents: Callable[..., AgentProcess]) -> None:
    """`status` of an agent serving 64 x 40 = 2,560 vGPUs prints every one (its reply is
    far beyond the 64 KiB a request may have)."""
    config = write_config(kubelet, "replicas_per_gpu = 40\n[simulated]\ncount = 64\n")
    agents("--config", str(config), "run")
    wait_until(answers(kubelet / "state" / "control.sock"), "the agent's control socket")
    result = vgpu_agent("--config", str(config), "status")
    assert result.code == 0, result.describe()
    assert result.stdout.startswith("serving 2560 vGPUs on 64 GPUs"), result.describe()
    vgpu_lines = [line for line in result.stdout.splitlines() if line.startswith("  ")]
    assert len(vgpu_lines) == 2560
    as_json = vgpu_agent("--config", str(config), "status", "--json")
    assert as_json.code == 0, as_json.describe()
    assert len(as_json.stdout) > 2 * control.MAX_REQUEST_BYTES


def test_request_longer_than_the_limit_is_refused(short_tmp_dir: str) -> None:
    """A request beyond MAX_REQUEST_BYTES is answered with an error, not read on."""
    server = control.ControlServer(os.path.join(short_tmp_dir, "c.sock"), lambda _: {"ok": True})
    server.start()
    try:
        answer = control.request(
            server.socket_path, HealthResetCommand("x" * control.MAX_REQUEST_BYTES)
        )
    finally:
        server.stop()
    assert answer == {
        "ok": False,
        "error": f"bad request: request longer than {control.MAX_REQUEST_BYTES} bytes",
    }


# -- item 2: memory headroom and 64-bit integers --------------------------------------------------


def test_headroom_beyond_the_gpu_memory_is_not_served(tmp_path: Path) -> None:
    """A headroom that leaves a GPU's vGPUs no memory: `gpus` says it is not served and
    why; `run` refuses to start (it would hand every pod a 0 MiB limit) and names the key."""
    config = write_config(tmp_path, "[simulated]\ncount = 1\n", mps="memory_headroom_mib = 90000\n")
    listed = vgpu_agent("--config", str(config), "gpus")
    assert listed.code == 0, listed.describe()
    assert "not served: GPU 0" in listed.stdout, listed.describe()
    assert "mps.memory_headroom_mib = 90000" in listed.stdout, listed.describe()
    run = vgpu_agent("--config", str(config), "run")
    assert run.code != 0, run.describe()
    assert "mps.memory_headroom_mib = 90000" in run.stderr, run.describe()
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("key", "table"),
    [
        ("memory_headroom_mib", "mps"),
        ("memory_limit", "mps"),
        ("register_timeout_s", "plugin"),
    ],
    ids=["headroom", "memory-limit", "seconds"],
)
def test_integers_beyond_64_bits_are_refused(tmp_path: Path, key: str, table: str) -> None:
    """`config check` refuses an integer TOML cannot hold (2**64), naming the key."""
    config = tmp_path / "config.toml"
    config.write_text(f"[{table}]\n{key} = {2**64}\n")
    result = vgpu_agent("config", "check", str(config))
    assert result.code == 78, result.describe()
    assert_one_line_error(result, f"{table}.{key}", "64-bit")


# -- item 13: CLI polish ---------------------------------------------------------------------------


def test_config_check_of_a_fifo_does_not_hang(tmp_path: Path) -> None:
    """`config check` on a FIFO (which no one writes) answers at once: not a regular file."""
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    result = vgpu_agent("config", "check", str(fifo), timeout_s=30)
    assert result.code == 78, result.describe()
    assert_one_line_error(result, str(fifo), "not a regular file (a FIFO)")


def test_simulate_xid_that_is_not_a_number(tmp_path: Path) -> None:
    """`simulate xid 0 abc` says the XID must be an integer from 0 to 65535."""
    result = vgpu_agent("simulate", "xid", "0", "abc")
    assert result.code == 2, result.describe()
    assert "'abc' is not an XID number (an integer from 0 to 65535)" in result.stderr
    assert "range" not in result.stderr.replace("0 to 65535", "")


def test_health_reset_of_a_healthy_gpu(kubelet: Path, agents: Callable[..., AgentProcess]) -> None:
    """`health reset` of a GPU with no fault says there was nothing to clear; after an
    injected XID it names what it cleared."""
    config = write_config(kubelet, "[simulated]\ncount = 1\n")
    agents("--config", str(config), "run")
    wait_until(answers(kubelet / "state" / "control.sock"), "the agent's control socket")
    healthy = vgpu_agent("--config", str(config), "health", "reset", "0")
    assert healthy.code == 0, healthy.describe()
    assert healthy.stdout.endswith(": no fault recorded, nothing to clear\n"), healthy.describe()
    assert "cleared" not in healthy.stdout
    injected = vgpu_agent("--config", str(config), "simulate", "xid", "0", "79")
    assert injected.code == 0, injected.describe()
    reset = vgpu_agent("--config", str(config), "health", "reset", "0")
    assert reset.code == 0, reset.describe()
    assert reset.stdout.endswith(": cleared xid 79\n"), reset.describe()


def test_demo_output_is_only_the_demo() -> None:
    """`vgpu-agent demo` prints its own lines only: the agent's log (its warnings about
    the injected XID and the kubelet restart) does not land between them."""
    result = vgpu_agent("demo")
    assert result.code == 0, result.describe()
    assert result.stderr == "", result.describe()
    for line in result.stdout.splitlines():
        assert line.startswith(("== ", "   ")), result.describe()
    assert "== done" in result.stdout


# -- item 10: NVML errors say what to do -----------------------------------------------------------


@pytest.mark.skipif(not NO_NVML, reason="this machine has an NVIDIA driver")
def test_no_driver_says_what_to_do(tmp_path: Path) -> None:
    """Without the NVIDIA driver, `gpus` says to install it or to use the simulated
    backend, in one line without nested parentheses."""
    config = tmp_path / "config.toml"
    config.write_text('[gpus]\nbackend = "nvml"\n')
    result = vgpu_agent("--config", str(config), "gpus")
    assert_one_line_error(result, "install the NVIDIA driver", "--simulate N", "simulated")
    assert "((" not in result.stderr.replace(" ", "")
    assert "))" not in result.stderr.replace(" ", "")


# -- item 9: simulated mode agrees with itself ------------------------------------------------


def test_simulated_mps_commands_agree(tmp_path: Path) -> None:
    """With simulated GPUs, `mps status [GPU]`, `mps start`, `mps stop` and `doctor` all say
    the daemons are simulated inside the agent (none says missing, none fails), and
    `mps exec-daemon` refuses in one line."""
    config = write_config(tmp_path)
    argvs = {
        "status": ("mps", "status"),
        "status 1": ("mps", "status", "1"),
        "start": ("mps", "start"),
        "stop": ("mps", "stop"),
        "doctor": ("doctor",),
        "exec": ("mps", "exec-daemon", "GPU-nope"),
    }
    results = {name: vgpu_agent("--config", str(config), *argv) for name, argv in argvs.items()}
    for name in ("status", "start", "stop"):
        lines = results[name].stdout.splitlines()
        assert results[name].code == 0, results[name].describe()
        assert len(lines) == 2, results[name].describe()
        assert all("simulated inside `vgpu-agent run`" in line for line in lines)
    assert results["status 1"].code == 0, results["status 1"].describe()
    assert results["status 1"].stdout.startswith("GPU 1 ")
    assert len(results["status 1"].stdout.splitlines()) == 1
    doctor_lines = [line for line in results["doctor"].stdout.splitlines() if "mps daemon" in line]
    assert len(doctor_lines) == 2, results["doctor"].describe()
    assert all("simulated inside `vgpu-agent run`" in line for line in doctor_lines)
    assert_one_line_error(results["exec"], "simulated inside `vgpu-agent run`", "control_binary")
    assert not (tmp_path / "pipe").exists()
    assert not (tmp_path / "log").exists()


def test_exec_daemon_of_an_unknown_gpu_leaves_nothing(tmp_path: Path) -> None:
    """`mps exec-daemon GPU-nope` (real daemons, a stand-in program) names the GPU it does
    not serve and creates no directory; `mps status` names a missing pipe dir once."""
    config = write_config(tmp_path, mps='control_binary = "/bin/true"\n')
    result = vgpu_agent("--config", str(config), "mps", "exec-daemon", "GPU-nope")
    assert_one_line_error(result, "no such served GPU: GPU-nope")
    assert not (tmp_path / "pipe").exists()
    assert not (tmp_path / "log").exists()
    status = vgpu_agent("--config", str(config), "mps", "status", "0")
    assert status.code == 1, status.describe()
    (line,) = status.stdout.splitlines()
    assert line.endswith(" is missing"), status.describe()
    assert line.count(str(tmp_path / "pipe")) == 1, status.describe()


# -- item 12: the README and the man page say what works ------------------------------------

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
MAN_PAGE = REPO / "packaging" / "man" / "vgpu-agent.1"


def command_paths() -> set[str]:
    """Every command `vgpu-agent --help` leads to ("mps status", "gpus", ...)."""
    from tests.ops.test_cli_errors import COMMANDS, TAKES_NO_CONFIG

    return set(COMMANDS) | TAKES_NO_CONFIG


def man_page_text() -> str:
    """The man page as words: roff font escapes, quotes and macros taken out."""
    text = MAN_PAGE.read_text()
    text = re.sub(r"\\f[BIRP]", "", text).replace("\\-", "-").replace('"', " ")
    text = re.sub(r"^\.[A-Z]+\b", " ", text, flags=re.MULTILINE)
    return " ".join(text.split())


def test_man_page_lists_every_command() -> None:
    """Each command click offers is named in the man page's COMMANDS section (the table
    of commands comes from tests/ops/test_cli_errors.py, which checks it against click)."""
    commands_section = man_page_text().split(" COMMANDS ", 1)[1].split(" FILES ", 1)[0]
    missing = {path for path in command_paths() if f" {path} " not in f" {commands_section} "}
    assert not missing, f"the man page lacks {sorted(missing)}"


def test_readme_has_a_complete_pod_manifest() -> None:
    """README shows a whole Pod (apiVersion to the vGPU limit) asking for the resource the
    agent advertises by default."""
    from vgpu_agent.config.schema import PluginConfig

    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.DOTALL)
    pods = [block for block in blocks if "kind: Pod" in block]
    assert pods, "no Pod manifest in README.md"
    pod = pods[0]
    for needed in ("apiVersion: v1", "metadata:", "name:", "spec:", "containers:", "image:"):
        assert needed in pod, needed
    # One vGPU: what a container may hold under the default (enforced) confinement.
    assert f"{PluginConfig().resource_name}: 1" in pod


def readme_try_it() -> list[str]:
    """The commands of README's "Try it" block, in order (comments dropped)."""
    text = README.read_text()
    after = text.split("Try it without a GPU or a kubelet", 1)[1]
    block = re.search(r"```sh\n(.*?)```", after, flags=re.DOTALL)
    assert block is not None, "no command block after README's Try it"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line]


@pytest.mark.slow
@pytest.mark.skipif(
    not (REPO / ".venv" / "bin" / "vgpu-agent").exists(), reason="no .venv in this checkout"
)
def test_readme_try_it_works_as_written(short_tmp_dir: str) -> None:
    """README's "Try it" commands run as written from the clone after `scripts/dev demo`
    (only /tmp/vgpu-laptop is moved to a temp dir, in a copy of examples/laptop.toml): the
    agent serves, status, gpus, mps status and doctor succeed, the injected XID leaves it
    degraded (exit 4)."""
    commands = readme_try_it()
    assert [command.split()[0] for command in commands] == [".venv/bin/vgpu-agent"] + [
        ".venv/bin/python"
    ] + [".venv/bin/vgpu-agent"] * 7, commands
    root = Path(short_tmp_dir)
    config = _laptop_config(root)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("NOTIFY_SOCKET", "VGPU_CONFIG")
    }

    def argv(command: str) -> list[str]:
        moved = command.replace("/tmp/vgpu-laptop", str(root))
        return moved.replace("examples/laptop.toml", str(config)).rstrip(" &").split()

    def call(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv(command),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )

    demo, standin, run, *foreground = commands
    shown = call(demo)
    assert shown.returncode == 0, shown.stderr
    background = [
        subprocess.Popen(argv(command), cwd=REPO, env=env, stdout=subprocess.DEVNULL)
        for command in (standin, run)
    ]
    try:
        wait_until(lambda: call(foreground[0]).returncode == 0, "the agent serving and registered")
        *steps, last = foreground
        for command in steps:
            result = call(command)
            assert result.returncode == 0, (command, result.stdout, result.stderr)
        shown = call(last)
        assert shown.returncode == 4, shown.stderr
        assert "xid 79" in shown.stdout, shown.stdout
    finally:
        for process in reversed(background):
            process.send_signal(signal.SIGTERM)
            process.wait(TIMEOUT_S)


# -- item 11: no input that can damage the host ----------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("pipe_root", "/tmp"),
        ("pipe_root", "/tmp/"),
        ("pipe_root", "/"),
        ("pipe_root", "/var"),
        ("log_root", "/var/log"),
        ("log_root", "//run"),
    ],
    ids=["tmp", "tmp-slash", "root", "var", "var-log", "double-slash-run"],
)
def test_shared_system_directory_is_refused(tmp_path: Path, key: str, value: str) -> None:
    """`config check` refuses an MPS directory root the system or every user shares."""
    config = tmp_path / "config.toml"
    config.write_text(f'[mps]\n{key} = "{value}"\n')
    result = vgpu_agent("config", "check", str(config))
    assert result.code == 78, result.describe()
    assert_one_line_error(result, f"mps.{key}", "shares", "not /tmp")


def stand_in_program(directory: Path, marker: Path) -> Path:
    """A control program that only records that it ran (in ``marker``)."""
    program = directory / "mps-control"
    program.write_text(f"#!/bin/sh\necho ran >> {marker}\n")
    program.chmod(0o755)
    return program


def test_existing_shared_pipe_root_is_refused_and_left_alone(short_tmp_dir: str) -> None:
    """An existing pipe root that others may write (sticky 1777, as /tmp) is refused and
    keeps its mode; an existing private one (0700) is used and keeps its mode too."""
    root = Path(short_tmp_dir)
    marker = root / "ran"
    program = stand_in_program(root, marker)
    shared = root / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    config = write_config(
        root, mps=f'control_binary = "{program}"\nmulti_user = "off"\n', name="shared.toml"
    ).read_text()
    (root / "shared.toml").write_text(config.replace(f"{root}/pipe", str(shared)))
    result = vgpu_agent("--config", str(root / "shared.toml"), "mps", "start", "0")
    assert_one_line_error(result, str(shared), "writable by other users", "mps.pipe_root")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    private = root / "pipe"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    write_config(root, mps=f'control_binary = "{program}"\nmulti_user = "off"\n')
    # The stand-in starts no daemon: start fails later, after the directories are made.
    started = vgpu_agent("--config", str(root / "config.toml"), "mps", "start", "0")
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert f"MPS directory {private} is not searchable by other users" in started.stderr
    assert [path.name for path in private.iterdir()] != []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand files to another user")
@pytest.mark.parametrize(
    "case",
    ["world-writable-target", "other-owner", "writable-directory"],
)
def test_untrusted_control_binary_is_not_run(short_tmp_dir: str, case: str) -> None:
    """A control program another user could change (a symlink to a world-writable file,
    a file of another owner, a file in a directory others may write) is refused in one
    line and never run; doctor fails its binaries check for it."""
    root = Path(short_tmp_dir)
    marker = root / "ran"
    (root / "bin").mkdir(mode=0o755)
    program = stand_in_program(root / "bin", marker)
    named = program
    if case == "world-writable-target":
        program.chmod(0o777)
        named = root / "link"
        named.symlink_to(program)
    elif case == "other-owner":
        os.chown(program, 65534, 65534)
    else:
        (root / "bin").chmod(0o777)
    config = write_config(root, mps=f'control_binary = "{named}"\nmulti_user = "auto"\n')
    result = vgpu_agent("--config", str(config), "mps", "start", "0")
    assert_one_line_error(result, "refusing to run the MPS control program", str(named))
    doctor = vgpu_agent("--config", str(config), "doctor")
    (line,) = [line for line in doctor.stdout.splitlines() if "] mps binaries:" in line]
    assert line.startswith("[FAIL] mps binaries: refusing to run the MPS control program")
    assert not marker.exists(), "the untrusted program ran"


# -- item 5: no GPU to serve is exit 78 ----------------------------------------------------------


@pytest.mark.parametrize(
    ("gpus_text", "words"),
    [
        ("serve = [5]\n[simulated]\ncount = 2\n", "gpus.serve names 5"),
        (
            '[simulated]\nmodel = "Tesla P100"\ncompute_capability = "6.0"\n',
            "older than Volta",
        ),
    ],
    ids=["serve-missing-gpu", "only-pre-volta"],
)
def test_no_gpu_to_serve_exits_78(tmp_path: Path, gpus_text: str, words: str) -> None:
    """`run` on a node with no GPU the config can serve exits 78 (systemd's
    RestartPreventExitStatus) with one log line saying why and what to do."""
    config = write_config(tmp_path, gpus_text)
    result = vgpu_agent("--config", str(config), "run")
    assert result.code == 78, result.describe()
    (line,) = [line for line in result.stderr.splitlines() if "no GPU to serve" in line]
    assert words in line
    assert "fix the config" in line
    assert "Traceback" not in result.stderr


# -- item 1: the truth while waiting for the GPU driver -----------------------------------------


@pytest.mark.skipif(not NO_NVML, reason="this machine has an NVIDIA driver")
def test_status_while_waiting_for_the_driver(
    short_tmp_dir: str, agents: Callable[..., AgentProcess]
) -> None:
    """An agent waiting for the NVIDIA driver is running, and every command says so:
    `status` shows what it waits for, `health reset` that no GPU is served yet, `doctor`
    that it runs but waits; none says "not running, start it"."""
    root = Path(short_tmp_dir)
    config = write_config(root).read_text().replace('backend = "simulated"', 'backend = "nvml"')
    (root / "config.toml").write_text(config)
    agent = agents("--config", str(root / "config.toml"), "run")
    agent.wait_for_line("opening the GPU backend failed")
    shown = vgpu_agent("--config", str(root / "config.toml"), "status")
    assert shown.code == 3, shown.describe()  # waiting-for-driver (issue 23)
    assert shown.stdout.startswith("waiting for the GPU driver: initialising NVML"), shown.stdout
    document = vgpu_agent("--config", str(root / "config.toml"), "status", "--json")
    assert document.code == 3, document.describe()
    assert json.loads(document.stdout)["state"] == "waiting-for-driver"
    assert json.loads(document.stdout)["ok"] is False
    assert "install the NVIDIA driver" in shown.stdout
    reset = vgpu_agent("--config", str(root / "config.toml"), "health", "reset", "0")
    assert_one_line_error(reset, "no GPU is served yet: waiting for the GPU driver")
    assert "not running" not in reset.stderr
    doctor = vgpu_agent("--config", str(root / "config.toml"), "doctor")
    (line,) = [line for line in doctor.stdout.splitlines() if "] agent:" in line]
    assert "running, but waiting for the GPU driver" in line, doctor.stdout
    assert agent.stop() == 0


# -- item 6: one agent at a time ------------------------------------------------------------------


def test_second_agent_exits_at_once(kubelet: Path, agents: Callable[..., AgentProcess]) -> None:
    """A second `run` beside a live agent exits 1 at once, naming the first one's pid,
    before it touches anything: the compute mode log line never appears, the first agent
    keeps serving and answering."""
    config = write_config(kubelet, "[simulated]\ncount = 1\n")
    first = agents("--config", str(config), "run")
    wait_until(answers(kubelet / "state" / "control.sock"), "the first agent")
    second = vgpu_agent("--config", str(config), "run", timeout_s=30)
    assert second.code == 1, second.describe()
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.describe()
    assert f"another vgpu-agent (pid {first.process.pid}) already runs" in lines[0]
    assert "systemctl stop vgpu-agent" in lines[0]
    assert "compute mode" not in second.stderr
    shown = vgpu_agent("--config", str(config), "status")
    assert shown.code == 0, shown.describe()
    assert "serving 10 vGPUs on 1 GPUs" in shown.stdout


# -- items 3 and 4: the CLI finds the agent whatever the file says now -------------------------


def test_broken_config_still_reaches_the_running_agent(
    kubelet: Path, agents: Callable[..., AgentProcess]
) -> None:
    """After a bad edit of the config file, `status` and `health reset` still reach the
    agent that runs (with the config it loaded), saying so in one note; `config check`
    still reports the bad file."""
    config = write_config(kubelet, "[simulated]\ncount = 1\n")
    agents("--config", str(config), "run")
    wait_until(answers(kubelet / "state" / "control.sock"), "the agent")
    config.write_text(config.read_text() + "[gpus\n")
    shown = vgpu_agent("--config", str(config), "status")
    assert shown.code == 0, shown.describe()
    assert shown.stdout.startswith("serving 10 vGPUs on 1 GPUs"), shown.describe()
    (note,) = shown.stderr.strip().splitlines()
    assert note.startswith("vgpu-agent: note: "), note
    assert "not valid TOML" in note, note
    assert str(kubelet / "state" / "control.sock") in note
    reset = vgpu_agent("--config", str(config), "health", "reset", "0")
    assert reset.code == 0, reset.describe()
    assert "nothing to clear" in reset.stdout
    checked = vgpu_agent("config", "check", str(config))
    assert checked.code == 78, checked.describe()


def test_reload_of_restart_only_keys_is_refused_and_status_still_answers(
    kubelet: Path, agents: Callable[..., AgentProcess]
) -> None:
    """Changing agent.state_dir and mps.pipe_root, then SIGHUP: the agent logs that a
    restart is needed and keeps its socket; `status`, reading the new file, still reaches
    it and says the file changed since the agent started."""
    config = write_config(kubelet, "[simulated]\ncount = 1\n")
    agent = agents("--config", str(config), "run")
    wait_until(answers(kubelet / "state" / "control.sock"), "the agent")
    config.write_text(
        config.read_text()
        .replace(f"{kubelet}/state", f"{kubelet}/state2")
        .replace(f"{kubelet}/pipe", f"{kubelet}/pipe2")
    )
    agent.process.send_signal(signal.SIGHUP)
    line = agent.wait_for_line("reload: keeping the running config")
    assert "restart needed: agent.state_dir, mps.pipe_root cannot change" in line
    assert (kubelet / "state" / "control.sock").exists()
    assert not (kubelet / "state2").exists()
    shown = vgpu_agent("--config", str(config), "status")
    assert shown.code == 0, shown.describe()
    assert shown.stdout.startswith("serving 10 vGPUs on 1 GPUs"), shown.describe()
    assert "was changed since the agent started" in shown.stderr
    assert "reloaded" not in agent.output


# -- item 8: waiting for the kubelet is said ------------------------------------------------------


def test_agent_before_the_kubelet_says_it_waits(
    short_tmp_dir: str, agents: Callable[..., AgentProcess]
) -> None:
    """An agent started before the kubelet logs once that it waits for the kubelet's
    socket, then registers when the kubelet comes."""
    root = Path(short_tmp_dir)
    (root / "dp").mkdir()
    config = write_config(root, "[simulated]\ncount = 1\n")
    agent = agents("--config", str(config), "run")
    line = agent.wait_for_line("waiting for the kubelet")
    assert f"no socket {root}/dp/kubelet.sock yet" in line
    standin = KubeletStandin(str(root / "dp"))
    standin.start()
    try:
        standin.wait_for_registration(1, TIMEOUT_S)
    finally:
        standin.stop()
    assert agent.output.count("waiting for the kubelet") == 1


def test_plugin_dir_that_is_a_file_is_warned(
    short_tmp_dir: str, agents: Callable[..., AgentProcess]
) -> None:
    """`run --plugin-dir FILE` warns that the plugin directory is not a directory and
    names the kubelet's usual one."""
    root = Path(short_tmp_dir)
    (root / "plugins").write_text("")
    config = write_config(root, "[simulated]\ncount = 1\n")
    agent = agents("--config", str(config), "run", "--plugin-dir", str(root / "plugins"))
    line = agent.wait_for_line("waiting for the kubelet")
    assert f"the plugin directory {root}/plugins is not a directory" in line
    assert "/var/lib/kubelet/device-plugins" in line


#: The benchmark with few calls and a short idle period: only its output is checked.
BENCH_QUICK = ("--calls", "20", "--idle-seconds", "0.1", "--restarts", "2", "--daemon-gpus", "2")


@pytest.mark.slow
def test_bench_output_is_only_numbers() -> None:
    """`bench/control_plane.py` prints its measures only: the agent's log (with its
    journald `<N>` prefixes under NOTIFY_SOCKET) goes to a file, not between them."""
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / "control_plane.py"), *BENCH_QUICK],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    lines = completed.stdout.splitlines()
    assert len(lines) == 10, completed.stdout
    for line in lines:
        assert not line.startswith("<"), line
        assert "WARNING" not in line, line
        assert ":" in line, line


# -- issue 23: an operator's first hour ----------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent.parent
LAPTOP = REPO / "examples" / "laptop.toml"


def test_config_option_after_the_command_says_where_it_goes() -> None:
    """`status --config X` says that --config goes before the command, and how."""
    result = vgpu_agent("status", "--config", "/etc/vgpu/x.toml")
    assert result.code == 2, result.describe()
    assert "--config goes before the command: vgpu-agent --config PATH status" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_without_an_agent_is_a_document_and_exit_5(tmp_path: Path) -> None:
    """With no agent, `status --json` still prints one document (state not-running, ok
    false) and exits 5; plain `status` says so in one line with the same code."""
    config = write_config(tmp_path)
    document = vgpu_agent("--config", str(config), "status", "--json")
    assert document.code == 5, document.describe()
    answer = json.loads(document.stdout)
    assert (answer["state"], answer["ok"], answer["exit_code"]) == ("not-running", False, 5)
    assert "the agent is not running" in answer["error"]
    plain = vgpu_agent("--config", str(config), "status")
    assert plain.code == 5
    assert_one_line_error(plain, "the agent is not running")


def test_status_with_a_bad_config_is_a_document_and_exit_78(tmp_path: Path) -> None:
    """A config that cannot be read: `status --json` prints the config-error document
    and exits 78, the one error line on stderr."""
    config = write_config(tmp_path, "replicas_per_gpu = 999\n")
    result = vgpu_agent("--config", str(config), "status", "--json")
    assert result.code == 78, result.describe()
    answer = json.loads(result.stdout)
    assert (answer["state"], answer["ok"], answer["exit_code"]) == ("config-error", False, 78)
    assert "gpus.replicas_per_gpu" in answer["error"]
    assert result.stderr.startswith("vgpu-agent: config error:"), result.describe()


def test_status_names_an_agent_running_with_another_config(
    kubelet: Path, agents: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """Plain `status` finds no agent where its config says, but names the one that runs
    with another config (a private state_dir) and the command that reaches it."""
    running = write_config(kubelet, "[simulated]\ncount = 1\n")
    agents("--config", str(running), "run")
    wait_until(answers(kubelet / "state" / "control.sock"), "the agent's control socket")
    other = write_config(tmp_path)
    result = vgpu_agent("--config", str(other), "status")
    assert result.code == 5, result.describe()
    assert f"an agent runs with config {running}" in result.stderr, result.describe()
    assert f"vgpu-agent --config {running} status" in result.stderr


def test_status_states_and_exit_codes(kubelet: Path, agents: Callable[..., AgentProcess]) -> None:
    """A registered agent with every vGPU healthy is `serving` (exit 0) and says its GPUs
    are simulated; an application fault (XID 31) is listed, the GPU still serving; after a
    critical XID it is `degraded` (exit 4)."""
    config = write_config(kubelet, "[simulated]\ncount = 1\n")
    agents("--config", str(config), "run")

    def state() -> str:
        shown = vgpu_agent("--config", str(config), "status", "--json")
        return str(json.loads(shown.stdout)["state"]) if shown.stdout else ""

    wait_until(lambda: state() == "serving", "the agent serving and registered")
    serving = vgpu_agent("--config", str(config), "status", "--json")
    assert serving.code == 0, serving.describe()
    answer = json.loads(serving.stdout)
    assert (answer["ok"], answer["exit_code"], answer["backend"]) == (True, 0, "simulated")
    plain = vgpu_agent("--config", str(config), "status")
    assert plain.code == 0
    assert "backend: simulated GPUs" in plain.stdout
    assert vgpu_agent("--config", str(config), "simulate", "xid", "0", "31").code == 0
    wait_until(
        lambda: "MPS fault" in vgpu_agent("--config", str(config), "status").stdout,
        "the MPS fault in status",
    )
    (fault_line,) = [
        line
        for line in vgpu_agent("--config", str(config), "status").stdout.splitlines()
        if line.startswith("MPS fault")
    ]
    assert fault_line.endswith(" XID 31: culprit unknown; hit no pod with MPS clients known")
    assert vgpu_agent("--config", str(config), "simulate", "xid", "0", "79").code == 0
    degraded = vgpu_agent("--config", str(config), "status", "--json")
    assert degraded.code == 4, degraded.describe()
    assert json.loads(degraded.stdout)["state"] == "degraded"
    assert vgpu_agent("--config", str(config), "status").code == 4


def _laptop_config(root: Path) -> Path:
    """examples/laptop.toml as shipped, its /tmp/vgpu-laptop moved under ``root`` (tests
    run side by side)."""
    path = root / "laptop.toml"
    path.write_text(LAPTOP.read_text().replace("/tmp/vgpu-laptop", str(root)))
    return path


def test_the_laptop_example_agrees_with_itself(
    short_tmp_dir: str, agents: Callable[..., AgentProcess]
) -> None:
    """With examples/laptop.toml, run, status, gpus, mps status and doctor all describe the
    same two simulated GPUs, and none of them fails."""
    root = Path(short_tmp_dir)
    standin = KubeletStandin(str(root / "dp"))
    standin.start()
    try:
        config = _laptop_config(root)
        agents("--config", str(config), "run")
        wait_until(answers(root / "state" / "control.sock"), "the agent's control socket")
        status = vgpu_agent("--config", str(config), "status", "--json")
        uuids = [gpu["uuid"] for gpu in json.loads(status.stdout)["gpus"]]
        assert len(uuids) == 2, status.describe()
        gpus = vgpu_agent("--config", str(config), "gpus")
        mps = vgpu_agent("--config", str(config), "mps", "status")
        doctor = vgpu_agent("--config", str(config), "doctor")
        for result in (gpus, mps, doctor):
            assert result.code == 0, result.describe()
            assert "[FAIL]" not in result.stdout, result.describe()
            for uuid in uuids:
                assert uuid in result.stdout, result.describe()
        assert "simulated" in mps.stdout
        assert "[ ok ] driver: the simulated backend is in use" in doctor.stdout
        assert "[ ok ] agent: running: serving 8 vGPUs on 2 GPUs" in doctor.stdout
    finally:
        standin.stop()


def test_doctor_lines_fit_a_terminal(tmp_path: Path) -> None:
    """doctor wraps its findings at 100 columns (a path longer than that stays whole)."""
    result = vgpu_agent("--config", str(_laptop_config(tmp_path)), "doctor")
    assert "[warn] device list:" in result.stdout, result.describe()
    for line in result.stdout.splitlines():
        assert len(line) <= 100 or " " not in line.strip(), line


def test_doctor_as_another_user_says_so_and_blames_no_bug(tmp_path: Path) -> None:
    """doctor run by a user other than root says first that root-only checks may fail,
    and no check ends as an internal error."""
    config = _laptop_config(tmp_path)
    config.chmod(0o644)
    tmp_path.chmod(0o755)
    result = vgpu_agent("--config", str(config), "doctor", as_nobody=True)
    assert result.stdout.startswith("[warn] user: not run as root"), result.describe()
    assert "bug" not in result.stdout + result.stderr, result.describe()
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(os.path.exists("/etc/vgpu/config.toml"), reason="this host has a config")
def test_config_check_without_a_file_says_there_is_none() -> None:
    """`config check` with no file at the default path says so, not "<defaults>: ok"."""
    result = vgpu_agent("config", "check")
    assert result.code == 0, result.describe()
    assert result.stdout == (
        "no file at /etc/vgpu/config.toml: the agent runs with the built-in defaults (ok)\n"
    )


@pytest.mark.skipif(not NO_NVML, reason="this machine has an NVIDIA driver")
def test_doctor_says_the_agent_runs_on_simulated_gpus(
    kubelet: Path, agents: Callable[..., AgentProcess]
) -> None:
    """An agent started with `run --simulate` beside a config for the real GPUs: doctor's
    agent line says it runs on simulated GPUs, not a plain ok beside a failed driver."""
    config = write_config(kubelet).read_text().replace('backend = "simulated"', 'backend = "nvml"')
    (kubelet / "config.toml").write_text(config)
    agents("--config", str(kubelet / "config.toml"), "run", "--simulate", "1")
    wait_until(answers(kubelet / "state" / "control.sock"), "the agent's control socket")
    doctor = vgpu_agent("--config", str(kubelet / "config.toml"), "doctor")
    assert "[FAIL] driver:" in doctor.stdout, doctor.describe()
    (line,) = [line for line in doctor.stdout.splitlines() if "] agent:" in line]
    assert line.startswith("[warn] agent: running on simulated GPUs (run --simulate)"), line
