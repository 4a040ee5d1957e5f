"""The DevicePlugin gRPC service: converts between protobuf messages and the node model.

:class:`PluginServicer` answers the five RPCs from a :class:`~vgpu_agent.model.node.Node`, which
owns the served GPUs and decides every Allocate; :class:`PluginServer` owns the gRPC server
on the unix socket in the plugin directory. This module and
:mod:`vgpu_agent.frontends.deviceplugin.kubelet` are the only ones that touch generated code.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Optional, Protocol, TypeVar, cast

import grpc

from vgpu_agent.frontends._proto import deviceplugin_pb2 as pb
from vgpu_agent.frontends._proto import deviceplugin_pb2_grpc as pb_grpc
from vgpu_agent.frontends.deviceplugin.kubelet import plugin_options
from vgpu_agent.frontends.serving import (
    SERVER_OPTIONS,
    UnparseableRequest,
    listen_on_unix_socket,
    remove_stale_socket,
    tolerant,
    unix_target,
)
from vgpu_agent.host.sockets import MAX_UNIX_SOCKET_PATH_BYTES, socket_identity
from vgpu_agent.model.devices import MAX_DEVICE_ID_LENGTH, InvalidRequestError, Inventory
from vgpu_agent.model.errors import AgentError
from vgpu_agent.model.node import Node

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: The most device ids one request may carry in total; a real node has a few hundred vGPUs,
#: so anything near this is a broken or hostile client, refused before any work is done.
MAX_IDS_PER_REQUEST = 10_000
#: Streams wake at least this often to notice a cancelled RPC whose callback was missed.
LIST_AND_WATCH_RECHECK_S = 5.0
#: gRPC worker threads. Each open ListAndWatch stream holds one for as long as it lasts.
SERVER_WORKERS = 16
#: At most this many ListAndWatch streams at once, so the unary RPCs always find a worker.
MAX_LIST_AND_WATCH_STREAMS = 12
#: A request larger than this is refused by gRPC itself (RESOURCE_EXHAUSTED); 10,000 ids of
#: 63 characters take about 0.7 MiB.
#: The longest status message we send: it ends up in `kubectl describe pod`.
MAX_DETAILS_CHARS = 500

# The generated gRPC module has no type stubs; these are what we call from it.
_device_plugin_stub = cast(Callable[[Any], Any], pb_grpc.DevicePluginStub)


def _parsed(request: Any) -> Any:
    if isinstance(request, UnparseableRequest):
        raise InvalidRequestError(
            f"the request is not a valid {request.message_name} message ({request.error}); "
            "device ids must be UTF-8 text"
        )
    return request


def add_servicer(servicer: PluginServicer, server: Any) -> None:
    """Serve ``servicer``'s five RPCs on ``server``, like the generated
    ``add_DevicePluginServicer_to_server`` but with requests that fail to parse handed to
    the servicer as :class:`UnparseableRequest`."""
    unary = grpc.unary_unary_rpc_method_handler
    handlers = {
        "GetDevicePluginOptions": unary(
            servicer.GetDevicePluginOptions,
            request_deserializer=tolerant(pb.Empty),
            response_serializer=pb.DevicePluginOptions.SerializeToString,
        ),
        "ListAndWatch": grpc.unary_stream_rpc_method_handler(
            servicer.ListAndWatch,
            request_deserializer=tolerant(pb.Empty),
            response_serializer=pb.ListAndWatchResponse.SerializeToString,
        ),
        "GetPreferredAllocation": unary(
            servicer.GetPreferredAllocation,
            request_deserializer=tolerant(pb.PreferredAllocationRequest),
            response_serializer=pb.PreferredAllocationResponse.SerializeToString,
        ),
        "Allocate": unary(
            servicer.Allocate,
            request_deserializer=tolerant(pb.AllocateRequest),
            response_serializer=pb.AllocateResponse.SerializeToString,
        ),
        "PreStartContainer": unary(
            servicer.PreStartContainer,
            request_deserializer=tolerant(pb.PreStartContainerRequest),
            response_serializer=pb.PreStartContainerResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("v1beta1.DevicePlugin", handlers),)
    )


def printable(text: str, limit: int = MAX_DETAILS_CHARS) -> str:
    """``text`` with control and other unprintable characters escaped, at most ``limit``
    characters: ids from a hostile request must not reach a terminal raw."""
    escaped = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


class RpcContext(Protocol):
    """The part of ``grpc.ServicerContext`` the servicer uses (grpc ships no type stubs)."""

    def is_active(self) -> bool:
        """Whether the RPC is still running (not cancelled, not timed out, not finished)."""
        ...

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Call ``callback`` when the RPC ends; False if it has already ended."""
        ...

    def abort(self, code: Any, details: str) -> NoReturn:
        """End the RPC with a status code and message."""
        ...


def list_response(inventory: Inventory) -> pb.ListAndWatchResponse:
    """The ListAndWatch message for ``inventory``: every vGPU, its health and NUMA node."""
    devices = []
    for vgpu in inventory.vgpus():
        device = pb.Device(ID=vgpu.vgpu_id, health=vgpu.health)
        if vgpu.numa_node is not None:
            device.topology.nodes.append(pb.NUMANode(ID=vgpu.numa_node))
        devices.append(device)
    return pb.ListAndWatchResponse(devices=devices)


def check_device_ids(device_ids: Sequence[str], what: str) -> None:
    """Refuse hostile or broken id lists before any work: too many ids, or an id longer
    than the kubelet allows. ``what`` names the list in the message."""
    if len(device_ids) > MAX_IDS_PER_REQUEST:
        raise InvalidRequestError(
            f"{what} holds {len(device_ids)} device ids; at most {MAX_IDS_PER_REQUEST} are accepted"
        )
    for device_id in device_ids:
        if len(device_id) > MAX_DEVICE_ID_LENGTH:
            raise InvalidRequestError(
                f"{what} holds a device id of {len(device_id)} characters "
                f"({device_id[:40]!r}...); device ids are at most {MAX_DEVICE_ID_LENGTH}"
            )


class PluginServicer(pb_grpc.DevicePluginServicer):
    """The DevicePlugin service over a :class:`~vgpu_agent.model.node.Node`."""

    def __init__(
        self,
        node: Node,
        max_streams: int = MAX_LIST_AND_WATCH_STREAMS,
        *,
        observe_latency: Optional[Callable[[str, float], None]] = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._node = node
        self._max_streams = max_streams
        #: Told (method name, seconds) after each Allocate and GetPreferredAllocation.
        self._observe_latency = observe_latency
        self._clock = clock
        self._lock = threading.Lock()
        self._streams = 0
        # Streams started under an older generation end; see end_streams().
        self._generation = 0
        self._cached_response: Optional[tuple[int, pb.ListAndWatchResponse]] = None

    @property
    def open_streams(self) -> int:
        """How many ListAndWatch streams are running now."""
        with self._lock:
            return self._streams

    def end_streams(self) -> None:
        """End every ListAndWatch stream running now (the server is about to stop);
        streams opened later are served normally, so the servicer can be reused."""
        with self._lock:
            self._generation += 1
        self._node.wake()

    # -- the RPCs -----------------------------------------------------------------------------

    def GetDevicePluginOptions(  # noqa: N802 - the gRPC method name
        self, request: pb.Empty, context: RpcContext
    ) -> pb.DevicePluginOptions:
        """Options: no PreStartContainer needed, GetPreferredAllocation available."""
        return plugin_options()

    def ListAndWatch(  # noqa: N802 - the gRPC method name
        self, request: pb.Empty, context: RpcContext
    ) -> Iterator[pb.ListAndWatchResponse]:
        """The full device list now, then again after every change, until the RPC ends,
        the server stops or the node is closed."""
        with self._lock:
            if self._streams >= self._max_streams:
                too_many = True
            else:
                too_many = False
                self._streams += 1
                generation = self._generation
        if too_many:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"vgpu-agent already serves {self._max_streams} ListAndWatch streams",
            )
        try:
            yield from self._watch(context, generation)
        except Exception as exc:
            log.exception("ListAndWatch failed inside vgpu-agent")
            context.abort(
                grpc.StatusCode.INTERNAL,
                f"vgpu-agent failed to answer ListAndWatch: {type(exc).__name__}: {exc}",
            )
        finally:
            with self._lock:
                self._streams -= 1

    def GetPreferredAllocation(  # noqa: N802 - the gRPC method name
        self, request: pb.PreferredAllocationRequest, context: RpcContext
    ) -> pb.PreferredAllocationResponse:
        """Best-fit ids on one GPU for each container request."""
        started = self._clock()
        try:
            return _answer(
                context, "GetPreferredAllocation", lambda: self._preferred(_parsed(request))
            )
        finally:
            self._observed("GetPreferredAllocation", started)

    def Allocate(  # noqa: N802 - the gRPC method name
        self, request: pb.AllocateRequest, context: RpcContext
    ) -> pb.AllocateResponse:
        """Validate each container's ids and return its environment, mounts, annotations."""
        started = self._clock()
        try:
            return _answer(context, "Allocate", lambda: self._allocate(_parsed(request)))
        finally:
            self._observed("Allocate", started)

    def _observed(self, method: str, started: float) -> None:
        if self._observe_latency is not None:
            self._observe_latency(method, self._clock() - started)

    def PreStartContainer(  # noqa: N802 - the gRPC method name
        self, request: pb.PreStartContainerRequest, context: RpcContext
    ) -> pb.PreStartContainerResponse:
        """Nothing to prepare: the kubelet does not call this (pre_start_required is False)."""
        return _answer(context, "PreStartContainer", lambda: self._pre_start(_parsed(request)))

    # -- the work -----------------------------------------------------------------------------

    def _pre_start(self, request: pb.PreStartContainerRequest) -> pb.PreStartContainerResponse:
        return pb.PreStartContainerResponse()

    def _watch(self, context: RpcContext, generation: int) -> Iterator[pb.ListAndWatchResponse]:
        ended = threading.Event()

        def on_rpc_end() -> None:
            ended.set()
            self._node.wake()

        def should_end() -> bool:
            return ended.is_set() or self._generation != generation

        if not context.add_callback(on_rpc_end):
            return  # the RPC already ended
        version, inventory = self._node.snapshot()
        yield self._list_response(version, inventory)
        while True:
            new_version, inventory = self._node.wait_for_change(
                version, LIST_AND_WATCH_RECHECK_S, should_end
            )
            if should_end() or self._node.closed or not context.is_active():
                return
            if new_version != version:
                version = new_version
                yield self._list_response(version, inventory)

    def _list_response(self, version: int, inventory: Inventory) -> pb.ListAndWatchResponse:
        # Every stream sends the same message for a version: build it once.
        cached = self._cached_response
        if cached is not None and cached[0] == version:
            return cached[1]
        response = list_response(inventory)
        self._cached_response = (version, response)
        return response

    def _preferred(self, request: pb.PreferredAllocationRequest) -> pb.PreferredAllocationResponse:
        _check_request_size(
            sum(
                len(c.available_deviceIDs) + len(c.must_include_deviceIDs)
                for c in request.container_requests
            ),
            "the preferred allocation request",
        )
        response = pb.PreferredAllocationResponse()
        for container in request.container_requests:
            check_device_ids(container.available_deviceIDs, "the available device ids")
            check_device_ids(container.must_include_deviceIDs, "the must-include device ids")
            if container.allocation_size > MAX_IDS_PER_REQUEST:
                raise InvalidRequestError(
                    f"allocation size {container.allocation_size} is larger than "
                    f"{MAX_IDS_PER_REQUEST}"
                )
            chosen = self._node.preferred(
                list(container.available_deviceIDs),
                list(container.must_include_deviceIDs),
                container.allocation_size,
            )
            response.container_responses.append(
                pb.ContainerPreferredAllocationResponse(deviceIDs=chosen)
            )
        return response

    def _allocate(self, request: pb.AllocateRequest) -> pb.AllocateResponse:
        if not request.container_requests:
            raise InvalidRequestError("the Allocate request holds no container requests")
        _check_request_size(
            sum(len(c.devices_ids) for c in request.container_requests), "the Allocate request"
        )
        _check_each_vgpu_in_one_container(
            [container.devices_ids for container in request.container_requests]
        )
        response = pb.AllocateResponse()
        allocations = []
        for container in request.container_requests:
            check_device_ids(container.devices_ids, "the Allocate request")
            allocation = self._node.allocate(list(container.devices_ids))
            container_grant = allocation.grant
            response.container_responses.append(
                pb.ContainerAllocateResponse(
                    envs=container_grant.envs,
                    mounts=[
                        pb.Mount(
                            container_path=mount.container_path,
                            host_path=mount.host_path,
                            read_only=mount.read_only,
                        )
                        for mount in container_grant.mounts
                    ],
                    annotations=container_grant.annotations,
                    cdi_devices=[
                        pb.CDIDevice(name=device.name) for device in container_grant.cdi_devices
                    ],
                )
            )
            allocations.append(allocation)
        for allocation in allocations:
            log.info(
                "allocated %d vGPU(s) on GPU %s: %s",
                len(allocation.vgpu_ids),
                allocation.gpu_uuid,
                ", ".join(allocation.vgpu_ids),
                extra={"fields": {"VGPU_EVENT": "allocate", "GPU_UUID": allocation.gpu_uuid}},
            )
        return response


def _check_request_size(total_ids: int, what: str) -> None:
    if total_ids > MAX_IDS_PER_REQUEST:
        raise InvalidRequestError(
            f"{what} holds {total_ids} device ids; at most {MAX_IDS_PER_REQUEST} are accepted"
        )


def _check_each_vgpu_in_one_container(containers: Sequence[Sequence[str]]) -> None:
    """A vGPU is one share of a GPU for one container: two containers of one request that
    name the same id would both be granted it (the kubelet never asks so; a forged or
    broken request does)."""
    first_container: dict[str, int] = {}
    for number, device_ids in enumerate(containers, start=1):
        for device_id in device_ids:
            earlier = first_container.setdefault(device_id, number)
            if earlier != number:
                raise InvalidRequestError(
                    f"vGPU {device_id} is asked for by containers {earlier} and {number} of "
                    "one Allocate request; each vGPU goes to one container (the kubelet never "
                    "asks so: check what sent this request)"
                )


def _answer(context: RpcContext, rpc_name: str, work: Callable[[], _T]) -> _T:
    """Run an RPC's work; turn our request errors into INVALID_ARGUMENT and anything
    unexpected into INTERNAL (logged), so no request can take the server down."""
    try:
        return work()
    except InvalidRequestError as exc:
        details = printable(str(exc))
        log.warning("%s refused: %s", rpc_name, details)
        code = grpc.StatusCode.INVALID_ARGUMENT
    except Exception as exc:
        log.exception("%s failed inside vgpu-agent", rpc_name)
        code = grpc.StatusCode.INTERNAL
        details = printable(f"vgpu-agent failed to answer {rpc_name}: {type(exc).__name__}: {exc}")
    return context.abort(code, details)


@dataclass(frozen=True)
class AdvertisedDevice:
    """One device as a ListAndWatch message lists it."""

    device_id: str
    health: str
    numa_nodes: tuple[int, ...] = ()


def device_plugin_stub(channel: Any) -> Any:
    """A DevicePlugin client on ``channel`` (the generated stub, untyped)."""
    return _device_plugin_stub(channel)


def advertised_devices(response: pb.ListAndWatchResponse) -> tuple[AdvertisedDevice, ...]:
    """The devices of one ListAndWatch message as plain values."""
    return tuple(
        AdvertisedDevice(
            device_id=device.ID,
            health=device.health,
            numa_nodes=tuple(node.ID for node in device.topology.nodes),
        )
        for device in response.devices
    )


def query_devices(socket_path: str, timeout_s: float = 2.0) -> tuple[AdvertisedDevice, ...]:
    """Ask a running plugin at ``socket_path`` for its device list (the first ListAndWatch
    message), as ``vgpu-agent status`` does. Raises AgentError when nothing answers."""
    if socket_identity(socket_path) is None:
        raise AgentError(
            f"asking the agent for its devices: no socket at {socket_path} "
            "(is vgpu-agent running, with this plugin directory and socket name?)"
        )
    with grpc.insecure_channel(unix_target(socket_path)) as channel:
        stream = device_plugin_stub(channel).ListAndWatch(pb.Empty(), timeout=timeout_s)
        try:
            first = next(stream)
        except StopIteration:
            raise AgentError(
                f"asking the agent on {socket_path} for its devices: it ended the stream "
                "without a device list (is it shutting down?)"
            ) from None
        except grpc.RpcError as exc:
            raise AgentError(
                f"asking the agent on {socket_path} for its devices: "
                f"{exc.code().name}: {exc.details()} (is vgpu-agent running?)"
            ) from exc
        finally:
            stream.cancel()
    return advertised_devices(first)


class PluginServer:
    """The gRPC server of one :class:`PluginServicer` on a unix socket.

    One instance serves once: after :meth:`stop` make a new one (the servicer can be reused).
    """

    def __init__(
        self, socket_path: str, servicer: PluginServicer, workers: int = SERVER_WORKERS
    ) -> None:
        self._socket_path = os.path.abspath(socket_path)
        self._servicer = servicer
        self._workers = workers
        self._server: Optional[Any] = None
        self._identity: Optional[tuple[int, int]] = None

    @property
    def socket_path(self) -> str:
        """The absolute path of the socket."""
        return self._socket_path

    def start(self) -> None:
        """Listen on the socket and serve. Removes a stale socket file first; raises
        AgentError if another live process serves there or the socket cannot be made."""
        if self._server is not None:
            raise AgentError(f"the plugin server on {self._socket_path} is already started")
        path = self._socket_path
        if len(os.fsencode(path)) > MAX_UNIX_SOCKET_PATH_BYTES:
            raise AgentError(
                f"cannot serve on {path}: a unix socket path is at most "
                f"{MAX_UNIX_SOCKET_PATH_BYTES} bytes (choose a shorter plugin directory)"
            )
        self._remove_stale_socket()
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=self._workers, thread_name_prefix="vgpu-plugin-rpc"
            ),
            options=SERVER_OPTIONS,
        )
        add_servicer(self._servicer, server)
        listen_on_unix_socket(
            server, path, "does the directory exist and is it writable by this user?"
        )
        server.start()
        self._server = server
        self._identity = socket_identity(path)
        log.debug("device plugin serving on %s", path)

    def _remove_stale_socket(self) -> None:
        path = self._socket_path
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise AgentError(f"cannot inspect {path}: {exc.strerror}") from exc
        remove_stale_socket(
            path,
            info,
            f"cannot serve on {path}",
            "another process is serving on that socket (is another vgpu-agent running? "
            "stop it first)",
        )

    def socket_exists(self) -> bool:
        """Whether our socket file is still there (the kubelet deletes it when it restarts)."""
        return self._identity is not None and socket_identity(self._socket_path) == self._identity

    def stop(self, grace_s: float = 0.5) -> None:
        """End the streams, stop serving (in-flight calls get ``grace_s``), and remove the
        socket file if it is still the one we created. Safe to call more than once."""
        server = self._server
        if server is None:
            return
        self._server = None
        self._servicer.end_streams()
        path = self._socket_path
        current = socket_identity(path)
        foreign = current is not None and current != self._identity
        if foreign:
            # gRPC unlinks its socket path when it stops, whoever's socket is there now; keep
            # a socket another server made at our path (after ours was deleted) out of reach.
            aside = f"{path}.{os.getpid()}.keep"
            try:
                os.rename(path, aside)
            except OSError as exc:
                log.warning("cannot protect the socket now at %s: %s", path, exc.strerror)
                foreign = False
        try:
            server.stop(grace_s).wait()
        finally:
            if foreign:
                os.replace(aside, path)
        if socket_identity(path) == self._identity:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove socket %s: %s", path, exc.strerror)
        self._identity = None
        log.debug("device plugin stopped serving on %s", self._socket_path)
