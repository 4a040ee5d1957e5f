"""Attribution: cgroup path shapes, the kubelet checkpoint, the PodResources API through a
real gRPC stand-in, and the join of all three with NVML's MPS client list."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pytest

from tests.builders import gpu_uuid, make_inventory, vgpu_id
from vgpu_agent.model.devices import MpsGrantPolicy
from vgpu_agent.model.errors import AttributionError
from vgpu_agent.model.gpu import GpuProcess
from vgpu_agent.observability.attribution import (
    Attribution,
    ContainerDevices,
    attribute,
    gather,
    limits_from,
)
from vgpu_agent.observability.cgroups import PodCgroup, parse_cgroup, read_process_cgroup
from vgpu_agent.observability.checkpoint import CheckpointEntry, parse_checkpoint, read_checkpoint
from vgpu_agent.observability.podresources import list_pod_resources
from vgpu_agent.standins.podresources import (
    PodResourcesStandin,
    StandinContainer,
    StandinPod,
    checkpoint_text,
)
from vgpu_agent.standins.simulated import SimulatedBackend

RESOURCE = "eks.amazonaws.com/vgpu"
UID = "3f1b2c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d"
UID_SYSTEMD = UID.replace("-", "_")
CID = "a" * 56 + "0123abcd"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"{UID_SYSTEMD}.slice/cri-containerd-{CID}.scope\n",
            PodCgroup(UID, CID, "burstable"),
        ),
        (
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
            f"{UID_SYSTEMD}.slice/cri-containerd-{CID}.scope\n",
            PodCgroup(UID, CID, "besteffort"),
        ),
        (
            f"0::/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/cri-containerd-{CID}.scope\n",
            PodCgroup(UID, CID, "guaranteed"),
        ),
        (
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"{UID_SYSTEMD}.slice/crio-{CID}.scope\n",
            PodCgroup(UID, CID, "burstable"),
        ),
        (
            f"0::/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/crio-{CID}.scope\n",
            PodCgroup(UID, CID, "guaranteed"),
        ),
        (
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"{UID_SYSTEMD}.slice/crio-conmon-{CID}.scope\n",
            PodCgroup(UID, None, "burstable"),
        ),
        (f"0::/kubepods/burstable/pod{UID}/{CID}\n", PodCgroup(UID, CID, "burstable")),
        (f"0::/kubepods/besteffort/pod{UID}/{CID}\n", PodCgroup(UID, CID, "besteffort")),
        (f"0::/kubepods/pod{UID}/{CID}\n", PodCgroup(UID, CID, "guaranteed")),
        (
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
            f"kubelet-kubepods-besteffort-pod{UID_SYSTEMD}.slice/cri-containerd-{CID}.scope\n",
            PodCgroup(UID, CID, "besteffort"),
        ),
        (
            f"0::/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/cri-containerd-{CID}.scope/"
            "init.scope\n",
            PodCgroup(UID, CID, "guaranteed"),
        ),
        (
            "12:pids:/kubepods/burstable/pod" + UID + "/" + CID + "\n"
            "11:memory:/kubepods/burstable/pod" + UID + "/" + CID + "\n",
            PodCgroup(UID, CID, "burstable"),
        ),
        ("0::/system.slice/nvidia-mps.service\n", None),
        ("0::/user.slice/user-1000.slice/session-3.scope\n", None),
        (f"0::/pod{UID}/{CID}\n", None),
        ("0::/\n", None),
        ("", None),
        ("garbage without colons\n", None),
    ],
    ids=[
        "containerd-systemd-burstable",
        "containerd-systemd-besteffort",
        "containerd-systemd-guaranteed",
        "crio-systemd-burstable",
        "crio-systemd-guaranteed",
        "crio-conmon",
        "cgroupfs-burstable",
        "cgroupfs-besteffort",
        "cgroupfs-guaranteed",
        "nested-kubelet-prefix",
        "container-sub-cgroup",
        "cgroup-v1",
        "host-service",
        "user-session",
        "pod-like-outside-kubepods",
        "root",
        "empty",
        "garbage",
    ],
)
def test_cgroup_paths_name_the_pod_and_container(text: str, expected: Optional[PodCgroup]) -> None:
    """Each runtime's and driver's cgroup path shape gives the pod UID, container id and QoS."""
    assert parse_cgroup(text) == expected


def test_a_process_cgroup_is_read_from_proc(tmp_path: Path) -> None:
    """read_process_cgroup reads <proc>/<pid>/cgroup; a gone process is in no pod."""
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text(f"0::/kubepods/pod{UID}/{CID}\n")
    assert read_process_cgroup(42, str(tmp_path)) == PodCgroup(UID, CID, "guaranteed")
    assert read_process_cgroup(43, str(tmp_path)) is None


def test_this_process_is_in_no_pod() -> None:
    """The test runner itself is not in a Kubernetes pod (the real /proc)."""
    assert read_process_cgroup(os.getpid()) is None


def test_the_checkpoint_lists_allocations_in_both_device_id_shapes() -> None:
    """DeviceIDs as a NUMA-node map (kubelet >= 1.20) and as a plain list are both read."""
    text = (
        '{"Data":{"PodDeviceEntries":['
        '{"PodUID":"AAA","ContainerName":"c1","ResourceName":"r/x",'
        '"DeviceIDs":{"0":["g::0"],"1":["g::1"]},"AllocResp":"e30="},'
        '{"PodUID":"bbb","ContainerName":"c2","ResourceName":"r/y","DeviceIDs":["h::3"]},'
        '{"PodUID":7}],"RegisteredDevices":{}},"Checksum":1}'
    )
    assert parse_checkpoint(text) == [
        CheckpointEntry("aaa", "c1", "r/x", ("g::0", "g::1")),
        CheckpointEntry("bbb", "c2", "r/y", ("h::3",)),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not JSON"),
        ("[]", "no 'Data' object"),
        ('{"Data":{"PodDeviceEntries":{}}}', "is not a list"),
        ('{"Data":' + "[" * 200_000 + "]" * 200_000 + "}", "nested too deeply"),
    ],
    ids=["not-json", "no-data", "entries-not-a-list", "nested-200000-deep"],
)
def test_a_bad_checkpoint_is_a_clear_error(text: str, message: str) -> None:
    """A checkpoint that is not the kubelet's gives one error naming the file and the fault."""
    with pytest.raises(AttributionError, match=message) as caught:
        parse_checkpoint(text, "/x/kubelet_internal_checkpoint")
    assert "/x/kubelet_internal_checkpoint" in str(caught.value)


def test_an_empty_checkpoint_has_no_allocations(tmp_path: Path) -> None:
    """The checkpoint of a kubelet without allocations (PodDeviceEntries null) lists none."""
    path = tmp_path / "kubelet_internal_checkpoint"
    path.write_text('{"Data":{"PodDeviceEntries":null,"RegisteredDevices":{}},"Checksum":0}')
    assert read_checkpoint(str(path)) == []


def test_a_plugin_dir_that_is_a_file_is_named_not_blamed_on_root(tmp_path: Path) -> None:
    """A plugin directory that is a file says so; it does not tell root to run as root."""
    (tmp_path / "dp").write_text("")
    with pytest.raises(AttributionError) as caught:
        read_checkpoint(str(tmp_path / "dp" / "kubelet_internal_checkpoint"))
    assert f"{tmp_path / 'dp'} is not a directory" in str(caught.value)
    assert "as root" not in str(caught.value)


def test_a_missing_checkpoint_says_what_is_lost(tmp_path: Path) -> None:
    """Without the checkpoint the error says processes cannot be matched to containers."""
    with pytest.raises(AttributionError, match="cannot be matched to containers"):
        read_checkpoint(str(tmp_path / "kubelet_internal_checkpoint"))


# -- PodResources over a real gRPC server -------------------------------------------------------


def test_pod_resources_are_listed_from_a_grpc_server(short_tmp_dir: str) -> None:
    """List over a unix socket gives namespace, pod, container and our resource's ids only."""
    socket_path = os.path.join(short_tmp_dir, "pod-resources", "kubelet.sock")
    pods = [
        StandinPod(
            "team-a",
            "trainer",
            UID,
            (
                StandinContainer("main", RESOURCE, (vgpu_id(0, 0), vgpu_id(0, 1))),
                StandinContainer("sidecar"),
                StandinContainer("nic", "example.com/nic", ("nic0",)),
            ),
        )
    ]
    with PodResourcesStandin(socket_path, pods) as standin:
        listed = list_pod_resources(socket_path, RESOURCE)
        every = list_pod_resources(socket_path)
    assert listed == [
        ContainerDevices("team-a", "trainer", "main", RESOURCE, (vgpu_id(0, 0), vgpu_id(0, 1)))
    ]
    assert [devices.resource_name for devices in every] == [RESOURCE, "example.com/nic"]
    assert standin.calls == {"List": 2}


def test_a_missing_pod_resources_socket_says_attribution_is_reduced(short_tmp_dir: str) -> None:
    """No socket: the error names it and says attribution shows vGPU ids only."""
    socket_path = os.path.join(short_tmp_dir, "kubelet.sock")
    with pytest.raises(AttributionError) as caught:
        list_pod_resources(socket_path)
    assert str(caught.value).startswith(f"kubelet PodResources socket {socket_path} not found")
    assert "attribution shows vGPU ids only" in str(caught.value)


def test_a_file_in_place_of_the_socket_is_named(short_tmp_dir: str) -> None:
    """A regular file where the socket should be is reported as not a socket."""
    socket_path = os.path.join(short_tmp_dir, "kubelet.sock")
    Path(socket_path).write_text("")
    with pytest.raises(AttributionError, match="is not a socket"):
        list_pod_resources(socket_path)


def test_a_socket_nobody_serves_is_unavailable(short_tmp_dir: str) -> None:
    """A stale socket (the kubelet died) gives UNAVAILABLE, translated to our error."""
    socket_path = os.path.join(short_tmp_dir, "kubelet.sock")
    standin = PodResourcesStandin(socket_path)
    standin.start()
    # Stop the server but leave a socket file behind, as a killed kubelet does.
    standin.stop()
    import socket

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(socket_path)
    stale.close()
    with pytest.raises(AttributionError, match="UNAVAILABLE"):
        list_pod_resources(socket_path, timeout_s=1.0)


def test_the_standin_answers_get_and_allocatable(short_tmp_dir: str) -> None:
    """The stand-in serves Get (NOT_FOUND for an unknown pod) and GetAllocatableResources."""
    import grpc

    from vgpu_agent.frontends._proto import podresources_pb2 as pb
    from vgpu_agent.frontends._proto import podresources_pb2_grpc as pb_grpc
    from vgpu_agent.frontends.serving import unix_target

    socket_path = os.path.join(short_tmp_dir, "kubelet.sock")
    pods = [StandinPod("ns", "p", UID, (StandinContainer("c", RESOURCE, (vgpu_id(0, 2),)),))]
    with (
        PodResourcesStandin(socket_path, pods),
        grpc.insecure_channel(unix_target(socket_path)) as channel,
    ):
        stub = pb_grpc.PodResourcesListerStub(channel)  # type: ignore[no-untyped-call]
        answer = stub.Get(pb.GetPodResourcesRequest(pod_name="p", pod_namespace="ns"))
        assert answer.pod_resources.containers[0].devices[0].device_ids == [vgpu_id(0, 2)]
        with pytest.raises(grpc.RpcError) as caught:
            stub.Get(pb.GetPodResourcesRequest(pod_name="q", pod_namespace="ns"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert list(stub.GetAllocatableResources(pb.AllocatableResourcesRequest()).devices) == []


def test_the_standin_checkpoint_round_trips() -> None:
    """The checkpoint the stand-in writes reads back as its pods' allocations."""
    pods = [
        StandinPod("ns", "p", UID, (StandinContainer("c", RESOURCE, (vgpu_id(1, 0),)),)),
        StandinPod("ns", "q", "other-uid", (StandinContainer("d"),)),
    ]
    assert parse_checkpoint(checkpoint_text(pods)) == [
        CheckpointEntry(UID, "c", RESOURCE, (vgpu_id(1, 0),))
    ]


# -- the join -------------------------------------------------------------------------------------

INVENTORY = make_inventory((4, 4))
SERVED = {served.gpu.uuid: served for served in INVENTORY.gpus}
POLICY = MpsGrantPolicy()
G0, G1 = gpu_uuid(0), gpu_uuid(1)
UID_A = "aaaaaaaa-0000-0000-0000-000000000001"
UID_B = "bbbbbbbb-0000-0000-0000-000000000002"


def _devices(namespace: str, pod: str, container: str, *ids: str) -> ContainerDevices:
    return ContainerDevices(namespace, pod, container, RESOURCE, ids)


def _entry(uid: str, container: str, *ids: str) -> CheckpointEntry:
    return CheckpointEntry(uid, container, RESOURCE, ids)


def _in_pod(uid: str, container_id: str = CID) -> PodCgroup:
    return PodCgroup(uid, container_id, "burstable")


def _join(
    pod_devices: Optional[list[ContainerDevices]],
    checkpoint: Optional[list[CheckpointEntry]],
    processes: list[tuple[GpuProcess, Optional[PodCgroup]]],
) -> Attribution:
    return attribute(
        served=SERVED,
        resource_name=RESOURCE,
        pod_devices=pod_devices,
        checkpoint=checkpoint,
        processes=processes,
        limits_for=limits_from(INVENTORY, POLICY),
    )


def test_each_container_gets_its_own_processes_memory_and_limits() -> None:
    """Two pods on one GPU: each container's vGPUs, limits and its own processes' memory."""
    result = _join(
        [
            _devices("ns", "a", "main", vgpu_id(0, 0)),
            _devices("ns", "b", "main", vgpu_id(0, 1), vgpu_id(0, 2)),
        ],
        [_entry(UID_A, "main", vgpu_id(0, 0)), _entry(UID_B, "main", vgpu_id(0, 1), vgpu_id(0, 2))],
        [
            (GpuProcess(100, G0, 500), _in_pod(UID_A)),
            (GpuProcess(101, G0, 250), _in_pod(UID_A)),
            (GpuProcess(200, G0, 4000), _in_pod(UID_B)),
        ],
    )
    by_pod = {usage.pod: usage for usage in result.containers}
    assert by_pod["a"].pids == (100, 101)
    assert by_pod["a"].memory_used_mib == 750
    assert by_pod["a"].pod_uid == UID_A
    assert (by_pod["a"].thread_limit_percent, by_pod["a"].memory_limit_mib) == (25, 6144)
    assert by_pod["b"].memory_used_mib == 4000
    assert by_pod["b"].vgpu_ids == (vgpu_id(0, 1), vgpu_id(0, 2))
    assert (by_pod["b"].thread_limit_percent, by_pod["b"].memory_limit_mib) == (50, 12288)
    assert result.strays == ()
    assert result.clients_on(G0) == 3
    assert result.clients_on(G1) == 0


def test_a_process_in_no_pod_is_a_stray_of_its_gpu() -> None:
    """A host process on a served GPU is counted as a client but belongs to no container."""
    result = _join(
        [_devices("ns", "a", "main", vgpu_id(1, 0))],
        [_entry(UID_A, "main", vgpu_id(1, 0))],
        [(GpuProcess(7, G1, 300), None)],
    )
    assert [(stray.pid, stray.gpu_uuid, stray.memory_used_mib) for stray in result.strays] == [
        (7, G1, 300)
    ]
    assert "not in a pod" in result.strays[0].why
    assert result.containers[0].memory_used_mib == 0
    assert result.clients_on(G1) == 1


def test_a_pod_without_vgpus_of_that_gpu_is_a_stray() -> None:
    """A pod using a GPU it holds no vGPU of (it bypassed the plugin) is reported as such."""
    result = _join(
        [_devices("ns", "a", "main", vgpu_id(0, 0))],
        [_entry(UID_A, "main", vgpu_id(0, 0))],
        [(GpuProcess(9, G1, 100), _in_pod(UID_A))],
    )
    assert f"in pod {UID_A}, which holds no vGPU of this GPU" in result.strays[0].why
    assert result.containers[0].memory_used_mib == 0


def test_a_listed_pod_whose_processes_are_gone_uses_nothing() -> None:
    """PodResources naming a pod with no running client shows its vGPUs with 0 MiB used."""
    result = _join(
        [_devices("ns", "done", "main", vgpu_id(0, 3))], [_entry(UID_A, "main", vgpu_id(0, 3))], []
    )
    (usage,) = result.containers
    assert (usage.pod, usage.pids, usage.memory_used_mib) == ("done", (), 0)
    assert result.pods[0].memory_used_mib == 0


def test_stale_checkpoint_entries_of_gone_pods_are_ignored() -> None:
    """Checkpoint entries PodResources no longer lists are not shown as holders."""
    result = _join(
        [_devices("ns", "a", "main", vgpu_id(0, 0))],
        [_entry(UID_A, "main", vgpu_id(0, 0)), _entry(UID_B, "old", vgpu_id(0, 1))],
        [],
    )
    assert [usage.container for usage in result.containers] == ["main"]


def test_several_containers_of_a_pod_on_one_gpu_share_their_memory_figure() -> None:
    """Containers of one pod on one GPU cannot be told apart: memory goes to the pod."""
    result = _join(
        [
            _devices("ns", "a", "left", vgpu_id(0, 0)),
            _devices("ns", "a", "right", vgpu_id(0, 1)),
            _devices("ns", "a", "other-gpu", vgpu_id(1, 0)),
        ],
        [
            _entry(UID_A, "left", vgpu_id(0, 0)),
            _entry(UID_A, "right", vgpu_id(0, 1)),
            _entry(UID_A, "other-gpu", vgpu_id(1, 0)),
        ],
        [
            (GpuProcess(1, G0, 100), _in_pod(UID_A, "1" * 64)),
            (GpuProcess(2, G0, 200), _in_pod(UID_A, "2" * 64)),
            (GpuProcess(3, G1, 50), _in_pod(UID_A, "3" * 64)),
        ],
    )
    by_name = {usage.container: usage for usage in result.containers}
    assert by_name["left"].memory_used_mib is None
    assert by_name["left"].memory_shared_with == ("right",)
    assert by_name["right"].memory_shared_with == ("left",)
    assert by_name["other-gpu"].memory_used_mib == 50
    assert by_name["other-gpu"].memory_shared_with == ()
    pods = {(pod.pod, pod.gpu_uuid): pod for pod in result.pods}
    assert pods[("a", G0)].memory_used_mib == 300
    assert pods[("a", G0)].containers == ("left", "right")
    assert pods[("a", G0)].pids == (1, 2)
    assert pods[("a", G1)].memory_used_mib == 50


def test_without_pod_resources_the_checkpoint_gives_uids_and_vgpu_ids() -> None:
    """A kubelet without the socket: containers by pod UID and name, memory still joined."""
    result = _join(
        None,
        [_entry(UID_A, "main", vgpu_id(0, 0))],
        [(GpuProcess(5, G0, 64), _in_pod(UID_A))],
    )
    (usage,) = result.containers
    assert (usage.namespace, usage.pod, usage.pod_uid) == ("", "", UID_A)
    assert (usage.vgpu_ids, usage.memory_used_mib) == ((vgpu_id(0, 0),), 64)


def test_without_the_checkpoint_processes_cannot_be_matched() -> None:
    """PodResources without the checkpoint: holders are shown, processes are strays."""
    result = _join(
        [_devices("ns", "a", "main", vgpu_id(0, 0))],
        None,
        [(GpuProcess(5, G0, 64), _in_pod(UID_A))],
    )
    assert result.containers[0].pod_uid == ""
    assert result.containers[0].memory_used_mib == 0
    assert "without the kubelet checkpoint" in result.strays[0].why


def test_unknown_memory_stays_unknown() -> None:
    """A client whose memory NVML cannot tell makes its container's figure unknown, not 0."""
    result = _join(
        [_devices("ns", "a", "main", vgpu_id(0, 0))],
        [_entry(UID_A, "main", vgpu_id(0, 0))],
        [(GpuProcess(5, G0, None), _in_pod(UID_A)), (GpuProcess(6, G0, 10), _in_pod(UID_A))],
    )
    assert result.containers[0].memory_used_mib is None
    assert result.containers[0].pids == (5, 6)


def test_ids_of_other_gpus_and_malformed_ids_are_skipped() -> None:
    """Device ids of GPUs not served here, and ids not ours, do not make holders."""
    result = _join(
        [_devices("ns", "a", "main", "GPU-elsewhere::0", "not-a-vgpu", vgpu_id(0, 0))],
        [_entry(UID_A, "main", vgpu_id(0, 0))],
        [(GpuProcess(5, "GPU-elsewhere", 10), None)],
    )
    assert [usage.vgpu_ids for usage in result.containers] == [(vgpu_id(0, 0),)]
    assert result.strays == ()


def test_without_mps_there_are_no_limits() -> None:
    """With MPS off (no pipe directory, no policy) containers have no thread or memory limit."""
    limits = limits_from(make_inventory((4,), pipe_root=None), None)
    assert limits(G0, 2) == (None, None)


def _gather_pod_a(
    short_tmp_dir: str, backend: SimulatedBackend, proc_root: str, cgroup_root: str
) -> Attribution:
    """gather() against a PodResources stand-in (and its checkpoint) serving pod ns/a, whose
    container main holds vGPU 1 of GPU 0."""
    socket_path = os.path.join(short_tmp_dir, "kubelet.sock")
    checkpoint = os.path.join(short_tmp_dir, "kubelet_internal_checkpoint")
    pods = [StandinPod("ns", "a", UID_A, (StandinContainer("main", RESOURCE, (vgpu_id(0, 1),)),))]
    with PodResourcesStandin(socket_path, pods, checkpoint_path=checkpoint):
        return gather(
            backend=backend,
            inventory=INVENTORY,
            policy=POLICY,
            resource_name=RESOURCE,
            pod_resources_socket=socket_path,
            checkpoint_path=checkpoint,
            list_pods=list_pod_resources,
            proc_root=proc_root,
            cgroup_root=cgroup_root,
        )


def test_gather_asks_every_source(short_tmp_dir: str, tmp_path: Path) -> None:
    """gather: PodResources over gRPC, the checkpoint file, NVML clients and /proc cgroups."""
    backend = SimulatedBackend([served.gpu for served in INVENTORY.gpus])
    backend.add_mps_client(G0, 100, 512)
    backend.add_mps_client(G1, 200, 128)
    proc = tmp_path / "proc"
    (proc / "100").mkdir(parents=True)
    (proc / "100" / "cgroup").write_text(
        f"0::/kubepods.slice/kubepods-pod{UID_A.replace('-', '_')}.slice/crio-{CID}.scope\n"
    )
    result = _gather_pod_a(short_tmp_dir, backend, str(proc), str(tmp_path / "no-cgroups"))
    assert result.problems == ()
    (usage,) = result.containers
    assert (usage.namespace, usage.pod, usage.container, usage.memory_used_mib) == (
        "ns",
        "a",
        "main",
        512,
    )
    assert [stray.pid for stray in result.strays] == [200]


def test_gather_names_each_source_that_failed(short_tmp_dir: str) -> None:
    """No kubelet and a failing backend: every problem is reported, none raised."""
    backend = SimulatedBackend([served.gpu for served in INVENTORY.gpus])
    backend.fail_calls("driver gone")
    result = gather(
        backend=backend,
        inventory=INVENTORY,
        policy=POLICY,
        resource_name=RESOURCE,
        pod_resources_socket=os.path.join(short_tmp_dir, "kubelet.sock"),
        checkpoint_path=os.path.join(short_tmp_dir, "kubelet_internal_checkpoint"),
        list_pods=list_pod_resources,
    )
    assert result.containers == ()
    assert len(result.problems) == 4
    assert "PodResources socket" in result.problems[0]
    assert "checkpoint" in result.problems[1]
    assert "driver gone" in result.problems[2]


def _cgroup(root: Path, relative: str, pids: list[int]) -> None:
    directory = root / relative
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cgroup.procs").write_text("".join(f"{pid}\n" for pid in pids))


def test_the_cgroup_tree_names_pods_of_pids_proc_hides(tmp_path: Path) -> None:
    """pod_cgroups_by_pid reads cgroup.procs of container cgroups, in every layout."""
    uid_b = "bbbbbbbb-0000-0000-0000-000000000002"
    _cgroup(tmp_path, "system.slice/containerd.service", [1, 2])
    _cgroup(
        tmp_path,
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/"
        f"cri-containerd-{CID}.scope",
        [100, 101],
    )
    _cgroup(
        tmp_path,
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice",
        [],
    )
    _cgroup(tmp_path, f"kubepods/besteffort/pod{uid_b}/{'d' * 64}", [200])
    _cgroup(tmp_path, f"kubepods/besteffort/pod{uid_b}/{'d' * 64}/nested", [201])
    from vgpu_agent.observability.cgroups import pod_cgroups_by_pid

    found = pod_cgroups_by_pid(str(tmp_path))
    assert found == {
        100: PodCgroup(UID, CID, "burstable"),
        101: PodCgroup(UID, CID, "burstable"),
        200: PodCgroup(uid_b, "d" * 64, "besteffort"),
        201: PodCgroup(uid_b, "d" * 64, "besteffort"),
    }


def test_gather_falls_back_to_the_cgroup_tree(short_tmp_dir: str, tmp_path: Path) -> None:
    """A client /proc does not show (another user's, ProtectProc=invisible) is still found."""
    backend = SimulatedBackend([served.gpu for served in INVENTORY.gpus])
    backend.add_mps_client(G0, 300, 700)
    cgroups = tmp_path / "cgroup"
    _cgroup(
        cgroups,
        f"kubepods.slice/kubepods-pod{UID_A.replace('-', '_')}.slice/cri-containerd-{CID}.scope",
        [300],
    )
    result = _gather_pod_a(short_tmp_dir, backend, str(tmp_path / "empty-proc"), str(cgroups))
    (usage,) = result.containers
    assert (usage.pids, usage.memory_used_mib) == ((300,), 700)
    assert result.strays == ()


def test_the_cached_checkpoint_rereads_only_a_changed_file(tmp_path: Path) -> None:
    """CachedCheckpoint parses again when the file changes, and reports a missing one."""
    from vgpu_agent.observability.checkpoint import CachedCheckpoint

    path = tmp_path / "kubelet_internal_checkpoint"
    pods = [StandinPod("ns", "a", UID_A, (StandinContainer("main", RESOURCE, (vgpu_id(0, 0),)),))]
    path.write_text(checkpoint_text(pods))
    cached = CachedCheckpoint()
    assert [entry.pod_uid for entry in cached(str(path))] == [UID_A]
    more = [*pods, StandinPod("ns", "b", UID_B, (StandinContainer("x", RESOURCE, ("g::1",)),))]
    path.write_text(checkpoint_text(more))
    os.utime(path, ns=(1, 1))
    assert [entry.pod_uid for entry in cached(str(path))] == [UID_A, UID_B]
    path.unlink()
    with pytest.raises(AttributionError, match="not found"):
        cached(str(path))


def test_the_client_keeps_its_channel_across_kubelet_restarts(short_tmp_dir: str) -> None:
    """PodResourcesClient answers again over its kept channel after the server restarts."""
    from vgpu_agent.observability.podresources import PodResourcesClient

    socket_path = os.path.join(short_tmp_dir, "kubelet.sock")
    pods = [StandinPod("ns", "a", UID_A, (StandinContainer("main", RESOURCE, (vgpu_id(0, 0),)),))]
    client = PodResourcesClient(timeout_s=5.0)
    try:
        with PodResourcesStandin(socket_path, pods):
            assert [devices.pod for devices in client(socket_path, RESOURCE)] == ["a"]
        with pytest.raises(AttributionError, match="not found"):
            client(socket_path, RESOURCE)
        with PodResourcesStandin(socket_path, []):
            assert client(socket_path, RESOURCE) == []
    finally:
        client.close()
