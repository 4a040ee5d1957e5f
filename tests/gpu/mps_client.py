"""A CUDA client for the real-GPU tests: reports what it saw as one JSON line on stdout.

Run with exactly the environment a container would get from Allocate. It records when
it started, when its first kernel finished (an MPS client of another user waits here
when the daemon is not in multi-user mode), the memory it sees, the multiprocessor count
CUDA reports, and the outcome of the allocations it was asked to try. With ``--probe-s`` it
measures the matrix throughput it gets (what share of the SMs it can use), with
``--max-alloc`` the most memory it can allocate. Exit status 0 whenever it could report.
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
