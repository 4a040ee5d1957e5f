"""A CUDA client for the real-GPU tests: reports what it saw as one JSON line on stdout.

Run with exactly the environment a container would get from Allocate. It records when
it started, when its first kernel finished (an MPS client of another user waits here
when the daemon is not in multi-user mode), the memory it sees, the multiprocessor count
CUDA reports, and the outcome of the allocations it was asked to try. With ``--probe-s`` it
measures the matrix throughput it gets (what share of the SMs it can use), with
``--max-alloc`` the most memory it can allocate. With ``--loop-s`` it counts matrix products
in a window that starts when the test says (``--start-file``), and survives being ended by
the MPS server: it reports what it did before and the error that ended it. Exit status 0
whenever it could report.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Any

MIB = 1024 * 1024
#: Square fp16 matrices this large keep every SM of an H100/H200 busy.
PROBE_SIZE = 8192
#: The counted loop's matrices (as tests/gpu/investigate_tenants.sh), products per sync.
LOOP_SIZE = 2048
LOOP_BATCH = 10
#: While waiting for its window the looping client touches the GPU this often, so that it
#: sees at once when the MPS server ends it.
LOOP_TOUCH_S = 0.05
#: The longest a looping client waits for the test to name its window.
LOOP_WAIT_S = 240.0


def matmul_tflops(torch: Any, seconds: float, start_at: float) -> float:
    """Multiply PROBE_SIZE-square fp16 matrices for ``seconds`` from ``start_at`` (epoch s)."""
    a = torch.randn(PROBE_SIZE, PROBE_SIZE, device="cuda", dtype=torch.float16)
    b = torch.randn(PROBE_SIZE, PROBE_SIZE, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    while time.time() < start_at:
        time.sleep(0.01)
    products = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(5):
            a @ b
        torch.cuda.synchronize()
        products += 5
    elapsed = time.perf_counter() - started
    return 2.0 * PROBE_SIZE**3 * products / elapsed / 1e12


def _wait_for_window(torch: Any, small: Any, start_file: str) -> float:
    """Touch the GPU every LOOP_TOUCH_S until ``start_file`` names the window's start (epoch
    s) and it has come; the start time."""
    deadline = time.time() + LOOP_WAIT_S
    start_at = None
    while start_at is None or time.time() < start_at:
        if start_at is None and os.path.exists(start_file):
            with open(start_file, encoding="utf-8") as named:
                start_at = float(named.read().strip())
        if start_at is None and time.time() > deadline:
            raise TimeoutError(f"no window named in {start_file} after {LOOP_WAIT_S:g} s")
        (small * 2).sum().item()
        time.sleep(LOOP_TOUCH_S)
    return start_at


def counted_loop(torch: Any, seconds: float, start_file: str) -> dict[str, object]:
    """Count LOOP_SIZE-square fp16 products for ``seconds`` from the start ``start_file``
    names. A CUDA error (the MPS server ended this client) stops it: what it did until then
    is reported with the error, when it came and in which phase."""
    report: dict[str, object] = {"iterations": 0}
    phase = "context"
    try:
        a = torch.randn(LOOP_SIZE, LOOP_SIZE, device="cuda", dtype=torch.float16)
        for _ in range(3):
            a @ a
        torch.cuda.synchronize()
        report["first_kernel"] = time.time()
        phase = "waiting"
        small = torch.ones(16, device="cuda")
        start_at = _wait_for_window(torch, small, start_file)
        report["window_start"] = start_at
        phase = "window"
        iterations = 0
        began = time.time()
        while time.time() - began < seconds:
            for _ in range(LOOP_BATCH):
                a @ a
            torch.cuda.synchronize()
            iterations += LOOP_BATCH
            report["iterations"] = iterations
        report["loop_s"] = round(time.time() - began, 3)
    except TimeoutError:
        raise
    except Exception as exc:  # the MPS server ended this client, or another CUDA error
        report["loop_error"] = f"{type(exc).__name__}: {exc}"[:300]
        report["loop_error_at"] = time.time()
        report["loop_error_phase"] = phase
    return report


def illegal_read(torch: Any) -> None:
    """An elementwise kernel that reads device address 4 GiB, which nothing maps: an
    illegal memory access (an MMU fault), not a device-side assert."""
    wild = torch.cuda.jiterator._create_jit_fn(
        "template <typename T> T wild_read(T x) "
        "{ return x + *reinterpret_cast<volatile T*>(0x100000000ULL); }"
    )
    wild(torch.ones(1 << 20, device="cuda"))
    torch.cuda.synchronize()


def max_allocation_mib(torch: Any) -> int:
    """The most device memory this client can hold at once: 1 GiB blocks, then 64 MiB ones."""
    blocks = []
    total_mib = 0
    for step_mib in (1024, 64):
        while True:
            try:
                block = torch.empty(step_mib * MIB, dtype=torch.uint8, device="cuda")
            except torch.cuda.OutOfMemoryError:
                break
            blocks.append(block)
            total_mib += step_mib
    del blocks
    torch.cuda.empty_cache()
    return total_mib


def main() -> int:
    """Run the requested CUDA work and print the report."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default="client")
    parser.add_argument("--hold-s", type=float, default=0.0, help="keep the GPU busy this long")
    parser.add_argument(
        "--alloc-mib", type=int, action="append", default=[], help="try allocating this much"
    )
    parser.add_argument(
        "--keep-mib", type=int, default=0, help="hold this much device memory while busy"
    )
    parser.add_argument(
        "--probe-s", type=float, default=0.0, help="measure matrix TFLOP/s for this long"
    )
    parser.add_argument(
        "--start-at", type=float, default=0.0, help="start the probe at this epoch time"
    )
    parser.add_argument(
        "--max-alloc", action="store_true", help="find the most memory it can allocate"
    )
    parser.add_argument(
        "--loop-s",
        type=float,
        default=0.0,
        help="count matrix products this long from --start-file's time, surviving its end",
    )
    parser.add_argument(
        "--start-file", default="", help="the file that names the --loop-s window's start"
    )
    parser.add_argument(
        "--illegal-access",
        action="store_true",
        help="after --hold-s, read through a wild device pointer (an MMU fault, XID 31)",
    )
    args = parser.parse_args()
    report: dict[str, object] = {
        "label": args.label,
        "uid": os.getuid(),
        "pid": os.getpid(),
        "start": time.time(),
        "env": {
            key: value for key, value in os.environ.items() if key.startswith(("CUDA", "NVIDIA"))
        },
    }
    try:
        torch = importlib.import_module("torch")  # optional: typed as Any

        if args.loop_s > 0:
            # Everything CUDA happens inside the loop, which reports being ended.
            report.update(counted_loop(torch, args.loop_s, args.start_file))
            report["end"] = time.time()
            sys.stdout.write(json.dumps(report) + "\n")
            sys.stdout.flush()
            if "loop_error" in report:
                # Its server tore the context down: nothing for torch to release at exit,
                # and the report must not depend on that going well.
                os._exit(0)
            return 0
        report["device_count"] = torch.cuda.device_count()
        a = torch.randn(256, 1024, device="cuda", dtype=torch.float16)
        b = torch.randn(1024, 1024, device="cuda", dtype=torch.float16)
        (a @ b).sum().item()
        report["first_kernel"] = time.time()
        properties = torch.cuda.get_device_properties(0)
        report["device_name"] = properties.name
        report["multi_processor_count"] = properties.multi_processor_count
        report["device_uuid"] = "GPU-" + str(getattr(properties, "uuid", ""))
        free, total = torch.cuda.mem_get_info()
        report["free_mib"] = free // MIB
        report["total_mib"] = total // MIB
        kept = None
        if args.keep_mib:
            kept = torch.empty(args.keep_mib * MIB, dtype=torch.uint8, device="cuda")
            kept.fill_(1)
            torch.cuda.synchronize()
            report["kept_mib"] = args.keep_mib
        kernels = 0
        while time.time() - float(report["first_kernel"]) < args.hold_s:  # type: ignore[arg-type]
            for _ in range(20):
                a @ b
            torch.cuda.synchronize()
            kernels += 20
        report["held_until"] = time.time()
        report["kernels"] = kernels
        if args.illegal_access:
            report["faulted_at"] = time.time()
            illegal_read(torch)
        del kept
        allocations = []
        for size_mib in args.alloc_mib:
            try:
                block = torch.empty(size_mib * MIB, dtype=torch.uint8, device="cuda")
                block[-1] = 1
                torch.cuda.synchronize()
                allocations.append({"mib": size_mib, "ok": True})
                del block
            except torch.cuda.OutOfMemoryError as exc:
                allocations.append({"mib": size_mib, "ok": False, "error": str(exc)[:200]})
            torch.cuda.empty_cache()
        report["allocations"] = allocations
        if args.probe_s > 0:
            report["tflops"] = round(matmul_tflops(torch, args.probe_s, args.start_at), 2)
        if args.max_alloc:
            report["max_alloc_mib"] = max_allocation_mib(torch)
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"[:500]
    report["end"] = time.time()
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
