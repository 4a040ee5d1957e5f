"""DRA benchmark: NodePrepareResources / NodeUnprepareResources latency beside Allocate.

Two agents are built by the composition root on 8 simulated GPUs x 48 vGPUs and run in
this process: one serving the device plugin to the kubelet stand-in, one in DRA mode
(dra.enabled) registered with the DRA kubelet stand-in, its API server in memory or, with
``--api http``, the stand-in API server over HTTP through the Kubernetes client as the
node's identity. Every kubelet call crosses a real unix socket through gRPC. Each
NodePrepareResources prepares a new claim of one share (reading it from the API server,
writing its CDI spec and the prepared claims record, both fsync'ed), each
NodeUnprepareResources removes one.

Prints p50/p99 of each call over ``--calls`` calls, plus the time from an injected XID to
the ResourceSlice without the sick GPU's shares. Numbers, no pass/fail.

Usage: python bench/dra_prepare.py [--calls 2000] [--api memory|http]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from typing import Callable

from vgpu_agent.agent.loop import Agent
from vgpu_agent.config.dra import DraConfig
from vgpu_agent.config.schema import (
    AgentConfig,
    Config,
    GpusConfig,
    MpsConfig,
    PluginConfig,
    SimulatedConfig,
)
from vgpu_agent.frontends.dra.kubeapi import KubeResourceApi
from vgpu_agent.frontends.dra.types import AllocatedDevice, ClaimRef, ResourceApi
from vgpu_agent.host.log import setup_logging
from vgpu_agent.host.systemd import Notifier
from vgpu_agent.model.commands import SimulateAction, SimulateCommand
from vgpu_agent.runtime.compose import build_agent
from vgpu_agent.standins.apiserver.server import ApiServerStandIn
from vgpu_agent.standins.dra_kubelet import DraKubeletStandin
from vgpu_agent.standins.kubelet import KubeletStandin
from vgpu_agent.standins.resourceapi import InMemoryResourceApi

RESOURCE = "eks.amazonaws.com/vgpu"
GPUS = 8
REPLICAS = 48
NODE = "bench-node"
WAIT_S = 30.0
TOKEN = "bench-node-token"  # noqa: S105 - a token of the in-process stand-in only


def percentile(samples: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``samples`` (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def timed(call: Callable[[], object]) -> float:
    """Milliseconds one call took."""
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def base_config(root: str) -> Config:
    """8 simulated GPUs of 48 vGPUs, everything under ``root``, quiet log."""
    return Config(
        agent=AgentConfig(state_dir=f"{root}/state", log_level="warning"),
        plugin=PluginConfig(plugin_dir=f"{root}/dp"),
        gpus=GpusConfig(backend="simulated", replicas_per_gpu=REPLICAS),
        mps=MpsConfig(pipe_root=f"{root}/mps", log_root=f"{root}/mpslog"),
        simulated=SimulatedConfig(count=GPUS),
    )


def start(agent: Agent) -> threading.Thread:
    """Run ``agent`` in a thread."""
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    return thread


def line(name: str, samples: list[float]) -> str:
    """One result line."""
    return (
        f"{name:<38} p50 {percentile(samples, 0.5):.3f} ms  p99 {percentile(samples, 0.99):.3f} ms"
        f"  ({len(samples)} calls)"
    )


class MemoryCluster:
    """The API server in memory."""

    def __init__(self) -> None:
        self.api = InMemoryResourceApi()
        self.client: ResourceApi = self.api

    def add_claim(self, name: str, driver: str, device: str) -> ClaimRef:
        """An allocated claim of ``device``."""
        uid = str(uuid.uuid4())
        return self.api.add_claim(
            "bench", name, uid, [AllocatedDevice("vgpu", driver, NODE, device)]
        )

    def devices(self, driver: str, count: int) -> list[str]:
        """The node's device names once there are ``count``."""
        published = self.api.wait_for_slice(driver, NODE, lambda s: len(s.devices) == count, WAIT_S)
        return [device.name for device in published.devices]

    def close(self) -> None:
        """Nothing to release."""


class HttpCluster:
    """The stand-in API server over HTTP, the Kubernetes client as system:node:<node>."""

    def __init__(self) -> None:
        self.server = ApiServerStandIn(tokens={TOKEN: f"system:node:{NODE}"}, anonymous_user=None)
        self.server.start()
        self.server.add_node(NODE)
        self.kube = KubeResourceApi.for_server(self.server.url, token=TOKEN)
        self.client: ResourceApi = self.kube

    def add_claim(self, name: str, driver: str, device: str) -> ClaimRef:
        """An allocated claim of ``device``, referenced by a pod on the node."""
        result = AllocatedDevice("vgpu", driver, NODE, device)
        uid = self.server.add_claim("bench", name, node=NODE, results=[result])
        return ClaimRef("bench", name, uid)

    def devices(self, driver: str, count: int) -> list[str]:
        """The node's device names once there are ``count``."""
        deadline = time.monotonic() + WAIT_S
        while True:
            names = [
                device["name"]
                for body in self.server.slices().values()
                if body["spec"]["driver"] == driver
                for device in body["spec"].get("devices") or []
            ]
            if len(names) == count:
                return names
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(names)} devices in the slices, wanted {count}")
            time.sleep(0.005)

    def close(self) -> None:
        """Close the client and stop the server."""
        self.kube.close()
        self.server.stop()


def main() -> int:
    """Run the benchmark and print its numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--api", choices=("memory", "http"), default="memory")
    args = parser.parse_args()
    # The agents' warnings (no PodResources socket, the injected XID) would sit between the
    # numbers.
    setup_logging("error", {}, stream=sys.stderr)
    root = tempfile.mkdtemp(prefix="vgd", dir="/tmp")
    total = GPUS * REPLICAS
    try:
        # The device plugin agent: Allocate of one vGPU.
        plugin_config = base_config(f"{root}/dp-node")
        kubelet = KubeletStandin(plugin_config.plugin.plugin_dir)
        kubelet.start()
        plugin_agent = build_agent(plugin_config, notifier=Notifier(None))
        plugin_thread = start(plugin_agent)
        devices = kubelet.wait_for_devices(lambda devs: len(devs) == total, WAIT_S, RESOURCE)
        one = [devices[0].device_id]
        allocate = [timed(lambda: kubelet.allocate(RESOURCE, one)) for _ in range(args.calls)]
        plugin_agent.request_stop("bench")
        plugin_thread.join(WAIT_S)
        kubelet.stop()

        # The DRA agent.
        dra_root = f"{root}/dra-node"
        config = replace(
            base_config(dra_root),
            dra=DraConfig(
                enabled=True,
                node_name=NODE,
                registry_dir=f"{dra_root}/reg",
                plugins_dir=f"{dra_root}/plugins",
                cdi_dir=f"{dra_root}/cdi",
            ),
        )
        driver = config.dra.driver_name
        cluster = HttpCluster() if args.api == "http" else MemoryCluster()
        dra_kubelet = DraKubeletStandin(config.dra.registry_dir)
        dra_kubelet.start()
        started = time.monotonic()
        dra_agent = build_agent(
            config, notifier=Notifier(None), make_resource_api=lambda _c: cluster.client
        )
        dra_thread = start(dra_agent)
        dra_kubelet.wait_for_registration(1, WAIT_S)
        registered_ms = (time.monotonic() - started) * 1000
        names = cluster.devices(driver, total)
        published_ms = (time.monotonic() - started) * 1000
        prepare: list[float] = []
        unprepare: list[float] = []
        for number in range(args.calls):
            claim = cluster.add_claim(f"claim-{number}", driver, names[number % len(names)])
            started_call = time.perf_counter()
            answer = dra_kubelet.prepare(driver, [claim])[claim.uid]
            prepare.append((time.perf_counter() - started_call) * 1000)
            if answer.error:
                raise RuntimeError(f"NodePrepareResources failed: {answer.error}")
            started_call = time.perf_counter()
            dra_kubelet.unprepare(driver, [claim])
            unprepare.append((time.perf_counter() - started_call) * 1000)
        xid_started = time.monotonic()
        dra_agent.submit(SimulateCommand(SimulateAction.XID, "0", 79))
        cluster.devices(driver, total - REPLICAS)
        xid_ms = (time.monotonic() - xid_started) * 1000
        dra_agent.request_stop("bench")
        dra_thread.join(WAIT_S)
        dra_kubelet.stop()
        cluster.close()

        print(f"GPUs x vGPUs:                          {GPUS} x {REPLICAS} = {total} shares")
        print(line("Allocate (1 vGPU, device plugin):", allocate))
        print(line("NodePrepareResources (1 claim, 1 share):", prepare))
        print(line("NodeUnprepareResources (1 claim):", unprepare))
        print(f"agent start -> DRA registration:        {registered_ms:.0f} ms")
        print(f"agent start -> ResourceSlice published: {published_ms:.0f} ms")
        print(f"injected XID -> ResourceSlice update:   {xid_ms:.1f} ms")
        where = "the stand-in API server over HTTP" if args.api == "http" else "in memory"
        print(f"(in-process agents over unix sockets; API server {where})")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
