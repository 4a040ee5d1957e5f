"""On a real NVIDIA GPU: a pod that keeps faulting is held off its neighbours (issue 20,
item 2).

The pods of tests/gpu/test_tenants_gpu.py (cgroups, a PodResources stand-in, the kubelet
checkpoint), the agent's attribution and per-pod client policy on its refresher over NVML,
the health watcher over NVML, and the fault log reading the GPU's daemon output, with
``faults.repeat_limit = 2`` and ``offender_action = "hold"``. Pod ``tenants/multi`` plays the
crasher: each of its containers' processes reads a wild device pointer (XID 31).

1. Two long-running neighbours and the crasher: the fault ends all three; the event names
   the three pods; the server tore down clients of three pods, so whichever it names is a
   lead and counts for nobody.
2. and 3. The crasher restarts alone and faults again, twice: every client the server tore
   down was its own, so each fault counts against it, and the second holds it.
4. A new neighbour and the crasher's next process: the policy ends the crasher's client (it
   is held) before its fault comes; the neighbour runs to its end; no further fault.

Whom the server names in step 1 is printed, with the lines it wrote. Only the test's own
clients fault or are ended; the GPU's settings are never changed, the daemon lives under
/tmp and is quit at the end. Run with ``scripts/test-gpu -k offender -s``.
"""

from __future__ import annotations

import json
import os
import queue
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Union

import pytest

from vgpu_agent.agent.faults import ApplicationFault, FaultEvent, FaultLog, SeenFault
from vgpu_agent.agent.health import HealthChange, HealthMonitor
from vgpu_agent.agent.offenders import OffenderPolicy
from vgpu_agent.config.schema import AttributionConfig, FaultsConfig, HealthConfig
from vgpu_agent.mps.daemon_log import daemon_logs_for
from vgpu_agent.observability.checkpoint import CHECKPOINT_NAME
from vgpu_agent.standins.podresources import PodResourcesStandin

from .conftest import Client, Node
from .test_attribution_gpu import _enter
from .test_isolation_gpu import _report
from .test_tenants_gpu import (
    MULTI,
    NAMESPACE,
    NEIGHBOURS,
    REPLICAS,
    Pods,
    _grant_pods,
    _observability,
    _policy_config,
    pods,  # noqa: F401 - the fixture
)

pytestmark = pytest.mark.gpu
NodeFactory = Callable[..., Node]
CRASHER = f"{NAMESPACE}/{MULTI}"
#: How long the health watcher may take to hand on a fault's XID.
FAULT_WAIT_S = 60.0
#: How long after its first kernel the held crasher's process would fault.
HELD_FAULT_AFTER_S = 8.0


def test_a_repeat_offender_is_held_off_its_neighbours(
    make_node: NodeFactory,
    pods: Pods,  # noqa: F811 - the fixture imported above
    work_dir: Path,
) -> None:
    """Steps 1 to 4 of the module's docstring."""
    from vgpu_agent.gpus.nvml import NvmlBackend

    node = make_node(replicas=REPLICAS, max_vgpus_per_container=1)
    gpu_uuid = node.gpus[0].uuid
    base = _policy_config(node, work_dir, "end")
    config = replace(
        base,
        attribution=AttributionConfig(
            pod_resources_socket=base.attribution.pod_resources_socket, refresh_interval_s=0.5
        ),
        faults=FaultsConfig(repeat_limit=2, offender_action="hold", hold_s=600.0),
    )
    grants, standin_pods = _grant_pods(node, pods)
    offenders = OffenderPolicy(config.faults)
    backend = NvmlBackend()
    observability = _observability(node, config, offenders.held)
    daemon_logs = daemon_logs_for(config.mps)
    assert daemon_logs is not None, "the direct manager's output is read"
    daemon_logs.follow([gpu_uuid])
    fault_log = FaultLog(observability, offenders, daemon_logs)
    arrived: queue.Queue[SeenFault] = queue.Queue()

    def emit(change: Union[HealthChange, ApplicationFault]) -> None:
        if isinstance(change, ApplicationFault):
            arrived.put(fault_log.seen(change))  # as the agent's loop: who is on the GPU now

    monitor = HealthMonitor(
        NvmlBackend(), node.daemons, HealthConfig(mps_check_interval_s=0.5), [gpu_uuid], emit=emit
    )
    events: list[FaultEvent] = []

    def start(label: str, pod: str, arguments: list[str]) -> Client:
        return node.start_client(
            grants[pod], 1000, label, arguments, prefix=_enter(pods.cgroups[pod])
        )

    def next_fault() -> FaultEvent:
        seen = arrived.get(timeout=FAULT_WAIT_S)
        time.sleep(1.0)
        while not arrived.empty():  # further XIDs of the same fault
            arrived.get_nowait()
        event = fault_log.record(seen, fault_log.name(seen))
        print("recorded:", json.dumps(event.describe()))
        events.append(event)
        return event

    with PodResourcesStandin(
        config.attribution.pod_resources_socket,
        standin_pods,
        checkpoint_path=os.path.join(config.plugin.plugin_dir, CHECKPOINT_NAME),
    ):
        observability.start(backend)
        monitor.start()
        try:
            # 1. Two long-running neighbours and the crasher.
            victims = [start(name, name, ["--hold-s", "60"]) for name in NEIGHBOURS[:2]]
            node.wait_for_clients(0, 2, timeout_s=90.0)
            crasher = start(f"{MULTI}-1", MULTI, ["--hold-s", "4", "--illegal-access"])
            first = next_fault()
            outcomes = {
                c.label: _report(c).get("error", "ran to the end") for c in [crasher, *victims]
            }
            print("step 1 outcomes:", json.dumps(outcomes))
            assert set(first.pods) == {CRASHER, *(f"{NAMESPACE}/{n}" for n in NEIGHBOURS[:2])}
            assert all("illegal memory access" in outcome for outcome in outcomes.values())
            assert first.culprit.evidence == "named", "three pods torn down: a lead"
            assert offenders.offenders() == []
            # 2. and 3. The crasher alone, twice.
            for attempt in (2, 3):
                alone = start(f"{MULTI}-{attempt}", MULTI, ["--hold-s", "2", "--illegal-access"])
                fault = next_fault()
                print(f"step {attempt}:", json.dumps(_report(alone).get("error", "no error")))
                assert fault.culprit.pod is not None
                assert (fault.culprit.pod.uid, fault.culprit.evidence) == (
                    pods.uids[MULTI],
                    "sole-client",
                ), fault.culprit
            assert list(offenders.held()) == [pods.uids[MULTI]], offenders.describe()
            # 4. A new neighbour beside the held crasher's next process.
            neighbour = start(NEIGHBOURS[2], NEIGHBOURS[2], ["--hold-s", "12"])
            held = start(
                f"{MULTI}-4", MULTI, ["--hold-s", str(HELD_FAULT_AFTER_S), "--illegal-access"]
            )
            held_report = _report(held)
            neighbour_report = _report(neighbour)
            time.sleep(2.0)
            print("step 4 held:", json.dumps(held_report.get("error")))
            print("step 4 neighbour kernels:", neighbour_report.get("kernels"))
            assert "faulted_at" not in held_report, "ended before its fault"
            assert "terminated" in str(held_report.get("error", "")).lower(), held_report
            assert "error" not in neighbour_report, neighbour_report
            assert int(neighbour_report["kernels"]) > 0
            assert arrived.empty(), "no further fault"
            assert observability.client_policy is not None
            recent = observability.client_policy.describe()["recent"]
            assert any(
                entry["pod"] == CRASHER and entry["action"] == "ended" and entry["reason"] == "held"
                for entry in recent
            ), recent
        finally:
            monitor.stop()
            observability.stop()
            backend.close()
            fault_log.close()
    print(
        json.dumps(
            {
                "test": "offender",
                "device": node.gpus[0].model,
                "faults": [
                    (e.xid, e.culprit.pid, e.culprit.evidence, list(e.pods)) for e in events
                ],
                "held": list(offenders.held()),
            }
        )
    )
