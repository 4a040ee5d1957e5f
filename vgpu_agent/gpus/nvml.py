"""The NVML GPU backend: the only module that imports pynvml.

Every pynvml error is translated here, in :func:`translate_error`, into a
:class:`~vgpu_agent.model.errors.GpuError` (or :class:`~vgpu_agent.model.errors.GpuLostError`) that
says what failed and what to check. One lock serialises NVML calls between the agent's
main thread and its health watcher; only the blocking event wait runs outside it, so a
watcher waiting for events never holds up Allocate or a compute-mode change.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Any, Callable, Optional, TypeVar

from vgpu_agent.model.errors import GpuError, GpuLostError
from vgpu_agent.model.gpu import ComputeMode, Gpu, GpuEvent, GpuEventKind, GpuProcess

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

# pynvml's integer error codes; spelled out so that translate_error can be tested
# without importing pynvml (the codes are part of NVML's stable ABI).
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_GPU_NOT_FOUND = 28

_LOST_CODES = frozenset({NVML_ERROR_GPU_IS_LOST, NVML_ERROR_GPU_NOT_FOUND})
#: Without a GPU, what to use instead (the CLI's option and the config key).
TRY_WITHOUT_GPU = 'or try without a GPU: --simulate N, or gpus.backend = "simulated"'
_HINTS = {
    NVML_ERROR_LIBRARY_NOT_FOUND: "libnvidia-ml.so.1 was not found: install the NVIDIA "
    f"driver, {TRY_WITHOUT_GPU}",
    NVML_ERROR_DRIVER_NOT_LOADED: "the NVIDIA kernel driver is not loaded: load it "
    f"(modprobe nvidia; nvidia-smi must list the GPUs), {TRY_WITHOUT_GPU}",
    NVML_ERROR_NO_PERMISSION: "insufficient permissions: run as root",
    NVML_ERROR_LIB_RM_VERSION_MISMATCH: "the NVML library and the loaded kernel driver "
    "differ in version: reboot or reload the driver after the upgrade",
    NVML_ERROR_GPU_IS_LOST: "the GPU is lost, fallen off the bus: see the kernel log",
    NVML_ERROR_GPU_NOT_FOUND: "the GPU is gone: see the kernel log",
    NVML_ERROR_RESET_REQUIRED: "the GPU needs a reset (nvidia-smi -r)",
    NVML_ERROR_NOT_SUPPORTED: "this GPU or driver does not support it",
    NVML_ERROR_FUNCTION_NOT_FOUND: "the driver is too old for this NVML function: upgrade it",
    NVML_ERROR_UNINITIALIZED: "NVML is not initialised: the backend was closed",
}

_COMPUTE_MODES = {
    0: ComputeMode.DEFAULT,
    1: ComputeMode.EXCLUSIVE_THREAD,
    2: ComputeMode.PROHIBITED,
    3: ComputeMode.EXCLUSIVE_PROCESS,
}
_COMPUTE_MODE_VALUES = {mode: value for value, mode in _COMPUTE_MODES.items()}

_EVENT_XID = 0x0000000000000008
_EVENT_DOUBLE_BIT_ECC = 0x0000000000000002
#: nvmlEventTypeGpuUnavailableError, defined by newer drivers and nvidia-ml-py only.
_EVENT_GPU_UNAVAILABLE = 0x0000000000004000


def translate_error(action: str, code: Optional[int], text: str) -> GpuError:
    """Our error for an NVML failure with error ``code`` while doing ``action``."""
    hint = _HINTS.get(code) if code is not None else None
    message = f"{action}: NVML error: {text}"
    if hint is not None:
        message += f"; {hint}"
    if code in _LOST_CODES:
        return GpuLostError(message)
    return GpuError(message)


def normalise_pci_bus_id(bus_id: str) -> str:
    """The sysfs spelling of a PCI bus id: lower case with a 4-digit domain.

    NVML reports ``00000000:3B:00.0`` (8-digit domain, upper case); sysfs names the
    device ``0000:3b:00.0``.
    """
    domain, separator, rest = bus_id.strip().partition(":")
    if not separator:
        return bus_id.strip().lower()
    try:
        domain_number = int(domain, 16)
    except ValueError:
        return bus_id.strip().lower()
    return f"{domain_number:04x}:{rest.lower()}"


def numa_node_from_sysfs(bus_id: str, sysfs_root: str = "/sys/bus/pci/devices") -> Optional[int]:
    """The NUMA node sysfs reports for a PCI device; None if unknown (-1 or unreadable)."""
    path = os.path.join(sysfs_root, normalise_pci_bus_id(bus_id), "numa_node")
    try:
        with open(path, encoding="ascii") as numa_file:
            node = int(numa_file.read().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def process_from_nvml(gpu_uuid: str, entry: Any) -> GpuProcess:
    """Our GpuProcess for one of NVML's process info entries (``pid``, ``usedGpuMemory`` in
    bytes, None when NVML cannot tell)."""
    used_bytes = getattr(entry, "usedGpuMemory", None)
    used_mib = int(used_bytes) // (1024 * 1024) if used_bytes is not None else None
    return GpuProcess(pid=int(entry.pid), gpu_uuid=gpu_uuid, used_memory_mib=used_mib)


def _text(value: Any) -> str:
    # Older nvidia-ml-py releases return bytes, newer ones str.
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _handle_address(handle: Any) -> Optional[int]:
    address = ctypes.cast(handle, ctypes.c_void_p).value
    return int(address) if address else None


def _import_pynvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:
        raise GpuError(
            "loading NVML: the Python package nvidia-ml-py (module pynvml) is not "
            f"installed: install it, {TRY_WITHOUT_GPU}"
        ) from exc
    return pynvml


class NvmlBackend:
    """:class:`~vgpu_agent.model.gpu.GpuBackend` on real GPUs through NVML.

    NVML is initialised in the constructor and shut down by :meth:`close`. ``nvml`` is the
    pynvml module (imported here when not given; tests pass a fake with the same names), and
    ``sysfs_root`` is where PCI devices' NUMA nodes are read when NVML cannot say.
    """

    def __init__(
        self, nvml: Optional[Any] = None, sysfs_root: str = "/sys/bus/pci/devices"
    ) -> None:
        self._nvml: Any = nvml if nvml is not None else _import_pynvml()
        self._sysfs_root = sysfs_root
        self._lock = threading.Lock()
        self._event_set: Any = None
        self._uuid_by_handle: dict[int, str] = {}
        self._closed = False
        self._call("initialising NVML", self._nvml.nvmlInit)

    def _call(self, action: str, function: Callable[..., _T], *args: Any) -> _T:
        with self._lock:
            return self._call_unlocked(action, function, *args)

    def _call_unlocked(self, action: str, function: Callable[..., _T], *args: Any) -> _T:
        try:
            return function(*args)
        except self._nvml.NVMLError as exc:
            raise translate_error(action, getattr(exc, "value", None), str(exc)) from exc

    def _handle(self, gpu_uuid: str) -> Any:
        return self._call_unlocked(
            f"finding GPU {gpu_uuid}", self._nvml.nvmlDeviceGetHandleByUUID, gpu_uuid
        )

    def driver_version(self) -> str:
        """The NVIDIA driver's version string (for logs and doctor)."""
        return _text(
            self._call("reading the driver version", self._nvml.nvmlSystemGetDriverVersion)
        )

    def list_gpus(self) -> list[Gpu]:
        """Every GPU on the node, in index order."""
        with self._lock:
            count = self._call_unlocked("counting GPUs", self._nvml.nvmlDeviceGetCount)
            return [self._describe(index) for index in range(count)]

    def _describe(self, index: int) -> Gpu:
        nvml = self._nvml
        handle = self._call_unlocked(f"opening GPU {index}", nvml.nvmlDeviceGetHandleByIndex, index)
        uuid = _text(
            self._call_unlocked(f"reading GPU {index}'s UUID", nvml.nvmlDeviceGetUUID, handle)
        )
        what = f"GPU {index} ({uuid})"
        name = _text(self._call_unlocked(f"reading {what}'s name", nvml.nvmlDeviceGetName, handle))
        memory = self._call_unlocked(
            f"reading {what}'s memory", nvml.nvmlDeviceGetMemoryInfo, handle
        )
        major, minor = self._call_unlocked(
            f"reading {what}'s compute capability", nvml.nvmlDeviceGetCudaComputeCapability, handle
        )
        pci = self._call_unlocked(f"reading {what}'s PCI info", nvml.nvmlDeviceGetPciInfo, handle)
        bus_id = _text(pci.busId)
        return Gpu(
            index=index,
            uuid=uuid,
            model=name,
            memory_mib=int(memory.total) // (1024 * 1024),
            compute_capability=(int(major), int(minor)),
            pci_bus_id=bus_id,
            numa_node=self._numa_node(handle, bus_id),
            mig_enabled=self._mig_enabled(handle, what),
        )

    def _numa_node(self, handle: Any, bus_id: str) -> Optional[int]:
        # NVML's answer is preferred; many drivers (the lent H200 among them) answer
        # NOT_SUPPORTED, and sysfs is what the kernel itself uses.
        function = getattr(self._nvml, "nvmlDeviceGetNumaNodeId", None)
        if function is not None:
            try:
                node = int(function(handle))
            except self._nvml.NVMLError:
                node = -1
            if node >= 0:
                return node
        return numa_node_from_sysfs(bus_id, self._sysfs_root)

    def _mig_enabled(self, handle: Any, what: str) -> bool:
        try:
            current, _pending = self._nvml.nvmlDeviceGetMigMode(handle)
        except self._nvml.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code in (NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND):
                return False
            raise translate_error(f"reading {what}'s MIG mode", code, str(exc)) from exc
        return bool(current)

    def get_compute_mode(self, gpu_uuid: str) -> ComputeMode:
        """The GPU's current compute mode."""
        with self._lock:
            handle = self._handle(gpu_uuid)
            value = self._call_unlocked(
                f"reading the compute mode of GPU {gpu_uuid}",
                self._nvml.nvmlDeviceGetComputeMode,
                handle,
            )
        try:
            return _COMPUTE_MODES[int(value)]
        except KeyError:
            raise GpuError(
                f"reading the compute mode of GPU {gpu_uuid}: NVML reported unknown mode {value}"
            ) from None

    def set_compute_mode(self, gpu_uuid: str, mode: ComputeMode) -> None:
        """Set the GPU's compute mode (needs root)."""
        with self._lock:
            handle = self._handle(gpu_uuid)
            self._call_unlocked(
                f"setting compute mode {mode.value} on GPU {gpu_uuid}",
                self._nvml.nvmlDeviceSetComputeMode,
                handle,
                _COMPUTE_MODE_VALUES[mode],
            )

    def check(self, gpu_uuid: str) -> None:
        """Query the GPU once; GpuLostError if it is gone, GpuError if the query fails."""
        with self._lock:
            try:
                handle = self._handle(gpu_uuid)
            except GpuError as exc:
                if isinstance(exc.__cause__, self._nvml.NVMLError) and (
                    getattr(exc.__cause__, "value", None) == NVML_ERROR_NOT_FOUND
                ):
                    raise GpuLostError(f"checking GPU {gpu_uuid}: NVML no longer sees it") from exc
                raise
            # A memory query touches the device itself, so a GPU that fell off the bus
            # answers GPU_IS_LOST here even while its handle still resolves.
            self._call_unlocked(
                f"checking GPU {gpu_uuid}", self._nvml.nvmlDeviceGetMemoryInfo, handle
            )

    def watch_events(self, gpu_uuids: list[str]) -> list[str]:
        """Register for XID, double-bit ECC and GPU-unavailable events on these GPUs.

        Returns the GPUs whose driver cannot report XID events; the caller reports them
        and polls them with :meth:`check` instead. Never raises for NOT_SUPPORTED.
        """
        nvml = self._nvml
        wanted = _EVENT_XID | _EVENT_DOUBLE_BIT_ECC | _EVENT_GPU_UNAVAILABLE
        unwatched: list[str] = []
        with self._lock:
            if self._event_set is None:
                self._event_set = self._call_unlocked(
                    "creating an NVML event set", nvml.nvmlEventSetCreate
                )
            for gpu_uuid in gpu_uuids:
                handle = self._handle(gpu_uuid)
                try:
                    supported = int(nvml.nvmlDeviceGetSupportedEventTypes(handle))
                except nvml.NVMLError:
                    # Older drivers lack the query; try the XID and ECC events anyway.
                    supported = _EVENT_XID | _EVENT_DOUBLE_BIT_ECC
                event_types = wanted & supported
                if not event_types & _EVENT_XID:
                    unwatched.append(gpu_uuid)
                    continue
                try:
                    nvml.nvmlDeviceRegisterEvents(handle, event_types, self._event_set)
                except nvml.NVMLError as exc:
                    code = getattr(exc, "value", None)
                    if code != NVML_ERROR_NOT_SUPPORTED:
                        raise translate_error(
                            f"registering for fault events on GPU {gpu_uuid}", code, str(exc)
                        ) from exc
                    unwatched.append(gpu_uuid)
                    continue
                address = _handle_address(handle)
                if address is not None:
                    self._uuid_by_handle[address] = gpu_uuid
        # The caller (the health monitor) reports these once and polls them instead.
        for gpu_uuid in unwatched:
            _log.debug("GPU %s: no NVML XID event support", gpu_uuid)
        return unwatched

    def wait_events(self, timeout_s: float) -> list[GpuEvent]:
        """Block up to ``timeout_s`` for one fault event on the watched GPUs."""
        nvml = self._nvml
        event_set = self._event_set
        if event_set is None or self._closed:
            raise GpuError("waiting for GPU events: no GPU is being watched (call watch_events)")
        timeout_ms = max(0, int(timeout_s * 1000))
        try:
            # Outside the lock: this blocks for up to timeout_s by design.
            data = nvml.nvmlEventSetWait_v2(event_set, timeout_ms)
        except nvml.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code == NVML_ERROR_TIMEOUT:
                return []
            raise translate_error("waiting for GPU events", code, str(exc)) from exc
        return [self._event_from(data)]

    def _event_from(self, data: Any) -> GpuEvent:
        address = _handle_address(data.device)
        gpu_uuid = self._uuid_by_handle.get(address) if address is not None else None
        event_type = int(data.eventType)
        if event_type & _EVENT_XID:
            xid = int(data.eventData)
            return GpuEvent(GpuEventKind.XID, gpu_uuid, xid=xid, detail=f"XID {xid}")
        if event_type & _EVENT_DOUBLE_BIT_ECC:
            return GpuEvent(GpuEventKind.DOUBLE_BIT_ECC, gpu_uuid, detail="double-bit ECC error")
        return GpuEvent(GpuEventKind.LOST, gpu_uuid, detail=f"NVML event 0x{event_type:x}")

    def mps_client_processes(self, gpu_uuid: str) -> list[GpuProcess]:
        """The GPU's MPS clients (nvmlDeviceGetMPSComputeRunningProcesses), host pids."""
        with self._lock:
            handle = self._handle(gpu_uuid)
            entries = self._call_unlocked(
                f"listing the MPS client processes of GPU {gpu_uuid}",
                self._nvml.nvmlDeviceGetMPSComputeRunningProcesses,
                handle,
            )
        return [process_from_nvml(gpu_uuid, entry) for entry in entries]

    def interrupt_wait(self) -> None:
        """NVML's event wait cannot be interrupted; it returns at its timeout."""

    def close(self) -> None:
        """Free the event set and shut NVML down; call after the watcher has stopped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._event_set is not None:
                try:
                    self._nvml.nvmlEventSetFree(self._event_set)
                except self._nvml.NVMLError as exc:
                    _log.debug("freeing the NVML event set failed: %s", exc)
                self._event_set = None
            self._call_unlocked("shutting NVML down", self._nvml.nvmlShutdown)
