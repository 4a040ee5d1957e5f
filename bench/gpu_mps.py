"""MPS on one real GPU: what each of the agent's MPS settings costs, and whether limits hold.

Three studies, each printed as a table and written as JSON and markdown:

- ``factors`` (k = 4, 8, 16 latency-bound clients: 64x1024 @ 1024x1024 fp16 matmuls, a
  synchronize every 20 kernels, all released together): time slicing; uncapped MPS; a grid
  of per-client thread percentages set by hand on a plain single-user daemon (1x, 1.5x, 2x
  and 3x one share, share = 100/k %); then one factor at a time on top of 1x: multi-user
  mode, the pinned-memory limit, a whole-number percentage (what Allocate hands out today),
  the limit delivered by the daemon default (the ceiling) instead of, or as well as, the
  client variable; the agent's own configuration (its daemon settings and what
  ``devices.grant`` hands out); and the proposed default (multi-user, daemon ceiling = one
  share as a fraction, pinned-memory ceiling = one slice, client variables the same).
  Each row: throughput, x time slicing, per-client p50 and worst p99, and % of the best
  hand-set row of the same k in the same run.
- ``single``: one client alone, in each of the settings that differ at k = 1, in rounds
  that each start one setting later (the single-client anomaly of issue 12).
- ``late``: the same ceiling set while a server already runs (a reload, or the probe
  putting a lost ceiling back): what a client that unsets its variables gets from that
  server, and from the next one once it has exited.
- ``confirm``: time slicing, then rounds of hand-set 1x and 2x, the agent's own
  configuration and (where it differs) the proposed default, at 8 and 16 clients; a
  summary folds the repeats (mean, min-max).
- ``reuse``: the agent's client variables at k = 1, 4, 8, 16 and 8 again, all through one
  multi-user daemon, as the earlier runs of this benchmark did.
- ``hostile``: a daemon whose defaults are set to the ceiling of 1 vGPU of N (thread share
  and memory slice, by device index); clients that keep, unset, raise or lower their limit
  variables, each alone and a raiser beside a compliant one: the multiprocessor count CUDA
  reports, the matrix TFLOP/s they get and the most memory they can allocate.

Needs an NVIDIA GPU, torch and nvidia-cuda-mps-control, run as root from the source tree.
No GPU setting is changed (compute mode stays as found); every daemon lives under /tmp, is
quit after its row, and the end checks that no MPS process is left.

    python3 bench/gpu_mps.py [--study factors,single,hostile] [--clients 4,8,16]
        [--duration-s 3] [--budget-s 470] [--json FILE] [--markdown FILE]
    python3 bench/gpu_mps.py --dry-run   # print the plan, start nothing
    python3 bench/gpu_mps.py --fake      # the whole run on the CPU: stand-in daemon, no CUDA
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLIENT_PROGRAM = os.path.join(ROOT, "tests", "gpu", "mps_client.py")
FAKE_CONTROL = os.path.join(ROOT, "tests", "fakes", "fake_mps_control.py")
KERNELS_PER_SYNC = 20
IMAGE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/tmp",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
#: Where the pinned rows put the daemon (its servers inherit it) and the clients: the
#: daemon on CPUs 0-1, client i on CPU n/2 + i (8 + i on the 16-CPU machine).
CPUS = os.cpu_count() or 2
DAEMON_CPUS = "0,1" if CPUS >= 4 else "0"
FIRST_CLIENT_CPU = max(1, CPUS // 2)
#: The vGPUs per GPU of the hostile study's ceiling.
HOSTILE_REPLICAS = 8


# -- the settings under study ------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One MPS configuration; thread figures are multiples of one share (100/k %)."""

    name: str
    label: str
    mps: bool = True
    multi_user: bool = False
    daemon_threads: Optional[float] = None
    daemon_memory: bool = False
    env_threads: Optional[float] = None
    whole_percent: bool = False
    env_memory: bool = False
    #: Daemon defaults and client variables exactly as the agent's own code computes them.
    agent: bool = False
    #: Part of the hand-set grid the other rows are compared with.
    hand: bool = False
    #: The daemon (and the servers it spawns) on CPUs of its own, each client on another.
    cpu_pinned: bool = False


TIMESLICE = Setting("timeslice", "time slicing (no MPS)", mps=False)
UNCAPPED = Setting("uncapped", "MPS, no limits")
HAND = [
    Setting(f"hand-{multiple:g}x", f"hand-set {multiple:g}x share", env_threads=multiple, hand=True)
    for multiple in (1.0, 1.5, 2.0, 3.0)
]
FACTORS = [
    Setting("multi-user", "1x + multi-user (-M)", multi_user=True, env_threads=1.0),
    Setting("pinned-mem", "1x + pinned-memory limit (env)", env_threads=1.0, env_memory=True),
    Setting("whole-pct", "1x as a whole percentage", env_threads=1.0, whole_percent=True),
    Setting("daemon-only", "1x by daemon default only", daemon_threads=1.0),
    Setting("daemon+env", "1x by daemon default and env", daemon_threads=1.0, env_threads=1.0),
    Setting(
        "mu+mem", "1x + multi-user + memory env", multi_user=True, env_threads=1.0, env_memory=True
    ),
]
AGENT = Setting("agent", "the agent's own configuration", agent=True)
PROPOSED = Setting(
    "proposed",
    "proposed default (-M, ceiling 1x + slice, env same)",
    multi_user=True,
    daemon_threads=1.0,
    daemon_memory=True,
    env_threads=1.0,
    env_memory=True,
)
PROPOSED_2X = Setting(
    "proposed-2x",
    "as proposed at 2x share",
    multi_user=True,
    daemon_threads=2.0,
    daemon_memory=True,
    env_threads=2.0,
    env_memory=True,
)
SINGLE = [
    TIMESLICE,
    UNCAPPED,
    Setting("env-100", "MPS, env threads 100", env_threads=1.0),
    Setting("mem-env", "MPS, memory env (whole GPU)", env_memory=True),
    Setting("multi-user", "MPS -M, no limits", multi_user=True),
    AGENT,
    Setting("timeslice-pin", "time slicing, client pinned to a CPU", mps=False, cpu_pinned=True),
    Setting("uncapped-pin", "MPS, daemon and client on CPUs of their own", cpu_pinned=True),
    Setting(
        "multi-user-pin",
        "MPS -M, daemon and client on CPUs of their own",
        multi_user=True,
        cpu_pinned=True,
    ),
]


def factor_settings(count: int) -> list[Setting]:
    """The rows of the factor study for ``count`` clients (no duplicates of another row)."""
    settings = [TIMESLICE, UNCAPPED, *HAND]
    for setting in FACTORS:
        if setting.whole_percent and float(100 // count) == 100 / count:
            continue  # the whole percentage is the share itself: hand-1x already measures it
        settings.append(setting)
    settings += [AGENT, PROPOSED, PROPOSED_2X]
    return settings


def percentage(multiple: float, count: int, whole: bool = False) -> str:
    """``multiple`` shares of ``count`` as MPS takes a percentage: up to 3 decimals, or the
    whole number below it as Allocate hands out today."""
    value = min(100.0, multiple * 100.0 / count)
    if whole:
        return str(max(1, int(value)))
    return f"{value:.3f}".rstrip("0").rstrip(".")


@dataclass
class Plan:
    """What one row starts: the daemon (if any), its default commands, each client's env."""

    daemon: bool
    multi_user: bool
    daemon_commands: list[str]
    client_env: dict[str, str]
    cpu_pinned: bool = False


def plan_for(setting: Setting, count: int, memory_mib: int) -> Plan:
    """The daemon and the limit variables of ``setting`` for ``count`` clients."""
    return replace(_plan_for(setting, count, memory_mib), cpu_pinned=setting.cpu_pinned)


def _plan_for(setting: Setting, count: int, memory_mib: int) -> Plan:
    if not setting.mps:
        return Plan(False, False, [], {})
    if setting.agent:
        return agent_plan(count, memory_mib)
    commands: list[str] = []
    env: dict[str, str] = {}
    slice_mib = memory_mib // count
    if setting.daemon_threads is not None:
        threads = percentage(setting.daemon_threads, count)
        commands.append(f"set_default_active_thread_percentage {threads}")
    if setting.daemon_memory:
        commands.append(f"set_default_device_pinned_mem_limit 0 {slice_mib}M")
    if setting.env_threads is not None:
        threads = percentage(setting.env_threads, count, setting.whole_percent)
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = threads
    if setting.env_memory:
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"0={slice_mib}M"
    return Plan(True, setting.multi_user, commands, env)


def agent_plan(count: int, memory_mib: int) -> Plan:
    """The agent's default configuration for ``count`` vGPUs of this GPU, computed by its
    own code: multi-user mode unless the config says off, the daemon defaults it sets, and
    the limit variables Allocate grants one vGPU."""
    from vgpu_agent.config.plan import grant_policy
    from vgpu_agent.config.schema import Config
    from vgpu_agent.model.devices import ServedGpu, grant
    from vgpu_agent.model.gpu import Gpu
    from vgpu_agent.mps.ceilings import daemon_default_commands

    config = Config()
    gpu = Gpu(0, "GPU-bench", "bench", memory_mib, (9, 0))
    served = ServedGpu(gpu, count, pipe_dir="/pipe")
    policy = grant_policy(config)
    env = {
        key: value
        for key, value in grant(served, 1, policy).envs.items()
        if key.startswith("CUDA_MPS_") and key != "CUDA_MPS_PIPE_DIRECTORY"
    }
    commands = daemon_default_commands(config.mps, memory_mib, count)
    return Plan(True, config.mps.multi_user != "off", commands, env)


# -- the GPU, the daemons and the clients --------------------------------------------------


@dataclass
class Machine:
    """The GPU under test and how to reach it."""

    uuid: str
    model: str
    memory_mib: int
    driver: str
    compute_mode: str
    control_binary: str
    fake: bool
    sample_clock: Callable[[], dict[str, int]] = field(default=lambda: {})


def open_machine(fake: bool) -> tuple[Machine, Callable[[], None]]:
    """The first GPU as NVML reports it (or a stand-in with ``fake``), and its closer."""
    if fake:
        fake_control = f"{sys.executable} {FAKE_CONTROL}"
        machine = Machine("GPU-fake", "fake", 143771, "none", "Default", fake_control, True)
        return machine, lambda: None
    import pynvml  # only here, on the GPU machine: the agent's own NVML module lacks clocks

    from vgpu_agent.gpus.nvml import NvmlBackend

    backend = NvmlBackend()
    gpu = backend.list_gpus()[0]
    handle = pynvml.nvmlDeviceGetHandleByIndex(gpu.index)

    def sample_clock() -> dict[str, int]:
        return {
            "sm_mhz": int(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
            "power_w": int(pynvml.nvmlDeviceGetPowerUsage(handle)) // 1000,
        }

    found = shutil.which("nvidia-cuda-mps-control")
    if found is None:
        raise SystemExit("nvidia-cuda-mps-control is not on PATH: install the driver's MPS tools")
    control = found
    machine = Machine(
        gpu.uuid,
        gpu.model,
        gpu.memory_mib,
        backend.driver_version(),
        backend.get_compute_mode(gpu.uuid).value,
        control,
        False,
        sample_clock,
    )
    return machine, backend.close


class Daemon:
    """A control daemon of its own under /tmp, pinned to the GPU, quit when done."""

    def __init__(self, machine: Machine, multi_user: bool, cpu_pinned: bool = False) -> None:
        self.machine = machine
        self.root = tempfile.mkdtemp(prefix="vgpu-bench-", dir="/tmp")
        os.chmod(self.root, 0o755)  # noqa: S103 - clients of other uids walk through it
        self.pipe_dir = os.path.join(self.root, "pipe")
        self.log_dir = os.path.join(self.root, "log")
        for path in (self.pipe_dir, self.log_dir):
            os.mkdir(path, 0o755)
        self.environment = dict(os.environ)
        self.environment.update(
            CUDA_VISIBLE_DEVICES=machine.uuid,
            CUDA_MPS_PIPE_DIRECTORY=self.pipe_dir,
            CUDA_MPS_LOG_DIRECTORY=self.log_dir,
        )
        command = [*machine.control_binary.split(), "-f"] + (["-M"] if multi_user else [])
        if cpu_pinned:
            command = ["taskset", "-c", DAEMON_CPUS, *command]
        self.output = open(os.path.join(self.log_dir, "daemon.out"), "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            env=self.environment,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20.0
        while True:
            answer = self.command("get_server_list", check=False)
            if answer is not None:
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the MPS daemon did not answer: {self.log_tail()}")
            time.sleep(0.05)

    def command(self, line: str, check: bool = True) -> Optional[str]:
        """Send one control command; its answer, or None when the daemon cannot be reached."""
        result = subprocess.run(
            self.machine.control_binary.split(),
            input=line + "\n",
            capture_output=True,
            text=True,
            env=self.environment,
            timeout=15,
            check=False,
        )
        answer = (result.stdout + result.stderr).strip()
        if result.returncode != 0 or "Cannot find" in answer:
            if check:
                raise RuntimeError(f"MPS control command {line!r} failed: {answer}")
            return None
        return answer

    def log_tail(self) -> str:
        """The end of the daemon's own output, for error messages."""
        with open(os.path.join(self.log_dir, "daemon.out"), "rb") as output:
            return output.read()[-500:].decode(errors="replace")

    def stop(self) -> None:
        """Quit the daemon (its servers go with it) and remove its directories."""
        if self.process.poll() is None:
            self.command("quit", check=False)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.output.close()
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def daemon_for(machine: Machine, plan: Plan) -> Iterator[tuple[Optional[Daemon], dict[str, str]]]:
    """Start the plan's daemon and send its defaults; yields it and what it reads back."""
    if not plan.daemon:
        yield None, {}
        return
    daemon = Daemon(machine, plan.multi_user, plan.cpu_pinned)
    try:
        readback: dict[str, str] = {}
        for command in plan.daemon_commands:
            answer = daemon.command(command)
            if answer and any(word in answer.lower() for word in ("unrecognized", "invalid")):
                raise RuntimeError(f"the MPS daemon refused {command!r}: {answer}")
        if plan.daemon_commands:
            for query in (
                "get_default_active_thread_percentage",
                "get_default_device_pinned_mem_limit 0",
            ):
                readback[query] = daemon.command(query) or ""
        yield daemon, readback
    finally:
        daemon.stop()


def client_environment(
    machine: Machine, daemon: Optional[Daemon], limits: dict[str, str]
) -> dict[str, str]:
    """A client's whole environment: what an image brings, the GPU, the pipe dir, limits."""
    environment = dict(IMAGE_ENV)
    if os.environ.get("LD_LIBRARY_PATH"):
        environment["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    # The container runtime shows a pod only its GPU; CUDA_VISIBLE_DEVICES stands in here.
    environment["CUDA_VISIBLE_DEVICES"] = machine.uuid
    if daemon is not None:
        environment["CUDA_MPS_PIPE_DIRECTORY"] = daemon.pipe_dir
    environment.update(limits)
    return environment


def latency_worker(duration_s: float) -> int:
    """One latency-bound client: warm up, say ready, wait for go, run, report as JSON."""
    import importlib

    torch = importlib.import_module("torch")
    a = torch.randn(64, 1024, device="cuda", dtype=torch.float16)
    b = torch.randn(1024, 1024, device="cuda", dtype=torch.float16)
    for _ in range(50):
        a @ b
    torch.cuda.synchronize()
    free, _total = torch.cuda.mem_get_info()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return _measure(
        duration_s,
        lambda: [a @ b for _ in range(KERNELS_PER_SYNC)],
        torch.cuda.synchronize,
        free,
        sms,
    )


def fake_worker(duration_s: float) -> int:
    """The same protocol with no GPU, for --fake: each iteration sleeps 0.3 ms."""
    return _measure(duration_s, lambda: time.sleep(0.0003), lambda: None, 1 << 30, 0)


def _measure(
    duration_s: float,
    launch: Callable[[], object],
    synchronize: Callable[[], object],
    free_bytes: int,
    sms: int,
) -> int:
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    latencies: list[float] = []
    end = time.perf_counter() + duration_s
    now = time.perf_counter()
    while now < end:
        launch()
        synchronize()
        after = time.perf_counter()
        latencies.append(after - now)
        now = after
    latencies.sort()
    report = {
        "iterations": len(latencies),
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "free_mib": free_bytes // (1024 * 1024),
        "sms": sms,
    }
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


def run_clients(
    machine: Machine,
    environments: list[dict[str, str]],
    duration_s: float,
    cpu_pinned: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Start one latency worker per environment, release them together, collect their
    reports; also samples the SM clock half way through."""
    worker = "fake" if machine.fake else "latency"
    command = [sys.executable, os.path.abspath(__file__), "--worker", worker]
    command += ["--duration-s", str(duration_s)]
    processes = [
        subprocess.Popen(
            (["taskset", "-c", str(FIRST_CLIENT_CPU + index)] if cpu_pinned else []) + command,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for index, env in enumerate(environments)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a benchmark client did not start: {line!r}")
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        time.sleep(duration_s / 2)
        clock = machine.sample_clock()
        reports = []
        for process in processes:
            stdout, _ = process.communicate(timeout=duration_s + 60)
            reports.append(json.loads(stdout.strip().splitlines()[-1]))
        return reports, clock
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


# -- the studies ---------------------------------------------------------------------------


@dataclass
class Run:
    """Everything one invocation measured, written out after every row."""

    machine: dict[str, Any]
    command: str
    duration_s: float
    started: float = field(default_factory=time.time)
    rows: list[dict[str, Any]] = field(default_factory=list)
    hostile: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def measure_row(
    machine: Machine, study: str, setting: Setting, count: int, *, duration_s: float, run: Run
) -> dict[str, Any]:
    """Run ``count`` clients under ``setting`` on a daemon of their own; record the row."""
    plan = plan_for(setting, count, machine.memory_mib)
    with daemon_for(machine, plan) as (daemon, readback):
        return record_row(
            machine, study, setting, count, plan, daemon, readback, duration_s=duration_s, run=run
        )


def record_row(  # noqa: PLR0917 - one row's every input, all needed
    machine: Machine,
    study: str,
    setting: Setting,
    count: int,
    plan: Plan,
    daemon: Optional[Daemon],
    readback: dict[str, str],
    *,
    duration_s: float,
    run: Run,
) -> dict[str, Any]:
    """Run ``count`` clients with the plan's variables through ``daemon``; record the row."""
    environments = [client_environment(machine, daemon, plan.client_env) for _ in range(count)]
    reports, clock = run_clients(machine, environments, duration_s, plan.cpu_pinned)
    row = {
        "study": study,
        "setting": setting.name,
        "label": setting.label,
        "clients": count,
        "hand": setting.hand,
        "multi_user": plan.multi_user if plan.daemon else None,
        "daemon_commands": plan.daemon_commands,
        "daemon_readback": readback,
        "client_env": plan.client_env,
        "iterations_per_s": sum(report["iterations"] for report in reports) / duration_s,
        "p50_ms": [round(report["p50_ms"], 3) for report in reports],
        "p99_ms": [round(report["p99_ms"], 3) for report in reports],
        "free_mib": sorted({report["free_mib"] for report in reports}),
        "sms": sorted({report["sms"] for report in reports}),
        **clock,
    }
    run.rows.append(row)
    return row


#: The client counts the reuse study runs, in turn, on one daemon (the earlier runs' order).
REUSE_COUNTS = (1, 4, 8, 16, 8)
REUSE = Setting("reuse", "agent's variables, one -M daemon for every row in turn")


def reuse_study(machine: Machine, run: Run, log: Callable[[str], None], duration_s: float) -> None:
    """The agent's client variables for k = 1, 4, 8, 16 and 8 again, all through one
    multi-user daemon without defaults, as the earlier runs of this benchmark did."""
    with daemon_for(machine, Plan(True, True, [], {})) as (daemon, readback):
        for count in REUSE_COUNTS:
            plan = replace(agent_plan(count, machine.memory_mib), daemon_commands=[])
            row = record_row(
                machine,
                "reuse",
                REUSE,
                count,
                plan,
                daemon,
                readback,
                duration_s=duration_s,
                run=run,
            )
            log("r " + format_row(row))


def repeat_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the same study, k and setting folded together: mean, min and max throughput,
    x time slicing and % of the best hand-set setting, both on means; the worst p99."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["study"], row["clients"], row["setting"]), []).append(row)
    folded = []
    for (study, count, setting), group in groups.items():
        rates = [row["iterations_per_s"] for row in group]
        folded.append(
            {
                "study": study,
                "clients": count,
                "setting": setting,
                "label": group[0]["label"],
                "hand": group[0]["hand"],
                "runs": len(group),
                "mean": statistics.mean(rates),
                "min": min(rates),
                "max": max(rates),
                "p50_median_ms": statistics.median(p for row in group for p in row["p50_ms"]),
                "worst_p99_ms": max(max(row["p99_ms"]) for row in group),
            }
        )
    for entry in folded:
        peers = [
            f for f in folded if (f["study"], f["clients"]) == (entry["study"], entry["clients"])
        ]
        slices = [f for f in peers if f["setting"] == TIMESLICE.name]
        best = max((f["mean"] for f in peers if f["hand"]), default=None)
        entry["x_slice"] = entry["mean"] / slices[0]["mean"] if slices else None
        entry["p99_x_slice"] = entry["worst_p99_ms"] / slices[0]["worst_p99_ms"] if slices else None
        entry["pct_of_best_hand"] = 100.0 * entry["mean"] / best if best else None
    return folded


def derive(rows: list[dict[str, Any]]) -> None:
    """Fill in x time slicing, p99 against time slicing and % of the best hand-set row,
    per study and client count (a study without its own, such as reuse, borrows those of
    the other studies at the same client count)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["study"], row["clients"]), []).append(row)
    for (_study, count), group in groups.items():
        same_count = [row for row in rows if row["clients"] == count]
        slices = [row for row in group if row["setting"] == TIMESLICE.name] or [
            row for row in same_count if row["setting"] == TIMESLICE.name
        ]
        hands = [row for row in group if row["hand"]] or [row for row in same_count if row["hand"]]
        slice_rate = statistics.mean(r["iterations_per_s"] for r in slices) if slices else None
        slice_p99 = statistics.mean(max(r["p99_ms"]) for r in slices) if slices else None
        best = max((r["iterations_per_s"] for r in hands), default=None)
        for row in group:
            rate = row["iterations_per_s"]
            row["x_slice"] = rate / slice_rate if slice_rate else None
            row["p99_x_slice"] = max(row["p99_ms"]) / slice_p99 if slice_p99 else None
            row["pct_of_best_hand"] = 100.0 * rate / best if best else None


def late_ceiling_study(machine: Machine, run: Run, log: Callable[[str], None]) -> None:
    """Does a ceiling set while an MPS server already runs reach that server's new clients
    (a reload, or a probe putting a lost ceiling back), or only servers started later?"""
    replicas = HOSTILE_REPLICAS
    slice_mib = machine.memory_mib // replicas
    commands = [
        f"set_default_active_thread_percentage {percentage(1.0, replicas)}",
        f"set_default_device_pinned_mem_limit 0 {slice_mib}M",
    ]
    label = f"ceiling 1 of {replicas} set while a server runs"
    readback: dict[str, str] = {}

    def record(name: str, report: dict[str, Any]) -> None:
        entry: dict[str, Any] = {"daemon": label, "daemon_readback": readback, "client": name}
        entry.update(together=False, env={}, **report)
        run.hostile.append(entry)
        log(format_hostile(entry))

    try:
        with daemon_for(machine, Plan(True, True, [], {})) as (daemon, _):
            assert daemon is not None
            holder = None
            if not machine.fake:
                holder = subprocess.Popen(
                    [sys.executable, CLIENT_PROGRAM, "--label", "holder", "--hold-s", "60"],
                    env=client_environment(machine, daemon, {}),
                    stdout=subprocess.DEVNULL,
                )
            try:
                wait_for_servers(daemon, present=True, fake=machine.fake)
                for command in commands:
                    daemon.command(command)
                for query in (
                    "get_default_active_thread_percentage",
                    "get_default_device_pinned_mem_limit 0",
                ):
                    readback[query] = daemon.command(query) or ""
                record("unset, same server", probe_clients(machine, daemon, [("", {})], False)[0])
                # The per-server commands, for each running server: do they reach it?
                servers = (daemon.command("get_server_list") or "").split()
                for server in servers:
                    for command in (
                        f"set_active_thread_percentage {server} {percentage(1.0, replicas)}",
                        f"set_device_pinned_mem_limit {server} 0 {slice_mib}M",
                    ):
                        readback[command] = daemon.command(command, check=False) or ""
                    for query in (
                        f"get_active_thread_percentage {server}",
                        f"get_device_pinned_mem_limit {server} 0",
                    ):
                        readback[query] = daemon.command(query, check=False) or ""
                log(f"late ceiling, read back: {readback}")
                record(
                    "unset, same server after per-server commands",
                    probe_clients(machine, daemon, [("", {})], False)[0],
                )
            finally:
                if holder is not None:
                    holder.kill()
                    holder.wait()
            # Whether (and when) the server exits once its clients have gone.
            left = time.monotonic()
            try:
                wait_for_servers(daemon, present=False, fake=machine.fake, timeout_s=45.0)
            except RuntimeError as exc:
                run.failed.append(f"late ceiling: {exc} after its last client left")
                log(f"late ceiling: {exc} after its last client left")
                return
            readback["server exit after its last client, s"] = f"{time.monotonic() - left:.1f}"
            log(f"server gone {time.monotonic() - left:.1f} s after its last client")
            record("unset, new server", probe_clients(machine, daemon, [("", {})], False)[0])
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
        run.failed.append(f"late ceiling: {exc}")
        log(f"late ceiling: FAILED: {exc}")


def wait_for_servers(daemon: Daemon, present: bool, fake: bool, timeout_s: float = 60.0) -> None:
    """Wait until the daemon has an MPS server running (or none), as get_server_list says."""
    if fake:
        return
    deadline = time.monotonic() + timeout_s
    while bool((daemon.command("get_server_list") or "").strip()) != present:
        if time.monotonic() > deadline:
            state = "start" if present else "exit"
            raise RuntimeError(f"no MPS server {state} within {timeout_s:g} s")
        time.sleep(0.2)


def hostile_study(machine: Machine, run: Run, log: Callable[[str], None]) -> None:
    """The ceiling of 1 vGPU of HOSTILE_REPLICAS against clients that unset or raise it."""
    replicas = HOSTILE_REPLICAS
    slice_mib = machine.memory_mib // replicas
    share = percentage(1.0, replicas)
    compliant = {
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": share,
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={slice_mib}M",
    }
    variants: list[tuple[str, dict[str, str]]] = [
        ("compliant", compliant),
        ("unset", {}),
        (
            "raised",
            {
                "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100",
                "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={machine.memory_mib}M",
            },
        ),
        (
            "lowered",
            {
                "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": percentage(0.5, replicas),
                "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=4096M",
            },
        ),
    ]
    ceiling = Plan(
        True,
        True,
        [
            f"set_default_active_thread_percentage {share}",
            f"set_default_device_pinned_mem_limit 0 {slice_mib}M",
        ],
        {},
    )
    cases: list[tuple[str, Plan, list[tuple[str, dict[str, str]]]]] = [
        ("no ceiling (plain daemon)", Plan(True, False, [], {}), [("unset", {})]),
        (f"ceiling 1 of {replicas}", ceiling, [(name, env) for name, env in variants]),
        (
            f"ceiling 1 of {replicas}, side by side",
            ceiling,
            [("compliant", compliant), ("raised", variants[2][1])],
        ),
    ]
    for daemon_label, plan, clients in cases:
        together = "side by side" in daemon_label
        try:
            hostile_case(
                machine,
                run,
                log,
                daemon_label=daemon_label,
                plan=plan,
                clients=clients,
                together=together,
            )
        except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
            run.failed.append(f"hostile/{daemon_label}: {exc}")
            log(f"hostile {daemon_label}: FAILED: {exc}")


def hostile_case(
    machine: Machine,
    run: Run,
    log: Callable[[str], None],
    *,
    daemon_label: str,
    plan: Plan,
    clients: list[tuple[str, dict[str, str]]],
    together: bool,
) -> None:
    """One daemon of the hostile study and its clients."""
    with daemon_for(machine, plan) as (daemon, readback):
        groups = [clients] if together else [[client] for client in clients]
        for group in groups:
            reports = probe_clients(machine, daemon, group, together)
            for (name, env), report in zip(group, reports):
                entry = {
                    "daemon": daemon_label,
                    "daemon_readback": readback,
                    "client": name,
                    "together": together,
                    "env": env,
                    **report,
                }
                run.hostile.append(entry)
                log(format_hostile(entry))


def probe_clients(
    machine: Machine,
    daemon: Optional[Daemon],
    clients: list[tuple[str, dict[str, str]]],
    together: bool,
) -> list[dict[str, Any]]:
    """Run tests/gpu/mps_client.py's probe for each client (all at once when ``together``)."""
    start_at = time.time() + (12.0 if together else 0.0)
    processes = []
    for name, env in clients:
        if machine.fake:
            report = {"label": name, "multi_processor_count": 0, "tflops": 0.0}
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-c", f"print({json.dumps(json.dumps(report))})"],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
            continue
        command = [sys.executable, CLIENT_PROGRAM, "--label", name, "--probe-s", "2"]
        command += ["--start-at", str(start_at)]
        if not together:
            command.append("--max-alloc")
        processes.append(
            subprocess.Popen(
                command,
                env=client_environment(machine, daemon, env),
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    reports = []
    for process in processes:
        stdout, _ = process.communicate(timeout=120)
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        reports.append(json.loads(lines[-1]) if lines else {"error": "no report"})
    keep = ("multi_processor_count", "tflops", "max_alloc_mib", "free_mib", "error")
    return [{key: report[key] for key in keep if key in report} for report in reports]


# -- output ----------------------------------------------------------------------------------


def format_row(row: dict[str, Any]) -> str:
    """One line of the printed table."""
    p50 = row["p50_ms"]

    def ratio(value: Optional[float], suffix: str = "x") -> str:
        return f"{value:.2f}{suffix}" if value is not None else "-"

    best = row.get("pct_of_best_hand")
    return (
        f"{row['setting']:<12}{row['clients']:>3}{row['iterations_per_s']:>9.0f}"
        f"{ratio(row.get('x_slice')):>8}{(f'{best:.0f}%' if best is not None else '-'):>6}  "
        f"{min(p50):.3f}/{statistics.median(p50):.3f}/{max(p50):.3f}"
        f"{max(row['p99_ms']):>8.3f}{ratio(row.get('p99_x_slice')):>7}"
        f"  sm{row['sms']} {row.get('sm_mhz', '-')}MHz"
    )


def format_hostile(entry: dict[str, Any]) -> str:
    """One line of the hostile table."""
    return (
        f"{entry['daemon']:<42}{entry['client']:<20}"
        f" SMs {entry.get('multi_processor_count', '-')!s:>4}"
        f"  {entry.get('tflops', '-')!s:>7} TFLOP/s"
        f"  max alloc {entry.get('max_alloc_mib', '-')!s:>7} MiB  {entry.get('error', '')}"
    )


HEADER = "setting       k   iter/s  xslice  best  p50 ms min/med/max  p99max  xslice"


def markdown(run: Run) -> str:
    """The results as markdown tables, for bench/RESULTS.md."""
    machine = run.machine
    lines = [
        f"GPU {machine['model']} ({machine['memory_mib']} MiB), driver {machine['driver']}, "
        f"compute mode {machine['compute_mode']}; {run.duration_s:g} s per row.",
        f"Command: `{run.command}`",
        "",
    ]
    for study in ("factors", "confirm", "reuse", "single"):
        rows = [row for row in run.rows if row["study"] == study]
        if not rows:
            continue
        lines += [
            f"#### {study}",
            "",
            "| setting | k | daemon | client env | iter/s | x slicing | % best hand-set "
            "| p50 ms min/med/max | worst p99 ms | p99 / slicing p99 | SMs seen |",
            "|---|---:|---|---|---:|---:|---:|---|---:|---:|---|",
        ]
        for row in rows:
            daemon = describe_daemon(row)
            env = " ".join(
                f"{k.replace('CUDA_MPS_', '')}={v}" for k, v in row["client_env"].items()
            )
            p50 = row["p50_ms"]
            lines.append(
                f"| {row['label']} | {row['clients']} | {daemon or 'plain'} | {env or '-'} "
                f"| {row['iterations_per_s']:.0f} | {_fmt(row.get('x_slice'))} "
                f"| {_fmt(row.get('pct_of_best_hand'), 0)} "
                f"| {min(p50):.3f} / {statistics.median(p50):.3f} / {max(p50):.3f} "
                f"| {max(row['p99_ms']):.3f} | {_fmt(row.get('p99_x_slice'))} "
                f"| {','.join(str(s) for s in row['sms'])} |"
            )
        lines.append("")
        if study in ("confirm", "single"):
            lines += summary_markdown(rows)
    if run.hostile:
        lines += [
            "#### hostile",
            "",
            "| daemon | client | client env | SMs CUDA reports | TFLOP/s "
            "| most memory allocated MiB |",
            "|---|---|---|---:|---:|---:|",
        ]
        for entry in run.hostile:
            env = " ".join(f"{k.replace('CUDA_MPS_', '')}={v}" for k, v in entry["env"].items())
            lines.append(
                f"| {entry['daemon']} | {entry['client']} | {env or '(none)'} "
                f"| {entry.get('multi_processor_count', '-')} | {entry.get('tflops', '-')} "
                f"| {entry.get('max_alloc_mib', '-')} |"
            )
        lines.append("")
    if run.skipped:
        lines.append("Skipped for time: " + ", ".join(run.skipped))
    for failure in run.failed:
        lines.append(f"Failed: {failure}")
    return "\n".join(lines) + "\n"


def describe_daemon(row: dict[str, Any]) -> str:
    """A row's daemon for the tables: none, plain, or -M and the defaults it was given."""
    if row["multi_user"] is None:
        return "-"
    parts = ["-M"] if row["multi_user"] else []
    parts += [command.replace("set_default_", "") for command in row["daemon_commands"]]
    return ", ".join(parts) or "plain"


def summary_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The repeat summary of a study's rows as a markdown table."""
    lines = [
        "Folded over repeats (x slicing and % best hand-set on mean throughput):",
        "",
        "| setting | k | runs | iter/s mean (min-max) | x slicing | % best hand-set "
        "| p50 ms median | worst p99 ms | p99 / slicing p99 |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for entry in repeat_summary(rows):
        lines.append(
            f"| {entry['label']} | {entry['clients']} | {entry['runs']} "
            f"| {entry['mean']:.0f} ({entry['min']:.0f}-{entry['max']:.0f}) "
            f"| {_fmt(entry['x_slice'])} | {_fmt(entry['pct_of_best_hand'], 0)} "
            f"| {entry['p50_median_ms']:.3f} | {entry['worst_p99_ms']:.3f} "
            f"| {_fmt(entry['p99_x_slice'])} |"
        )
    return [*lines, ""]


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def leftover_mps_processes() -> list[str]:
    """MPS processes still running (there must be none at the end)."""
    result = subprocess.run(
        ["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=False
    )
    return [line.strip() for line in result.stdout.splitlines() if "nvidia-cuda-mps" in line]


STUDIES = ("hostile", "late", "factors", "single", "confirm", "reuse")


def client_counts(parser: argparse.ArgumentParser, option: str, text: str) -> list[int]:
    """A comma list of client counts, or a usage error naming the option."""
    try:
        counts = [int(count) for count in text.split(",")]
    except ValueError:
        parser.error(f"{option} {text!r}: give client counts like 4,8,16")
    if any(count < 1 or count > 48 for count in counts):
        parser.error(f"{option}: each count must be 1 to 48 (MPS serves 48 clients per GPU)")
    return counts


def confirm_settings(count: int) -> list[Setting]:
    """The confirmation rows: hand-set 1x and 2x, the agent's own configuration, and the
    proposed default where the agent's configuration is not already the same."""
    settings = [HAND[0], HAND[2], AGENT]
    if plan_for(AGENT, count, 143771) != plan_for(PROPOSED, count, 143771):
        settings.append(PROPOSED)
    return settings


def main(arguments: Sequence[str]) -> int:
    """Run the chosen studies, print and write the tables."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--worker", choices=("latency", "fake"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--study",
        default="hostile,single,factors",
        help="comma list of: hostile, late, factors, single, confirm, reuse",
    )
    parser.add_argument("--clients", default="8,16,4", help="client counts of the factor study")
    parser.add_argument("--settings", help="only these factor-study settings (comma list)")
    parser.add_argument("--duration-s", type=float, default=3.0)
    parser.add_argument("--single-rounds", type=int, default=2)
    parser.add_argument("--single-settings", help="only these single-client settings (comma list)")
    parser.add_argument("--confirm-clients", default="8,16", help="client counts of confirm")
    parser.add_argument("--confirm-rounds", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=470.0, help="start no row after this")
    parser.add_argument("--json", help="write the results here (after every row)")
    parser.add_argument("--markdown", help="write the tables here (after every row)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, start nothing")
    parser.add_argument("--fake", action="store_true", help="stand-in daemon and clients, no GPU")
    args = parser.parse_args(arguments)
    if args.worker == "latency":
        return latency_worker(args.duration_s)
    if args.worker == "fake":
        return fake_worker(args.duration_s)
    studies = [study.strip() for study in args.study.split(",") if study.strip()]
    unknown = set(studies) - set(STUDIES)
    if unknown:
        parser.error(f"unknown study {', '.join(sorted(unknown))}: pick from {', '.join(STUDIES)}")
    counts = client_counts(parser, "--clients", args.clients)
    confirm_counts = client_counts(parser, "--confirm-clients", args.confirm_clients)
    only = set(args.settings.split(",")) if args.settings else None
    single_only = set(args.single_settings.split(",")) if args.single_settings else None
    single = [s for s in SINGLE if single_only is None or s.name in single_only]
    schedule: list[tuple[str, Setting, int]] = []

    def factor_rows(selected: list[int]) -> list[tuple[str, Setting, int]]:
        return [
            ("factors", setting, count)
            for count in selected
            for setting in factor_settings(count)
            if only is None or setting.name in only or setting is TIMESLICE
        ]

    # The counts the goals are stated for (8 and 16) first, so a short budget drops others.
    if "factors" in studies:
        schedule += factor_rows([count for count in counts if count >= 8])
    if "confirm" in studies:
        for count in confirm_counts:
            schedule.append(("confirm", TIMESLICE, count))
            for _ in range(args.confirm_rounds):
                schedule += [("confirm", setting, count) for setting in confirm_settings(count)]
    if "single" in studies:
        for round_number in range(args.single_rounds):
            # Each round starts one setting later, so no setting runs twice in a row.
            shift = round_number % len(single)
            order = single[shift:] + single[:shift]
            schedule += [("single", setting, 1) for setting in order]
    if "reuse" in studies:
        schedule.append(("reuse", REUSE, 0))
    if "factors" in studies:
        schedule += factor_rows([count for count in counts if count < 8])
    if args.dry_run:
        memory_mib = 143771
        print(
            f"{len(schedule)} rows (+ hostile: {'hostile' in studies}, "
            f"+ reuse: {len(REUSE_COUNTS) if 'reuse' in studies else 0} rows)"
        )
        for study, setting, count in schedule:
            if study == "reuse":
                print(f"reuse: one -M daemon, the agent's variables at k = {REUSE_COUNTS}")
                continue
            plan = plan_for(setting, count, memory_mib)
            daemon = ("-M " if plan.multi_user else "") + "; ".join(plan.daemon_commands)
            print(
                f"{study:<8}{setting.name:<12}{count:>3}"
                f"  daemon[{daemon if plan.daemon else 'none'}]"
                f"  env{plan.client_env}"
            )
        return 0

    machine, close = open_machine(args.fake)
    run = Run(
        machine={k: v for k, v in asdict(machine).items() if k != "sample_clock"},
        command="python3 bench/gpu_mps.py " + " ".join(arguments),
        duration_s=args.duration_s,
    )

    def log(line: str) -> None:
        print(line, flush=True)

    def save() -> None:
        derive(run.rows)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as output:
                json.dump(asdict(run), output, indent=1)
        if args.markdown:
            with open(args.markdown, "w", encoding="utf-8") as output:
                output.write(markdown(run))

    # A timeout's SIGTERM unwinds like an error, so every daemon is quit on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    log(
        f"GPU {machine.model} ({machine.memory_mib} MiB), driver {machine.driver}, "
        f"compute mode {machine.compute_mode}"
    )
    try:
        if "hostile" in studies:
            hostile_study(machine, run, log)
            save()
        if "late" in studies:
            late_ceiling_study(machine, run, log)
            save()
        log(HEADER)
        for study, setting, count in schedule:
            if time.monotonic() - started > args.budget_s:
                run.skipped.append(f"{study}/{setting.name}/{count}")
                continue
            try:
                if study == "reuse":
                    reuse_study(machine, run, log, args.duration_s)
                    save()
                    continue
                row = measure_row(
                    machine, study, setting, count, duration_s=args.duration_s, run=run
                )
            except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
                run.failed.append(f"{study}/{setting.name}/{count}: {exc}")
                log(f"{study[0]} {setting.name:<12}{count:>3}  FAILED: {exc}")
                continue
            save()
            log(f"{study[0]} " + format_row(row))
    finally:
        save()
        close()
    log("\n" + markdown(run))
    log(f"elapsed {time.monotonic() - started:.0f} s")
    leftovers = leftover_mps_processes()
    if leftovers:
        log("MPS processes left running: " + "; ".join(leftovers))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
