"""The DRA kubelet plugin assembled: servers, claim preparation and the slice publisher
over one node model, with what the agent's registration state machine needs.

:class:`DraPlugin` is built once by the composition root. Its :meth:`~DraPlugin.serve`,
:meth:`~DraPlugin.register` and :meth:`~DraPlugin.registry_identity` are the three
functions :class:`vgpu_agent.agent.registration.Registrar` is handed, so the agent's loop
drives DRA registration exactly as it drives the device plugin's: serve when the kubelet's
registry directory is there, count the registration once the kubelet's plugin watcher has
accepted us (it dials our socket; we never dial it), serve again when our socket is gone.
Every accepted registration republishes the slice (a restarted kubelet wiped it).

Before the first slice is built, the API server is asked which slice features it keeps
(:meth:`~vgpu_agent.frontends.dra.types.FeatureProbe.probe_features`, a dry-run create):
consumable capacity makes each GPU one shared device, device taints keep a sick GPU in the
slice with taints naming the cause. Found out, never configured: a disabled feature gate
drops those fields silently, and a slice that relied on them would mislead the scheduler.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

from vgpu_agent.config.dra import DraConfig
from vgpu_agent.frontends._proto import dra_v1_pb2, dra_v1beta1_pb2
from vgpu_agent.frontends.dra.cdi import CdiSpecs
from vgpu_agent.frontends.dra.claims import ClaimPreparer, PreparedClaims
from vgpu_agent.frontends.dra.health import ResourceHealthServicer
from vgpu_agent.frontends.dra.publisher import GenerationStore, SlicePublisher
from vgpu_agent.frontends.dra.server import (
    DraPluginServicer,
    DraServer,
    RegistrationServicer,
    RegistrationStatus,
)
from vgpu_agent.frontends.dra.slices import node_slice
from vgpu_agent.frontends.dra.types import ApiFeatures, NodeSlice, ResourceApi
from vgpu_agent.host.log import log_event
from vgpu_agent.host.sockets import SocketIdentity
from vgpu_agent.model.devices import Inventory
from vgpu_agent.model.node import Node

log = logging.getLogger(__name__)


class DraEndpoint:
    """The served sockets as the registration state machine sees them; stopping them at
    a clean stop (the node closed) also ends the publisher, which deletes the slices."""

    def __init__(self, server: DraServer, plugin: DraPlugin) -> None:
        self._server = server
        self._plugin = plugin

    def socket_exists(self) -> bool:
        """Whether both sockets are still ours."""
        return self._server.socket_exists()

    def stop(self) -> None:
        """Stop serving; at a clean stop, wait for the slices to be deleted."""
        self._server.stop()
        if self._plugin.node.closed:
            self._plugin.publisher.stop()


class DraPlugin:
    """The agent as a DRA kubelet plugin for one driver on one node."""

    def __init__(
        self,
        node: Node,
        api: ResourceApi,
        dra: DraConfig,
        *,
        node_name: str,
        state_dir: str,
        register_timeout_s: float = 5.0,
        driver_version: Callable[[], str] = lambda: "",
        observe_latency: Optional[Callable[[str, float], None]] = None,
        publish_retry_initial_s: float = 0.5,
    ) -> None:
        self.node = node
        self.dra = dra
        self._api = api
        self._features: Optional[ApiFeatures] = None
        self.node_name = node_name
        self._register_timeout_s = register_timeout_s
        self._driver_version = driver_version
        self._known_driver_version = ""
        self.preparer = ClaimPreparer(
            node,
            api,
            CdiSpecs(dra.cdi_dir, dra.driver_name),
            PreparedClaims(state_dir),
            driver=dra.driver_name,
            pool=node_name,
            cdi_kind=dra.cdi_kind,
        )
        self.publisher = SlicePublisher(
            node,
            api,
            self.build_slice,
            driver=dra.driver_name,
            node_name=node_name,
            generations=GenerationStore(state_dir),
            resync_interval_s=dra.resync_interval_s,
            retry_initial_s=publish_retry_initial_s,
        )
        self.status = RegistrationStatus()
        self._handlers = [
            RegistrationServicer(
                dra.driver_name, dra.plugin_socket_path, self._on_status
            ).handler(),
            DraPluginServicer(self.preparer, dra_v1_pb2, observe_latency=observe_latency).handler(),
            DraPluginServicer(
                self.preparer, dra_v1beta1_pb2, observe_latency=observe_latency
            ).handler(),
            ResourceHealthServicer(
                node,
                pool=node_name,
                consumable_capacity=lambda: bool(
                    self._features is not None and self._features.consumable_capacity
                ),
            ).handler(),
        ]
        self._seen = self.status.snapshot()

    @property
    def description(self) -> str:
        """What registers, for the log."""
        return f"DRA driver {self.dra.driver_name} on {self.dra.registration_socket_path}"

    @property
    def features(self) -> Optional[ApiFeatures]:
        """What the API server was found to keep (None until it was asked)."""
        return self._features

    def api_features(self) -> ApiFeatures:
        """What the API server keeps, asked once (DraApiError until it answers; an API
        without :class:`~vgpu_agent.frontends.dra.types.FeatureProbe` keeps nothing more)."""
        if self._features is not None:
            return self._features
        probe = getattr(self._api, "probe_features", None)
        found = probe(self.dra.driver_name, self.node_name) if callable(probe) else ApiFeatures()
        if not isinstance(found, ApiFeatures):  # pragma: no cover - a broken fake
            raise TypeError(f"probe_features answered {found!r}, not ApiFeatures")
        self._features = found
        layout = (
            "each GPU one shared device (consumable capacity)"
            if found.consumable_capacity
            else "a device per share (no consumable capacity)"
        )
        health = (
            "a sick GPU tainted in the slice"
            if found.device_taints
            else "a sick GPU left out of the slice (no device taints)"
        )
        log_event(
            log,
            logging.INFO,
            f"the API server's ResourceSlices: {layout}; {health}",
            VGPU_EVENT="dra-features",
        )
        return found

    def build_slice(self, inventory: Inventory, generation: int) -> NodeSlice:
        """The node's slice for ``inventory`` at ``generation``, with the features the API
        server keeps."""
        features = self.api_features()
        if not self._known_driver_version:
            try:
                self._known_driver_version = self._driver_version()
            except Exception as exc:  # an attribute less is better than no slice
                log.warning("reading the driver version for the ResourceSlice: %s", exc)
        return node_slice(
            inventory,
            driver=self.dra.driver_name,
            node_name=self.node_name,
            generation=generation,
            policy=self.node.grant_policy,
            driver_version=self._known_driver_version,
            features=features,
        )

    # -- what the registration state machine is handed ---------------------------------------

    def registry_identity(self) -> Optional[SocketIdentity]:
        """The kubelet's registry directory (device, inode), None while it is missing: the
        kubelet makes it when its plugin watcher starts."""
        try:
            info = os.stat(self.dra.registry_dir)
        except OSError:
            return None
        if not os.path.isdir(self.dra.registry_dir):
            return None
        return (info.st_dev, info.st_ino)

    def serve(self) -> DraEndpoint:
        """Serve both sockets anew (and start publishing the slice, once)."""
        self.publisher.start()
        self._seen = self.status.snapshot()
        server = DraServer(
            self.dra.registration_socket_path, self.dra.plugin_socket_path, self._handlers
        )
        server.start()
        return DraEndpoint(server, self)

    def register(self, abandon: Callable[[], bool]) -> None:
        """Wait for the kubelet to accept the registration of the sockets just served."""
        self.status.wait_after(
            self._seen, self._register_timeout_s, abandon, f"registering {self.description}"
        )

    def _on_status(self, registered: bool, error: str) -> None:
        self.status.record(registered, error)
        if registered:
            log_event(
                log,
                logging.INFO,
                f"the kubelet accepted {self.description}; publishing the node's ResourceSlice",
                VGPU_EVENT="dra-registered",
            )
            self.publisher.republish()
        else:
            log.error("the kubelet refused %s: %s", self.description, error)
