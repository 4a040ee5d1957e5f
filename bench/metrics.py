"""Metrics benchmark: scrape cost at 8 GPUs x 48 vGPUs with 100 containers, and the idle CPU
of a real `vgpu-agent run` process with metrics on.

Prints: the join of 100 containers' sources (attribute()), one gather() through the
PodResources stand-in (gRPC List, checkpoint, MPS client list, /proc), rendering the metrics
text in-process and a full HTTP scrape of /metrics (p50/p99 over --scrapes each), then the
agent process's CPU use over an idle window with metrics served, the attribution refreshed
every 10 s against a PodResources stand-in naming 100 pods (when read: the window starts
once the refreshes that starting and the readiness scrape cause are over). Goals: a scrape
under 50 ms, idle CPU under 0.2 % of one core. Prints numbers; asserts nothing.

Usage: python bench/metrics.py [--scrapes 200] [--idle-seconds 60]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Callable, Optional

from control_plane import CONFIG, at_least_one, cpu_seconds, percentile, rss_mib, wait_ready

from vgpu_agent.config.schema import SimulatedConfig
from vgpu_agent.model.devices import Inventory, MpsGrantPolicy, ServedGpu
from vgpu_agent.model.gpu import GpuProcess
from vgpu_agent.observability.attribution import (
    Attribution,
    ContainerDevices,
    attribute,
    gather,
    limits_from,
)
from vgpu_agent.observability.cgroups import PodCgroup
from vgpu_agent.observability.checkpoint import CHECKPOINT_NAME, CachedCheckpoint, CheckpointEntry
from vgpu_agent.observability.metrics import AgentMetrics, MetricsServer, NodeView
from vgpu_agent.observability.podresources import PodResourcesClient
from vgpu_agent.standins.kubelet import KubeletStandin
from vgpu_agent.standins.podresources import PodResourcesStandin, StandinContainer, StandinPod
from vgpu_agent.standins.simulated import SimulatedBackend, gpus_from_config

RESOURCE = "eks.amazonaws.com/vgpu"
GPUS = 8
REPLICAS = 48
CONTAINERS = 100
WAIT_S = 30.0
#: The idle window starts once the agent has made no PodResources List call for this long
#: (the refresh interval, 10 s, and a second): the refresh at start, and the one that the
#: readiness scrape below makes due, are the cost of starting and of that scrape, not idle.
SETTLE_S = 11.0

#: The control-plane bench's simulated node, with attribution and metrics added.
AGENT_CONFIG = (
    CONFIG
    + """[attribution]
pod_resources_socket = "{root}/pr/kubelet.sock"
[metrics]
enabled = {metrics}
listen_address = "127.0.0.1:{port}"
"""
)


def node_pods(inventory: Inventory) -> list[StandinPod]:
    """100 pods of one container each, holding 1-3 vGPUs, spread over the GPUs."""
    pods = []
    next_free = {served.gpu.uuid: 0 for served in inventory.gpus}
    for number in range(CONTAINERS):
        served = inventory.gpus[number % len(inventory.gpus)]
        count = 1 + number % 3
        start = next_free[served.gpu.uuid]
        next_free[served.gpu.uuid] = start + count
        ids = tuple(served.vgpu_ids[start : start + count])
        uid = f"00000000-0000-0000-0000-{number:012d}"
        pods.append(
            StandinPod(
                f"team-{number % 7}",
                f"job-{number}",
                uid,
                (StandinContainer("main", RESOURCE, ids),),
            )
        )
    return pods


def timed_ms(count: int, call: Callable[[], object]) -> list[float]:
    """Milliseconds per call over ``count`` calls."""
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def show(label: str, samples: list[float]) -> None:
    """Print a p50/p99 line."""
    print(
        f"{label:44s} p50 {percentile(samples, 0.5):7.3f} ms  p99 "
        f"{percentile(samples, 0.99):7.3f} ms  ({len(samples)} runs)"
    )


def in_process(scrapes: int) -> None:
    """The join, one gather, rendering and an HTTP scrape, at 8 x 48 with 100 containers."""
    gpus = gpus_from_config(SimulatedConfig(count=GPUS))
    inventory = Inventory(
        tuple(ServedGpu(gpu, REPLICAS, pipe_dir=f"/run/nvidia-mps/{gpu.uuid}") for gpu in gpus)
    )
    pods = node_pods(inventory)
    devices = [
        ContainerDevices(pod.namespace, pod.name, c.name, RESOURCE, c.device_ids)
        for pod in pods
        for c in pod.containers
    ]
    checkpoint = [
        CheckpointEntry(pod.uid, c.name, RESOURCE, c.device_ids)
        for pod in pods
        for c in pod.containers
    ]
    processes: list[tuple[GpuProcess, Optional[PodCgroup]]] = []
    for number, pod in enumerate(pods):
        gpu_uuid = pod.containers[0].device_ids[0].split("::")[0]
        processes.append(
            (
                GpuProcess(10_000 + number, gpu_uuid, 500 + number),
                PodCgroup(pod.uid, "c" * 64, "burstable"),
            )
        )
    served = {entry.gpu.uuid: entry for entry in inventory.gpus}
    policy = MpsGrantPolicy()

    def join() -> Attribution:
        return attribute(
            served=served,
            resource_name=RESOURCE,
            pod_devices=devices,
            checkpoint=checkpoint,
            processes=processes,
            limits_for=limits_from(inventory, policy),
        )

    attribution = join()
    print(f"GPUs x vGPUs:  {GPUS} x {REPLICAS}; containers: {len(attribution.containers)}")
    show("attribute() (the join, 100 containers):", timed_ms(scrapes, join))

    root = tempfile.mkdtemp(prefix="vgm", dir="/tmp")
    backend = SimulatedBackend(gpus)
    for number, pod in enumerate(pods):
        gpu_uuid = pod.containers[0].device_ids[0].split("::")[0]
        backend.add_mps_client(gpu_uuid, 10_000 + number, 500 + number)
    socket_path = os.path.join(root, "kubelet.sock")
    checkpoint_path = os.path.join(root, CHECKPOINT_NAME)
    client = PodResourcesClient()
    cached = CachedCheckpoint()
    with PodResourcesStandin(socket_path, pods, checkpoint_path=checkpoint_path):
        gathered = timed_ms(
            max(10, scrapes // 10),
            lambda: gather(
                backend=backend,
                inventory=inventory,
                policy=policy,
                resource_name=RESOURCE,
                pod_resources_socket=socket_path,
                checkpoint_path=checkpoint_path,
                list_pods=client,
                read_checkpoint_at=cached,
            ),
        )
    client.close()
    shutil.rmtree(root, ignore_errors=True)
    show("gather() as the agent's refresher (kept channel):", gathered)

    view = NodeView(inventory, attribution, mps_enabled=True, registered=True)
    metrics = AgentMetrics(lambda: view)
    for number in range(1000):
        metrics.observe_allocate(0.0002 + number * 1e-6)
        metrics.xid_event(gpus[number % GPUS].uuid, 13 if number % 2 else 79)
    text = metrics.render()
    lines = len(text.splitlines())
    print(f"metrics text: {len(text)} bytes, {lines} lines")
    show("render (in process):", timed_ms(scrapes, metrics.render))
    server = MetricsServer(metrics, "127.0.0.1", 0)
    server.start()
    url = f"http://127.0.0.1:{server.port}/metrics"

    def scrape() -> bytes:
        with urllib.request.urlopen(url, timeout=10) as response:
            return bytes(response.read())

    try:
        show("HTTP scrape of /metrics (goal < 50 ms):", timed_ms(scrapes, scrape))
    finally:
        server.stop()


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def settle(list_calls: Callable[[], int]) -> None:
    """Wait until ``list_calls`` has not changed for SETTLE_S (at most WAIT_S more)."""
    deadline = time.monotonic() + SETTLE_S + WAIT_S
    calls, quiet_since = list_calls(), time.monotonic()
    while time.monotonic() - quiet_since < SETTLE_S and time.monotonic() < deadline:
        time.sleep(0.5)
        if list_calls() != calls:
            calls, quiet_since = list_calls(), time.monotonic()


def idle_agent(idle_seconds: float, metrics: bool = True, scrape_every_s: float = 0.0) -> None:
    """CPU of a real agent process with metrics on (or off, for the baseline), idle, or
    scraped every ``scrape_every_s`` as Prometheus would."""
    root = tempfile.mkdtemp(prefix="vgi", dir="/tmp")
    port = free_port()
    config_path = os.path.join(root, "config.toml")
    with open(config_path, "w") as config_file:
        config_file.write(
            AGENT_CONFIG.format(
                root=root,
                gpus=GPUS,
                replicas=REPLICAS,
                port=port,
                metrics="true" if metrics else "false",
            )
        )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(os.path.join(root, "notify"))
    kubelet = KubeletStandin(os.path.join(root, "dp"))
    kubelet.start()
    gpus = gpus_from_config(SimulatedConfig(count=GPUS))
    inventory = Inventory(tuple(ServedGpu(gpu, REPLICAS) for gpu in gpus))
    pods = PodResourcesStandin(
        os.path.join(root, "pr", "kubelet.sock"),
        node_pods(inventory),
        checkpoint_path=os.path.join(root, "dp", CHECKPOINT_NAME),
    )
    pods.start()
    env = {**os.environ, "NOTIFY_SOCKET": os.path.join(root, "notify")}
    agent = subprocess.Popen(
        [sys.executable, "-m", "vgpu_agent", "--config", config_path, "run"], env=env
    )
    try:
        wait_ready(notify, WAIT_S)
        url = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + WAIT_S
        while metrics:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = response.read()
            if b'pod="job-99"' in body:
                break
            if time.monotonic() > deadline:
                print("the agent's metrics never showed the 100 pods")
                return
            time.sleep(0.5)
        settle(lambda: pods.calls.get("List", 0))
        state = "on" if metrics else "off"
        print(f"agent RSS with metrics {state}:                  {rss_mib(agent.pid):.1f} MiB")
        before = cpu_seconds(agent.pid)
        calls_before = pods.calls.get("List", 0)
        window_end = time.monotonic() + idle_seconds
        while scrape_every_s > 0 and time.monotonic() + scrape_every_s < window_end:
            time.sleep(scrape_every_s)
            with urllib.request.urlopen(url, timeout=10) as response:
                response.read()
        time.sleep(max(0.0, window_end - time.monotonic()))
        used = cpu_seconds(agent.pid) - before
        calls = pods.calls.get("List", 0) - calls_before
        goal = " (goal < 0.2 %)" if metrics else " (the baseline)"
        if scrape_every_s > 0:
            state += f", scraped every {scrape_every_s:.0f} s"
            goal = ""
        print(
            f"idle CPU with metrics {state} over {idle_seconds:.0f} s{goal}: "
            f"{used / idle_seconds * 100:.3f} % of one core ({calls} PodResources List calls)"
        )
    finally:
        agent.terminate()
        agent.wait(timeout=WAIT_S)
        pods.stop()
        kubelet.stop()
        notify.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    """Run the benchmark and print its numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapes", type=at_least_one, default=200)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--skip-scrape", action="store_true", help="only the idle CPU part")
    parser.add_argument("--skip-idle", action="store_true", help="only the in-process part")
    args = parser.parse_args()
    if not args.skip_scrape:
        in_process(args.scrapes)
    if args.skip_idle:
        return 0
    idle_agent(args.idle_seconds, metrics=False)
    idle_agent(args.idle_seconds, metrics=True)
    idle_agent(args.idle_seconds, metrics=True, scrape_every_s=15.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
