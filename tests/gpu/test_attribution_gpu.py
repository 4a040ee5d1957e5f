"""On a real NVIDIA GPU: two MPS clients placed in pod-shaped cgroup v2 directories are
attributed to the right containers, with the GPU memory each really holds.

The cgroups are created under a private parent in /sys/fs/cgroup (one containerd/systemd
shape, one cgroupfs shape), the clients are started inside them, and a PodResources
stand-in and a kubelet checkpoint name the two pods. Everything is removed at the end.
Skipped, with the reason, where cgroup v2 is not writable.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from vgpu_agent.config.plan import grant_policy
from vgpu_agent.model.errors import GpuError
from vgpu_agent.observability.attribution import Attribution, gather
from vgpu_agent.observability.podresources import list_pod_resources
from vgpu_agent.standins.podresources import PodResourcesStandin, StandinContainer, StandinPod

from .conftest import RESOURCE, Node

pytestmark = pytest.mark.gpu
NodeFactory = Callable[..., Node]
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: Device memory each client keeps while it runs: different, so a swap would show.
KEEP_MIB = {"alpha": 1024, "beta": 3072}
#: A CUDA context and the client's own tensors come on top of what it keeps.
CONTEXT_ALLOWANCE_MIB = 1536


def _why_no_cgroup_v2() -> str:
    if not (CGROUP_ROOT / "cgroup.controllers").exists():
        return "cgroup v2 is not mounted at /sys/fs/cgroup"
    probe = CGROUP_ROOT / f"vgpu-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError as exc:
        return f"cannot create a cgroup under /sys/fs/cgroup: {exc.strerror}"
    probe.rmdir()
    return ""


@pytest.fixture
def pod_cgroups() -> Iterator[dict[str, tuple[str, Path]]]:
    """Two pod-shaped leaf cgroups under a private parent: {label: (pod UID, leaf dir)}."""
    reason = _why_no_cgroup_v2()
    if reason:
        pytest.skip(reason)
    parent = CGROUP_ROOT / f"vgpu-test-{uuid.uuid4().hex[:8]}"
    uid_alpha, uid_beta = str(uuid.uuid4()), str(uuid.uuid4())
    alpha = (
        parent
        / "kubepods.slice"
        / "kubepods-burstable.slice"
        / f"kubepods-burstable-pod{uid_alpha.replace('-', '_')}.slice"
        / f"cri-containerd-{uuid.uuid4().hex}{uuid.uuid4().hex}.scope"
    )
    beta = parent / "kubepods" / "besteffort" / f"pod{uid_beta}" / (uuid.uuid4().hex * 2)
    alpha.mkdir(parents=True)
    beta.mkdir(parents=True)
    yield {"alpha": (uid_alpha, alpha), "beta": (uid_beta, beta)}
    _remove_cgroup_tree(parent)


def _remove_cgroup_tree(parent: Path) -> None:
    """Remove the test's cgroups, leaves first; processes still inside go back to the root."""
    directories = sorted(
        (path for path in parent.rglob("*") if path.is_dir()),
        key=lambda path: len(path.parts),
        reverse=True,
    )
    for directory in [*directories, parent]:
        deadline = time.monotonic() + 10.0
        while True:
            try:
                directory.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                with contextlib.suppress(OSError):
                    for pid in (directory / "cgroup.procs").read_text().split():
                        (CGROUP_ROOT / "cgroup.procs").write_text(pid)
                time.sleep(0.1)


def _enter(cgroup: Path) -> list[str]:
    """A command prefix that moves itself into ``cgroup`` and then runs the rest."""
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup)]


def test_clients_in_pod_cgroups_are_attributed_with_their_memory(
    make_node: NodeFactory, pod_cgroups: dict[str, tuple[str, Path]], work_dir: Path
) -> None:
    """Each client's pid is found in its pod's cgroup and its GPU memory goes to its container."""
    from vgpu_agent.gpus.nvml import NvmlBackend

    node = make_node()
    ids = node.vgpu_ids(0)
    grants = {"alpha": node.allocate(0, 1, first=0), "beta": node.allocate(0, 2, first=1)}
    held = {"alpha": (ids[0],), "beta": (ids[1], ids[2])}
    pods = [
        StandinPod(
            "team-" + label,
            label + "-pod",
            pod_cgroups[label][0],
            (StandinContainer(label, RESOURCE, held[label]),),
        )
        for label in ("alpha", "beta")
    ]
    socket_path = str(work_dir / "pod-resources" / "kubelet.sock")
    checkpoint = str(work_dir / "checkpoint" / "kubelet_internal_checkpoint")
    clients = {
        label: node.start_client(
            grants[label],
            1000,
            label,
            ["--hold-s", "60", "--keep-mib", str(KEEP_MIB[label])],
            prefix=_enter(pod_cgroups[label][1]),
        )
        for label in ("alpha", "beta")
    }
    backend = NvmlBackend()
    try:
        gpu_uuid = node.gpus[0].uuid
        deadline = time.monotonic() + 90.0
        while True:
            processes = backend.mps_client_processes(gpu_uuid)
            big = [p for p in processes if (p.used_memory_mib or 0) >= min(KEEP_MIB.values())]
            if len(big) >= 2:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the two clients never showed their memory in NVML: {processes}")
            time.sleep(0.5)
        with PodResourcesStandin(socket_path, pods, checkpoint_path=checkpoint):
            result: Attribution = gather(
                backend=backend,
                inventory=node.state.inventory(),
                policy=grant_policy(node.config),
                resource_name=RESOURCE,
                pod_resources_socket=socket_path,
                checkpoint_path=checkpoint,
                list_pods=list_pod_resources,
            )
    except GpuError as exc:
        pytest.fail(f"NVML: {exc}")
    finally:
        backend.close()
    assert result.problems == ()
    by_container = {usage.container: usage for usage in result.containers_on(gpu_uuid)}
    assert set(by_container) == {"alpha", "beta"}
    for label in ("alpha", "beta"):
        usage = by_container[label]
        assert (usage.namespace, usage.pod) == ("team-" + label, label + "-pod")
        assert usage.pod_uid == pod_cgroups[label][0]
        assert usage.vgpu_ids == held[label]
        assert len(usage.pids) >= 1, f"{label}: no MPS client pid found in its cgroup"
        assert usage.memory_used_mib is not None
        assert KEEP_MIB[label] <= usage.memory_used_mib <= KEEP_MIB[label] + CONTEXT_ALLOWANCE_MIB
    assert not [stray for stray in result.strays if stray.pid in by_container["alpha"].pids]
    for client in clients.values():
        client.process.kill()
        client.process.communicate()
