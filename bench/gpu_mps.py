"""MPS against time slicing on one real GPU, with the agent's own Allocate environment.

k = 1, 4, 8, 16 latency-bound clients (64x1024 @ 1024x1024 fp16 matmuls, a synchronize
every 20 kernels) run for a fixed time, started together:

- ``timeslice``: plain processes, no MPS (the GPU's default time slicing),
- ``mps-proportional``: through the agent's MPS daemon, each client holding 1 of k vGPUs
  with the environment Allocate grants (threads 100/k %, memory 1/k),
- ``mps-none``: the same with ``mps.thread_limit = "none"``.

Prints aggregate throughput (iterations of 20 kernels per second), the speed-up over time
slicing, and each client's p50/p99 iteration latency. Needs an NVIDIA GPU, torch and
nvidia-cuda-mps-control; the GPU's settings are left as found; the daemon lives under /tmp
and is quit at the end.

    python3 bench/gpu_mps.py [--duration-s 6] [--clients 1,4,8,16] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

KERNELS_PER_SYNC = 20
IMAGE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/tmp",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def worker(duration_s: float) -> int:
    """One client: warm up, say ready, wait for go, run ``duration_s``, report as JSON."""
    import importlib

    torch = importlib.import_module("torch")
    a = torch.randn(64, 1024, device="cuda", dtype=torch.float16)
    b = torch.randn(1024, 1024, device="cuda", dtype=torch.float16)
    for _ in range(50):
        a @ b
    torch.cuda.synchronize()
    free, _total = torch.cuda.mem_get_info()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    latencies: list[float] = []
    end = time.perf_counter() + duration_s
    now = time.perf_counter()
    while now < end:
        for _ in range(KERNELS_PER_SYNC):
            a @ b
        torch.cuda.synchronize()
        after = time.perf_counter()
        latencies.append(after - now)
        now = after
    latencies.sort()
    report = {
        "iterations": len(latencies),
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "free_mib": free // (1024 * 1024),
    }
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


def run_clients(environments: list[dict[str, str]], duration_s: float) -> list[dict[str, Any]]:
    """Start one worker per environment, release them together, collect their reports."""
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                "--duration-s",
                str(duration_s),
            ],
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for environment in environments
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
        reports = []
        for process in processes:
            stdout, _ = process.communicate(timeout=duration_s + 60)
            reports.append(json.loads(stdout.strip().splitlines()[-1]))
        return reports
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def base_environment(gpu_uuid: str) -> dict[str, str]:
    """What every client gets besides the Allocate response."""
    environment = dict(IMAGE_ENV)
    if os.environ.get("LD_LIBRARY_PATH"):
        environment["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    # The NVIDIA container runtime shows a pod only its GPU (NVIDIA_VISIBLE_DEVICES); with no
    # runtime here, CUDA_VISIBLE_DEVICES stands in for that isolation on multi-GPU machines.
    environment["CUDA_VISIBLE_DEVICES"] = gpu_uuid
    return environment


def summarise(
    mode: str, clients: int, reports: list[dict[str, Any]], duration_s: float
) -> dict[str, Any]:
    """One result row."""
    total = sum(report["iterations"] for report in reports)
    return {
        "mode": mode,
        "clients": clients,
        "iterations_per_s": total / duration_s,
        "p50_ms": [round(report["p50_ms"], 3) for report in reports],
        "p99_ms": [round(report["p99_ms"], 3) for report in reports],
        "free_mib": [report["free_mib"] for report in reports],
    }


def main() -> int:
    """Run every configuration and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--duration-s", type=float, default=6.0)
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.worker:
        return worker(args.duration_s)

    from vgpu_agent.config import MpsConfig
    from vgpu_agent.devices import MpsGrantPolicy, ServedGpu, grant
    from vgpu_agent.mps import DirectMpsDaemons
    from vgpu_agent.nvml import NvmlBackend

    counts = [int(count) for count in args.clients.split(",")]
    backend = NvmlBackend()
    try:
        gpu = backend.list_gpus()[0]
        driver = backend.driver_version()
        compute_mode = backend.get_compute_mode(gpu.uuid).value
    finally:
        backend.close()
    print(f"GPU {gpu.model} ({gpu.memory_mib} MiB), driver {driver}, compute mode {compute_mode}")
    rows: list[dict[str, Any]] = []
    baseline: dict[int, float] = {}

    def record(mode: str, count: int, environments: list[dict[str, str]]) -> None:
        row = summarise(mode, count, run_clients(environments, args.duration_s), args.duration_s)
        if mode == "timeslice":
            baseline[count] = row["iterations_per_s"]
        row["speedup"] = row["iterations_per_s"] / baseline[count] if count in baseline else None
        rows.append(row)
        print(format_row(row), flush=True)

    print(f"{'mode':<18}{'k':>3}{'iter/s':>10}{'x slice':>9}  p50 ms (min/med/max)   p99 ms max")
    for count in counts:
        record("timeslice", count, [base_environment(gpu.uuid) for _ in range(count)])

    root = tempfile.mkdtemp(prefix="vgpu-bench", dir="/tmp")
    config = MpsConfig(
        manager="direct", pipe_root=os.path.join(root, "pipe"), log_root=os.path.join(root, "log")
    )
    daemons = DirectMpsDaemons(config)
    try:
        info = daemons.start(gpu)
        for policy in ("proportional", "none"):
            for count in counts:
                served = ServedGpu(gpu, count, pipe_dir=info.pipe_dir)
                # No mount namespace here: the container path is the host path.
                mps = MpsGrantPolicy(container_pipe_dir=info.pipe_dir, thread_limit=policy)
                environments = []
                for _ in range(count):
                    environment = base_environment(gpu.uuid)
                    environment.update(grant(served, 1, mps).envs)
                    environments.append(environment)
                record(f"mps-{policy}", count, environments)
    finally:
        daemons.stop_all()
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as output:
            json.dump(
                {
                    "gpu": gpu.model,
                    "driver": driver,
                    "compute_mode": compute_mode,
                    "duration_s": args.duration_s,
                    "rows": rows,
                },
                output,
                indent=2,
            )
    return 0


def format_row(row: dict[str, Any]) -> str:
    """One line of the printed table."""
    p50 = row["p50_ms"]
    speedup: Optional[float] = row["speedup"]
    shown = f"{speedup:.2f}x" if speedup is not None else "-"
    return (
        f"{row['mode']:<18}{row['clients']:>3}{row['iterations_per_s']:>10.0f}{shown:>9}  "
        f"{min(p50):.3f}/{statistics.median(p50):.3f}/{max(p50):.3f}"
        f"{max(row['p99_ms']):>14.3f}"
    )


if __name__ == "__main__":
    sys.exit(main())
