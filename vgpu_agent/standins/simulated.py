"""Simulated GPUs and MPS daemons, for the demo, the tests and trying the agent anywhere.

The simulated backend is stateful like a real node: compute modes change when set, faults
are injected (:meth:`SimulatedBackend.inject_xid`, :meth:`lose`, :meth:`recover`) and come
out of :meth:`wait_events` like NVML events, and failures can be switched on for a call or
for initialisation to test the agent's error handling.
"""

from __future__ import annotations

import threading
import uuid as uuid_module
from collections import deque
from typing import Optional

from vgpu_agent.config.plan import simulated_mps
from vgpu_agent.config.schema import Config, MpsConfig, MultiUser, SimulatedConfig
from vgpu_agent.model.commands import SimulateAction, SimulateCommand
from vgpu_agent.model.daemons import MpsDaemonInfo, QuickCheck
from vgpu_agent.model.devices import Ceiling, pipe_dir_for
from vgpu_agent.model.errors import GpuError, GpuLostError, VgpuError
from vgpu_agent.model.gpu import ComputeMode, Gpu, GpuEvent, GpuEventKind, GpuProcess

#: Namespace for deterministic simulated UUIDs: the same count always gives the same UUIDs.
_UUID_NAMESPACE = uuid_module.UUID("6a0f3f4e-2b5c-4d8e-9a61-7c2d0b1e5f93")


#: The driver version a simulated node reports where one is shown (the DRA slice).
SIMULATED_DRIVER_VERSION = "580.95.05"


def simulated_uuid(index: int) -> str:
    """The UUID of simulated GPU ``index`` (stable across runs)."""
    return f"GPU-{uuid_module.uuid5(_UUID_NAMESPACE, f'gpu-{index}')}"


def gpus_from_config(config: SimulatedConfig) -> list[Gpu]:
    """The GPUs a simulated config describes."""
    if config.gpus:
        return [
            Gpu(
                index=index,
                uuid=spec.uuid,
                model=spec.model,
                memory_mib=spec.memory_mib,
                compute_capability=spec.compute_capability,
                pci_bus_id=f"00000000:{0x10 + index:02X}:00.0",
                numa_node=spec.numa_node,
                mig_enabled=spec.mig_enabled,
            )
            for index, spec in enumerate(config.gpus)
        ]
    return [
        Gpu(
            index=index,
            uuid=simulated_uuid(index),
            model=config.model,
            memory_mib=config.memory_mib,
            compute_capability=config.compute_capability,
            pci_bus_id=f"00000000:{0x10 + index:02X}:00.0",
            numa_node=index * 2 // max(config.count, 1),
        )
        for index in range(config.count)
    ]


class SimulatedBackend:
    """A GpuBackend over GPUs that exist only in memory."""

    def __init__(self, gpus: list[Gpu], *, fail_init: Optional[str] = None) -> None:
        if fail_init is not None:
            raise GpuError(f"initialising the simulated GPU backend: {fail_init}")
        self._gpus = list(gpus)
        self._lock = threading.Lock()
        self._events_ready = threading.Condition(self._lock)
        self._compute_modes = {gpu.uuid: ComputeMode.DEFAULT for gpu in gpus}
        self._lost: set[str] = set()
        self._unwatchable: set[str] = set()
        self._watched: set[str] = set()
        self._events: deque[GpuEvent] = deque()
        self._failing_calls: Optional[str] = None
        self._processes: dict[int, GpuProcess] = {}
        #: How many calls failed because of :meth:`fail_calls` (tests wait on it).
        self.failed_calls = 0
        self.closed = False

    # -- GpuBackend --------------------------------------------------------------------

    def list_gpus(self) -> list[Gpu]:
        """Every simulated GPU that is not lost."""
        with self._lock:
            self._maybe_fail("listing GPUs")
            return [gpu for gpu in self._gpus if gpu.uuid not in self._lost]

    def get_compute_mode(self, gpu_uuid: str) -> ComputeMode:
        """The simulated GPU's compute mode."""
        with self._lock:
            self._require(gpu_uuid, "reading the compute mode of")
            return self._compute_modes[gpu_uuid]

    def set_compute_mode(self, gpu_uuid: str, mode: ComputeMode) -> None:
        """Change the simulated GPU's compute mode."""
        with self._lock:
            self._require(gpu_uuid, "setting the compute mode of")
            self._compute_modes[gpu_uuid] = mode

    def check(self, gpu_uuid: str) -> None:
        """Succeeds unless the GPU is lost or calls are failing."""
        with self._lock:
            self._require(gpu_uuid, "querying")

    def watch_events(self, gpu_uuids: list[str]) -> list[str]:
        """Watch these GPUs; those marked unwatchable must be polled."""
        with self._lock:
            self._maybe_fail("registering for events of GPUs " + ", ".join(gpu_uuids))
            self._watched.update(gpu_uuids)
            return [uuid for uuid in gpu_uuids if uuid in self._unwatchable]

    def wait_events(self, timeout_s: float) -> list[GpuEvent]:
        """Injected events for watched GPUs, waiting up to ``timeout_s`` for one."""
        with self._events_ready:
            self._maybe_fail("waiting for GPU events")
            if not self._events:
                self._events_ready.wait(timeout_s)
            events = [
                event
                for event in self._events
                if event.gpu_uuid is None
                or (event.gpu_uuid in self._watched and event.gpu_uuid not in self._unwatchable)
            ]
            self._events.clear()
            return events

    def mps_client_processes(self, gpu_uuid: str) -> list[GpuProcess]:
        """The simulated MPS clients on the GPU (see :meth:`add_mps_client`), by pid."""
        with self._lock:
            self._require(gpu_uuid, "listing the MPS client processes of")
            return sorted(
                (process for process in self._processes.values() if process.gpu_uuid == gpu_uuid),
                key=lambda process: process.pid,
            )

    def interrupt_wait(self) -> None:
        """Wake a blocked wait_events with no events."""
        with self._events_ready:
            self._events_ready.notify_all()

    def close(self) -> None:
        """Mark the backend closed and wake any waiter."""
        with self._events_ready:
            self.closed = True
            self._events_ready.notify_all()

    # -- fault injection ----------------------------------------------------------------

    def inject_xid(self, gpu_uuid: Optional[str], xid: int) -> None:
        """An XID error on one GPU (or, with None, an event with no device attached)."""
        self._push(GpuEvent(GpuEventKind.XID, gpu_uuid, xid, f"simulated XID {xid}"))

    def inject_double_bit_ecc(self, gpu_uuid: str) -> None:
        """A double-bit ECC error on a GPU."""
        self._push(GpuEvent(GpuEventKind.DOUBLE_BIT_ECC, gpu_uuid, None, "simulated DBE"))

    def lose(self, gpu_uuid: str) -> None:
        """The GPU falls off the bus: queries fail and a LOST event is raised."""
        with self._lock:
            self._require_known(gpu_uuid)
            self._lost.add(gpu_uuid)
        self._push(GpuEvent(GpuEventKind.LOST, gpu_uuid, None, "simulated GPU loss"))

    def recover(self, gpu_uuid: str) -> None:
        """A lost GPU answers again."""
        with self._lock:
            self._require_known(gpu_uuid)
            self._lost.discard(gpu_uuid)

    def add_mps_client(self, gpu_uuid: str, pid: int, used_memory_mib: Optional[int]) -> None:
        """A process ``pid`` becomes (or stays, with new memory) an MPS client of the GPU."""
        with self._lock:
            self._require_known(gpu_uuid)
            self._processes[pid] = GpuProcess(pid, gpu_uuid, used_memory_mib)

    def remove_mps_client(self, pid: int) -> None:
        """The client process ``pid`` exits."""
        with self._lock:
            self._processes.pop(pid, None)

    def set_unwatchable(self, gpu_uuid: str) -> None:
        """Make event registration unsupported for this GPU (it must be polled)."""
        with self._lock:
            self._unwatchable.add(gpu_uuid)

    def fail_calls(self, reason: Optional[str]) -> None:
        """Make every call fail with ``reason`` (None: work again)."""
        with self._lock:
            self._failing_calls = reason

    # -- internals ----------------------------------------------------------------------

    def _push(self, event: GpuEvent) -> None:
        with self._events_ready:
            self._events.append(event)
            self._events_ready.notify_all()

    def _maybe_fail(self, action: str) -> None:
        if self._failing_calls is not None:
            self.failed_calls += 1
            raise GpuError(f"{action}: {self._failing_calls}")

    def _require_known(self, gpu_uuid: str) -> None:
        if gpu_uuid not in self._compute_modes:
            known = ", ".join(self._compute_modes) or "none"
            raise GpuError(f"no simulated GPU {gpu_uuid!r} (simulated GPUs: {known})")

    def _require(self, gpu_uuid: str, action: str) -> None:
        self._maybe_fail(f"{action} GPU {gpu_uuid}")
        self._require_known(gpu_uuid)
        if gpu_uuid in self._lost:
            raise GpuLostError(f"{action} GPU {gpu_uuid}: the GPU is lost (simulated)")


class SimulatedMpsDaemons:
    """MPS daemons that exist only in memory: healthy unless set down."""

    def __init__(self, pipe_root: str, log_root: str, *, multi_user: bool = True) -> None:
        self._pipe_root = pipe_root
        self._log_root = log_root
        self._multi_user = multi_user
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._down: dict[str, str] = {}

    def start(self, gpu: Gpu) -> MpsDaemonInfo:
        """'Start' the GPU's daemon (always succeeds)."""
        with self._lock:
            self._running.add(gpu.uuid)
        return MpsDaemonInfo(
            gpu_uuid=gpu.uuid,
            pipe_dir=pipe_dir_for(self._pipe_root, gpu.uuid),
            log_dir=pipe_dir_for(self._log_root, gpu.uuid),
            multi_user=self._multi_user,
        )

    def apply_defaults(self, gpu: Gpu, ceiling: Ceiling) -> list[str]:
        """Nothing to set: simulated daemons have no client defaults."""
        return []

    def stop(self, gpu_uuid: str) -> None:
        """'Quit' the GPU's daemon."""
        with self._lock:
            self._running.discard(gpu_uuid)

    def quick_check(self, gpu_uuid: str) -> QuickCheck:
        """The whole state of a simulated daemon is in memory, so the quick check sees it
        all: the reason it was set down, or nothing wrong."""
        return QuickCheck(self._problem(gpu_uuid))

    def full_check(self, gpu_uuid: str) -> Optional[str]:
        """The same as the quick check: there is no daemon to ask."""
        return self._problem(gpu_uuid)

    def _problem(self, gpu_uuid: str) -> Optional[str]:
        with self._lock:
            if gpu_uuid in self._down:
                return self._down[gpu_uuid]
            if gpu_uuid not in self._running:
                return "MPS daemon not started"
            return None

    def set_down(
        self, gpu_uuid: str, reason: Optional[str] = "MPS daemon down (simulated)"
    ) -> None:
        """Make the GPU's daemon stop answering (reason) or answer again (None)."""
        with self._lock:
            if reason is None:
                self._down.pop(gpu_uuid, None)
            else:
                self._down[gpu_uuid] = reason


class SimulatedMpsInspector:
    """Simulated MPS daemons as doctor sees them: they live inside the agent and answer."""

    in_agent: Optional[str] = "simulated"

    def __init__(self, multi_user: MultiUser) -> None:
        self._multi_user = multi_user

    def probe(self, gpu_uuid: str) -> Optional[str]:
        """Always answers: the daemon lives inside the agent."""
        return None

    def multi_user_supported(self) -> bool:
        """Simulated daemons offer multi-user mode."""
        return True

    def daemon_multi_user(self, gpu_uuid: str) -> Optional[bool]:
        """Multi-user unless the config turns it off."""
        return self._multi_user != "off"

    def ceiling_gaps(self, gpu_uuid: str, ceiling: Ceiling) -> list[str]:
        """Nothing to read back: simulated daemons hold no ceiling of their own."""
        return []


class Simulation:
    """The simulated GPUs of one agent, its simulated MPS daemons (unless the config names
    a stand-in control program), and the faults `vgpu-agent simulate` injects into them."""

    def __init__(self, backend: SimulatedBackend, mps: Optional[SimulatedMpsDaemons]) -> None:
        self.backend = backend
        self.mps = mps

    @classmethod
    def from_config(cls, config: Config) -> Simulation:
        """The simulated node ``config`` describes."""
        backend = SimulatedBackend(gpus_from_config(config.simulated))
        mps = None
        if config.mps.enabled and simulated_mps(config):
            mps = SimulatedMpsDaemons(config.mps.pipe_root, config.mps.log_root)
        return cls(backend, mps)

    def end_client(self, mps: MpsConfig, gpu_uuid: str, pid: int) -> Optional[str]:
        """End a simulated MPS client as ``terminate_client`` would (the per-pod policy):
        it leaves the GPU's client list. None when the GPU has no such client."""
        if not any(process.pid == pid for process in self.backend.mps_client_processes(gpu_uuid)):
            return None
        self.backend.remove_mps_client(pid)
        return "simulated MPS server"

    def inject(self, command: SimulateCommand, gpu_uuid: str) -> None:
        """Inject ``command``'s fault into the GPU; VgpuError when there is nothing to."""
        action = command.action
        if action is SimulateAction.XID:
            if command.xid is None:
                raise VgpuError("simulate xid needs an XID number")
            self.backend.inject_xid(gpu_uuid, command.xid)
        elif action is SimulateAction.ECC:
            self.backend.inject_double_bit_ecc(gpu_uuid)
        elif action is SimulateAction.LOSE:
            self.backend.lose(gpu_uuid)
        elif action is SimulateAction.RECOVER:
            self.backend.recover(gpu_uuid)
        elif action is SimulateAction.MPS_CLIENT:
            if command.pid is None:
                raise VgpuError("simulate mps-client needs a pid")
            self.backend.add_mps_client(gpu_uuid, command.pid, command.memory_mib)
        elif self.mps is None:
            raise VgpuError("MPS is off in this config; nothing to simulate")
        else:
            down = action is SimulateAction.MPS_DOWN
            self.mps.set_down(gpu_uuid, "MPS daemon down (simulated)" if down else None)
