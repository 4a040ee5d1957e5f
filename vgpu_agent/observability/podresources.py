"""The kubelet's PodResources API v1: which pod's containers hold which devices.

The kubelet serves ``PodResourcesLister`` on ``/var/lib/kubelet/pod-resources/kubelet.sock``.
:func:`list_pod_resources` asks it once and returns our own dataclasses; every gRPC failure
becomes an :class:`~vgpu_agent.model.errors.AttributionError` that says what to check. Only this
module and :mod:`vgpu_agent.standins.podresources` touch the generated PodResources classes.
"""

from __future__ import annotations

import os
import stat
import threading
from typing import Any, Callable, Optional, cast

import grpc

from vgpu_agent.frontends._proto import podresources_pb2 as pb
from vgpu_agent.frontends._proto import podresources_pb2_grpc as pb_grpc
from vgpu_agent.frontends.serving import CHANNEL_OPTIONS, unix_target
from vgpu_agent.model.errors import AttributionError
from vgpu_agent.observability.attribution import ContainerDevices

#: Where the kubelet serves the PodResources API.
DEFAULT_POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
#: Bound on one List call: the kubelet answers from memory.
LIST_TIMEOUT_S = 2.0

# The generated gRPC module has no type stubs.
_lister_stub = cast(Callable[[Any], Any], pb_grpc.PodResourcesListerStub)


def _missing_message(socket_path: str) -> str:
    return (
        f"kubelet PodResources socket {socket_path} not found; attribution shows vGPU ids "
        "only (is the kubelet running, and is its pod-resources directory visible to the agent?)"
    )


def _check_socket(socket_path: str) -> None:
    try:
        mode = os.stat(socket_path).st_mode
    except FileNotFoundError:
        raise AttributionError(_missing_message(socket_path)) from None
    except OSError as exc:
        raise AttributionError(
            f"reading the kubelet PodResources socket {socket_path}: {exc.strerror or exc}; "
            "run the agent as root"
        ) from exc
    if not stat.S_ISSOCK(mode):
        raise AttributionError(
            f"kubelet PodResources socket {socket_path} is not a socket; check "
            "attribution.pod_resources_socket"
        )


def _list(
    channel: Any, socket_path: str, resource_name: str, timeout_s: float
) -> list[ContainerDevices]:
    try:
        try:
            response = _lister_stub(channel).List(pb.ListPodResourcesRequest(), timeout=timeout_s)
        except grpc.RpcError as first:
            # After a kubelet restart the kept channel's first call can still go out on the
            # old server's broken transport (UNAVAILABLE, "Stream removed"); gRPC has
            # reconnected by the time it fails, so one more try reaches the new kubelet.
            if not (isinstance(first, grpc.Call) and first.code() == grpc.StatusCode.UNAVAILABLE):
                raise
            response = _lister_stub(channel).List(pb.ListPodResourcesRequest(), timeout=timeout_s)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        name = code.name if code is not None else "UNKNOWN"
        raise AttributionError(
            f"listing pod resources from the kubelet on {socket_path}: {name}: {details}; "
            "attribution shows vGPU ids only until the kubelet answers"
        ) from exc
    found: list[ContainerDevices] = []
    for pod in response.pod_resources:
        for container in pod.containers:
            for devices in container.devices:
                if resource_name and devices.resource_name != resource_name:
                    continue
                if not devices.device_ids:
                    continue
                found.append(
                    ContainerDevices(
                        namespace=str(pod.namespace),
                        pod=str(pod.name),
                        container=str(container.name),
                        resource_name=str(devices.resource_name),
                        device_ids=tuple(str(device_id) for device_id in devices.device_ids),
                    )
                )
    return found


def list_pod_resources(
    socket_path: str = DEFAULT_POD_RESOURCES_SOCKET,
    resource_name: str = "",
    timeout_s: float = LIST_TIMEOUT_S,
) -> list[ContainerDevices]:
    """Every container's devices of ``resource_name`` (of every resource when empty), over a
    channel opened for this one call.

    Containers that hold none of the resource are left out. Raises AttributionError when the
    socket is missing or the kubelet does not answer.
    """
    _check_socket(socket_path)
    with grpc.insecure_channel(unix_target(socket_path), options=CHANNEL_OPTIONS) as channel:
        return _list(channel, socket_path, resource_name, timeout_s)


class PodResourcesClient:
    """:func:`list_pod_resources` over one channel kept open between calls (a refresher asks
    every few seconds; opening a channel costs more than the call). The channel reconnects
    by itself when the kubelet restarts; a new socket path opens a new one."""

    def __init__(self, timeout_s: float = LIST_TIMEOUT_S) -> None:
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._socket_path = ""
        self._channel: Optional[Any] = None

    def __call__(self, socket_path: str, resource_name: str) -> list[ContainerDevices]:
        """Every container's devices of ``resource_name``; AttributionError as
        :func:`list_pod_resources`."""
        _check_socket(socket_path)
        with self._lock:
            if self._channel is None or socket_path != self._socket_path:
                self._close_locked()
                self._channel = grpc.insecure_channel(
                    unix_target(socket_path), options=CHANNEL_OPTIONS
                )
                self._socket_path = socket_path
            channel = self._channel
        return _list(channel, socket_path, resource_name, self._timeout_s)

    def close(self) -> None:
        """Close the channel."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
