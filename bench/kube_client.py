"""Compare Kubernetes API client libraries for the DRA frontend: import time, memory, size.

Each candidate is installed with its dependencies into its own directory (pip --target,
for the Python that runs it, with the versions requirements.lock pins where it pins them),
compiled to .pyc as the OS packages do at install time, then started N times in a fresh
isolated interpreter (-I -S: the standard library and the candidate, nothing else) doing
what the agent does with it: import it, build a client for a loopback server, read one
resource.k8s.io/v1 ResourceClaim from a small local HTTP server, and build and serialize
one ResourceSlice of 8 devices. It prints, per candidate: the distributions installed and
their size (as shipped, without .pyc, and with), the import time (wall clock and CPU
time), the time to the first answer, the CPU time in all, and the resident memory after
all that (VmRSS) against a bare interpreter's. The runs interleave the candidates; on a
shared machine read the CPU times and minima rather than the wall-clock medians.

    .venv/bin/python bench/kube_client.py [--python python3.9] [--runs 7] [--json FILE]

Needs the package index (pip install). Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CANDIDATES: dict[str, list[str]] = {
    "kubernetes": ["kubernetes==35.0.0"],
    "lightkube": ["lightkube==0.22.0", "lightkube-models==1.37.0.8"],
}

CLAIM = {
    "apiVersion": "resource.k8s.io/v1",
    "kind": "ResourceClaim",
    "metadata": {
        "name": "train-vgpu",
        "namespace": "team-a",
        "uid": "1b4e",
        "resourceVersion": "7",
    },
    "spec": {"devices": {"requests": [{"name": "vgpu", "exactly": {"deviceClassName": "vgpu"}}]}},
    "status": {
        "allocation": {
            "devices": {
                "results": [
                    {
                        "request": "vgpu",
                        "driver": "vgpu.eks.amazonaws.com",
                        "pool": "n1",
                        "device": "gpu-0-vgpu-3",
                    }
                ]
            }
        }
    },
}

# What each candidate runs in the child: ``server`` is the loopback URL.
PROGRAMS = {
    "bare": """
import json, sys, time
t0, c0 = time.perf_counter(), time.process_time()
result = {"import_s": 0.0, "import_cpu_s": 0.0, "first_answer_s": time.perf_counter() - t0}
""",
    "kubernetes": """
import json, sys, time
t0, c0 = time.perf_counter(), time.process_time()
from kubernetes import client
t1, c1 = time.perf_counter(), time.process_time()
configuration = client.Configuration()
configuration.host = server
api_client = client.ApiClient(configuration)
resource_api = client.ResourceV1Api(api_client)
claim = resource_api.read_namespaced_resource_claim("train-vgpu", "team-a")
assert claim.status.allocation.devices.results[0].device == "gpu-0-vgpu-3"
body = client.V1ResourceSlice(
    metadata=client.V1ObjectMeta(name="n1-vgpu-eks-amazonaws-com"),
    spec=client.V1ResourceSliceSpec(
        driver="vgpu.eks.amazonaws.com", node_name="n1",
        pool=client.V1ResourcePool(name="n1", generation=1, resource_slice_count=1),
        devices=[
            client.V1Device(
                name=f"gpu-0-vgpu-{i}",
                attributes={"index": client.V1DeviceAttribute(int=0)},
                capacity={"memory": client.V1DeviceCapacity(value="10Gi")},
            )
            for i in range(8)
        ],
    ),
)
json.dumps(api_client.sanitize_for_serialization(body))
result = {
    "import_s": t1 - t0, "import_cpu_s": c1 - c0, "first_answer_s": time.perf_counter() - t0
}
""",
    "lightkube": """
import json, sys, time
t0, c0 = time.perf_counter(), time.process_time()
from lightkube import Client, KubeConfig
from lightkube.config.models import Cluster, User
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.models.resource_v1 import Device, ResourcePool, ResourceSliceSpec
from lightkube.resources.resource_v1 import ResourceClaim, ResourceSlice
t1, c1 = time.perf_counter(), time.process_time()
kube = Client(KubeConfig.from_one(cluster=Cluster(server=server), user=User()), trust_env=False)
claim = kube.get(ResourceClaim, "train-vgpu", namespace="team-a")
assert claim.status.allocation.devices.results[0].device == "gpu-0-vgpu-3"
body = ResourceSlice(
    metadata=ObjectMeta(name="n1-vgpu-eks-amazonaws-com"),
    spec=ResourceSliceSpec(
        driver="vgpu.eks.amazonaws.com", nodeName="n1",
        pool=ResourcePool(name="n1", generation=1, resourceSliceCount=1),
        devices=[
            Device(name=f"gpu-0-vgpu-{i}", attributes={"index": {"int": 0}},
                   capacity={"memory": {"value": "10Gi"}})
            for i in range(8)
        ],
    ),
)
json.dumps(body.to_dict())
result = {
    "import_s": t1 - t0, "import_cpu_s": c1 - c0, "first_answer_s": time.perf_counter() - t0
}
""",
}

FOOTER = """
with open("/proc/self/status") as status:
    rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
result["rss_kib"] = rss
result["cpu_s"] = time.process_time() - c0
print(json.dumps(result))
"""


class _ClaimHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        data = json.dumps(CLAIM).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Quiet."""


LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"


def install(python: str, requirements: list[str], target: Path) -> list[str]:
    """pip-install ``requirements`` into ``target`` for ``python``, with the versions
    requirements.lock pins where it pins them (the lightkube set as the packages ship it);
    the distributions it got."""
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-compile", "--only-binary=:all:", "--constraint", str(LOCK),
         "--target", str(target), *requirements],
        check=True,
    )  # fmt: skip
    return sorted(info.name.removesuffix(".dist-info") for info in target.glob("*.dist-info"))


def size_bytes(root: Path, *, with_pyc: bool) -> int:
    """The bytes of the files under ``root`` (``.pyc`` files counted only ``with_pyc``)."""
    return sum(
        path.stat().st_size
        for path in root.rglob("*")
        if path.is_file() and (with_pyc or path.suffix != ".pyc")
    )


def measure(python: str, target: str, program: str, server: str) -> dict[str, float]:
    """One fresh isolated interpreter running ``program``; its timings and VmRSS."""
    prelude = f"import sys\nsys.path.insert(0, {target!r})\nserver = {server!r}\n"
    completed = subprocess.run(
        [python, "-I", "-S", "-c", prelude + program + FOOTER],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(completed.stdout)  # type: ignore[no-any-return]  # the child's dict


def summary(distributions: list[str], target: Path, runs: list[dict[str, float]]) -> dict[str, Any]:
    """One candidate's figures: sizes, and medians (and minima) over its runs."""

    def median_ms(key: str) -> float:
        return 1000 * statistics.median(run[key] for run in runs)

    return {
        "distributions": distributions,
        "size_mib": size_bytes(target, with_pyc=False) / 2**20,
        "size_with_pyc_mib": size_bytes(target, with_pyc=True) / 2**20,
        "import_ms_median": median_ms("import_s"),
        "import_ms_min": 1000 * min(run["import_s"] for run in runs),
        "import_cpu_ms_median": median_ms("import_cpu_s"),
        "first_answer_ms_median": median_ms("first_answer_s"),
        "cpu_ms_median": median_ms("cpu_s"),
        "rss_mib_median": statistics.median(run["rss_kib"] for run in runs) / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the interpreter to measure")
    parser.add_argument("--runs", type=int, default=7, help="fresh interpreters per candidate")
    parser.add_argument("--json", help="also write the figures to this file")
    arguments = parser.parse_args()
    version = subprocess.run(
        [arguments.python, "-c", "import platform; print(platform.python_version())"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip

    server = ThreadingHTTPServer(("127.0.0.1", 0), _ClaimHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    figures: dict[str, Any] = {"python": version, "runs": arguments.runs, "candidates": {}}
    names = ["bare", *CANDIDATES]
    with tempfile.TemporaryDirectory(prefix="kube-client-bench-") as scratch:
        targets: dict[str, str] = {}
        distributions: dict[str, list[str]] = {}
        for name in names:
            target = Path(scratch) / name
            target.mkdir()
            wanted = CANDIDATES.get(name, [])
            distributions[name] = install(arguments.python, wanted, target) if wanted else []
            # Compile with the measured interpreter, as the packages' postinst does.
            subprocess.run(
                [arguments.python, "-m", "compileall", "-q", "-j", "0", str(target)], check=True
            )
            targets[name] = str(target)
            measure(arguments.python, targets[name], PROGRAMS[name], url)  # warm the page cache
        # Rounds interleave the candidates, so a busy moment of the machine hits them alike.
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for _ in range(arguments.runs):
            for name in names:
                runs[name].append(measure(arguments.python, targets[name], PROGRAMS[name], url))
        for name in names:
            figures["candidates"][name] = summary(
                distributions[name], Path(targets[name]), runs[name]
            )
    server.shutdown()

    bare_rss = figures["candidates"]["bare"]["rss_mib_median"]
    print(f"Python {version}, {arguments.runs} interleaved runs each: medians (wall-clock min)")
    print(
        f"{'candidate':<11} {'dists':>5} {'MiB':>6} {'+pyc':>6} {'import ms':>12} "
        f"{'import CPU ms':>13} {'to answer ms':>12} {'CPU ms':>7} {'RSS MiB':>8} {'over bare':>9}"
    )
    for name, row in figures["candidates"].items():
        print(
            f"{name:<11} {len(row['distributions']):>5} {row['size_mib']:>6.1f} "
            f"{row['size_with_pyc_mib']:>6.1f} "
            f"{row['import_ms_median']:>5.0f} ({row['import_ms_min']:>4.0f}) "
            f"{row['import_cpu_ms_median']:>13.0f} {row['first_answer_ms_median']:>12.0f} "
            f"{row['cpu_ms_median']:>7.0f} {row['rss_mib_median']:>8.1f} "
            f"{row['rss_mib_median'] - bare_rss:>9.1f}"
        )
    for name in CANDIDATES:
        print(f"{name}: {' '.join(figures['candidates'][name]['distributions'])}")
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
