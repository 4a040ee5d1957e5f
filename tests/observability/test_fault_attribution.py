"""What the fault log asks of the attribution and tells the metrics (issue 20 item 2): the
MPS clients on a GPU and their pods, the pod of a running process from its cgroup (also when
/proc hides it), the pods present, and the culprit and offender metrics."""

from __future__ import annotations

import functools
from dataclasses import replace

from tests.harness import scrape_metrics
from tests.observability.test_observability import CID, UID, _Node, node  # noqa: F401
from vgpu_agent.config.schema import MetricsConfig
from vgpu_agent.model.devices import MpsGrantPolicy
from vgpu_agent.model.pods import PodRef
from vgpu_agent.observability.attribution import gather
from vgpu_agent.observability.podresources import list_pod_resources
from vgpu_agent.observability.service import AgentCounts, Observability

OTHER_UID = "99999999-8888-7777-6666-555555555555"


def _cgroup_path(uid: str) -> str:
    return (
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
        f"{uid.replace('-', '_')}.slice/cri-containerd-{CID}.scope"
    )


def _observability(node: _Node, metrics: MetricsConfig) -> Observability:  # noqa: F811
    proc = node.root / "proc"
    cgroup = node.root / "cgroup"
    for pid, uid in ((4242, UID), (5555, OTHER_UID)):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cgroup").write_text(f"0::/{_cgroup_path(uid)}\n")
    hidden = cgroup / _cgroup_path(OTHER_UID)
    hidden.mkdir(parents=True)
    (hidden / "cgroup.procs").write_text("6666\n")
    return Observability(
        node.config(metrics=metrics),
        inventory=lambda: node.inventory,
        counts=lambda: AgentCounts(True),
        policy=MpsGrantPolicy,
        list_pods=list_pod_resources,
        gather_attribution=functools.partial(gather, proc_root=str(proc), cgroup_root=str(cgroup)),
        proc_root=str(proc),
        cgroup_root=str(cgroup),
    )


def test_the_clients_and_pods_the_fault_log_reads(node: _Node) -> None:  # noqa: F811
    """Clients by pid with their pod; a process's pod from /proc, or from the cgroup tree
    when /proc hides it, named as the attribution names it; the pods present once an
    attribution was taken."""
    observability = _observability(node, MetricsConfig())
    gpu0, gpu1 = (served.gpu.uuid for served in node.inventory.gpus)
    node.backend.add_mps_client(gpu0, 4242, 100)
    assert observability.pods_present() is None, "no attribution yet"
    observability.start(node.backend)
    try:
        observability.fresh(10.0)
        assert observability.clients_on(gpu0) == {4242: PodRef(UID, "ns/web")}
        assert observability.clients_on(gpu1) == {}
        assert observability.pod_of_process(4242) == PodRef(UID, "ns/web")
        assert observability.pod_of_process(5555) == PodRef(OTHER_UID, "")
        assert observability.pod_of_process(6666) == PodRef(OTHER_UID, "")
        assert observability.pod_of_process(7777) is None
        present = observability.pods_present()
        assert present is not None
        assert present.pod_uids == frozenset({UID})
        assert 0.0 <= present.age_s < 10.0
    finally:
        observability.stop()


def test_culprits_and_offenders_are_metrics(node: _Node) -> None:  # noqa: F811
    """The culprit counter, the offenders counter and the held gauge, which outlives a
    restart of the metrics endpoint and forgets a released pod."""
    observability = _observability(node, MetricsConfig(enabled=True, listen_address="127.0.0.1:0"))
    gpu0 = node.inventory.gpus[0].gpu.uuid
    observability.start(node.backend)
    try:
        observability.record_culprit(gpu0, "ns/web")
        observability.record_culprit(gpu0, "")
        observability.record_offender(UID, "ns/web", held=True)
        observability.record_offender(OTHER_UID, "ns/other", held=False)
        samples = scrape_metrics(observability.metrics_address)
        assert samples[f"vgpu_mps_fault_culprits_total{{gpu_uuid={gpu0},pod=ns/web}}"] == 1
        assert samples[f"vgpu_mps_fault_culprits_total{{gpu_uuid={gpu0},pod=}}"] == 1
        assert samples["vgpu_mps_offenders_total{action=hold,pod=ns/web}"] == 1
        assert samples["vgpu_mps_offenders_total{action=report,pod=ns/other}"] == 1
        assert samples[f"vgpu_mps_offender_held{{pod=ns/web,pod_uid={UID}}}"] == 1
        assert not any(key.startswith("vgpu_mps_offender_held{pod=ns/other") for key in samples)
        config = observability._config
        textfile = str(node.root / "vgpu.prom")
        observability.reconfigure(
            replace(config, metrics=replace(config.metrics, textfile_path=textfile))
        )
        samples = scrape_metrics(observability.metrics_address)
        assert samples[f"vgpu_mps_offender_held{{pod=ns/web,pod_uid={UID}}}"] == 1
        observability.release_offender(UID)
        samples = scrape_metrics(observability.metrics_address)
        assert not any(key.startswith("vgpu_mps_offender_held{") for key in samples)
    finally:
        observability.stop()
