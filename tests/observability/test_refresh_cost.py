"""What keeps a refresher that looks every second cheap, while the per-pod client policy
acts: the PodResources answer is reused until the kubelet's checkpoint changes (or it is
too old), the cgroup tree is walked only for a hidden client not seen before, and the
passes between full refreshes write no textfile."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pytest

from tests.builders import make_inventory, vgpu_id
from tests.observability.test_attribution import CID, G0, INVENTORY, POLICY, RESOURCE, UID_A
from vgpu_agent.config.schema import (
    AttributionConfig,
    Config,
    IsolationConfig,
    MetricsConfig,
    MpsConfig,
    PluginConfig,
)
from vgpu_agent.model.devices import MpsGrantPolicy
from vgpu_agent.model.errors import AttributionError
from vgpu_agent.observability.attribution import ContainerDevices, PodListCache, gather
from vgpu_agent.observability.cgroups import PodCgroup
from vgpu_agent.observability.checkpoint import CHECKPOINT_NAME, read_checkpoint
from vgpu_agent.observability.service import AgentCounts, Observability
from vgpu_agent.standins.podresources import StandinContainer, StandinPod, checkpoint_text
from vgpu_agent.standins.simulated import SimulatedBackend

DEVICES = [ContainerDevices("ns", "a", "main", RESOURCE, (vgpu_id(0, 1),))]


class Kubelet:
    """Counts the PodResources calls; fails them on request."""

    def __init__(self) -> None:
        self.calls = 0
        self.failing: Optional[str] = None

    def list_pods(self, socket_path: str, resource_name: str) -> list[ContainerDevices]:
        self.calls += 1
        if self.failing is not None:
            raise AttributionError(self.failing)
        return list(DEVICES)


def _write_checkpoint(path: Path, uids: tuple[str, ...]) -> None:
    pods = [
        StandinPod("ns", uid[:4], uid, (StandinContainer("main", RESOURCE, ("g::1",)),))
        for uid in uids
    ]
    temporary = path.with_suffix(".tmp")
    temporary.write_text(checkpoint_text(pods))
    os.replace(temporary, path)


def test_the_pod_list_is_asked_again_only_when_the_checkpoint_changed(tmp_path: Path) -> None:
    """Within max_age the answer is reused while the checkpoint stays; a new allocation
    (the kubelet rewrites its checkpoint) or the age asks again; max_age 0 always asks."""
    now = [0.0]
    checkpoint = tmp_path / CHECKPOINT_NAME
    _write_checkpoint(checkpoint, (UID_A,))
    kubelet = Kubelet()
    cache = PodListCache(lambda: now[0])
    lister = cache.lister(kubelet.list_pods, str(checkpoint), 10.0)
    assert lister("s", RESOURCE) == DEVICES
    assert lister("s", RESOURCE) == DEVICES
    assert kubelet.calls == 1
    _write_checkpoint(checkpoint, (UID_A, "bbbbbbbb-0000-0000-0000-000000000002"))
    lister("s", RESOURCE)
    assert kubelet.calls == 2
    now[0] += 10.0
    lister("s", RESOURCE)
    assert kubelet.calls == 3
    cache.lister(kubelet.list_pods, str(checkpoint), 0.0)("s", RESOURCE)
    assert kubelet.calls == 4


def test_a_failed_or_unreadable_answer_is_never_reused(tmp_path: Path) -> None:
    """A PodResources error is raised and not kept; without a checkpoint every call asks."""
    kubelet = Kubelet()
    checkpoint = tmp_path / CHECKPOINT_NAME
    _write_checkpoint(checkpoint, (UID_A,))
    lister = PodListCache(lambda: 0.0).lister(kubelet.list_pods, str(checkpoint), 10.0)
    kubelet.failing = "kubelet PodResources socket gone"
    with pytest.raises(AttributionError):
        lister("s", RESOURCE)
    kubelet.failing = None
    lister("s", RESOURCE)
    assert kubelet.calls == 2
    missing = PodListCache(lambda: 0.0).lister(kubelet.list_pods, str(tmp_path / "none"), 10.0)
    missing("s", RESOURCE)
    missing("s", RESOURCE)
    assert kubelet.calls == 4


def test_hidden_clients_are_looked_up_in_the_cgroup_tree_once(tmp_path: Path) -> None:
    """A client /proc hides is found in the cgroup tree, then remembered: with the tree
    gone it is still found; once it is no client any more it is forgotten."""
    backend = SimulatedBackend([served.gpu for served in INVENTORY.gpus])
    backend.add_mps_client(G0, 300, 700)
    backend.add_mps_client(G0, 301, 10)
    cgroups = tmp_path / "cgroup"
    scope = cgroups / (
        f"kubepods.slice/kubepods-pod{UID_A.replace('-', '_')}.slice/cri-containerd-{CID}.scope"
    )
    scope.mkdir(parents=True)
    (scope / "cgroup.procs").write_text("300\n")
    checkpoint = tmp_path / CHECKPOINT_NAME
    pods = [StandinPod("ns", "a", UID_A, (StandinContainer("main", RESOURCE, (vgpu_id(0, 1),)),))]
    checkpoint.write_text(checkpoint_text(pods))
    known: dict[int, Optional[PodCgroup]] = {}

    def once() -> tuple[tuple[int, ...], list[int]]:
        result = gather(
            backend=backend,
            inventory=INVENTORY,
            policy=POLICY,
            resource_name=RESOURCE,
            pod_resources_socket="unused",
            checkpoint_path=str(checkpoint),
            list_pods=lambda socket_path, resource: list(DEVICES),
            read_checkpoint_at=read_checkpoint,
            proc_root=str(tmp_path / "empty-proc"),
            cgroup_root=str(cgroups),
            hidden_cgroups=known,
        )
        (usage,) = result.containers
        return usage.pids, [stray.pid for stray in result.strays]

    assert once() == ((300,), [301])
    assert known == {300: PodCgroup(UID_A, CID, "guaranteed"), 301: None}
    (scope / "cgroup.procs").unlink()
    scope.rmdir()
    assert once() == ((300,), [301]), "remembered, not walked again"
    backend.remove_mps_client(300)
    once()
    assert set(known) == {301}


def _observability(root: Path, kubelet: Kubelet, **isolation: object) -> Observability:
    config = Config(
        plugin=PluginConfig(plugin_dir=str(root)),
        attribution=AttributionConfig(pod_resources_socket=str(root / "pr.sock")),
        metrics=MetricsConfig(enabled=True, listen_address="", textfile_path=str(root / "v.prom")),
        mps=MpsConfig(),
        isolation=IsolationConfig(**isolation),  # type: ignore[arg-type]
    )
    return Observability(
        config,
        inventory=lambda: make_inventory((4,)),
        counts=lambda: AgentCounts(True),
        policy=MpsGrantPolicy,
        list_pods=kubelet.list_pods,
        end_client=lambda mps, gpu_uuid, pid: None,
    )


def test_checks_between_full_refreshes_reuse_the_pod_list_and_write_no_textfile(
    tmp_path: Path,
) -> None:
    """While the policy acts, the refresher looks every check interval; a check that is no
    full refresh asks no PodResources (checkpoint unchanged) and writes no textfile."""
    _write_checkpoint(tmp_path / CHECKPOINT_NAME, (UID_A,))
    kubelet = Kubelet()
    observability = _observability(tmp_path, kubelet, check_interval_s=0.5)
    assert observability._interval() == 0.5
    observability._backend = SimulatedBackend([served.gpu for served in make_inventory((4,)).gpus])
    observability._start_metrics()
    try:
        observability.refresh_once(full=True)
        textfile = tmp_path / "v.prom"
        assert textfile.exists()
        textfile.unlink()
        observability.refresh_once(full=False)
        assert kubelet.calls == 1
        assert not textfile.exists()
        # Right after a full refresh the next pass is a check, not a full refresh.
        assert observability._due() == (False, True)
    finally:
        observability._stop_metrics()
    cooperative = _observability(tmp_path, kubelet, check_interval_s=0.5)
    cooperative.reconfigure(
        Config(
            plugin=PluginConfig(plugin_dir=str(tmp_path)),
            mps=MpsConfig(confinement="cooperative"),
        )
    )
    assert cooperative._interval() == 10.0, "no policy, no faster refresh"
    assert cooperative._due() == (True, True), "a reload asks for a refresh"
    assert cooperative._due() == (False, False), "then only readers do"


def test_a_quiet_check_only_lists_the_clients(tmp_path: Path) -> None:
    """Between full refreshes a check gathers only when NVML lists other clients than the
    last attribution did, or the policy has a retry waiting."""
    _write_checkpoint(tmp_path / CHECKPOINT_NAME, (UID_A,))
    kubelet = Kubelet()
    observability = _observability(tmp_path, kubelet, check_interval_s=0.5)
    backend = SimulatedBackend([served.gpu for served in make_inventory((4,)).gpus])
    observability._backend = backend
    uuid0 = make_inventory((4,)).gpus[0].gpu.uuid
    backend.add_mps_client(uuid0, 300, 10)
    assert observability._check_due(), "a client the last attribution did not have"
    observability.refresh_once(full=True)
    assert not observability._check_due(), "nothing came or went"
    backend.remove_mps_client(300)
    assert observability._check_due(), "a client went"
    observability.refresh_once(full=False)
    assert not observability._check_due()
    backend.fail_calls("driver gone")
    assert observability._check_due(), "NVML fails: the gather says why"
