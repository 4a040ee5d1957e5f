"""The DRA kubelet plugin's gRPC side: plugin registration and the DRAPlugin service.

:class:`RegistrationServicer` answers the kubelet's plugin watcher on the registration
socket (``<registry dir>/<driver>-reg.sock``): GetInfo says we are a ``DRAPlugin`` named
after the driver, served on the endpoint socket, speaking ``v1.DRAPlugin`` and
``v1beta1.DRAPlugin``; NotifyRegistrationStatus carries the kubelet's verdict.
:class:`DraPluginServicer` answers NodePrepareResources / NodeUnprepareResources of either
version by converting to and from :class:`~vgpu_agent.frontends.dra.claims.ClaimPreparer`.
:class:`DraServer` serves both on their unix sockets. This module and the DRA stand-in
kubelet are the only ones that touch the DRA generated code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent import futures
from types import ModuleType
from typing import Any, Callable, NoReturn, Optional, Protocol

import grpc

from vgpu_agent.frontends._proto import dra_v1_pb2, dra_v1beta1_pb2
from vgpu_agent.frontends._proto import pluginregistration_pb2 as reg_pb
from vgpu_agent.frontends.dra.claims import ClaimPreparer, PrepareResult
from vgpu_agent.frontends.dra.types import ClaimRef
from vgpu_agent.frontends.serving import (
    SERVER_OPTIONS,
    UnparseableRequest,
    listen_on_unix_socket,
    remove_stale_socket,
    tolerant,
)
from vgpu_agent.host.sockets import (
    MAX_UNIX_SOCKET_PATH_BYTES,
    SocketIdentity,
    socket_identity,
)
from vgpu_agent.model.errors import AgentError, RegistrationError

log = logging.getLogger(__name__)

#: PluginInfo.type of a DRA driver's kubelet plugin.
DRA_PLUGIN_TYPE = "DRAPlugin"
#: The services we serve on the endpoint, newest first: the kubelet takes the first it knows.
SUPPORTED_SERVICES = ("v1.DRAPlugin", "v1beta1.DRAPlugin")
#: The proto module of each service, and its full gRPC service name.
SERVICE_MODULES: dict[str, ModuleType] = {
    "v1.DRAPlugin": dra_v1_pb2,
    "v1beta1.DRAPlugin": dra_v1beta1_pb2,
}
REGISTRATION_SERVICE = "pluginregistration.Registration"
#: The most claims one request may name; a pod has a handful.
MAX_CLAIMS_PER_REQUEST = 1000
SERVER_WORKERS = 8
#: While waiting for the kubelet's verdict, ``abandon`` is asked this often.
ABANDON_CHECK_S = 0.1


def service_name(module: ModuleType) -> str:
    """The full gRPC name of the DRAPlugin service of a generated module."""
    name: str = module.DESCRIPTOR.services_by_name["DRAPlugin"].full_name
    return name


class RpcContext(Protocol):
    """The part of ``grpc.ServicerContext`` the servicers use."""

    def abort(self, code: Any, details: str) -> NoReturn:
        """End the RPC with a status code and message."""
        ...


class RegistrationServicer:
    """pluginregistration.Registration for one driver."""

    def __init__(self, driver: str, endpoint: str, on_status: Callable[[bool, str], None]) -> None:
        self._driver = driver
        self._endpoint = endpoint
        self._on_status = on_status

    def GetInfo(self, request: Any, context: RpcContext) -> reg_pb.PluginInfo:  # noqa: N802 - the gRPC method name
        """Who we are: a DRA plugin for the driver, on the endpoint, with its services."""
        return reg_pb.PluginInfo(
            type=DRA_PLUGIN_TYPE,
            name=self._driver,
            endpoint=self._endpoint,
            supported_versions=list(SUPPORTED_SERVICES),
        )

    def NotifyRegistrationStatus(  # noqa: N802 - the gRPC method name
        self, request: Any, context: RpcContext
    ) -> reg_pb.RegistrationStatusResponse:
        """The kubelet's verdict on our registration."""
        if isinstance(request, UnparseableRequest):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a RegistrationStatus message")
        self._on_status(bool(request.plugin_registered), str(request.error))
        return reg_pb.RegistrationStatusResponse()

    def handler(self) -> Any:
        """The generic handler serving this servicer."""
        unary = grpc.unary_unary_rpc_method_handler
        return grpc.method_handlers_generic_handler(
            REGISTRATION_SERVICE,
            {
                "GetInfo": unary(
                    self.GetInfo,
                    request_deserializer=tolerant(reg_pb.InfoRequest),
                    response_serializer=reg_pb.PluginInfo.SerializeToString,
                ),
                "NotifyRegistrationStatus": unary(
                    self.NotifyRegistrationStatus,
                    request_deserializer=tolerant(reg_pb.RegistrationStatus),
                    response_serializer=reg_pb.RegistrationStatusResponse.SerializeToString,
                ),
            },
        )


class DraPluginServicer:
    """The DRAPlugin service of one API version (``module``: its generated messages)."""

    def __init__(
        self,
        preparer: ClaimPreparer,
        module: ModuleType,
        *,
        observe_latency: Optional[Callable[[str, float], None]] = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._preparer = preparer
        self._pb: Any = module
        self._observe_latency = observe_latency
        self._clock = clock

    def _claims(self, request: Any, context: RpcContext, method: str) -> list[ClaimRef]:
        if isinstance(request, UnparseableRequest):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"the {method} request is not a valid message"
            )
        if len(request.claims) > MAX_CLAIMS_PER_REQUEST:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the {method} request names {len(request.claims)} claims; at most "
                f"{MAX_CLAIMS_PER_REQUEST} are accepted",
            )
        return [
            ClaimRef(namespace=claim.namespace, name=claim.name, uid=claim.uid)
            for claim in request.claims
        ]

    def NodePrepareResources(self, request: Any, context: RpcContext) -> Any:  # noqa: N802 - the gRPC method name
        """Prepare every claim; each gets its devices or its error."""
        started = self._clock()
        claims = self._claims(request, context, "NodePrepareResources")
        results = self._preparer.prepare(claims)
        response = self._pb.NodePrepareResourcesResponse()
        for uid, result in results.items():
            response.claims[uid].CopyFrom(self._prepare_response(result))
        if self._observe_latency is not None:
            self._observe_latency("NodePrepareResources", self._clock() - started)
        return response

    def _prepare_response(self, result: PrepareResult) -> Any:
        if result.error:
            return self._pb.NodePrepareResourceResponse(error=result.error)
        return self._pb.NodePrepareResourceResponse(
            devices=[
                self._pb.Device(
                    request_names=list(device.request_names),
                    pool_name=device.pool,
                    device_name=device.device,
                    cdi_device_ids=list(device.cdi_device_ids),
                )
                for device in result.devices
            ]
        )

    def NodeUnprepareResources(self, request: Any, context: RpcContext) -> Any:  # noqa: N802 - the gRPC method name
        """Unprepare every claim; each gets its error or none."""
        claims = self._claims(request, context, "NodeUnprepareResources")
        response = self._pb.NodeUnprepareResourcesResponse()
        for uid, error in self._preparer.unprepare(claims).items():
            response.claims[uid].CopyFrom(self._pb.NodeUnprepareResourceResponse(error=error))
        return response

    def handler(self) -> Any:
        """The generic handler serving this servicer under its version's service name."""
        unary = grpc.unary_unary_rpc_method_handler
        pb = self._pb
        return grpc.method_handlers_generic_handler(
            service_name(pb),
            {
                "NodePrepareResources": unary(
                    self.NodePrepareResources,
                    request_deserializer=tolerant(pb.NodePrepareResourcesRequest),
                    response_serializer=pb.NodePrepareResourcesResponse.SerializeToString,
                ),
                "NodeUnprepareResources": unary(
                    self.NodeUnprepareResources,
                    request_deserializer=tolerant(pb.NodeUnprepareResourcesRequest),
                    response_serializer=pb.NodeUnprepareResourcesResponse.SerializeToString,
                ),
            },
        )


class RegistrationStatus:
    """What the kubelet told us about our registrations (thread-safe)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self.accepted = 0
        self.refusals: list[str] = []

    def record(self, registered: bool, error: str) -> None:
        """Take one NotifyRegistrationStatus."""
        with self._condition:
            if registered:
                self.accepted += 1
            else:
                self.refusals.append(error or "no reason given")
            self._condition.notify_all()

    def snapshot(self) -> tuple[int, int]:
        """(accepted, refused) so far."""
        with self._condition:
            return self.accepted, len(self.refusals)

    def wait_after(
        self,
        seen: tuple[int, int],
        timeout_s: float,
        abandon: Callable[[], bool],
        what: str,
    ) -> None:
        """Wait until the kubelet accepts a registration after ``seen``; RegistrationError
        when it refuses, ``abandon()`` says so, or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while True:
                accepted, refused = self.accepted, len(self.refusals)
                if accepted > seen[0]:
                    return
                if refused > seen[1]:
                    raise RegistrationError(f"{what}: the kubelet refused: {self.refusals[-1]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RegistrationError(
                        f"{what}: the kubelet did not call within {timeout_s:g} s (is it running "
                        "with DRA on, and is dra.registry_dir its plugins_registry directory?)"
                    )
                self._condition.wait(min(left, ABANDON_CHECK_S))
                if abandon():
                    raise RegistrationError(f"{what}: abandoned, a socket changed meanwhile")


def _prepare_socket_path(path: str, what: str) -> None:
    """Check the path fits, make its directory, and remove a stale socket there."""
    if len(os.fsencode(path)) > MAX_UNIX_SOCKET_PATH_BYTES:
        raise AgentError(
            f"cannot serve the {what} on {path}: a unix socket path is at most "
            f"{MAX_UNIX_SOCKET_PATH_BYTES} bytes"
        )
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o750, exist_ok=True)
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise AgentError(f"cannot serve the {what} on {path}: {exc.strerror or exc}") from exc
    remove_stale_socket(
        path,
        info,
        f"cannot serve the {what} on {path}",
        "another process serves there (is another vgpu-agent running with the same "
        "dra.driver_name? stop it first)",
    )


class DraServer:
    """One gRPC server on the registration socket and the plugin socket.

    The plugin socket comes up first: the kubelet may dial the endpoint as soon as the
    registration socket appears. One instance serves once; make a new one after :meth:`stop`.
    """

    def __init__(
        self,
        registration_socket: str,
        plugin_socket: str,
        handlers: list[Any],
        workers: int = SERVER_WORKERS,
    ) -> None:
        self.registration_socket = os.path.abspath(registration_socket)
        self.plugin_socket = os.path.abspath(plugin_socket)
        self._handlers = handlers
        self._workers = workers
        self._servers: list[Any] = []
        self._identities: dict[str, Optional[SocketIdentity]] = {}

    def start(self) -> None:
        """Serve on both sockets; AgentError when either cannot be served."""
        try:
            for path, what in (
                (self.plugin_socket, "DRA plugin socket"),
                (self.registration_socket, "DRA registration socket"),
            ):
                self._serve_on(path, what)
        except BaseException:
            self.stop()
            raise
        log.debug("DRA plugin serving on %s and %s", self.plugin_socket, self.registration_socket)

    def _serve_on(self, path: str, what: str) -> None:
        _prepare_socket_path(path, what)
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=self._workers, thread_name_prefix="vgpu-dra-rpc"
            ),
            options=SERVER_OPTIONS,
        )
        server.add_generic_rpc_handlers(tuple(self._handlers))
        listen_on_unix_socket(server, path, "is its directory writable?")
        server.start()
        self._servers.append(server)
        self._identities[path] = socket_identity(path)

    def socket_exists(self) -> bool:
        """Whether both our sockets are still the ones we made."""
        return bool(self._identities) and all(
            identity is not None and socket_identity(path) == identity
            for path, identity in self._identities.items()
        )

    def stop(self, grace_s: float = 0.5) -> None:
        """Stop serving; remove the sockets that are still ours. Safe to call twice."""
        servers, self._servers = self._servers, []
        # The registration socket goes first, so the kubelet stops calling the plugin.
        for server in reversed(servers):
            server.stop(grace_s).wait()
        for path, identity in self._identities.items():
            if identity is not None and socket_identity(path) == identity:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        self._identities = {}
