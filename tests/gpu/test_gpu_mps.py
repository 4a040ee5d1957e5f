"""On a real NVIDIA GPU: the agent's NVML backend, its MPS daemons, and containers confined
to what Allocate grants them. Run with scripts/test-gpu (see tests/gpu/conftest.py)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from typing import Any, Callable

import pytest

from vgpu_agent.agent.health import HealthChange, HealthMonitor
from vgpu_agent.config.plan import daemon_ceiling
from vgpu_agent.config.schema import HealthConfig
from vgpu_agent.model.daemons import FULL_PROBE_INTERVAL_S, check_now
from vgpu_agent.model.devices import HEALTHY, UNHEALTHY
from vgpu_agent.model.errors import GpuLostError
from vgpu_agent.model.gpu import ComputeMode, Gpu
from vgpu_agent.mps.directories import daemon_pid
from vgpu_agent.mps.liveness import process_state

from .conftest import CONTAINER_PIPE_DIR, REPLICAS, Node, memory_limit_mib

pytestmark = pytest.mark.gpu
AS_UID_1000 = ("setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups")
NodeFactory = Callable[..., Node]


def _under_mps(report: dict[str, Any], limit_mib: int) -> bool:
    # Without MPS a client sees the whole GPU free; under MPS its pinned limit caps it.
    return bool(report["free_mib"] <= limit_mib)


def test_nvml_backend_reads_the_gpus(gpus: list[Gpu]) -> None:
    """NvmlBackend lists the GPUs, reads compute mode, checks them, and waits for events."""
    from vgpu_agent.gpus.nvml import NvmlBackend

    backend = NvmlBackend()
    try:
        listed = backend.list_gpus()
        assert [gpu.index for gpu in listed] == list(range(len(listed)))
        for gpu in listed:
            assert gpu.uuid.startswith("GPU-")
            assert gpu.memory_mib > 1024
            assert gpu.compute_capability >= (7, 0)
            assert gpu.pci_bus_id
            assert isinstance(backend.get_compute_mode(gpu.uuid), ComputeMode)
            backend.check(gpu.uuid)
        with pytest.raises(GpuLostError):
            backend.check("GPU-00000000-0000-0000-0000-000000000000")
        unwatched = backend.watch_events([gpu.uuid for gpu in listed])
        assert set(unwatched) <= {gpu.uuid for gpu in listed}
        started = time.monotonic()
        assert backend.wait_events(0.3) == []
        assert 0.2 <= time.monotonic() - started < 5.0
    finally:
        backend.close()


def test_clients_get_their_memory_share_and_no_more(make_node: NodeFactory) -> None:
    """1 of 4 vGPUs allocates just under a quarter of the GPU and fails above; 2 of 4 twice that."""
    node = make_node()
    one_grant = node.allocate(0, 1, first=0)
    two_grant = node.allocate(0, 2, first=1)
    one_mib = memory_limit_mib(one_grant)
    two_mib = memory_limit_mib(two_grant)
    assert one_mib == node.gpus[0].memory_mib // REPLICAS
    assert two_mib == node.gpus[0].memory_mib * 2 // REPLICAS
    # The client's own CUDA context counts against its limit (about 0.7 GiB with torch).
    clients = [
        node.start_client(
            grant, 1000, label, ["--alloc-mib", str(mib - 1024), "--alloc-mib", str(mib + 256)]
        )
        for grant, mib, label in ((one_grant, one_mib, "one"), (two_grant, two_mib, "two"))
    ]
    one, two = (client.result() for client in clients)
    for report, mib in ((one, one_mib), (two, two_mib)):
        assert _under_mps(report, mib), report
        assert [allocation["ok"] for allocation in report["allocations"]] == [True, False]
        assert "out of memory" in report["allocations"][1]["error"]
    assert two["allocations"][0]["mib"] > one_mib


def test_several_clients_share_one_daemon_at_once(make_node: NodeFactory) -> None:
    """Four clients of different users run at the same time through the GPU's one daemon."""
    node = make_node()
    clients = [
        node.start_client(node.allocate(0, 1, first=index), uid, f"c{index}", ["--hold-s", "6"])
        for index, uid in enumerate((0, 1000, 2000, 1000))
    ]
    node.wait_for_clients(0, 4)
    servers = node.control(0, "get_server_list").split()
    assert len(servers) == 1
    assert len(node.client_pids(0)) == 4
    reports = [client.result() for client in clients]
    limit_mib = node.gpus[0].memory_mib // REPLICAS
    assert all(_under_mps(report, limit_mib) for report in reports)
    assert max(report["first_kernel"] for report in reports) < min(
        report["held_until"] for report in reports
    )


def test_pipe_dir_works_for_a_non_root_pod_that_cannot_control_the_daemon(
    make_node: NodeFactory,
) -> None:
    """A uid-1000 pod runs under MPS through the mounted pipe dir but cannot quit the daemon."""
    node = make_node()
    pipe_dir = node.state.inventory().gpus[0].pipe_dir
    assert pipe_dir is not None
    assert stat.S_IMODE(os.stat(pipe_dir).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(os.path.join(pipe_dir, "control")).st_mode) == 0o666
    assert stat.S_IMODE(os.stat(os.path.join(pipe_dir, "control_lock")).st_mode) == 0o600
    grant = node.allocate(0, 1)
    assert dict(grant.envs)["CUDA_MPS_PIPE_DIRECTORY"] == CONTAINER_PIPE_DIR
    assert [(m.host_path, m.container_path) for m in grant.mounts] == [
        (pipe_dir, CONTAINER_PIPE_DIR)
    ]
    report = node.start_client(grant, 1000, "uid1000", ["--alloc-mib", "1024"]).result()
    assert report["uid"] == 1000
    assert _under_mps(report, memory_limit_mib(grant))
    assert report["allocations"][0]["ok"]
    attempt = subprocess.run(
        [
            "setpriv",
            "--reuid",
            "1000",
            "--regid",
            "1000",
            "--clear-groups",
            "nvidia-cuda-mps-control",
        ],
        input="quit\n",
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": pipe_dir},
        timeout=10,
        check=False,
    )
    assert "privilege" in (attempt.stdout + attempt.stderr).lower()
    assert check_now(node.daemons, node.gpus[0].uuid) is None


def _overlap_run(node: Node, holder_s: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    # A uid-1000 pod holds the GPU; a root pod and a uid-2000 pod arrive meanwhile.
    holder = node.start_client(
        node.allocate(0, 1, first=0), 1000, "holder", ["--hold-s", str(holder_s)]
    )
    node.wait_for_clients(0, 1)
    late = [
        node.start_client(
            node.allocate(0, 1, first=index),
            uid,
            f"uid{uid}",
            ["--hold-s", "1", "--alloc-mib", "4096"],
        )
        for index, uid in ((1, 0), (2, 2000))
    ]
    return holder.result(), [client.result() for client in late]


def test_users_share_the_gpu_at_once_in_multi_user_mode(make_node: NodeFactory) -> None:
    """With -M, root and uid-2000 pods get the GPU while a uid-1000 pod still holds it."""
    node = make_node(multi_user=True)
    holder, late = _overlap_run(node, holder_s=8.0)
    limit_mib = node.gpus[0].memory_mib // REPLICAS
    for report in late:
        assert report["first_kernel"] < holder["held_until"], (report, holder)
        assert _under_mps(report, limit_mib)
        assert report["allocations"][0]["ok"]
    assert _under_mps(holder, limit_mib)


def test_users_queue_without_multi_user_mode(make_node: NodeFactory) -> None:
    """Without -M, a pod of another user waits until the holder's pod has finished."""
    node = make_node(multi_user=False)
    holder, late = _overlap_run(node, holder_s=6.0)
    for report in late:
        assert report["first_kernel"] > holder["held_until"], (report, holder)
        assert report["first_kernel"] - report["start"] > 3.0


def _watch_health(node: Node) -> HealthMonitor:
    from vgpu_agent.gpus.nvml import NvmlBackend

    def emit(change: HealthChange) -> None:
        node.state.update(
            lambda inventory: inventory.with_reason(change.gpu_uuid, change.reason, change.present)
        )

    monitor = HealthMonitor(
        NvmlBackend(),
        node.daemons,
        HealthConfig(mps_check_interval_s=0.2),
        [gpu.uuid for gpu in node.gpus],
        emit=emit,
    )
    monitor.start()
    return monitor


def _all_gpu0(node: Node, health: str) -> Callable[[Any], bool]:
    ids = set(node.vgpu_ids(0))
    return lambda devices: all(d.health == health for d in devices if d.device_id in ids)


def test_killed_daemon_turns_the_vgpus_unhealthy_until_restarted(make_node: NodeFactory) -> None:
    """Kill the GPU's MPS daemon: the kubelet sees its vGPUs Unhealthy; restart: Healthy."""
    node = make_node()
    monitor = _watch_health(node)
    try:
        pipe_dir = node.state.inventory().gpus[0].pipe_dir
        assert pipe_dir is not None
        pid = daemon_pid(pipe_dir)
        assert pid is not None
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        node.standin.wait_for_devices(_all_gpu0(node, UNHEALTHY), 5.0)
        print(f"killed daemon -> Unhealthy at the kubelet in {time.monotonic() - killed:.2f} s")
        reason = check_now(node.daemons, node.gpus[0].uuid)
        assert reason is not None
        node.daemons.start(node.gpus[0])
        # As the unit's ExecStartPost (or the agent) does: the new daemon gets the ceiling.
        node.daemons.apply_defaults(
            node.gpus[0], daemon_ceiling(node.config.mps, node.gpus[0].memory_mib, REPLICAS)
        )
        # A full probe that ran before the ceiling was back reports it lost once; the next
        # one, FULL_PROBE_INTERVAL_S later, sees it held.
        node.standin.wait_for_devices(_all_gpu0(node, HEALTHY), FULL_PROBE_INTERVAL_S + 7.0)
        grant = node.allocate(0, 1)
        report = node.start_client(grant, 0, "after-restart").result()
        assert _under_mps(report, memory_limit_mib(grant))
    finally:
        monitor.stop()


def test_stopped_daemon_is_reported_at_once(make_node: NodeFactory) -> None:
    """A SIGSTOPped (hung) daemon is reported by the quick check, well within 1 s, and recovers."""
    node = make_node()
    pipe_dir = node.state.inventory().gpus[0].pipe_dir
    assert pipe_dir is not None
    pid = daemon_pid(pipe_dir)
    assert pid is not None
    # The check the health loop runs every half second is the quick part of this one.
    assert check_now(node.daemons, node.gpus[0].uuid) is None
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 2.0
        while process_state(pid) not in ("T", "t") and time.monotonic() < deadline:
            time.sleep(0.01)  # the signal takes effect asynchronously
        started = time.monotonic()
        reason = check_now(node.daemons, node.gpus[0].uuid)
        elapsed_s = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    assert reason is not None
    assert "stopped" in reason
    print(f"stopped daemon reported by the probe in {elapsed_s * 1000:.1f} ms")
    assert elapsed_s < 1.0
    assert check_now(node.daemons, node.gpus[0].uuid) is None


def test_client_sees_only_its_gpu(make_node: NodeFactory, gpus: list[Gpu]) -> None:
    """On a node of several GPUs, a client granted vGPUs of one GPU sees that GPU alone."""
    if len(gpus) < 2:
        pytest.skip("needs at least 2 GPUs")
    node = make_node()
    reports = [
        node.start_client(node.allocate(index, 1), 1000, f"gpu{index}").result()
        for index in range(len(gpus))
    ]
    for gpu, report in zip(gpus, reports):
        assert report["device_count"] == 1
        assert report["device_uuid"] == gpu.uuid


def test_daemon_defaults_confine_a_client_that_brings_no_limits(make_node: NodeFactory) -> None:
    """With enforced confinement (one vGPU per container), a client reaching the daemon
    without the limits Allocate gives is still held to one vGPU's memory share."""
    node = make_node(max_vgpus_per_container=1)
    slice_mib = node.gpus[0].memory_mib // REPLICAS
    print(
        "get_default_active_thread_percentage ->",
        node.control(0, "get_default_active_thread_percentage"),
    )
    print(
        "get_default_device_pinned_mem_limit 0 ->",
        node.control(0, "get_default_device_pinned_mem_limit 0"),
    )
    grant = node.allocate(0, 1)
    bare = type(grant)()
    bare.CopyFrom(grant)
    del bare.envs["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"]
    del bare.envs["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"]
    report = node.start_client(bare, 1000, "bare", ["--alloc-mib", str(slice_mib + 256)]).result()
    print(f"client without limits: {report['free_mib']} MiB free, slice {slice_mib} MiB")
    assert _under_mps(report, slice_mib), report
    assert report["free_mib"] > slice_mib // 2
    assert [allocation["ok"] for allocation in report["allocations"]] == [False]
