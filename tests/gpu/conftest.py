"""The real-GPU harness: the agent's own NVML backend and MPS daemons (pipe and log
directories under /tmp), its plugin server registered with the kubelet stand-in, and CUDA
clients started the way a container runtime would start them from an Allocate response.

Every test here is skipped, with the reason, where there is no NVIDIA GPU, no NVML, no MPS
control program, no torch, or no root (the clients need unshare and setpriv). The GPU's
settings are never changed: the compute mode stays as found.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from vgpu_agent.config.plan import daemon_ceiling, grant_policy
from vgpu_agent.config.schema import Config, Confinement, MpsConfig
from vgpu_agent.frontends.deviceplugin.kubelet import register
from vgpu_agent.frontends.deviceplugin.server import PluginServer, PluginServicer
from vgpu_agent.model import node as node_model
from vgpu_agent.model.devices import Inventory, ServedGpu
from vgpu_agent.model.errors import MpsError
from vgpu_agent.model.gpu import Gpu
from vgpu_agent.mps.control import control_command
from vgpu_agent.mps.daemons import DirectMpsDaemons
from vgpu_agent.standins.kubelet import KubeletStandin

HERE = Path(__file__).parent
RESOURCE = "eks.amazonaws.com/vgpu"
REPLICAS = 4
#: Enforced confinement (the default) with a ceiling of two shares, so that tests may grant
#: one container two vGPUs; the confinement tests build nodes with the product default, 1.
MAX_VGPUS_PER_CONTAINER = 2
#: Where the pipe directory appears inside the client's namespace, as in a pod.
CONTAINER_PIPE_DIR = "/run/nvidia-mps"
#: What a container image brings besides the Allocate response (not from the plugin).
#: The NVLink-multicast switches stay off, as the lent machines ask.
IMAGE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/tmp",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
#: Namespaces a pod gets: mount, IPC, network, UTS and PID.
POD_NAMESPACES = ("-m", "-i", "-n", "-u", "-p", "-f", "--mount-proc")
CLIENT_TIMEOUT_S = 120.0


def _why_no_gpu() -> Optional[str]:
    if os.geteuid() != 0:
        return "needs root (clients run in new namespaces as other uids)"
    for program in ("unshare", "setpriv", "nvidia-cuda-mps-control"):
        if shutil.which(program) is None:
            return f"{program} is not on PATH"
    if importlib.util.find_spec("pynvml") is None:
        return "pynvml (nvidia-ml-py) is not installed"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (the CUDA clients use it)"
    return None


@pytest.fixture(scope="session")
def gpus() -> list[Gpu]:
    """The node's GPUs as the agent's NVML backend lists them; skips without a usable GPU."""
    reason = _why_no_gpu()
    if reason is not None:
        pytest.skip(reason)
    from vgpu_agent.gpus.nvml import NvmlBackend
    from vgpu_agent.model.errors import GpuError

    try:
        backend = NvmlBackend()
    except GpuError as exc:
        pytest.skip(str(exc))
    try:
        found = backend.list_gpus()
    finally:
        backend.close()
    if not found:
        pytest.skip("NVML sees no GPU")
    return found


@pytest.fixture
def work_dir() -> Iterator[Path]:
    """A short, world-traversable directory under /tmp for one test's MPS dirs and sockets."""
    path = Path(tempfile.mkdtemp(prefix="vgpu-gpu", dir="/tmp"))
    path.chmod(0o755)
    for name in ("mps_client.py", "container.sh"):
        shutil.copy(HERE / name, path / name)
        (path / name).chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Client:
    """A CUDA client process started from an Allocate response."""

    label: str
    process: subprocess.Popen[str]

    def result(self, timeout_s: float = CLIENT_TIMEOUT_S) -> dict[str, Any]:
        """Wait for the client's JSON report (fails the test with its stderr if none)."""
        try:
            stdout, stderr = self.process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            stdout, stderr = self.process.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if not lines:
            pytest.fail(
                f"client {self.label} gave no report: rc={self.process.returncode} {stderr}"
            )
        report: dict[str, Any] = json.loads(lines[-1])
        if "error" in report:
            pytest.fail(f"client {self.label} failed: {report['error']}")
        return report


@dataclass
class Node:
    """One node under test: MPS daemons, the plugin server, the kubelet stand-in."""

    config: Config
    gpus: list[Gpu]
    daemons: DirectMpsDaemons
    state: node_model.Node
    standin: KubeletStandin
    server: PluginServer
    work_dir: Path
    clients: list[Client] = field(default_factory=list)

    def vgpu_ids(self, gpu_index: int) -> list[str]:
        """The vGPU ids of one GPU."""
        served = self.state.inventory().gpus[gpu_index]
        return served.vgpu_ids

    def allocate(self, gpu_index: int, count: int, first: int = 0) -> Any:
        """Allocate ``count`` vGPUs of GPU ``gpu_index`` through the plugin, as the kubelet does."""
        ids = self.vgpu_ids(gpu_index)[first : first + count]
        response = self.standin.allocate(RESOURCE, ids)
        return response.container_responses[0]

    def start_client(
        self,
        grant: Any,
        uid: int,
        label: str,
        arguments: Sequence[str] = (),
        prefix: Sequence[str] = (),
    ) -> Client:
        """Start mps_client.py in pod-like namespaces as ``uid`` with exactly the grant's
        environment (plus what an image brings) and its mounts at their container paths;
        ``prefix`` runs first and execs the rest (e.g. to enter a cgroup)."""
        environment = dict(IMAGE_ENV)
        if os.environ.get("LD_LIBRARY_PATH"):
            # Where the lent machines keep libcuda; a container runtime injects it likewise.
            environment["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
        environment.update(dict(grant.envs))
        # The NVIDIA container runtime turns NVIDIA_VISIBLE_DEVICES into device isolation:
        # the pod's NVML and CUDA see only that GPU. There is no runtime here, so
        # CUDA_VISIBLE_DEVICES stands in for it (frameworks count GPUs through NVML, which
        # MPS does not restrict; the CUDA runtime through MPS already sees the one GPU).
        environment["CUDA_VISIBLE_DEVICES"] = grant.envs["NVIDIA_VISIBLE_DEVICES"]
        mounts = [
            f"{mount.host_path}:{mount.container_path}:{'ro' if mount.read_only else 'rw'}"
            for mount in grant.mounts
        ]
        command = [
            *prefix,
            "unshare",
            *POD_NAMESPACES,
            str(self.work_dir / "container.sh"),
            str(uid),
            *mounts,
            "--",
            "env",
            "-i",
            *(f"{key}={value}" for key, value in environment.items()),
            sys.executable,
            str(self.work_dir / "mps_client.py"),
            "--label",
            label,
            *arguments,
        ]
        # A process group of its own: unshare's forked child (and everything under it, as
        # another uid) outlives a kill of unshare alone, but not a kill of the group.
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        client = Client(label, process)
        self.clients.append(client)
        return client

    def control(self, gpu_index: int, command: str) -> str:
        """A control command to a GPU's daemon."""
        pipe_dir = self.state.inventory().gpus[gpu_index].pipe_dir
        assert pipe_dir is not None
        return control_command(self.config.mps, pipe_dir, command)

    def client_pids(self, gpu_index: int) -> list[str]:
        """The client pids the GPU's MPS servers report."""
        pids: list[str] = []
        for server in self.control(gpu_index, "get_server_list").split():
            pids.extend(self.control(gpu_index, f"get_client_list {server}").split())
        return pids

    def wait_for_clients(self, gpu_index: int, count: int, timeout_s: float = 60.0) -> None:
        """Wait until the GPU's daemon serves at least ``count`` clients; a control command
        the daemon drops while clients connect ("Cannot send command") is asked again."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(MpsError):
                if len(self.client_pids(gpu_index)) >= count:
                    return
            time.sleep(0.1)
        pytest.fail(f"fewer than {count} MPS clients after {timeout_s:g} s")

    def close(self) -> None:
        """Stop clients, the plugin server, the stand-in and every daemon."""
        for client in self.clients:
            # The whole group, also where the test already killed unshare itself.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(client.process.pid, signal.SIGKILL)
            if client.process.returncode is None:
                client.process.communicate()
        self.server.stop()
        self.standin.stop()
        self.daemons.stop_all()


def memory_limit_mib(grant: Any) -> int:
    """The MiB of CUDA_MPS_PINNED_DEVICE_MEM_LIMIT ("0=<n>M") in a grant."""
    value = dict(grant.envs)["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"]
    device, _, size = value.partition("=")
    assert device == "0"
    assert size.endswith("M")
    return int(size[:-1])


@pytest.fixture
def make_node(gpus: list[Gpu], work_dir: Path) -> Iterator[Callable[..., Node]]:
    """Builds a node: a daemon per GPU (multi-user on unless asked) holding the enforced
    ceiling, the plugin, the kubelet stand-in."""
    nodes: list[Node] = []
    all_daemons: list[DirectMpsDaemons] = []

    def build(
        multi_user: bool = True,
        replicas: int = REPLICAS,
        max_vgpus_per_container: int = MAX_VGPUS_PER_CONTAINER,
        confinement: Confinement = "enforced",
    ) -> Node:
        mps = MpsConfig(
            manager="direct",
            pipe_root=str(work_dir / "pipe"),
            log_root=str(work_dir / "log"),
            multi_user="on" if multi_user else "off",
            container_pipe_dir=CONTAINER_PIPE_DIR,
            max_vgpus_per_container=max_vgpus_per_container,
            confinement=confinement,
        )
        config = Config(mps=mps)
        daemons = DirectMpsDaemons(mps)
        all_daemons.append(daemons)
        served = []
        for gpu in gpus:
            info = daemons.start(gpu)
            assert info.multi_user is multi_user
            # As the agent does after starting a daemon: set the ceiling of mps.confinement
            # ("enforced" by default), which the liveness probe then keeps.
            daemons.apply_defaults(gpu, daemon_ceiling(mps, gpu.memory_mib, replicas))
            served.append(ServedGpu(gpu, replicas, pipe_dir=info.pipe_dir))
        state = node_model.Node(Inventory(tuple(served)), grant_policy(config))
        plugin_dir = work_dir / "plugins"
        plugin_dir.mkdir(exist_ok=True)
        server = PluginServer(str(plugin_dir / "vgpu.sock"), PluginServicer(state))
        server.start()
        standin = KubeletStandin(str(plugin_dir))
        standin.start()
        node = Node(config, gpus, daemons, state, standin, server, work_dir)
        nodes.append(node)
        register(str(plugin_dir), "kubelet.sock", "vgpu.sock", RESOURCE, 5.0)
        standin.wait_for_devices(lambda devices: len(devices) == replicas * len(gpus), 10.0)
        return node

    yield build
    for node in nodes:
        node.close()
    for daemons in all_daemons:
        daemons.stop_all()
