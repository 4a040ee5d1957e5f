"""A stateful stand-in for the pynvml module, handed to :class:`vgpu_agent.gpus.nvml.NvmlBackend`.

It has the names the backend uses, spelled and numbered as in nvidia-ml-py (functions,
``NVML_ERROR_*`` codes, ``nvmlEventType*`` masks and an ``NVMLError`` exception carrying
``.value``), and behaves as NVML does where the backend can tell:

- device handles are ctypes pointers; each lookup returns a new pointer object to the same
  address, as ``nvmlDeviceGetHandleByUUID`` does, and events name their device by handle;
- ``nvmlEventSetWait_v2`` returns the next queued event or raises ``NVML_ERROR_TIMEOUT``
  at once when none is queued (nothing here ever sleeps);
- calls before ``nvmlInit`` or after ``nvmlShutdown`` raise ``NVML_ERROR_UNINITIALIZED``;
- a GPU marked lost answers ``NVML_ERROR_GPU_IS_LOST`` to device queries, a removed one
  ``NVML_ERROR_NOT_FOUND`` to handle lookups.

Failures on demand: :meth:`FakePynvml.fail` makes a named function raise a code (every
call, or the next ``times`` calls); per-device fields give NUMA, MIG and event support;
``missing`` hides functions that older nvidia-ml-py releases lack. The fake's names and
numbers are checked against the real pynvml in tests/gpus/test_nvml.py.
"""

from __future__ import annotations

import ctypes
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Union

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
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
NVML_ERROR_UNKNOWN = 999

NVML_COMPUTEMODE_DEFAULT = 0
NVML_COMPUTEMODE_EXCLUSIVE_THREAD = 1
NVML_COMPUTEMODE_PROHIBITED = 2
NVML_COMPUTEMODE_EXCLUSIVE_PROCESS = 3

nvmlEventTypeSingleBitEccError = 0x0000000000000001  # noqa: N816 (pynvml's spelling)
nvmlEventTypeDoubleBitEccError = 0x0000000000000002  # noqa: N816
nvmlEventTypePState = 0x0000000000000004  # noqa: N816
nvmlEventTypeXidCriticalError = 0x0000000000000008  # noqa: N816
nvmlEventTypeGpuUnavailableError = 0x0000000000004000  # noqa: N816

#: NVML's own texts for the codes the tests use (what ``str(NVMLError(code))`` gives).
ERROR_TEXTS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_RESET_REQUIRED: "GPU requires restart",
    NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}

_HANDLE_BASE = 0x7F0000001000
_EVENT_SET_BASE = 0x7E0000001000


class NVMLError(Exception):
    """pynvml's exception: ``.value`` is the NVML return code."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return ERROR_TEXTS.get(self.value, f"Unknown Error {self.value}")


@dataclass
class FakeDevice:
    """One GPU as NVML reports it; the fields are what the queries answer."""

    uuid: str
    name: str = "NVIDIA H200"
    memory_total_bytes: int = 150_754_820_096
    compute_capability: tuple[int, int] = (9, 0)
    bus_id: str = "00000000:3B:00.0"
    #: NVML's NUMA answer: a node, -1 (unknown) or an error code to raise as NVMLError.
    numa_node: Union[int, NVMLError] = 0
    #: (current, pending) MIG mode, or the error nvmlDeviceGetMigMode raises.
    mig_mode: Union[tuple[int, int], NVMLError] = (0, 0)
    compute_mode: int = NVML_COMPUTEMODE_DEFAULT
    #: What nvmlDeviceGetSupportedEventTypes answers, or the error it raises.
    supported_events: Union[int, NVMLError] = (
        nvmlEventTypeXidCriticalError
        | nvmlEventTypeDoubleBitEccError
        | nvmlEventTypeGpuUnavailableError
    )
    #: The error nvmlDeviceRegisterEvents raises for this GPU, if any.
    register_error: Optional[NVMLError] = None
    #: The error nvmlDeviceSetComputeMode raises for this GPU, if any.
    set_compute_mode_error: Optional[NVMLError] = None
    #: MPS client processes: (pid, used memory in bytes or None when NVML cannot tell).
    mps_processes: list[tuple[int, Optional[int]]] = field(default_factory=list)
    lost: bool = False
    removed: bool = False
    registered_events: int = 0


@dataclass
class FakeMemoryInfo:
    """nvmlDeviceGetMemoryInfo's answer (bytes)."""

    total: int
    free: int
    used: int


@dataclass
class FakePciInfo:
    """nvmlDeviceGetPciInfo's answer (only the field the backend reads)."""

    busId: str  # noqa: N815 (pynvml's field name)


@dataclass
class FakeProcessInfo:
    """One entry of nvmlDeviceGetMPSComputeRunningProcesses (the fields the backend reads)."""

    pid: int
    usedGpuMemory: Optional[int]  # noqa: N815 (pynvml's field name)


@dataclass
class FakeEventData:
    """nvmlEventSetWait_v2's answer: the device handle (NULL for none), type and data."""

    device: ctypes.c_void_p
    eventType: int  # noqa: N815 (pynvml's field name)
    eventData: int  # noqa: N815 (pynvml's field name)


@dataclass
class FakePynvml:
    """The fake module: pass an instance where ``import pynvml`` would go."""

    devices: list[FakeDevice] = field(default_factory=list)
    driver_version: str = "580.159.04"
    #: Strings come back as bytes, as nvidia-ml-py releases before 11.515 return them.
    strings_as_bytes: bool = False
    #: Function names this module does not have (an older nvidia-ml-py).
    missing: frozenset[str] = frozenset()
    initialised: bool = False
    init_count: int = 0
    shutdown_count: int = 0
    event_sets_created: int = 0
    event_sets_freed: int = 0
    #: The timeouts (ms) each nvmlEventSetWait_v2 call was given.
    wait_timeouts_ms: list[int] = field(default_factory=list)
    _failures: dict[str, deque[Optional[int]]] = field(default_factory=dict)
    _permanent_failures: dict[str, int] = field(default_factory=dict)
    _events: deque[Union[FakeEventData, NVMLError]] = field(default_factory=deque)

    NVMLError = NVMLError

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("nvml") and name in object.__getattribute__(self, "missing"):
            raise AttributeError(name)
        return object.__getattribute__(self, name)

    # Test controls -----------------------------------------------------------------------

    def fail(self, function: str, code: int, times: Optional[int] = None) -> None:
        """Make ``function`` raise NVMLError(code): every call, or only the next ``times``."""
        if times is None:
            self._permanent_failures[function] = code
        else:
            self._failures.setdefault(function, deque()).extend([code] * times)

    def handle_of(self, index: int) -> ctypes.c_void_p:
        """A new handle object for the device at ``index`` (same address every time)."""
        return ctypes.c_void_p(_HANDLE_BASE + index * 0x100)

    def queue_event(
        self, device_index: Optional[int], event_type: int, event_data: int = 0
    ) -> None:
        """Queue an event for the next wait; ``device_index`` None sends a NULL device."""
        handle = ctypes.c_void_p(None) if device_index is None else self.handle_of(device_index)
        self._events.append(FakeEventData(handle, event_type, event_data))

    def queue_wait_error(self, code: int) -> None:
        """Make the next wait raise NVMLError(code) instead of returning an event."""
        self._events.append(NVMLError(code))

    # Internals ---------------------------------------------------------------------------

    def _enter(self, function: str, needs_init: bool = True) -> None:
        pending = self._failures.get(function)
        if pending:
            code = pending.popleft()
            if code is not None:
                raise NVMLError(code)
        if function in self._permanent_failures:
            raise NVMLError(self._permanent_failures[function])
        if needs_init and not self.initialised:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _device(self, handle: Any) -> FakeDevice:
        address = ctypes.cast(handle, ctypes.c_void_p).value
        if address is None:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        index, remainder = divmod(address - _HANDLE_BASE, 0x100)
        if remainder or not 0 <= index < len(self.devices):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        device = self.devices[index]
        if device.removed:
            raise NVMLError(NVML_ERROR_GPU_NOT_FOUND)
        if device.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return device

    def _string(self, value: str) -> Union[str, bytes]:
        return value.encode() if self.strings_as_bytes else value

    # pynvml's functions ------------------------------------------------------------------

    def nvmlInit(self) -> None:  # noqa: N802 (pynvml's names follow)
        self._enter("nvmlInit", needs_init=False)
        self.initialised = True
        self.init_count += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self._enter("nvmlShutdown")
        self.initialised = False
        self.shutdown_count += 1

    def nvmlSystemGetDriverVersion(self) -> Union[str, bytes]:  # noqa: N802
        self._enter("nvmlSystemGetDriverVersion")
        return self._string(self.driver_version)

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        self._enter("nvmlDeviceGetCount")
        return sum(1 for device in self.devices if not device.removed)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> ctypes.c_void_p:  # noqa: N802
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.devices):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return self.handle_of(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: Union[str, bytes]) -> ctypes.c_void_p:  # noqa: N802
        self._enter("nvmlDeviceGetHandleByUUID")
        wanted = uuid.decode() if isinstance(uuid, bytes) else uuid
        for index, device in enumerate(self.devices):
            if device.uuid == wanted and not device.removed:
                return self.handle_of(index)
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, handle: Any) -> Union[str, bytes]:  # noqa: N802
        self._enter("nvmlDeviceGetUUID")
        return self._string(self._device(handle).uuid)

    def nvmlDeviceGetName(self, handle: Any) -> Union[str, bytes]:  # noqa: N802
        self._enter("nvmlDeviceGetName")
        return self._string(self._device(handle).name)

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> FakeMemoryInfo:  # noqa: N802
        self._enter("nvmlDeviceGetMemoryInfo")
        total = self._device(handle).memory_total_bytes
        return FakeMemoryInfo(total=total, free=total, used=0)

    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]:  # noqa: N802
        self._enter("nvmlDeviceGetCudaComputeCapability")
        return self._device(handle).compute_capability

    def nvmlDeviceGetPciInfo(self, handle: Any) -> FakePciInfo:  # noqa: N802
        self._enter("nvmlDeviceGetPciInfo")
        return FakePciInfo(busId=self._device(handle).bus_id)

    def nvmlDeviceGetNumaNodeId(self, handle: Any) -> int:  # noqa: N802
        self._enter("nvmlDeviceGetNumaNodeId")
        node = self._device(handle).numa_node
        if isinstance(node, NVMLError):
            raise node
        return node

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:  # noqa: N802
        self._enter("nvmlDeviceGetMigMode")
        mode = self._device(handle).mig_mode
        if isinstance(mode, NVMLError):
            raise mode
        return list(mode)

    def nvmlDeviceGetComputeMode(self, handle: Any) -> int:  # noqa: N802
        self._enter("nvmlDeviceGetComputeMode")
        return self._device(handle).compute_mode

    def nvmlDeviceSetComputeMode(self, handle: Any, mode: int) -> None:  # noqa: N802
        self._enter("nvmlDeviceSetComputeMode")
        device = self._device(handle)
        if device.set_compute_mode_error is not None:
            raise device.set_compute_mode_error
        device.compute_mode = mode

    def nvmlDeviceGetMPSComputeRunningProcesses(  # noqa: N802
        self, handle: Any
    ) -> list[FakeProcessInfo]:
        self._enter("nvmlDeviceGetMPSComputeRunningProcesses")
        return [FakeProcessInfo(pid, used) for pid, used in self._device(handle).mps_processes]

    def nvmlEventSetCreate(self) -> ctypes.c_void_p:  # noqa: N802
        self._enter("nvmlEventSetCreate")
        self.event_sets_created += 1
        return ctypes.c_void_p(_EVENT_SET_BASE + self.event_sets_created)

    def nvmlEventSetFree(self, event_set: Any) -> None:  # noqa: N802
        self._enter("nvmlEventSetFree")
        self.event_sets_freed += 1

    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int:  # noqa: N802
        self._enter("nvmlDeviceGetSupportedEventTypes")
        supported = self._device(handle).supported_events
        if isinstance(supported, NVMLError):
            raise supported
        return supported

    def nvmlDeviceRegisterEvents(  # noqa: N802
        self, handle: Any, event_types: int, event_set: Any
    ) -> None:
        self._enter("nvmlDeviceRegisterEvents")
        device = self._device(handle)
        if device.register_error is not None:
            raise device.register_error
        device.registered_events |= event_types

    def nvmlEventSetWait_v2(self, event_set: Any, timeout_ms: int) -> FakeEventData:  # noqa: N802
        self._enter("nvmlEventSetWait_v2")
        self.wait_timeouts_ms.append(timeout_ms)
        if not self._events:
            raise NVMLError(NVML_ERROR_TIMEOUT)
        event = self._events.popleft()
        if isinstance(event, NVMLError):
            raise event
        return event


def h200(index: int, **fields: Any) -> FakeDevice:
    """An H200 at ``index`` with a UUID and bus id of its own; ``fields`` override."""
    device = FakeDevice(
        uuid=f"GPU-{index:08x}-fake-4000-8000-00000000000{index}",
        bus_id=f"00000000:{0x3B + index:02X}:00.0",
    )
    for name, value in fields.items():
        setattr(device, name, value)
    return device
