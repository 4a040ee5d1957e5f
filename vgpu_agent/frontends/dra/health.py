"""The DRA resource health stream (KEP-4680): the kubelet's ``NodeWatchResources`` call on
the plugin's endpoint socket, answered with every device of the node's slice and whether
its GPU is healthy, again at every change of the node model.

The kubelet shows an allocated device's health in the status of the pods that use it
(``status.containerStatuses[].allocatedResourcesStatus``); a 1.36 kubelet asks every DRA
plugin for the stream and logs an unknown-service error, over and over, for one that does
not serve it. The devices are named as in the slice the agent publishes (a device per share,
or per GPU with consumable capacity), and a sick GPU's devices are reported ``UNHEALTHY``
whether or not its devices stayed in the slice (tainted) or left it.

:func:`device_health` is pure; :class:`ResourceHealthServicer` only converts and waits on
the node, like a ListAndWatch stream does. Beside :mod:`.server`, this is the one module that
touches the health API's generated code; :class:`~.plugin.DraPlugin` serves it on both of
the plugin's sockets with the DRAPlugin services.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Callable

import grpc

from vgpu_agent.frontends._proto import dra_health_v1alpha1_pb2 as health_pb
from vgpu_agent.frontends.dra.slices import DeviceNames
from vgpu_agent.model.devices import Inventory, parse_vgpu_id
from vgpu_agent.model.node import Node

#: The gRPC service the kubelet calls: /v1alpha1.DRAResourceHealth/NodeWatchResources.
HEALTH_SERVICE = "v1alpha1.DRAResourceHealth"
#: How often a waiting stream checks that its call is still active.
ACTIVE_CHECK_S = 0.5


def device_health(inventory: Inventory, *, consumable_capacity: bool) -> list[tuple[str, bool]]:
    """Every device of the node's slice layout by name, and whether its GPU is healthy."""
    names = DeviceNames.of(inventory)
    if consumable_capacity:
        pairs = [(name, gpu_uuid) for name, gpu_uuid in names.gpu_by_name.items()]
    else:
        pairs = [(name, parse_vgpu_id(vgpu)[0]) for name, vgpu in names.vgpu_by_name.items()]
    health = []
    for name, gpu_uuid in pairs:
        served = inventory.get(gpu_uuid)
        health.append((name, served is not None and served.healthy))
    return health


class ResourceHealthServicer:
    """``v1alpha1.DRAResourceHealth`` over the node model for one pool."""

    def __init__(
        self,
        node: Node,
        *,
        pool: str,
        consumable_capacity: Callable[[], bool],
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``consumable_capacity()`` says which layout the published slice has (what the
        API server was found to keep)."""
        self._node = node
        self._pool = pool
        self._consumable_capacity = consumable_capacity
        self._clock = clock

    def response(self, inventory: Inventory) -> health_pb.NodeWatchResourcesResponse:
        """The complete list the kubelet is sent for ``inventory``."""
        now = int(self._clock())
        return health_pb.NodeWatchResourcesResponse(
            devices=[
                health_pb.DeviceHealth(
                    device=health_pb.DeviceIdentifier(pool_name=self._pool, device_name=name),
                    health=health_pb.HEALTHY if healthy else health_pb.UNHEALTHY,
                    last_updated_time=now,
                )
                for name, healthy in device_health(
                    inventory, consumable_capacity=self._consumable_capacity()
                )
            ]
        )

    def NodeWatchResources(  # noqa: N802 - the gRPC method name
        self, request: Any, context: Any
    ) -> Iterator[health_pb.NodeWatchResourcesResponse]:
        """The devices now, then again at every change, until the call or the node ends."""
        version, inventory = self._node.snapshot()
        layout = self._consumable_capacity()
        yield self.response(inventory)
        while context.is_active() and not self._node.closed:
            new_version, inventory = self._node.wait_for_change(version, ACTIVE_CHECK_S)
            # The layout changes once, when the API server is first found to offer consumable
            # capacity: the device names change with it.
            new_layout = self._consumable_capacity()
            if new_version != version or new_layout != layout:
                version, layout = new_version, new_layout
                yield self.response(inventory)

    def handler(self) -> Any:
        """The generic handler serving this servicer."""
        return grpc.method_handlers_generic_handler(
            HEALTH_SERVICE,
            {
                "NodeWatchResources": grpc.unary_stream_rpc_method_handler(
                    self.NodeWatchResources,
                    request_deserializer=health_pb.NodeWatchResourcesRequest.FromString,
                    response_serializer=health_pb.NodeWatchResourcesResponse.SerializeToString,
                )
            },
        )
