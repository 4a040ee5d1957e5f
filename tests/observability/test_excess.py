"""Which MPS clients a pod runs beyond its allowance (pure): clients_per_vgpu per vGPU held
on the GPU, the newest beyond that first, a held pod's every client, pods whose containers
share a GPU counted together, and clients of no pod only ever reported."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import pytest

from vgpu_agent.observability.attribution import (
    Attribution,
    ContainerUsage,
    PodGpuUsage,
    StrayProcess,
)
from vgpu_agent.observability.excess import (
    EXCESS,
    HELD,
    UNATTRIBUTED,
    client_groups,
    excess_clients,
)

GPU_A = "GPU-aaaaaaaa-0000-4000-8000-000000000001"
GPU_B = "GPU-bbbbbbbb-0000-4000-8000-000000000002"
UID_WEB = "11111111-0000-4000-8000-000000000001"
UID_JOB = "22222222-0000-4000-8000-000000000002"
#: pid -> start time (seconds since boot): the higher pids started later, except 30.
STARTS = {10: 100.0, 11: 200.0, 12: 300.0, 13: 400.0, 30: 50.0, 31: 60.0, 40: 70.0}


def _container(
    uid: str, name: str, gpu: str, vgpus: int, pids: tuple[int, ...], *, shared: bool = False
) -> ContainerUsage:
    return ContainerUsage(
        namespace="ns",
        pod="web" if uid == UID_WEB else "job",
        container=name,
        pod_uid=uid,
        gpu_uuid=gpu,
        vgpu_ids=tuple(f"{gpu}::{index}" for index in range(vgpus)),
        thread_limit_percent=12.5,
        memory_limit_mib=10194,
        pids=() if shared else pids,
        memory_used_mib=None,
        memory_shared_with=("other",) if shared else (),
    )


def _pod(uid: str, gpu: str, containers: tuple[str, ...], pids: tuple[int, ...]) -> PodGpuUsage:
    return PodGpuUsage(
        namespace="ns",
        pod="web" if uid == UID_WEB else "job",
        pod_uid=uid,
        gpu_uuid=gpu,
        containers=containers,
        pids=pids,
        memory_used_mib=None,
    )


def _one_pod(vgpus: int, pids: tuple[int, ...], gpu: str = GPU_A) -> Attribution:
    """Pod ns/web with one container "app" holding ``vgpus`` on ``gpu``, running ``pids``."""
    return Attribution(
        containers=(_container(UID_WEB, "app", gpu, vgpus, pids),),
        pods=(_pod(UID_WEB, gpu, ("app",), pids),),
    )


def _decide(
    attribution: Attribution,
    clients_per_vgpu: int = 1,
    held: Optional[Mapping[str, str]] = None,
    skip: tuple[tuple[str, int], ...] = (),
) -> list[tuple[int, str]]:
    found = excess_clients(
        attribution,
        clients_per_vgpu=clients_per_vgpu,
        held=held or {},
        started=STARTS.get,
        skip=skip,
    )
    return [(client.pid, client.reason) for client in found]


@pytest.mark.parametrize(
    ("vgpus", "clients_per_vgpu", "pids", "expected"),
    [
        (1, 1, (10,), []),
        (1, 1, (10, 11, 12, 13), [(13, EXCESS), (12, EXCESS), (11, EXCESS)]),
        (1, 1, (13, 12, 11, 10), [(13, EXCESS), (12, EXCESS), (11, EXCESS)]),
        (2, 1, (10, 11, 12), [(12, EXCESS)]),
        (1, 3, (10, 11, 12, 13), [(13, EXCESS)]),
        (2, 2, (10, 11, 12, 13), []),
        (1, 1, (30, 10), [(10, EXCESS)]),
    ],
    ids=[
        "one-of-one",
        "four-on-one-newest-first",
        "pid-order-does-not-matter",
        "three-on-two",
        "clients-per-vgpu-3",
        "four-on-two-times-two",
        "start-time-not-pid-decides",
    ],
)
def test_clients_beyond_the_allowance_are_the_newest(
    vgpus: int, clients_per_vgpu: int, pids: tuple[int, ...], expected: list[tuple[int, str]]
) -> None:
    """A pod may run clients_per_vgpu x its vGPUs; the oldest run on, the rest come newest
    first."""
    assert _decide(_one_pod(vgpus, pids), clients_per_vgpu) == expected


def test_an_excess_client_says_who_and_why() -> None:
    """Each excess client names its GPU, pod, container, start time and the numbers."""
    (client,) = excess_clients(
        _one_pod(1, (10, 11)), clients_per_vgpu=1, held={}, started=STARTS.get
    )
    assert (client.gpu_uuid, client.pid, client.pod_uid) == (GPU_A, 11, UID_WEB)
    assert (client.pod, client.container, client.started_s) == ("ns/web", "app", 200.0)
    assert client.why == (
        "2 MPS clients on 1 vGPU(s) of this GPU, 1 allowed (isolation.clients_per_vgpu = 1)"
    )
    assert client.endable


def test_an_unknown_start_counts_as_the_newest() -> None:
    """A client whose start time cannot be read goes first; ties go by pid."""
    assert _decide(_one_pod(1, (10, 99, 98))) == [(99, EXCESS), (98, EXCESS)]


def test_a_held_pod_may_run_no_client() -> None:
    """Every client of a pod the fault policy holds is acted on, with its reason."""
    attribution = _one_pod(1, (10, 11))
    found = excess_clients(
        attribution, clients_per_vgpu=4, held={UID_WEB: "3 faults in 10 min"}, started=STARTS.get
    )
    assert [(client.pid, client.reason) for client in found] == [(11, HELD), (10, HELD)]
    assert found[0].why == "pod held at 0 MPS clients: 3 faults in 10 min"
    assert _decide(attribution, held={UID_JOB: "another pod"}) == [(11, EXCESS)]


def test_containers_of_one_pod_sharing_a_gpu_are_counted_together() -> None:
    """Two containers of a pod on one GPU (their processes cannot be told apart): they may
    run what their vGPUs together allow, and an excess client names both."""
    attribution = Attribution(
        containers=(
            _container(UID_WEB, "app", GPU_A, 1, (), shared=True),
            _container(UID_WEB, "sidecar", GPU_A, 1, (), shared=True),
        ),
        pods=(_pod(UID_WEB, GPU_A, ("app", "sidecar"), (10, 11, 12)),),
    )
    (group,) = client_groups(attribution, 1, {})
    assert (group.vgpus, group.allowed, group.containers) == (2, 2, ("app", "sidecar"))
    (client,) = excess_clients(attribution, clients_per_vgpu=1, held={}, started=STARTS.get)
    assert (client.pid, client.container) == (12, "app,sidecar")


def test_each_pod_and_gpu_is_its_own_group() -> None:
    """A pod's clients on two GPUs are counted per GPU; another pod's apart from it."""
    attribution = Attribution(
        containers=(
            _container(UID_WEB, "app", GPU_A, 1, (10, 11)),
            _container(UID_WEB, "app", GPU_B, 1, (30,)),
            _container(UID_JOB, "main", GPU_A, 1, (31, 40)),
        ),
        pods=(
            _pod(UID_WEB, GPU_A, ("app",), (10, 11)),
            _pod(UID_WEB, GPU_B, ("app",), (30,)),
            _pod(UID_JOB, GPU_A, ("main",), (31, 40)),
        ),
    )
    found = excess_clients(attribution, clients_per_vgpu=1, held={}, started=STARTS.get)
    assert [(client.gpu_uuid, client.pid, client.pod) for client in found] == [
        (GPU_A, 11, "ns/web"),
        (GPU_A, 40, "ns/job"),
    ]


def test_clients_of_no_pod_are_only_reported() -> None:
    """A client no pod holding the GPU's vGPUs accounts for is listed, never endable."""
    attribution = Attribution(
        strays=(StrayProcess(77, GPU_A, 500, "not in a pod (a host process, or it has exited)"),)
    )
    (client,) = excess_clients(attribution, clients_per_vgpu=1, held={}, started=STARTS.get)
    assert (client.pid, client.reason, client.pod, client.endable) == (77, UNATTRIBUTED, "", False)
    assert client.why.endswith("not in a pod (a host process, or it has exited)")


def test_clients_ended_already_neither_count_nor_come_back() -> None:
    """An ended client NVML still lists is skipped: the next newcomer is the excess one,
    and the pod's older clients are not taken for excess in its place."""
    attribution = _one_pod(1, (10, 11, 12))
    assert _decide(attribution, skip=((GPU_A, 11), (GPU_A, 12))) == []
    assert _decide(_one_pod(1, (10, 11, 13)), skip=((GPU_A, 11),)) == [(13, EXCESS)]
    assert _decide(_one_pod(2, (10, 11, 13)), skip=((GPU_A, 11),)) == []


def test_pods_without_a_uid_or_clients_make_no_group() -> None:
    """Without the checkpoint there are no pod UIDs and no clients are attributed: no group."""
    attribution = Attribution(
        containers=(_container("", "app", GPU_A, 1, ()),),
        pods=(_pod("", GPU_A, ("app",), ()),),
    )
    assert client_groups(attribution, 1, {}) == []
