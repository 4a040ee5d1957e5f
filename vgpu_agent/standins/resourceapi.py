"""An API server stand-in in memory, behind :class:`~vgpu_agent.frontends.dra.types.ResourceApi`.

It holds ResourceClaims (added by a test, the demo or the bench, allocated or not) and the
ResourceSlices the DRA frontend publishes, with every publish kept in order, and it can
fail on demand. It is what the DRA kubelet side is tested against without a cluster; the
real client and the HTTP stand-in API server live beside the frontend's API-server module.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Callable, Optional

from vgpu_agent.frontends.dra.types import (
    AllocatedDevice,
    ApiFeatures,
    ClaimAllocation,
    ClaimNotFoundError,
    ClaimRef,
    DraApiError,
    NodeSlice,
)


class InMemoryResourceApi:
    """ResourceClaims and ResourceSlices in memory (thread-safe)."""

    def __init__(self, features: Optional[ApiFeatures] = None) -> None:
        """``features``: what :meth:`probe_features` answers (by default an API server of
        Kubernetes 1.34/1.35 defaults: no consumable capacity, no device taints)."""
        self.features = features or ApiFeatures()
        self.probes = 0
        self._condition = threading.Condition()
        self._claims: dict[tuple[str, str], ClaimAllocation] = {}
        self._slices: dict[tuple[str, str], NodeSlice] = {}
        #: Every slice published, in order.
        self.published: list[NodeSlice] = []
        #: (driver, node) of every delete_slices call, in order.
        self.deletions: list[tuple[str, str]] = []
        #: The next calls of each kind fail with this message (None: they succeed).
        self.fail_publish: Optional[str] = None
        self.fail_get: Optional[str] = None
        self.claim_reads = 0

    # -- what a test, the demo or the bench sets up -------------------------------------------

    def add_claim(
        self,
        namespace: str,
        name: str,
        uid: str,
        devices: Sequence[AllocatedDevice] = (),
        *,
        allocated: bool = True,
    ) -> ClaimRef:
        """Create (or replace) a ResourceClaim with this allocation; returns its ref."""
        ref = ClaimRef(namespace=namespace, name=name, uid=uid)
        with self._condition:
            self._claims[(namespace, name)] = ClaimAllocation(ref, allocated, tuple(devices))
        return ref

    def delete_claim(self, namespace: str, name: str) -> None:
        """Delete a ResourceClaim."""
        with self._condition:
            self._claims.pop((namespace, name), None)

    def wipe_node(self, node_name: str) -> None:
        """Delete every slice of the node, whatever its driver (what a starting kubelet does)."""
        with self._condition:
            for key in [key for key in self._slices if key[1] == node_name]:
                del self._slices[key]
            self._condition.notify_all()

    def slice_of(self, driver: str, node_name: str) -> Optional[NodeSlice]:
        """The slice of ``driver`` on ``node_name`` now."""
        with self._condition:
            return self._slices.get((driver, node_name))

    def wait_for_slice(
        self,
        driver: str,
        node_name: str,
        check: Optional[Callable[[NodeSlice], bool]] = None,
        timeout_s: float = 5.0,
    ) -> NodeSlice:
        """Wait until the node has a slice of ``driver`` (for which ``check(slice)`` is true,
        when given); raises TimeoutError naming what it saw."""
        with self._condition:

            def satisfied() -> bool:
                current = self._slices.get((driver, node_name))
                return current is not None and (check is None or check(current))

            if not self._condition.wait_for(satisfied, timeout_s):
                raise TimeoutError(
                    f"no matching slice of {driver} on {node_name} within {timeout_s} s; "
                    f"now: {self._slices.get((driver, node_name))}"
                )
            return self._slices[(driver, node_name)]

    # -- ResourceApi --------------------------------------------------------------------------

    def get_claim(self, namespace: str, name: str) -> ClaimAllocation:
        """The claim, or ClaimNotFoundError."""
        with self._condition:
            self.claim_reads += 1
            if self.fail_get is not None:
                raise DraApiError(self.fail_get)
            claim = self._claims.get((namespace, name))
        if claim is None:
            raise ClaimNotFoundError(f"resourceclaims {namespace}/{name} not found")
        return claim

    def probe_features(self, driver: str, node_name: str) -> ApiFeatures:
        """What this API server keeps (:attr:`features`); fails like a publish would."""
        with self._condition:
            self.probes += 1
            if self.fail_publish is not None:
                raise DraApiError(self.fail_publish)
            return self.features

    def publish_slice(self, node_slice: NodeSlice) -> None:
        """Store the node's slice (replacing the driver's previous one on that node)."""
        with self._condition:
            if self.fail_publish is not None:
                raise DraApiError(self.fail_publish)
            self._slices[(node_slice.driver, node_slice.node_name)] = node_slice
            self.published.append(node_slice)
            self._condition.notify_all()

    def delete_slices(self, driver: str, node_name: str) -> None:
        """Delete the driver's slices on the node."""
        with self._condition:
            self._slices.pop((driver, node_name), None)
            self.deletions.append((driver, node_name))
            self._condition.notify_all()
