"""The GPU backend boundary: what the agent needs to know about and do to a GPU.

Two implementations sit behind :class:`GpuBackend`: :mod:`vgpu_agent.gpus.nvml` (the only
module that imports pynvml) and :mod:`vgpu_agent.standins.simulated` (for the demo and tests).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from vgpu_agent.model.errors import GpuError

#: CUDA MPS serves at most this many clients per GPU on Volta (compute capability 7.0) and newer.
MPS_CLIENT_LIMIT_VOLTA = 48
#: ... and this many on older GPUs.
MPS_CLIENT_LIMIT_PRE_VOLTA = 16
VOLTA_COMPUTE_CAPABILITY = (7, 0)


class ComputeMode(enum.Enum):
    """A GPU's compute mode as NVML reports it."""

    DEFAULT = "default"
    EXCLUSIVE_THREAD = "exclusive_thread"
    PROHIBITED = "prohibited"
    EXCLUSIVE_PROCESS = "exclusive_process"


@dataclass(frozen=True)
class Gpu:
    """One physical GPU as the backend sees it."""

    index: int
    uuid: str
    model: str
    memory_mib: int
    compute_capability: tuple[int, int]
    pci_bus_id: str = ""
    numa_node: Optional[int] = None
    mig_enabled: bool = False

    @property
    def volta_or_newer(self) -> bool:
        """Whether MPS gives this GPU per-client limits (Volta and newer)."""
        return self.compute_capability >= VOLTA_COMPUTE_CAPABILITY

    @property
    def mps_client_limit(self) -> int:
        """How many MPS clients this GPU's architecture serves at once."""
        if self.volta_or_newer:
            return MPS_CLIENT_LIMIT_VOLTA
        return MPS_CLIENT_LIMIT_PRE_VOLTA


class GpuEventKind(enum.Enum):
    """The kinds of GPU fault the backend reports."""

    XID = "xid"
    DOUBLE_BIT_ECC = "double_bit_ecc"
    LOST = "lost"


@dataclass(frozen=True)
class GpuEvent:
    """A fault reported by the backend.

    ``gpu_uuid`` is None when the event carried no device: it then concerns every GPU.
    """

    kind: GpuEventKind
    gpu_uuid: Optional[str]
    xid: Optional[int] = None
    detail: str = ""


@dataclass(frozen=True)
class GpuProcess:
    """An MPS client process on a GPU, as the driver reports it.

    ``pid`` is in the host's PID namespace; ``used_memory_mib`` is None where the driver
    cannot tell.
    """

    pid: int
    gpu_uuid: str
    used_memory_mib: Optional[int]


class GpuBackend(Protocol):
    """What the agent asks of the GPUs. Every method raises :class:`GpuError` on failure."""

    def list_gpus(self) -> list[Gpu]:
        """Every GPU on the node, in index order."""
        ...

    def get_compute_mode(self, gpu_uuid: str) -> ComputeMode:
        """The GPU's current compute mode."""
        ...

    def set_compute_mode(self, gpu_uuid: str, mode: ComputeMode) -> None:
        """Set the GPU's compute mode (needs root on real hardware)."""
        ...

    def check(self, gpu_uuid: str) -> None:
        """Query the GPU once; raises GpuLostError if it is gone, GpuError if it fails."""
        ...

    def watch_events(self, gpu_uuids: list[str]) -> list[str]:
        """Start watching these GPUs for faults; returns the UUIDs that cannot be watched
        by events (they must be polled with :meth:`check` instead)."""
        ...

    def wait_events(self, timeout_s: float) -> list[GpuEvent]:
        """Block up to ``timeout_s`` for fault events on the watched GPUs."""
        ...

    def interrupt_wait(self) -> None:
        """Make a blocked :meth:`wait_events` return early where the backend can (NVML
        cannot: its wait ends at its timeout)."""
        ...

    def mps_client_processes(self, gpu_uuid: str) -> list[GpuProcess]:
        """The MPS client processes on the GPU with the memory each uses."""
        ...

    def close(self) -> None:
        """Release the backend (NVML shutdown)."""
        ...


def set_compute_mode(
    backend: GpuBackend,
    gpu_uuid: str,
    wanted: ComputeMode,
    on_changed: Callable[[ComputeMode], None] = lambda previous: None,
) -> ComputeMode:
    """Set a GPU's compute mode and check that it reads back so; returns the mode it had.
    ``on_changed(previous)`` is called once the mode was changed (even if it then reads
    back otherwise). Raises GpuError when it cannot be set or reads back otherwise."""
    previous = backend.get_compute_mode(gpu_uuid)
    if previous is not wanted:
        backend.set_compute_mode(gpu_uuid, wanted)
        on_changed(previous)
    now = backend.get_compute_mode(gpu_uuid)
    if now is not wanted:
        raise GpuError(
            f"setting compute mode {wanted.value} on GPU {gpu_uuid}: it reads back as "
            f"{now.value}; check that nothing else changes it (nvidia-smi -q -d COMPUTE)"
        )
    return previous
