"""`vgpu-agent demo`: the agent on simulated GPUs against the built-in kubelet stand-in.

Everything runs in one process inside a temporary directory; nothing on the machine is
touched. It shows what a real node does: registration, the device list, a preferred
allocation, an Allocate response, which pod uses which vGPU and how much memory (a
PodResources stand-in names the pod; a simulated MPS client sits in a pod-shaped cgroup),
and a GPU fault turning vGPUs Unhealthy and back.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import tempfile
import threading
import time
from typing import Callable

from vgpu_agent.agent.loop import Agent
from vgpu_agent.config.schema import (
    AgentConfig,
    AttributionConfig,
    Config,
    GpusConfig,
    HealthConfig,
    IsolationConfig,
    MpsConfig,
    PluginConfig,
    SimulatedConfig,
)
from vgpu_agent.host.log import setup_logging
from vgpu_agent.host.systemd import Notifier
from vgpu_agent.model.commands import SimulateAction, SimulateCommand
from vgpu_agent.model.devices import HEALTHY, UNHEALTHY
from vgpu_agent.observability.attribution import gather
from vgpu_agent.observability.checkpoint import CHECKPOINT_NAME
from vgpu_agent.observability.enforcement import policy_status_lines, process_start_s
from vgpu_agent.observability.service import status_lines
from vgpu_agent.ops.demo_capacity import run_capacity_demo
from vgpu_agent.ops.demo_dra import run_dra_demo
from vgpu_agent.runtime.compose import build_agent
from vgpu_agent.standins.kubelet import KubeletStandin
from vgpu_agent.standins.podresources import PodResourcesStandin, StandinContainer, StandinPod

Echo = Callable[[str], None]
WAIT_S = 10.0
#: The demo's pod, and the pid of its simulated MPS client.
DEMO_POD_UID = "5f0c2a7e-0000-4000-8000-000000000001"
DEMO_CLIENT_PID = 4242
#: A second process of the demo's pod, beyond what its one vGPU allows.
DEMO_EXTRA_PID = 4343


def demo_config(root: str) -> Config:
    """Two simulated H100s, 4 vGPUs each, everything under ``root``."""
    return Config(
        agent=AgentConfig(state_dir=f"{root}/state"),
        plugin=PluginConfig(plugin_dir=f"{root}/device-plugins"),
        gpus=GpusConfig(backend="simulated", replicas_per_gpu=4),
        mps=MpsConfig(pipe_root=f"{root}/mps", log_root=f"{root}/mps-log"),
        health=HealthConfig(recovery_quiet_period_s=1.0, poll_interval_s=0.2),
        simulated=SimulatedConfig(count=2),
        attribution=AttributionConfig(
            pod_resources_socket=f"{root}/pod-resources/kubelet.sock", refresh_interval_s=0.2
        ),
        isolation=IsolationConfig(check_interval_s=0.2),
        source="<demo>",
    )


def run_demo(echo: Echo) -> int:
    """Run the demo, printing what happens; returns the exit code.

    The agent's log goes to a buffer, not between the demo's lines; it is printed only if
    the demo fails, to show why."""
    agent_log = io.StringIO()
    setup_logging("info", {}, stream=agent_log)
    root = tempfile.mkdtemp(prefix="vgpu-demo-")
    config = demo_config(root)
    resource = config.plugin.resource_name
    standin = KubeletStandin(config.plugin.plugin_dir)
    pods = PodResourcesStandin(
        config.attribution.pod_resources_socket,
        checkpoint_path=os.path.join(config.plugin.plugin_dir, CHECKPOINT_NAME),
    )
    # The demo's "/proc": the client processes sit in a containerd pod's cgroup, the
    # second started after the first.
    proc_root = os.path.join(root, "proc")
    for pid, started_ticks in ((DEMO_CLIENT_PID, 100), (DEMO_EXTRA_PID, 200)):
        os.makedirs(os.path.join(proc_root, str(pid)))
        with open(os.path.join(proc_root, str(pid), "cgroup"), "w") as cgroup:
            cgroup.write(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
                f"{DEMO_POD_UID.replace('-', '_')}.slice/cri-containerd-{'c' * 64}.scope\n"
            )
        with open(os.path.join(proc_root, str(pid), "stat"), "w") as stat:
            stat.write(
                f"{pid} (python3) S 1 {pid} {pid} 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 "
                f"{started_ticks} 0\n"
            )
    agent = build_agent(
        config,
        notifier=Notifier(None),
        gather_attribution=functools.partial(
            gather, proc_root=proc_root, cgroup_root=os.path.join(root, "cgroup")
        ),
        client_start_time=functools.partial(process_start_s, proc_root=proc_root),
    )
    thread = threading.Thread(target=agent.run, name="vgpu-agent", daemon=True)
    try:
        echo(f"== kubelet stand-in listening in {config.plugin.plugin_dir}")
        standin.start()
        pods.start()
        started = time.monotonic()
        thread.start()
        registration = standin.wait_for_registration(1, WAIT_S)
        echo(
            f"== agent registered in {time.monotonic() - started:.2f} s: "
            f"resource {registration.resource_name}, endpoint {registration.endpoint}, "
            f"API {registration.version}"
        )
        devices = standin.wait_for_devices(lambda devs: len(devs) == 8, WAIT_S, resource)
        echo(f"== ListAndWatch: {len(devices)} vGPUs")
        for device in devices:
            echo(f"   {device.device_id}  {device.health}  NUMA {list(device.numa_nodes)}")
        available = [device.device_id for device in devices]
        # One vGPU: what a container may hold by default (mps.max_vgpus_per_container = 1).
        preferred = standin.preferred_allocation(resource, available, [], 1)
        echo(f"== GetPreferredAllocation(size=1) -> {preferred}")
        response = standin.allocate(resource, preferred).container_responses[0]
        echo("== Allocate -> the container gets:")
        for name, value in sorted(response.envs.items()):
            echo(f"   env   {name}={value}")
        for mount in response.mounts:
            mode = "ro" if mount.read_only else "rw"
            echo(f"   mount {mount.host_path} -> {mount.container_path} ({mode})")
        show_attribution(agent, pods, preferred, resource, echo)
        show_extra_client(agent, preferred[0].split("::")[0], echo)
        gpu0 = agent.describe()["gpus"][0]["uuid"]
        echo(f"== simulating XID 79 (GPU fallen off the bus) on GPU 0 {gpu0}")
        agent.submit(SimulateCommand(SimulateAction.XID, "0", 79))
        devices = standin.wait_for_devices(
            lambda devs: sum(d.health == UNHEALTHY for d in devs) == 4, WAIT_S, resource
        )
        unhealthy = sum(device.health == UNHEALTHY for device in devices)
        echo(f"   ListAndWatch: {unhealthy} of {len(devices)} vGPUs Unhealthy")
        echo(f"   status: {agent.describe()['status']}")
        echo("== after the quiet period (1 s in the demo, 5 min by default) it heals:")
        devices = standin.wait_for_devices(
            lambda devs: all(d.health == HEALTHY for d in devs), WAIT_S, resource
        )
        echo(f"   ListAndWatch: {len(devices)} of {len(devices)} vGPUs Healthy")
        echo("== kubelet restart: it deletes our socket; the agent registers again")
        standin.restart()
        standin.wait_for_registration(2, WAIT_S)
        echo(f"   registered again ({len(standin.registrations)} registrations in all)")
        run_dra_demo(config, os.path.join(root, "dra"), echo)
        run_capacity_demo(config, os.path.join(root, "dra-capacity"), echo)
        echo("== done")
        return 0
    except BaseException:
        echo("== the demo failed; the agent's log:")
        for line in agent_log.getvalue().splitlines():
            echo(f"   {line}")
        raise
    finally:
        agent.request_stop("demo finished")
        thread.join(timeout=WAIT_S)
        standin.stop()
        pods.stop()
        shutil.rmtree(root, ignore_errors=True)


def show_attribution(
    agent: Agent, pods: PodResourcesStandin, held: list[str], resource: str, echo: Echo
) -> None:
    """The pod that got ``held`` runs an MPS client; `vgpu-agent status` attributes it."""
    container = StandinContainer("main", resource, tuple(held))
    pods.set_pods([StandinPod("ml", "trainer-0", DEMO_POD_UID, (container,))])
    gpu = held[0].split("::")[0]
    client = SimulateCommand(SimulateAction.MPS_CLIENT, gpu, pid=DEMO_CLIENT_PID, memory_mib=9200)
    agent.submit(client)
    echo(
        f"== the kubelet lists pod ml/trainer-0 with those vGPUs; its process {DEMO_CLIENT_PID} "
        "uses 9200 MiB on the GPU (simulated MPS client)"
    )
    deadline = time.monotonic() + WAIT_S
    while True:
        entry = next(g for g in agent.describe()["gpus"] if g["uuid"] == gpu)
        containers = (entry.get("attribution") or {}).get("containers", [])
        if any(c.get("memory_used_mib") == 9200 for c in containers) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    echo(f"   status: GPU {entry['index']} {entry['uuid']}")
    for line in status_lines(entry):
        echo(f"   {line}")


def show_extra_client(agent: Agent, gpu: str, echo: Echo) -> None:
    """The pod starts a second CUDA process on its one vGPU: the agent ends it (MPS would
    give it a whole share of its own)."""
    agent.submit(
        SimulateCommand(SimulateAction.MPS_CLIENT, gpu, pid=DEMO_EXTRA_PID, memory_mib=206)
    )
    echo(
        f"== the pod starts a second CUDA process {DEMO_EXTRA_PID} on its one vGPU; MPS would "
        "give it a share of its own, so the agent ends it (simulated terminate_client):"
    )
    deadline = time.monotonic() + WAIT_S
    while True:
        policy = agent.describe(0)["mps_client_policy"]
        if policy["recent"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for line in policy_status_lines(policy):
        echo(f"   {line.strip()}")
