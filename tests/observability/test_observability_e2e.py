"""Observability end to end: an agent in this process and a real `vgpu-agent run` process,
each with a kubelet stand-in and a PodResources stand-in, scraped over HTTP and asked for
`status`; and the `simulate mps-client` command that gives simulated GPUs MPS clients."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest

from tests.cli_process import run_cli_exec
from tests.harness import (
    AgentRun,
    NotifyListener,
    agent_runs,
    make_config,
    scrape_metrics,
    wait_until,
)
from vgpu_agent.config.schema import AttributionConfig, LabelsConfig, MetricsConfig
from vgpu_agent.model.commands import SimulateAction, SimulateCommand, parse_command, to_request
from vgpu_agent.model.errors import VgpuError
from vgpu_agent.observability.attribution import gather
from vgpu_agent.observability.checkpoint import CHECKPOINT_NAME
from vgpu_agent.observability.labels import LABEL_PREFIX, read_feature_file
from vgpu_agent.standins.kubelet import KubeletStandin
from vgpu_agent.standins.podresources import PodResourcesStandin, StandinContainer, StandinPod

RESOURCE = "eks.amazonaws.com/vgpu"
WAIT_S = 20.0
POD_UID = "0f0e0d0c-0b0a-0908-0706-050403020100"
CONTAINER_ID = "e" * 64


def pod_process(proc: Path, pid: int) -> Path:
    """Make process ``pid`` under the /proc stand-in ``proc`` a process of the test pod's
    container (its cgroup line); its directory."""
    directory = proc / str(pid)
    directory.mkdir(parents=True)
    (directory / "cgroup").write_text(
        f"0::/kubepods.slice/kubepods-pod{POD_UID.replace('-', '_')}.slice/"
        f"cri-containerd-{CONTAINER_ID}.scope\n"
    )
    return directory


def _pods(ids: list[str]) -> list[StandinPod]:
    return [StandinPod("ns", "web", POD_UID, (StandinContainer("app", RESOURCE, tuple(ids)),))]


@pytest.fixture
def start(short_tmp_dir: str) -> Iterator[Callable[..., AgentRun]]:
    """Agents in this process (tests.harness), stopped at the end."""
    yield from agent_runs(short_tmp_dir)


def test_command_for_a_simulated_mps_client_round_trips() -> None:
    """`simulate mps-client` carries the pid and memory; a request without them is refused."""
    command = SimulateCommand(SimulateAction.MPS_CLIENT, "0", pid=42, memory_mib=512)
    assert parse_command(to_request(command)) == command
    with pytest.raises(VgpuError, match="needs a pid"):
        parse_command({"command": "simulate", "action": "mps-client", "gpu": "0"})
    with pytest.raises(VgpuError, match="needs a memory_mib"):
        parse_command(
            {"command": "simulate", "action": "mps-client", "gpu": "0", "pid": 1, "memory_mib": -1}
        )


def test_an_agent_attributes_memory_and_counts_events(
    start: Callable[..., AgentRun], short_tmp_dir: str, tmp_path: Path
) -> None:
    """In process: a pod's MPS client memory, limits, strays, XIDs and Allocate latency."""
    root = short_tmp_dir
    proc = tmp_path / "proc"
    pod_process(proc, 4242)
    socket_path = f"{root}/pr/kubelet.sock"
    features = tmp_path / "features.d"
    config = make_config(
        root,
        attribution=AttributionConfig(pod_resources_socket=socket_path, refresh_interval_s=0.2),
        metrics=MetricsConfig(enabled=True, listen_address="127.0.0.1:0"),
        labels=LabelsConfig(enabled=True, features_dir=str(features)),
    )
    # Its pod holds 2 vGPUs: allowed, with a ceiling of two shares.
    config = replace(config, mps=replace(config.mps, max_vgpus_per_container=2))
    run = start(
        config,
        gather_attribution=functools.partial(
            gather, proc_root=str(proc), cgroup_root=str(tmp_path / "cgroup")
        ),
    )
    devices = run.devices(lambda devs: len(devs) == 8)
    ids = [device.device_id for device in devices[:2]]
    run.standin.allocate(RESOURCE, ids)
    pods = PodResourcesStandin(
        socket_path, _pods(ids), checkpoint_path=f"{root}/dp/{CHECKPOINT_NAME}"
    )
    pods.start()
    try:
        run.agent.submit(SimulateCommand(SimulateAction.MPS_CLIENT, "0", pid=4242, memory_mib=1500))
        run.agent.submit(SimulateCommand(SimulateAction.MPS_CLIENT, "0", pid=4343, memory_mib=20))
        run.agent.submit(SimulateCommand(SimulateAction.XID, "1", xid=79))

        def app() -> dict[str, object]:
            gpu = run.agent.describe()["gpus"][0]
            containers = gpu["attribution"]["containers"]
            return dict(containers[0]) if containers else {}

        wait_until(lambda: app().get("memory_used_mib") == 1500, WAIT_S, "the pod's memory")
        described = run.agent.describe()
        gpu0 = described["gpus"][0]
        assert app()["pids"] == [4242]
        assert (app()["thread_limit_percent"], app()["vgpu_ids"]) == (50, ids)
        assert [stray["pid"] for stray in gpu0["attribution"]["unattributed"]] == [4343]
        assert described["attribution"]["problems"] == []
        uuid0, uuid1 = gpu0["uuid"], described["gpus"][1]["uuid"]
        labels = f"container=app,gpu_uuid={uuid0},namespace=ns,pod=web"
        samples = scrape_metrics(described["metrics_address"])
        assert samples[f"vgpu_container_memory_used_bytes{{{labels}}}"] == 1500 * 1024 * 1024
        assert samples[f"vgpu_container_vgpus{{{labels}}}"] == 2
        assert samples[f"vgpu_unattributed_clients{{gpu_uuid={uuid0}}}"] == 1
        assert samples[f"vgpu_mps_clients{{gpu_uuid={uuid0}}}"] == 2
        assert samples["vgpu_allocate_duration_seconds_count{}"] >= 1
        assert samples[f"vgpu_xid_events_total{{gpu_uuid={uuid1},xid=79}}"] == 1
        assert samples[f"vgpu_health_changes_total{{gpu_uuid={uuid1},health=unhealthy}}"] == 1
        assert samples["vgpu_registrations_total{}"] == 1
        written = read_feature_file(str(features))
        assert written is not None
        assert written[f"{LABEL_PREFIX}vgpu.count"] == "8"
    finally:
        pods.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _cli(config_path: Path, *arguments: str) -> str:
    done = run_cli_exec("--config", str(config_path), *arguments)
    assert done.code == 0, done.stderr
    return done.stdout


def test_a_real_agent_process_serves_metrics_and_status(short_tmp_dir: str) -> None:
    """`vgpu-agent run`: /metrics over HTTP, `status` and `status --json` name the pod; a
    kubelet restart is counted; SIGTERM stops it cleanly."""
    root = short_tmp_dir
    port = _free_port()
    config_path = Path(root) / "config.toml"
    config_path.write_text(
        f'[agent]\nstate_dir = "{root}/state"\n[plugin]\nplugin_dir = "{root}/dp"\n'
        # Its pod holds 2 vGPUs: allowed, with a ceiling of two shares.
        f'[mps]\npipe_root = "{root}/mps"\nmax_vgpus_per_container = 2\n'
        '[gpus]\nbackend = "simulated"\nreplicas_per_gpu = 4\n'
        f'[attribution]\npod_resources_socket = "{root}/pr/kubelet.sock"\n'
        f"refresh_interval_s = 0.5\n"
        f'[metrics]\nenabled = true\nlisten_address = "127.0.0.1:{port}"\n'
    )
    kubelet = KubeletStandin(f"{root}/dp")
    kubelet.start()
    notify = NotifyListener(f"{root}/notify")
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "vgpu_agent", "--config", str(config_path), "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    pods = PodResourcesStandin(f"{root}/pr/kubelet.sock")
    try:
        devices = kubelet.wait_for_devices(lambda devs: len(devs) == 8, WAIT_S, RESOURCE)
        notify.wait_for(lambda message: "READY=1" in message)
        ids = [device.device_id for device in devices[4:6]]
        kubelet.allocate(RESOURCE, ids)
        pods.set_pods(_pods(ids))
        pods.checkpoint_path = f"{root}/dp/{CHECKPOINT_NAME}"
        pods.set_pods(_pods(ids))
        pods.start()
        _cli(config_path, "simulate", "mps-client", "1", "999999", "700")
        address = f"127.0.0.1:{port}"
        key = f"vgpu_container_vgpus{{container=app,gpu_uuid={devices[4].device_id.split('::')[0]}"
        wait_until(
            lambda: any(name.startswith(key) for name in scrape_metrics(address)), WAIT_S, "the pod"
        )
        text = _cli(config_path, "status")
        assert "ns/web app: 2 vGPUs, limit 50% of SMs and" in text
        assert "unattributed MPS client pid 999999: uses 700 MiB" in text
        assert f"metrics: http://{address}/metrics" in text
        answer = json.loads(_cli(config_path, "status", "--json"))
        users = answer["gpus"][1]["attribution"]
        assert [container["pod"] for container in users["containers"]] == ["web"]
        assert users["mps_clients"] == 1
        kubelet.restart()
        kubelet.wait_for_registration(2, WAIT_S)
        wait_until(
            lambda: scrape_metrics(address).get("vgpu_kubelet_restarts_total{}") == 1,
            WAIT_S,
            "the kubelet restart in the metrics",
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT_S) == 0
        output = process.stdout.read().decode() if process.stdout else ""
        assert "serving metrics on http://127.0.0.1:" in output
        assert "Traceback" not in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        pods.stop()
        kubelet.stop()
        notify.close()


def test_the_demo_shows_who_uses_which_vgpu() -> None:
    """`vgpu-agent demo` prints the pod holding the allocated vGPUs with its memory."""
    from vgpu_agent.ops.demo import run_demo

    lines: list[str] = []
    assert run_demo(lines.append) == 0
    text = "\n".join(lines)
    # One vGPU: what a container may hold under the default (enforced) confinement.
    assert "ml/trainer-0 main: 1 vGPU, limit 25% of SMs and" in text
    assert "uses 9200 MiB (pids 4242)" in text
    assert "::0  Healthy  ml/trainer-0 main" in text
