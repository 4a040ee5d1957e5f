"""Application faults under MPS (issue 20 item 2): an XID of health.ignored_xids on a
served GPU is recorded as an MPS fault of that GPU, naming the pods that had MPS clients on
it; journald fields, a metrics counter per GPU and pod, recent faults in status; the GPU
stays Healthy. And status says when a container runs more MPS clients than it holds vGPUs,
and what the per-pod policy does about it (item 1; tests/agent/test_tenants.py shows the
policy acting)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest

from tests.agent.test_fault_culprits import RecordingObserver
from tests.harness import AgentRun, agent_runs, make_config, scrape_metrics, wait_until
from tests.observability.test_observability_e2e import (
    RESOURCE,
    _pods,
    pod_process,
)
from vgpu_agent.agent.faults import ApplicationFault, FaultEvent, FaultLog
from vgpu_agent.agent.offenders import OffenderPolicy
from vgpu_agent.config.schema import (
    AttributionConfig,
    FaultsConfig,
    IsolationConfig,
    MetricsConfig,
)
from vgpu_agent.model.commands import SimulateAction, SimulateCommand
from vgpu_agent.model.pods import PodRef
from vgpu_agent.observability.attribution import gather
from vgpu_agent.observability.checkpoint import CHECKPOINT_NAME
from vgpu_agent.standins.podresources import PodResourcesStandin

WAIT_S = 20.0


@pytest.fixture
def start(short_tmp_dir: str) -> Iterator[Callable[..., AgentRun]]:
    """Agents in this process (tests.harness), stopped at the end."""
    yield from agent_runs(short_tmp_dir)


def test_fault_log_names_the_pods_counts_and_keeps_the_latest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One journal entry with the GPU, the XID and the pods; the counter told once; the
    recent list keeps the newest faults."""
    observer = RecordingObserver(
        {
            "GPU-1": {
                11: PodRef("uid-b", "ns/b"),
                12: PodRef("uid-a", "ns/a"),
                13: PodRef("uid-a", "ns/a"),
            }
        }
    )
    faults = FaultLog(
        observer,
        OffenderPolicy(FaultsConfig()),
        None,
        no_daemon_logs="not read here",
        wall_clock=lambda: 0.0,
    )

    def record(fault: ApplicationFault) -> FaultEvent:
        seen = faults.seen(fault)
        return faults.record(seen, faults.name(seen))

    with caplog.at_level(logging.WARNING):
        event = record(ApplicationFault("GPU-1", 31, "MMU fault"))
    assert event.pods == ("ns/a", "ns/b")
    assert observer.faults == [("GPU-1", 31, ("ns/a", "ns/b"))]
    assert observer.culprits == [("GPU-1", "")]
    (entry,) = caplog.records
    fields = entry.__dict__["fields"]
    assert fields == {
        "GPU_UUID": "GPU-1",
        "XID": "31",
        "VGPU_EVENT": "mps-fault",
        "VGPU_PODS": "ns/a,ns/b",
        "VGPU_CULPRIT_POD": "unknown",
        "VGPU_CULPRIT_POD_UID": None,
        "VGPU_CULPRIT_PID": None,
        "VGPU_CULPRIT_EVIDENCE": None,
    }
    assert "culprit unknown (not read here)" in entry.getMessage()
    assert "ns/a, ns/b" in entry.getMessage()
    for _ in range(30):
        record(ApplicationFault("GPU-2", 43))
    recent = faults.recent()
    assert len(recent) == 20
    assert recent[-1] == {
        "gpu_uuid": "GPU-2",
        "xid": 43,
        "at": "1970-01-01T00:00:00Z",
        "pods": [],
        "culprit": "unknown",
        "culprit_pod_uid": "",
        "culprit_pid": None,
        "culprit_evidence": "",
        "culprit_note": "not read here",
    }


def test_a_fault_under_mps_is_an_event_of_its_gpu_naming_its_pods(
    start: Callable[..., AgentRun], short_tmp_dir: str, tmp_path: Path
) -> None:
    """A pod's MPS client on GPU 0, then XID 31 there: status lists the fault with the pod,
    the counter counts it for that pod, and the GPU stays Healthy; once the container runs
    more clients than vGPUs, status calls it unsafe and says the policy only reports it."""
    root = short_tmp_dir
    proc = tmp_path / "proc"
    for pid in (4242, 4343, 4444):
        pod_process(proc, pid)
    socket_path = f"{root}/pr/kubelet.sock"
    config = make_config(
        root,
        attribution=AttributionConfig(pod_resources_socket=socket_path, refresh_interval_s=0.2),
        metrics=MetricsConfig(enabled=True, listen_address="127.0.0.1:0"),
        # Reported, not ended: the third client stays, and so does the warning.
        isolation=IsolationConfig(excess_clients="report", check_interval_s=0.1),
    )
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
        run.agent.submit(SimulateCommand(SimulateAction.MPS_CLIENT, "0", pid=4242, memory_mib=900))

        def attributed() -> bool:
            containers = run.agent.describe()["gpus"][0]["attribution"]["containers"]
            return bool(containers) and containers[0]["pids"] == [4242]

        wait_until(attributed, WAIT_S, "the pod's client")
        run.agent.submit(SimulateCommand(SimulateAction.XID, "0", xid=31))
        wait_until(lambda: bool(run.agent.describe()["mps_faults"]), WAIT_S, "the fault")
        described = run.agent.describe()
        uuid0 = described["gpus"][0]["uuid"]
        (fault,) = described["mps_faults"]
        assert (fault["gpu_uuid"], fault["xid"], fault["pods"]) == (uuid0, 31, ["ns/web"])
        assert (fault["culprit"], fault["culprit_note"]) == (
            "unknown",
            "the MPS daemons are simulated: they write no output",
        )
        assert described["gpus"][0]["healthy"]
        assert "unsafe" not in described["gpus"][0], "one client on 2 vGPUs is within its share"
        for extra_pid in (4343, 4444):
            run.agent.submit(
                SimulateCommand(SimulateAction.MPS_CLIENT, "0", pid=extra_pid, memory_mib=9)
            )

        def warned() -> list[str]:
            return list(run.agent.describe()["gpus"][0].get("unsafe", []))

        wait_until(lambda: bool(warned()), WAIT_S, "the container's third client")
        assert warned() == [
            "container ns/web/app runs 3 MPS client processes on 2 vGPU(s): MPS holds each "
            "process, not the container, to the ceiling, so it can use up to 3 shares; only "
            'reported (isolation.excess_clients = "report"): 1 beyond the 2 '
            "isolation.clients_per_vgpu = 1 lets it run"
        ]
        samples = scrape_metrics(described["metrics_address"])
        assert samples[f"vgpu_mps_faults_total{{gpu_uuid={uuid0},pod=ns/web,xid=31}}"] == 1
        assert samples[f"vgpu_mps_fault_culprits_total{{gpu_uuid={uuid0},pod=}}"] == 1
    finally:
        pods.stop()
