"""The node model: the GPUs this node serves, their vGPUs, health and what Allocate grants.

:class:`Node` is the one place that state lives. The agent's loop changes it (what is
served, health reasons, the grant policy after a reload); the frontends (the device plugin
server, the control socket, any later one) read it and ask it for allocations. It is plain
Python over the values of :mod:`vgpu_agent.model.devices`: no gRPC, NVML, subprocess or config.

Every change that makes the inventory different bumps a version and wakes the threads
waiting in :meth:`Node.wait_for_change` (the ListAndWatch streams); setting an equal
inventory changes nothing, so no stream re-sends.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional

from vgpu_agent.model.devices import (
    ContainerGrant,
    HealthReason,
    InvalidRequestError,
    Inventory,
    MpsGrantPolicy,
    ServedGpu,
    grant,
    preferred_allocation,
    validate_allocation,
)
from vgpu_agent.model.errors import VgpuError

#: Whether a GPU's MPS daemon is up right now: None when it is, else why not. It runs
#: inside Allocate (outside the node's lock): stat calls and /proc reads, and a control
#: command (bounded by mps.control_timeout_s) only when the daemon's pid file names a
#: process that is gone.
DaemonGate = Callable[[str], Optional[str]]


@dataclass(frozen=True)
class Allocation:
    """What one container was granted: its vGPUs, their GPU, and what it gets."""

    gpu_uuid: str
    vgpu_ids: tuple[str, ...]
    grant: ContainerGrant


@dataclass(frozen=True)
class HealthTransition:
    """A health reason that was really added to or removed from a served GPU."""

    gpu: ServedGpu
    reason: HealthReason
    present: bool

    @property
    def healthy(self) -> bool:
        """Whether the GPU's vGPUs are Healthy after the change."""
        return self.gpu.healthy


class Node:
    """The served GPUs and their state, shared between the agent loop and the frontends
    (thread-safe)."""

    def __init__(
        self,
        inventory: Optional[Inventory] = None,
        grant_policy: Optional[MpsGrantPolicy] = None,
        device_list_strategy: str = "envvar",
    ) -> None:
        """``grant_policy`` is what Allocate hands out for MPS (None: the GPU only);
        ``device_list_strategy`` how it names the GPU (``plugin.device_list_strategy``)."""
        self._condition = threading.Condition()
        self._inventory = inventory if inventory is not None else Inventory()
        self._grant_policy = grant_policy
        self._device_list_strategy = device_list_strategy
        self._version = 0
        self._closed = False
        self._daemon_gate: Optional[DaemonGate] = None

    # -- reading --------------------------------------------------------------------------

    def inventory(self) -> Inventory:
        """What is served now."""
        with self._condition:
            return self._inventory

    def snapshot(self) -> tuple[int, Inventory]:
        """The current version and inventory, read together."""
        with self._condition:
            return self._version, self._inventory

    @property
    def version(self) -> int:
        """Incremented on every change of the inventory."""
        with self._condition:
            return self._version

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        with self._condition:
            return self._closed

    @property
    def grant_policy(self) -> Optional[MpsGrantPolicy]:
        """What Allocate hands out for MPS (None: the GPU only)."""
        with self._condition:
            return self._grant_policy

    def allocation_context(self) -> tuple[Inventory, Optional[MpsGrantPolicy], str]:
        """The inventory, grant policy and device list strategy, read together: what a
        frontend that grants by amount rather than by vGPU ids (DRA consumable capacity)
        grants from."""
        with self._condition:
            return self._inventory, self._grant_policy, self._device_list_strategy

    def find_gpu(self, ref: str) -> ServedGpu:
        """The served GPU named by UUID or index; VgpuError listing the served ones."""
        inventory = self.inventory()
        for served in inventory.gpus:
            if ref in (served.gpu.uuid, str(served.gpu.index)):
                return served
        known = ", ".join(f"{served.gpu.index}={served.gpu.uuid}" for served in inventory.gpus)
        raise VgpuError(f"no served GPU {ref!r} (served: {known})")

    # -- what the frontends ask --------------------------------------------------------------

    def allocate(self, vgpu_ids: list[str]) -> Allocation:
        """Check one container's vGPU ids and say what the container gets; raises
        InvalidRequestError (for ``kubectl describe pod``) when they cannot be granted."""
        with self._condition:
            inventory, policy = self._inventory, self._grant_policy
            strategy = self._device_list_strategy
            gate = self._daemon_gate
        served = validate_allocation(inventory, vgpu_ids)
        if gate is not None and policy is not None:
            # Asked now, not from the last health check: a container given the pipe
            # directory of a daemon that is down runs outside MPS without an error.
            down = gate(served.gpu.uuid)
            if down is not None:
                raise InvalidRequestError(
                    f"GPU {served.gpu.uuid}'s MPS daemon is not up ({down}), and a container "
                    "given its pipe directory now would run outside MPS, unconfined; delete "
                    "the pod to reschedule it (the GPU's vGPUs are Unhealthy until the "
                    "daemon answers)"
                )
        granted = grant(served, len(vgpu_ids), policy, strategy)
        return Allocation(served.gpu.uuid, tuple(vgpu_ids), granted)

    def preferred(
        self, available_ids: list[str], must_include_ids: list[str], size: int
    ) -> list[str]:
        """Best-fit ids on one GPU (see :func:`vgpu_agent.model.devices.preferred_allocation`)."""
        return preferred_allocation(self.inventory(), available_ids, must_include_ids, size)

    def wait_for_change(
        self,
        version: int,
        timeout_s: float,
        give_up: Optional[Callable[[], bool]] = None,
    ) -> tuple[int, Inventory]:
        """Block until the version differs from ``version``, :meth:`close` is called,
        ``give_up()`` is true (checked now and after every :meth:`wake`), or ``timeout_s``
        passes; returns the version and inventory at that point."""
        with self._condition:
            self._condition.wait_for(
                lambda: (
                    self._version != version or self._closed or (give_up is not None and give_up())
                ),
                timeout=timeout_s,
            )
            return self._version, self._inventory

    def wake(self) -> None:
        """Make every waiter check its ``give_up`` again. Call it after changing what that
        checks: waiters evaluate it under this lock, so no wake-up is lost."""
        with self._condition:
            self._condition.notify_all()

    # -- what the agent's loop changes -------------------------------------------------------

    def serve(self, inventory: Inventory) -> None:
        """Serve ``inventory`` from now on; wakes the waiters if it differs."""
        with self._condition:
            self._replace(inventory)

    def update(self, change: Callable[[Inventory], Inventory]) -> Inventory:
        """Replace the inventory by ``change(current)`` atomically; returns the new one."""
        with self._condition:
            inventory = change(self._inventory)
            self._replace(inventory)
            return inventory

    def set_grant_policy(self, policy: Optional[MpsGrantPolicy]) -> None:
        """Use ``policy`` for the following Allocate calls (config reload)."""
        with self._condition:
            self._grant_policy = policy

    def set_daemon_gate(self, gate: Optional[DaemonGate]) -> None:
        """Ask ``gate`` before every MPS Allocate whether the GPU's daemon is up (None when
        it is, else why not); an Allocate on a GPU whose daemon is down is refused."""
        with self._condition:
            self._daemon_gate = gate

    def set_device_list_strategy(self, strategy: str) -> None:
        """Name GPUs as ``strategy`` says in the following Allocate calls (config reload)."""
        with self._condition:
            self._device_list_strategy = strategy

    def set_health(
        self, gpu_uuid: str, reason: HealthReason, present: bool
    ) -> Optional[HealthTransition]:
        """Add (``present``) or remove a reason of a served GPU; the transition, or None
        when the GPU is not served or already was in that state."""
        with self._condition:
            before = self._inventory.get(gpu_uuid)
            if before is None or (reason in before.unhealthy_reasons) == present:
                return None
            self._replace(self._inventory.with_reason(gpu_uuid, reason, present))
            after = self._inventory.get(gpu_uuid)
            assert after is not None  # noqa: S101 - with_reason keeps every GPU
            return HealthTransition(after, reason, present)

    def close(self) -> None:
        """Wake every waiter for good: the streams end (used at shutdown)."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def _replace(self, inventory: Inventory) -> None:
        if inventory == self._inventory:
            return
        self._inventory = inventory
        self._version += 1
        self._condition.notify_all()
