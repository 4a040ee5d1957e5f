"""A stand-in for the kubelet's PodResources API, for the demo and the tests.

A real gRPC ``PodResourcesLister`` server on a unix socket that answers ``List``, ``Get`` and
``GetAllocatableResources`` from the pods it is given, and writes the matching kubelet
device checkpoint (``kubelet_internal_checkpoint``), the other file the agent reads to find
which pod UID holds which vGPUs. It counts the calls it answers.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable, Optional, cast

import grpc

from vgpu_agent.frontends._proto import podresources_pb2 as pb
from vgpu_agent.frontends._proto import podresources_pb2_grpc as pb_grpc
from vgpu_agent.frontends.serving import unix_target

_add_lister_servicer = cast(
    Callable[[Any, Any], None], pb_grpc.add_PodResourcesListerServicer_to_server
)


@dataclass(frozen=True)
class StandinContainer:
    """One container of a stand-in pod and the devices of one resource it holds."""

    name: str
    resource_name: str = ""
    device_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class StandinPod:
    """A pod the stand-in reports (``uid`` goes only into the checkpoint, as in the kubelet)."""

    namespace: str
    name: str
    uid: str
    containers: tuple[StandinContainer, ...]


def checkpoint_text(pods: Sequence[StandinPod]) -> str:
    """The kubelet's device checkpoint JSON for these pods' allocations."""
    entries = [
        {
            "PodUID": pod.uid,
            "ContainerName": container.name,
            "ResourceName": container.resource_name,
            # The kubelet keys device ids by NUMA node; -1 is "unknown".
            "DeviceIDs": {"-1": list(container.device_ids)},
            "AllocResp": "",
        }
        for pod in pods
        for container in pod.containers
        if container.device_ids
    ]
    registered: dict[str, list[str]] = {}
    for pod in pods:
        for container in pod.containers:
            registered.setdefault(container.resource_name, []).extend(container.device_ids)
    document = {
        "Data": {"PodDeviceEntries": entries or None, "RegisteredDevices": registered},
        "Checksum": 0,
    }
    return json.dumps(document, indent=1) + "\n"


class _Lister:
    """The PodResourcesLister servicer (duck-typed: grpc looks the methods up by name)."""

    def __init__(self, standin: PodResourcesStandin) -> None:
        self._standin = standin

    def List(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC method name
        """Every pod with the devices of each container."""
        del request, context
        return pb.ListPodResourcesResponse(
            pod_resources=[_pod_message(pod) for pod in self._standin.answered("List")]
        )

    def Get(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC method name
        """One pod by namespace and name; NOT_FOUND otherwise."""
        for pod in self._standin.answered("Get"):
            if pod.name == request.pod_name and pod.namespace == request.pod_namespace:
                return pb.GetPodResourcesResponse(pod_resources=_pod_message(pod))
        context.abort(
            grpc.StatusCode.NOT_FOUND, f"pod {request.pod_namespace}/{request.pod_name} not found"
        )
        return None  # pragma: no cover - abort raises

    def GetAllocatableResources(self, request: Any, context: Any) -> Any:  # noqa: N802
        """Nothing allocatable is tracked by the stand-in: an empty answer."""
        del request, context
        self._standin.answered("GetAllocatableResources")
        return pb.AllocatableResourcesResponse()


def _pod_message(pod: StandinPod) -> Any:
    return pb.PodResources(
        name=pod.name,
        namespace=pod.namespace,
        containers=[
            pb.ContainerResources(
                name=container.name,
                devices=(
                    [
                        pb.ContainerDevices(
                            resource_name=container.resource_name,
                            device_ids=list(container.device_ids),
                        )
                    ]
                    if container.device_ids
                    else []
                ),
            )
            for container in pod.containers
        ],
    )


class PodResourcesStandin:
    """A PodResourcesLister server on ``socket_path`` reporting the pods given to it."""

    def __init__(
        self,
        socket_path: str,
        pods: Sequence[StandinPod] = (),
        *,
        checkpoint_path: Optional[str] = None,
    ) -> None:
        self.socket_path = socket_path
        self.checkpoint_path = checkpoint_path
        self._lock = threading.Lock()
        self._pods: tuple[StandinPod, ...] = ()
        self._server: Optional[Any] = None
        self.calls: dict[str, int] = {}
        self.set_pods(pods)

    def set_pods(self, pods: Sequence[StandinPod]) -> None:
        """Report these pods from now on (and write their checkpoint, when one is kept)."""
        with self._lock:
            self._pods = tuple(pods)
        if self.checkpoint_path is not None:
            directory = os.path.dirname(self.checkpoint_path) or "."
            os.makedirs(directory, exist_ok=True)
            temporary = os.path.join(directory, ".kubelet_internal_checkpoint.tmp")
            with open(temporary, "w", encoding="utf-8") as checkpoint_file:
                checkpoint_file.write(checkpoint_text(pods))
            os.replace(temporary, self.checkpoint_path)

    def answered(self, method: str) -> tuple[StandinPod, ...]:
        """Count a call of ``method`` and return the pods to answer it from."""
        with self._lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            return self._pods

    def start(self) -> None:
        """Listen on the socket (its directory is created if missing)."""
        if self._server is not None:
            raise RuntimeError(f"the PodResources stand-in on {self.socket_path} is running")
        os.makedirs(os.path.dirname(self.socket_path) or ".", exist_ok=True)
        if os.path.lexists(self.socket_path):
            os.unlink(self.socket_path)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="podresources-standin")
        )
        _add_lister_servicer(_Lister(self), server)
        if server.add_insecure_port(unix_target(self.socket_path)) == 0:
            raise RuntimeError(f"the PodResources stand-in cannot listen on {self.socket_path}")
        server.start()
        self._server = server

    def stop(self) -> None:
        """Stop serving and remove the socket."""
        server = self._server
        self._server = None
        if server is not None:
            server.stop(0).wait()
        if os.path.lexists(self.socket_path):
            os.unlink(self.socket_path)

    def __enter__(self) -> PodResourcesStandin:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
