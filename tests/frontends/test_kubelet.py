"""Registration with the kubelet stand-in, registration errors, and kubelet restarts."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Callable

import pytest

from vgpu_agent.frontends.deviceplugin import kubelet
from vgpu_agent.frontends.deviceplugin.server import PluginServer, PluginServicer, query_devices
from vgpu_agent.host.sockets import socket_identity
from vgpu_agent.model.devices import HealthReason, Inventory
from vgpu_agent.model.errors import RegistrationError
from vgpu_agent.model.node import Node
from vgpu_agent.standins.kubelet import KubeletStandin, is_extended_resource_name

RESOURCE = "eks.amazonaws.com/vgpu"
PLUGIN_SOCKET = "vgpu.sock"
#: Generous: registration normally takes milliseconds.
PROMPT_S = 5.0


@pytest.fixture
def state(inventory_factory: Callable[..., Inventory]) -> Node:
    """Two GPUs of three vGPUs; GPU 1 on NUMA node 0."""
    return Node(inventory_factory(replicas=(3, 3), numa_nodes=(None, 0)))


@pytest.fixture
def plugin_server(plugin_dir: str, state: Node) -> Iterator[PluginServer]:
    """Our plugin serving on <plugin_dir>/vgpu.sock."""
    server = PluginServer(os.path.join(plugin_dir, PLUGIN_SOCKET), PluginServicer(state))
    server.start()
    yield server
    server.stop()


def register(plugin_dir: str, resource_name: str = RESOURCE, timeout_s: float = PROMPT_S) -> None:
    """Register our socket as the agent does."""
    kubelet.register(plugin_dir, "kubelet.sock", PLUGIN_SOCKET, resource_name, timeout_s)


def test_register_with_the_kubelet(
    plugin_dir: str, kubelet_standin: KubeletStandin, plugin_server: PluginServer
) -> None:
    """The kubelet records the registration, asks our options and receives our devices."""
    register(plugin_dir)
    (registration,) = kubelet_standin.registrations
    assert (registration.version, registration.endpoint, registration.resource_name) == (
        "v1beta1",
        PLUGIN_SOCKET,
        RESOURCE,
    )
    assert registration.get_preferred_allocation_available
    assert not registration.pre_start_required
    devices = kubelet_standin.wait_for_devices(lambda devices: len(devices) == 6, PROMPT_S)
    assert [device.numa_nodes for device in devices] == [()] * 3 + [(0,)] * 3
    assert kubelet_standin.stream_open(RESOURCE)


def test_kubelet_sees_health_changes(
    plugin_dir: str,
    kubelet_standin: KubeletStandin,
    plugin_server: PluginServer,
    state: Node,
) -> None:
    """A health change in the state reaches the kubelet as a new device list."""
    register(plugin_dir)
    kubelet_standin.wait_for_devices(lambda devices: len(devices) == 6, PROMPT_S)
    uuid = state.inventory().gpus[0].gpu.uuid
    state.update(
        lambda inventory: inventory.with_reason(uuid, HealthReason.xid_fault(79), present=True)
    )
    devices = kubelet_standin.wait_for_devices(
        lambda devices: devices[0].health == "Unhealthy", PROMPT_S
    )
    assert [device.health for device in devices] == ["Unhealthy"] * 3 + ["Healthy"] * 3


def test_kubelet_calls_the_plugin_rpcs(
    plugin_dir: str,
    kubelet_standin: KubeletStandin,
    plugin_server: PluginServer,
    state: Node,
) -> None:
    """The stand-in's admission-time calls reach the plugin over the socket."""
    register(plugin_dir)
    ids = state.inventory().gpus[1].vgpu_ids
    preferred = kubelet_standin.preferred_allocation(RESOURCE, ids, [], 2)
    response = kubelet_standin.allocate(RESOURCE, preferred)
    assert preferred == ids[:2]
    assert response.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == (
        state.inventory().gpus[1].gpu.uuid
    )
    assert kubelet_standin.plugin_options(RESOURCE).get_preferred_allocation_available
    kubelet_standin.pre_start_container(RESOURCE, preferred)


def test_query_devices_reads_the_running_plugin(plugin_server: PluginServer, state: Node) -> None:
    """query_devices (vgpu-agent status) gets the advertised list from the socket."""
    devices = query_devices(plugin_server.socket_path, timeout_s=PROMPT_S)
    assert [device.device_id for device in devices] == [
        vgpu_id for served in state.inventory().gpus for vgpu_id in served.vgpu_ids
    ]


def test_register_without_a_kubelet_socket(plugin_dir: str, plugin_server: PluginServer) -> None:
    """No kubelet.sock: the error says the kubelet may not run."""
    with pytest.raises(RegistrationError, match="no socket there \\(is the kubelet running"):
        register(plugin_dir)


def test_register_with_nobody_listening(plugin_dir: str, plugin_server: PluginServer) -> None:
    """A kubelet.sock left by a dead kubelet: the error says nobody answers."""
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(os.path.join(plugin_dir, "kubelet.sock"))
    dead.close()
    with pytest.raises(RegistrationError, match="nobody answers on the socket"):
        register(plugin_dir)


def test_register_times_out_on_a_silent_kubelet(
    plugin_dir: str, plugin_server: PluginServer
) -> None:
    """A socket that accepts but never speaks gRPC: the error names the timeout."""
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(os.path.join(plugin_dir, "kubelet.sock"))
    silent.listen(8)
    try:
        started = time.monotonic()
        with pytest.raises(RegistrationError, match=r"timed out after 0\.3 s"):
            register(plugin_dir, timeout_s=0.3)
        assert time.monotonic() - started < PROMPT_S
    finally:
        silent.close()


@pytest.mark.parametrize(
    ("resource_name", "reason"),
    [
        ("vgpu", "is not an extended resource name"),
        ("kubernetes.io/vgpu", "is not an extended resource name"),
        ("gpu.kubernetes.io/vgpu", "is not an extended resource name"),
    ],
    ids=["no-domain", "kubernetes-io", "kubernetes-io-subdomain"],
)
def test_register_refused_for_a_bad_resource_name(
    plugin_dir: str,
    kubelet_standin: KubeletStandin,
    plugin_server: PluginServer,
    resource_name: str,
    reason: str,
) -> None:
    """The kubelet refuses a non-extended resource name and the error carries its reason."""
    with pytest.raises(RegistrationError, match=f"the kubelet refused: .*{reason}"):
        register(plugin_dir, resource_name=resource_name)
    assert kubelet_standin.registrations == []


def test_register_refused_when_the_plugin_does_not_serve(plugin_dir: str) -> None:
    """Registering before serving fails: the kubelet cannot dial us back."""
    standin = KubeletStandin(plugin_dir, dial_timeout_s=0.3)
    standin.start()
    try:
        with pytest.raises(RegistrationError, match="failed to dial device plugin"):
            kubelet.register(standin.plugin_dir, "kubelet.sock", PLUGIN_SOCKET, RESOURCE, PROMPT_S)
    finally:
        standin.stop()


@pytest.mark.parametrize(
    ("resource_name", "accepted"),
    [
        ("eks.amazonaws.com/vgpu", True),
        ("example.com/gpu-shared", True),
        ("vgpu", False),
        ("/vgpu", False),
        ("example.com/", False),
        ("example.com/a/b", False),
        ("kubernetes.io/vgpu", False),
        ("node.kubernetes.io/vgpu", False),
        ("requests.example.com/vgpu", False),
    ],
    ids=[
        "eks",
        "example",
        "bare",
        "empty-domain",
        "empty-name",
        "two-slashes",
        "k8s",
        "k8s-subdomain",
        "requests-prefix",
    ],
)
def test_is_extended_resource_name(resource_name: str, accepted: bool) -> None:
    """The stand-in accepts exactly the names a kubelet accepts from a device plugin."""
    assert is_extended_resource_name(resource_name) is accepted


def test_restart_deletes_every_file_but_the_checkpoint(
    plugin_dir: str, kubelet_standin: KubeletStandin, plugin_server: PluginServer
) -> None:
    """A restart removes plugin sockets and other files, keeps the checkpoint and folders."""
    register(plugin_dir)
    with open(os.path.join(plugin_dir, "other-plugin.txt"), "w", encoding="utf-8") as other:
        other.write("x")
    os.mkdir(os.path.join(plugin_dir, "folder"))
    kubelet_standin.restart()
    assert sorted(os.listdir(plugin_dir)) == [
        "folder",
        "kubelet.sock",
        kubelet.KUBELET_CHECKPOINT_NAME,
    ]
    assert not plugin_server.socket_exists()
    assert not kubelet_standin.stream_open(RESOURCE)


def test_kubelet_socket_identity_changes_across_restart(
    plugin_dir: str, kubelet_standin: KubeletStandin
) -> None:
    """The socket made by a restarted kubelet has another identity (even on a reused inode)."""
    path = os.path.join(plugin_dir, "kubelet.sock")
    before = socket_identity(path)
    kubelet_standin.restart()
    after = socket_identity(path)
    assert before is not None
    assert after is not None
    assert before != after


def test_kubelet_socket_identity_is_none_without_a_socket(plugin_dir: str) -> None:
    """A missing path or a regular file has no identity."""
    path = os.path.join(plugin_dir, "kubelet.sock")
    assert socket_identity(path) is None
    with open(path, "w", encoding="utf-8") as regular:
        regular.write("")
    assert socket_identity(path) is None


def test_register_again_after_a_kubelet_restart(
    plugin_dir: str, kubelet_standin: KubeletStandin, state: Node
) -> None:
    """After a restart a new server and registration bring the devices back to the kubelet."""
    servicer = PluginServicer(state)
    server = PluginServer(os.path.join(plugin_dir, PLUGIN_SOCKET), servicer)
    server.start()
    register(plugin_dir)
    kubelet_standin.restart()
    server.stop()
    server = PluginServer(os.path.join(plugin_dir, PLUGIN_SOCKET), servicer)
    server.start()
    try:
        register(plugin_dir)
        kubelet_standin.wait_for_registration(2, PROMPT_S)
        kubelet_standin.wait_for_devices(lambda devices: len(devices) == 6, PROMPT_S)
        assert kubelet_standin.stream_open(RESOURCE)
    finally:
        server.stop()


def test_wait_for_registration_times_out(kubelet_standin: KubeletStandin) -> None:
    """Waiting for a registration that never comes raises TimeoutError."""
    with pytest.raises(TimeoutError, match="0 registration"):
        kubelet_standin.wait_for_registration(1, timeout_s=0.05)


class _Output:
    """Reads a child's output straight from its pipe, so nothing waits in a buffer that
    ``select`` cannot see."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        self._fd = process.stdout.fileno()
        self._pending = ""

    def read_until(self, wanted: str, timeout_s: float = 10.0) -> str:
        """The lines up to and including one containing ``wanted``; fails, rather than
        hangs, when it does not come within ``timeout_s``."""
        seen = ""
        deadline = time.monotonic() + timeout_s
        while True:
            while "\n" in self._pending:
                line, self._pending = self._pending.split("\n", 1)
                seen += line + "\n"
                if wanted in line:
                    return seen
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no line with {wanted!r} within {timeout_s:g} s; got {seen!r}")
            ready, _, _ = select.select([self._fd], [], [], remaining)
            if ready:
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    pytest.fail(f"output ended before a line with {wanted!r}; got {seen!r}")
                self._pending += chunk.decode()


def test_standin_runs_as_a_program(plugin_dir: str, plugin_server: PluginServer) -> None:
    """`python3 -m vgpu_agent.standins.kubelet` prints registrations and device lists,
    restarts on SIGHUP and exits 0 on SIGTERM."""
    with subprocess.Popen(
        [sys.executable, "-m", "vgpu_agent.standins.kubelet", "--plugin-dir", plugin_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as process:
        output = _Output(process)
        try:
            output.read_until("listening on")
            register(plugin_dir)
            # The stand-in consumes ListAndWatch while Register is still in flight, as the
            # kubelet does: the two lines may come in either order.
            seen = output.read_until("registered eks.amazonaws.com/vgpu endpoint=vgpu.sock")
            if "devices eks.amazonaws.com/vgpu total=6 healthy=6" not in seen:
                output.read_until("devices eks.amazonaws.com/vgpu total=6 healthy=6")
            process.send_signal(signal.SIGHUP)
            output.read_until("restarted")
            output.read_until("listening on")
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=PROMPT_S) == 0
            output.read_until("stopped")
        finally:
            if process.poll() is None:
                process.kill()
