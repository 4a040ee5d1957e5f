"""A kubelet stand-in for the demo, the tests and the system test.

It behaves like the kubelet's device manager where a device plugin can tell: a real gRPC
``Registration`` server on ``<plugin dir>/kubelet.sock`` that, inside ``Register``, checks
the version and the resource name, dials the plugin's socket back, asks its options and
starts consuming ListAndWatch before it answers. :meth:`KubeletStandin.restart` does what a
restarting kubelet does to the plugin directory. It records everything it sees.

Run it alone with ``python3 -m vgpu_agent.standins.kubelet --plugin-dir DIR``: it prints one
line per registration and per device list, restarts on SIGHUP and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import stat
import sys
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable, Optional, cast

import grpc

from vgpu_agent.frontends._proto import deviceplugin_pb2 as pb
from vgpu_agent.frontends._proto import deviceplugin_pb2_grpc as pb_grpc
from vgpu_agent.frontends.deviceplugin.kubelet import (
    API_VERSION,
    DEFAULT_PLUGIN_DIR,
    KUBELET_CHECKPOINT_NAME,
    KUBELET_SOCKET_NAME,
)
from vgpu_agent.frontends.deviceplugin.server import (
    AdvertisedDevice,
    advertised_devices,
    device_plugin_stub,
)
from vgpu_agent.frontends.serving import CHANNEL_OPTIONS, unix_target
from vgpu_agent.model.devices import HEALTHY

#: How long Register waits for the plugin's socket to answer, like the kubelet's dial timeout.
DIAL_TIMEOUT_S = 5.0
#: What a restarted kubelet writes when it has no allocations yet; only its presence matters.
_EMPTY_CHECKPOINT = '{"Data":{"PodDeviceEntries":null,"RegisteredDevices":{}},"Checksum":0}\n'

# The generated gRPC module has no type stubs.
_add_registration_servicer = cast(
    Callable[[Any, Any], None], pb_grpc.add_RegistrationServicer_to_server
)


@dataclass(frozen=True)
class Registration:
    """One accepted Register call, with the options the plugin answered when dialled back."""

    version: str
    endpoint: str
    resource_name: str
    pre_start_required: bool
    get_preferred_allocation_available: bool
    #: time.monotonic() when the registration was accepted.
    at: float


@dataclass(frozen=True)
class DeviceListUpdate:
    """One ListAndWatch message: the plugin's whole device list at time ``at`` (monotonic)."""

    resource_name: str
    devices: tuple[AdvertisedDevice, ...]
    at: float

    @property
    def healthy_count(self) -> int:
        """How many devices are Healthy (the kubelet's allocatable)."""
        return sum(1 for device in self.devices if device.health == HEALTHY)


def is_extended_resource_name(resource_name: str) -> bool:
    """Whether the kubelet accepts ``resource_name`` from a device plugin: ``domain/name``
    outside the ``kubernetes.io`` domain."""
    domain, separator, name = resource_name.partition("/")
    if not separator or not domain or not name or "/" in name:
        return False
    if domain == "kubernetes.io" or domain.endswith(".kubernetes.io"):
        return False
    return not resource_name.startswith("requests.")


class _PluginClient:
    """The stand-in's connection to one registered plugin, consuming its ListAndWatch."""

    def __init__(self, resource_name: str, channel: Any, stub: Any) -> None:
        self.resource_name = resource_name
        self.channel = channel
        self.stub = stub
        self.call: Optional[Any] = None
        self.thread: Optional[threading.Thread] = None
        self.closing = False
        self.ended = threading.Event()

    def close(self) -> None:
        self.closing = True
        if self.call is not None:
            self.call.cancel()
        self.channel.close()
        thread = self.thread
        # A registration publishes its client just before starting the consumer thread; a
        # stop in between finds it not started (ident None) and ends on the closed channel.
        if (
            thread is not None
            and thread.ident is not None
            and thread is not threading.current_thread()
        ):
            thread.join(timeout=5.0)


class _RegistrationServicer(pb_grpc.RegistrationServicer):
    def __init__(self, standin: KubeletStandin) -> None:
        self._standin = standin

    def Register(self, request: pb.RegisterRequest, context: Any) -> pb.Empty:  # noqa: N802 - the gRPC method name
        return self._standin._register(request, context)


class KubeletStandin:
    """A kubelet as far as device plugins can tell, serving on ``<plugin_dir>/kubelet.sock``.

    ``on_event`` gets one human-readable line per registration, device list and stream end.
    """

    def __init__(
        self,
        plugin_dir: str,
        socket_name: str = KUBELET_SOCKET_NAME,
        on_event: Optional[Callable[[str], None]] = None,
        dial_timeout_s: float = DIAL_TIMEOUT_S,
    ) -> None:
        self.plugin_dir = plugin_dir
        self.socket_path = os.path.join(plugin_dir, socket_name)
        self._on_event = on_event
        self._dial_timeout_s = dial_timeout_s
        self._condition = threading.Condition()
        self._server: Optional[Any] = None
        self._clients: dict[str, _PluginClient] = {}
        self._registrations: list[Registration] = []
        self._updates: list[DeviceListUpdate] = []

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on a fresh kubelet.sock (the plugin directory is created if missing)."""
        if self._server is not None:
            raise RuntimeError(f"the kubelet stand-in on {self.socket_path} is already running")
        os.makedirs(self.plugin_dir, exist_ok=True)
        checkpoint = os.path.join(self.plugin_dir, KUBELET_CHECKPOINT_NAME)
        if not os.path.exists(checkpoint):
            with open(checkpoint, "w", encoding="utf-8") as checkpoint_file:
                checkpoint_file.write(_EMPTY_CHECKPOINT)
        if os.path.lexists(self.socket_path):
            os.unlink(self.socket_path)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="kubelet-standin"),
            options=(("grpc.max_receive_message_length", 16 * 1024 * 1024),),
        )
        _add_registration_servicer(_RegistrationServicer(self), server)
        if server.add_insecure_port(unix_target(self.socket_path)) == 0:
            raise RuntimeError(f"the kubelet stand-in cannot listen on {self.socket_path}")
        server.start()
        self._server = server
        self._emit(f"listening on {self.socket_path}")

    def stop(self) -> None:
        """Stop serving and drop every plugin connection (their ListAndWatch streams end)."""
        server = self._server
        self._server = None
        with self._condition:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.close()
        if server is not None:
            server.stop(0).wait()
        if os.path.lexists(self.socket_path):
            os.unlink(self.socket_path)

    def restart(self) -> None:
        """What a restarting kubelet does: stop, delete every file in the plugin directory
        except its checkpoint (plugin sockets included), then listen on a new kubelet.sock."""
        self.stop()
        for name in os.listdir(self.plugin_dir):
            if name == KUBELET_CHECKPOINT_NAME:
                continue
            path = os.path.join(self.plugin_dir, name)
            try:
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    continue
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._emit("restarted: removed the plugin sockets")
        self.start()

    def __enter__(self) -> KubeletStandin:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what it saw --------------------------------------------------------------------------

    @property
    def registrations(self) -> list[Registration]:
        """Every accepted registration, oldest first."""
        with self._condition:
            return list(self._registrations)

    @property
    def device_updates(self) -> list[DeviceListUpdate]:
        """Every ListAndWatch message received, oldest first."""
        with self._condition:
            return list(self._updates)

    def latest_devices(self, resource_name: str) -> Optional[tuple[AdvertisedDevice, ...]]:
        """The last device list the plugin for ``resource_name`` sent, if any."""
        with self._condition:
            return self._latest(resource_name)

    def _latest(self, resource_name: str) -> Optional[tuple[AdvertisedDevice, ...]]:
        for update in reversed(self._updates):
            if update.resource_name == resource_name:
                return update.devices
        return None

    def stream_open(self, resource_name: str) -> bool:
        """Whether the ListAndWatch stream of the plugin for ``resource_name`` is running."""
        with self._condition:
            client = self._clients.get(resource_name)
            return client is not None and not client.ended.is_set()

    def wait_for_registration(self, count: int, timeout_s: float) -> Registration:
        """Wait until ``count`` registrations were accepted; returns the ``count``-th.
        Raises TimeoutError after ``timeout_s``."""
        with self._condition:
            if not self._condition.wait_for(
                lambda: len(self._registrations) >= count, timeout=timeout_s
            ):
                raise TimeoutError(
                    f"{len(self._registrations)} registration(s) after {timeout_s:g} s, "
                    f"expected {count}"
                )
            return self._registrations[count - 1]

    def wait_for_devices(
        self,
        predicate: Callable[[tuple[AdvertisedDevice, ...]], bool],
        timeout_s: float,
        resource_name: Optional[str] = None,
    ) -> tuple[AdvertisedDevice, ...]:
        """Wait until the latest device list (of ``resource_name``, default: the last
        registered resource) satisfies ``predicate``; returns it. TimeoutError after
        ``timeout_s``."""

        def latest() -> Optional[tuple[AdvertisedDevice, ...]]:
            name = resource_name
            if name is None:
                if not self._registrations:
                    return None
                name = self._registrations[-1].resource_name
            return self._latest(name)

        def satisfied() -> bool:
            devices = latest()
            return devices is not None and predicate(devices)

        with self._condition:
            if not self._condition.wait_for(satisfied, timeout=timeout_s):
                devices = latest()
                shown = "none" if devices is None else f"{len(devices)} devices"
                raise TimeoutError(
                    f"no matching device list after {timeout_s:g} s (latest: {shown})"
                )
            devices = latest()
            assert devices is not None  # noqa: S101 - satisfied() just checked it
            return devices

    # -- calling the plugin, as the kubelet does at pod admission -----------------------------

    def plugin_stub(self, resource_name: str) -> Any:
        """The DevicePlugin client of the plugin registered for ``resource_name``."""
        with self._condition:
            client = self._clients.get(resource_name)
        if client is None:
            raise LookupError(f"no plugin is registered for {resource_name}")
        return client.stub

    def plugin_options(self, resource_name: str, timeout_s: float = 5.0) -> pb.DevicePluginOptions:
        """Ask the plugin's GetDevicePluginOptions."""
        return cast(
            pb.DevicePluginOptions,
            self.plugin_stub(resource_name).GetDevicePluginOptions(pb.Empty(), timeout=timeout_s),
        )

    def allocate(
        self, resource_name: str, device_ids: Sequence[str], timeout_s: float = 5.0
    ) -> pb.AllocateResponse:
        """One Allocate call with one container request, as the kubelet makes it.
        Raises grpc.RpcError when the plugin refuses."""
        request = pb.AllocateRequest(
            container_requests=[pb.ContainerAllocateRequest(devices_ids=list(device_ids))]
        )
        return cast(
            pb.AllocateResponse,
            self.plugin_stub(resource_name).Allocate(request, timeout=timeout_s),
        )

    def preferred_allocation(
        self,
        resource_name: str,
        available: Sequence[str],
        must_include: Sequence[str],
        size: int,
        timeout_s: float = 5.0,
    ) -> list[str]:
        """One GetPreferredAllocation call for one container; returns the preferred ids."""
        request = pb.PreferredAllocationRequest(
            container_requests=[
                pb.ContainerPreferredAllocationRequest(
                    available_deviceIDs=list(available),
                    must_include_deviceIDs=list(must_include),
                    allocation_size=size,
                )
            ]
        )
        response = cast(
            pb.PreferredAllocationResponse,
            self.plugin_stub(resource_name).GetPreferredAllocation(request, timeout=timeout_s),
        )
        return list(response.container_responses[0].deviceIDs)

    def pre_start_container(
        self, resource_name: str, device_ids: Sequence[str], timeout_s: float = 30.0
    ) -> pb.PreStartContainerResponse:
        """One PreStartContainer call (the kubelet's timeout for it is 30 s)."""
        request = pb.PreStartContainerRequest(devices_ids=list(device_ids))
        return cast(
            pb.PreStartContainerResponse,
            self.plugin_stub(resource_name).PreStartContainer(request, timeout=timeout_s),
        )

    # -- the Registration service -------------------------------------------------------------

    def _register(self, request: pb.RegisterRequest, context: Any) -> pb.Empty:
        if request.version != API_VERSION:
            context.abort(
                grpc.StatusCode.UNKNOWN,
                f"requested device plugin API version {request.version!r} is not supported; "
                f"the kubelet supports {API_VERSION}",
            )
        if not is_extended_resource_name(request.resource_name):
            context.abort(
                grpc.StatusCode.UNKNOWN,
                f"the ResourceName {request.resource_name!r} is invalid: it is not an "
                "extended resource name "
                "(it must be <domain>/<name> outside the kubernetes.io domain)",
            )
        endpoint_path = os.path.join(self.plugin_dir, request.endpoint)
        channel = grpc.insecure_channel(unix_target(endpoint_path), options=CHANNEL_OPTIONS)
        stub = device_plugin_stub(channel)
        try:
            grpc.channel_ready_future(channel).result(timeout=self._dial_timeout_s)
            options = stub.GetDevicePluginOptions(pb.Empty(), timeout=self._dial_timeout_s)
        except (grpc.FutureTimeoutError, grpc.RpcError) as exc:
            channel.close()
            context.abort(
                grpc.StatusCode.UNKNOWN,
                f"failed to dial device plugin at {endpoint_path}: {_describe(exc)}",
            )
        client = _PluginClient(request.resource_name, channel, stub)
        with self._condition:
            previous = self._clients.pop(request.resource_name, None)
        if previous is not None:
            previous.close()
        client.call = stub.ListAndWatch(pb.Empty())
        client.thread = threading.Thread(
            target=self._consume,
            args=(client,),
            name=f"kubelet-standin-{request.resource_name}",
            daemon=True,
        )
        registration = Registration(
            version=request.version,
            endpoint=request.endpoint,
            resource_name=request.resource_name,
            pre_start_required=options.pre_start_required,
            get_preferred_allocation_available=options.get_preferred_allocation_available,
            at=time.monotonic(),
        )
        with self._condition:
            self._clients[request.resource_name] = client
            self._registrations.append(registration)
            self._condition.notify_all()
        client.thread.start()
        self._emit(
            f"registered {request.resource_name} endpoint={request.endpoint} "
            f"version={request.version} preferred_allocation="
            f"{str(options.get_preferred_allocation_available).lower()}"
        )
        return pb.Empty()

    def _consume(self, client: _PluginClient) -> None:
        try:
            for response in client.call or ():
                devices = advertised_devices(response)
                update = DeviceListUpdate(client.resource_name, devices, time.monotonic())
                with self._condition:
                    self._updates.append(update)
                    self._condition.notify_all()
                self._emit(
                    f"devices {client.resource_name} total={len(devices)} "
                    f"healthy={update.healthy_count} "
                    f"unhealthy={len(devices) - update.healthy_count}"
                )
            reason = "the plugin ended it"
        except grpc.RpcError as exc:
            reason = _describe(exc)
        finally:
            with self._condition:
                client.ended.set()
                self._condition.notify_all()
        if not client.closing:
            # The kubelet would now count every device of this resource as unhealthy.
            self._emit(f"ListAndWatch of {client.resource_name} ended: {reason}")

    def _emit(self, line: str) -> None:
        if self._on_event is not None:
            self._on_event(line)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.FutureTimeoutError):
        return "timed out"
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{code().name}: {details()}"
    return str(exc) or type(exc).__name__


#: How often the stand-in's main thread wakes to run signal handlers that are due.
SIGNAL_POLL_S = 0.2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a kubelet stand-in in the foreground until SIGTERM or SIGINT; SIGHUP restarts it."""
    parser = argparse.ArgumentParser(
        prog="python3 -m vgpu_agent.standins.kubelet",
        description="A kubelet stand-in: accepts device plugin registrations and prints "
        "what the plugins report.",
    )
    parser.add_argument("--plugin-dir", default=DEFAULT_PLUGIN_DIR, help="%(default)s")
    parser.add_argument("--socket-name", default=KUBELET_SOCKET_NAME, help="%(default)s")
    args = parser.parse_args(argv)

    def emit(line: str) -> None:
        print(f"kubelet-standin: {line}", flush=True)

    # SimpleQueue.put is reentrant, so the signal handlers may use it whatever the main
    # thread holds at that moment (an Event's lock taken twice would deadlock).
    requests: queue.SimpleQueue[str] = queue.SimpleQueue()

    def on_stop(signum: int, frame: object) -> None:
        requests.put("stop")

    def on_restart(signum: int, frame: object) -> None:
        requests.put("restart")

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_restart)
    standin = KubeletStandin(args.plugin_dir, args.socket_name, on_event=emit)
    try:
        standin.start()
    except (OSError, RuntimeError) as exc:
        print(f"kubelet-standin: cannot start in {args.plugin_dir}: {exc}", file=sys.stderr)
        return 1
    try:
        while True:
            # A signal that lands on one of gRPC's threads does not interrupt a wait in the
            # main thread, and Python runs handlers only in the main thread: wake now and
            # then so a handler that is due runs and its request is seen.
            try:
                request = requests.get(timeout=SIGNAL_POLL_S)
            except queue.Empty:
                continue
            if request == "stop":
                break
            standin.restart()
    finally:
        standin.stop()
    emit("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
