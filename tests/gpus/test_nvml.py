"""The NVML backend without a GPU: error translation, PCI/NUMA lookup, how it fails without
the NVIDIA driver, and the whole backend driven through a fake pynvml module."""

from __future__ import annotations

import ctypes.util
from pathlib import Path
from typing import Any, Optional, Union

import pytest

from tests.fakes import fake_pynvml
from tests.fakes.fake_pynvml import FakeDevice, FakePynvml, h200
from vgpu_agent.gpus import nvml
from vgpu_agent.model.errors import GpuError, GpuLostError
from vgpu_agent.model.gpu import ComputeMode, Gpu, GpuEvent, GpuEventKind


@pytest.mark.parametrize(
    ("code", "kind", "hint"),
    [
        (nvml.NVML_ERROR_LIBRARY_NOT_FOUND, GpuError, "; libnvidia-ml.so.1 was not found: install"),
        (nvml.NVML_ERROR_DRIVER_NOT_LOADED, GpuError, "; the NVIDIA kernel driver is not loaded"),
        (nvml.NVML_ERROR_NO_PERMISSION, GpuError, "run as root"),
        (nvml.NVML_ERROR_GPU_IS_LOST, GpuLostError, "lost"),
        (nvml.NVML_ERROR_GPU_NOT_FOUND, GpuLostError, "gone"),
        (nvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, GpuError, "reboot or reload the driver"),
        (999, GpuError, ""),
    ],
    ids=["no-library", "driver-not-loaded", "no-permission", "lost", "gone", "mismatch", "unknown"],
)
def test_nvml_errors_become_ours_with_a_hint(code: int, kind: type, hint: str) -> None:
    """Each NVML error code becomes GpuError or GpuLostError naming the action and what to check."""
    error = nvml.translate_error("setting compute mode on GPU-1", code, "Some NVML Text")
    assert type(error) is kind
    assert str(error).startswith("setting compute mode on GPU-1: NVML error: Some NVML Text")
    assert hint in str(error)
    # One level of parentheses at most: the hint is not wrapped in them.
    assert "((" not in str(error).replace(" ", "")
    assert not str(error).endswith("))")


@pytest.mark.parametrize(
    ("bus_id", "sysfs_name"),
    [
        ("00000000:3B:00.0", "0000:3b:00.0"),
        ("0000:3b:00.0", "0000:3b:00.0"),
        ("00000001:AF:00.0", "0001:af:00.0"),
        ("3b:00.0", "003b:00.0"),
        ("bogus", "bogus"),
    ],
    ids=["nvml-8-digit", "already-sysfs", "domain-1", "no-domain", "garbage"],
)
def test_pci_bus_id_is_normalised_to_the_sysfs_name(bus_id: str, sysfs_name: str) -> None:
    """NVML's upper-case 8-digit-domain bus ids map to sysfs device names."""
    assert nvml.normalise_pci_bus_id(bus_id) == sysfs_name


@pytest.mark.parametrize(
    ("content", "expected"),
    [("1\n", 1), ("0\n", 0), ("-1\n", None), ("junk", None), (None, None)],
    ids=["node-1", "node-0", "unknown", "unreadable", "missing"],
)
def test_numa_node_comes_from_sysfs(
    tmp_path: Path, content: Optional[str], expected: Optional[int]
) -> None:
    """The sysfs numa_node file gives the node; -1, junk or no file mean unknown."""
    device = tmp_path / "0000:3b:00.0"
    device.mkdir()
    if content is not None:
        (device / "numa_node").write_text(content)
    assert nvml.numa_node_from_sysfs("00000000:3B:00.0", str(tmp_path)) == expected


@pytest.mark.skipif(
    ctypes.util.find_library("nvidia-ml") is not None, reason="this machine has the NVIDIA driver"
)
def test_without_the_driver_the_backend_says_to_install_it() -> None:
    """Opening NVML where libnvidia-ml is absent fails with a GpuError saying to install
    the driver or to try the simulated backend."""
    with pytest.raises(GpuError) as raised:
        nvml.NvmlBackend()
    assert "install the NVIDIA driver" in str(raised.value)
    assert '--simulate N, or gpus.backend = "simulated"' in str(raised.value)


class _NvmlProcessInfo:
    """The shape of pynvml's process info entries: pid and usedGpuMemory in bytes."""

    def __init__(self, pid: int, used: Optional[int]) -> None:
        self.pid = pid
        self.usedGpuMemory = used


@pytest.mark.parametrize(
    ("used_bytes", "used_mib"),
    [(512 * 1024 * 1024, 512), (512 * 1024 * 1024 + 5, 512), (0, 0), (None, None)],
    ids=["exact", "rounded-down", "zero", "not-available"],
)
def test_mps_client_entries_become_processes_in_mib(
    used_bytes: Optional[int], used_mib: Optional[int]
) -> None:
    """NVML's MPS client entries give pid and MiB; memory NVML cannot tell stays None."""
    process = nvml.process_from_nvml("GPU-1", _NvmlProcessInfo(4242, used_bytes))
    assert (process.pid, process.gpu_uuid, process.used_memory_mib) == (4242, "GPU-1", used_mib)


# NvmlBackend driven through a fake pynvml module (tests/fakes/fake_pynvml.py) ----------


def backend_on(*devices: FakeDevice, **options: Any) -> tuple[nvml.NvmlBackend, FakePynvml]:
    """An NvmlBackend opened on a fake pynvml that has ``devices``."""
    fake = FakePynvml(devices=list(devices), **options)
    return nvml.NvmlBackend(nvml=fake, sysfs_root="/nonexistent-sysfs"), fake


def test_fake_pynvml_matches_the_real_module() -> None:
    """Every name the fake offers exists in nvidia-ml-py's pynvml with the same value."""
    pynvml = pytest.importorskip("pynvml")
    fake = FakePynvml()
    for name in dir(fake_pynvml):
        if name.startswith(("NVML_ERROR_", "NVML_COMPUTEMODE_", "nvmlEventType")):
            assert getattr(pynvml, name) == getattr(fake_pynvml, name), name
    for name in dir(fake):
        if name.startswith("nvml"):
            assert callable(getattr(pynvml, name)), name
    assert issubclass(pynvml.NVMLError, Exception)
    real_error = pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
    assert real_error.value == fake.NVMLError(fake_pynvml.NVML_ERROR_GPU_IS_LOST).value
    assert str(real_error) == str(fake.NVMLError(fake_pynvml.NVML_ERROR_GPU_IS_LOST))


def test_backend_initialises_nvml_and_close_shuts_it_down_once() -> None:
    """The constructor calls nvmlInit; close frees the event set and calls nvmlShutdown once."""
    backend, fake = backend_on(h200(0))
    assert fake.initialised
    backend.watch_events([fake.devices[0].uuid])
    backend.close()
    backend.close()
    assert (fake.init_count, fake.shutdown_count) == (1, 1)
    assert (fake.event_sets_created, fake.event_sets_freed) == (1, 1)


@pytest.mark.parametrize(
    ("code", "kind", "hint"),
    [
        (fake_pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, GpuError, "install the NVIDIA driver"),
        (fake_pynvml.NVML_ERROR_DRIVER_NOT_LOADED, GpuError, "kernel driver is not loaded"),
        (fake_pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, GpuError, "reload the driver"),
        (fake_pynvml.NVML_ERROR_NO_PERMISSION, GpuError, "run as root"),
    ],
    ids=["no-library", "driver-not-loaded", "version-mismatch", "no-permission"],
)
def test_init_failure_becomes_a_gpu_error_naming_the_fix(
    code: int, kind: type[Exception], hint: str
) -> None:
    """nvmlInit failing raises our error saying NVML could not be initialised and why."""
    fake = FakePynvml()
    fake.fail("nvmlInit", code)
    with pytest.raises(kind, match="initialising NVML: NVML error: ") as raised:
        nvml.NvmlBackend(nvml=fake)
    assert hint in str(raised.value)
    assert isinstance(raised.value.__cause__, fake_pynvml.NVMLError)


def test_list_gpus_describes_every_device_in_index_order() -> None:
    """UUID, name, memory in MiB, compute capability, PCI bus id, NUMA node and MIG mode."""
    backend, _fake = backend_on(
        h200(0, numa_node=0),
        h200(
            1,
            name="NVIDIA A100-SXM4-80GB",
            memory_total_bytes=85_899_345_920,
            compute_capability=(8, 0),
            numa_node=1,
            mig_mode=(1, 1),
        ),
    )
    first, second = backend.list_gpus()
    assert first == Gpu(
        index=0,
        uuid=h200(0).uuid,
        model="NVIDIA H200",
        memory_mib=150_754_820_096 // (1024 * 1024),
        compute_capability=(9, 0),
        pci_bus_id="00000000:3B:00.0",
        numa_node=0,
        mig_enabled=False,
    )
    assert (second.index, second.uuid, second.model) == (1, h200(1).uuid, "NVIDIA A100-SXM4-80GB")
    assert (second.memory_mib, second.compute_capability) == (81920, (8, 0))
    assert (second.pci_bus_id, second.numa_node, second.mig_enabled) == (
        "00000000:3C:00.0",
        1,
        True,
    )


def test_list_gpus_on_a_node_without_gpus_is_empty() -> None:
    """A driver that sees no GPU gives an empty list, not an error."""
    backend, _fake = backend_on()
    assert backend.list_gpus() == []


def test_strings_returned_as_bytes_are_decoded() -> None:
    """Older nvidia-ml-py returns bytes for UUID, name and driver version; they become str."""
    backend, _fake = backend_on(h200(0), strings_as_bytes=True)
    [gpu] = backend.list_gpus()
    assert (gpu.uuid, gpu.model) == (h200(0).uuid, "NVIDIA H200")
    assert backend.driver_version() == "580.159.04"


@pytest.mark.parametrize(
    ("nvml_answer", "missing", "sysfs_content", "expected"),
    [
        (1, frozenset(), None, 1),
        (-1, frozenset(), "0\n", 0),
        (fake_pynvml.NVMLError(fake_pynvml.NVML_ERROR_NOT_SUPPORTED), frozenset(), "1\n", 1),
        (0, frozenset({"nvmlDeviceGetNumaNodeId"}), "1\n", 1),
        (fake_pynvml.NVMLError(fake_pynvml.NVML_ERROR_NOT_SUPPORTED), frozenset(), None, None),
    ],
    ids=["nvml-knows", "nvml-unknown", "nvml-not-supported", "old-pynvml", "nobody-knows"],
)
def test_numa_node_comes_from_nvml_else_sysfs(
    tmp_path: Path,
    nvml_answer: Union[int, fake_pynvml.NVMLError],
    missing: frozenset[str],
    sysfs_content: Optional[str],
    expected: Optional[int],
) -> None:
    """NVML's NUMA answer wins; -1, NOT_SUPPORTED or no such function fall back to sysfs."""
    if sysfs_content is not None:
        (tmp_path / "0000:3b:00.0").mkdir()
        (tmp_path / "0000:3b:00.0" / "numa_node").write_text(sysfs_content)
    fake = FakePynvml(devices=[h200(0, numa_node=nvml_answer)], missing=missing)
    backend = nvml.NvmlBackend(nvml=fake, sysfs_root=str(tmp_path))
    assert backend.list_gpus()[0].numa_node == expected


@pytest.mark.parametrize(
    "code",
    [fake_pynvml.NVML_ERROR_NOT_SUPPORTED, fake_pynvml.NVML_ERROR_FUNCTION_NOT_FOUND],
    ids=["not-supported", "function-not-found"],
)
def test_gpus_without_mig_support_report_mig_disabled(code: int) -> None:
    """A GPU or driver that cannot answer the MIG query has MIG off."""
    backend, _fake = backend_on(h200(0, mig_mode=fake_pynvml.NVMLError(code)))
    assert backend.list_gpus()[0].mig_enabled is False


def test_a_failing_mig_query_is_an_error_naming_the_gpu() -> None:
    """Any other MIG query failure is a GpuError naming the GPU and the MIG query."""
    device = h200(0, mig_mode=fake_pynvml.NVMLError(fake_pynvml.NVML_ERROR_NO_PERMISSION))
    backend, _fake = backend_on(device)
    with pytest.raises(GpuError, match=rf"reading GPU 0 \({device.uuid}\)'s MIG mode: .*root"):
        backend.list_gpus()


@pytest.mark.parametrize(
    ("function", "action"),
    [
        ("nvmlDeviceGetCount", "counting GPUs"),
        ("nvmlDeviceGetHandleByIndex", "opening GPU 0"),
        ("nvmlDeviceGetUUID", "reading GPU 0's UUID"),
        ("nvmlDeviceGetName", "reading GPU 0 (GPU-00000000-fake-4000-8000-000000000000)'s name"),
        (
            "nvmlDeviceGetMemoryInfo",
            "reading GPU 0 (GPU-00000000-fake-4000-8000-000000000000)'s memory",
        ),
        ("nvmlDeviceGetCudaComputeCapability", "compute capability"),
        ("nvmlDeviceGetPciInfo", "PCI info"),
    ],
    ids=["count", "handle", "uuid", "name", "memory", "capability", "pci"],
)
def test_each_enumeration_step_names_itself_when_it_fails(function: str, action: str) -> None:
    """A failed query during enumeration says which step on which GPU failed."""
    backend, fake = backend_on(h200(0))
    fake.fail(function, fake_pynvml.NVML_ERROR_UNKNOWN)
    with pytest.raises(GpuError, match="NVML error: Unknown Error") as raised:
        backend.list_gpus()
    assert action in str(raised.value)
    assert type(raised.value) is GpuError


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        (fake_pynvml.NVML_COMPUTEMODE_DEFAULT, ComputeMode.DEFAULT),
        (fake_pynvml.NVML_COMPUTEMODE_EXCLUSIVE_THREAD, ComputeMode.EXCLUSIVE_THREAD),
        (fake_pynvml.NVML_COMPUTEMODE_PROHIBITED, ComputeMode.PROHIBITED),
        (fake_pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS, ComputeMode.EXCLUSIVE_PROCESS),
    ],
    ids=["default", "exclusive-thread", "prohibited", "exclusive-process"],
)
def test_compute_mode_round_trips_through_nvml(value: int, mode: ComputeMode) -> None:
    """Each NVML compute mode reads as ours, and setting ours writes NVML's value."""
    backend, fake = backend_on(h200(0, compute_mode=value), h200(1))
    assert backend.get_compute_mode(h200(0).uuid) is mode
    backend.set_compute_mode(h200(1).uuid, mode)
    assert fake.devices[1].compute_mode == value
    assert backend.get_compute_mode(h200(1).uuid) is mode


def test_an_unknown_compute_mode_is_an_error() -> None:
    """A compute mode number NVML adds later is reported, not guessed."""
    backend, _fake = backend_on(h200(0, compute_mode=7))
    with pytest.raises(GpuError, match="NVML reported unknown mode 7"):
        backend.get_compute_mode(h200(0).uuid)


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        (fake_pynvml.NVML_ERROR_NO_PERMISSION, "insufficient permissions: run as root"),
        (fake_pynvml.NVML_ERROR_NOT_SUPPORTED, "this GPU or driver does not support it"),
    ],
    ids=["no-permission", "not-supported"],
)
def test_setting_compute_mode_fails_with_the_reason(code: int, hint: str) -> None:
    """A refused compute-mode change names the mode, the GPU and what to do; nothing changes."""
    device = h200(0, set_compute_mode_error=fake_pynvml.NVMLError(code))
    backend, fake = backend_on(device)
    with pytest.raises(GpuError) as raised:
        backend.set_compute_mode(device.uuid, ComputeMode.EXCLUSIVE_PROCESS)
    assert str(raised.value).startswith(
        f"setting compute mode exclusive_process on GPU {device.uuid}: NVML error: "
    )
    assert hint in str(raised.value)
    assert fake.devices[0].compute_mode == fake_pynvml.NVML_COMPUTEMODE_DEFAULT


def test_compute_mode_of_an_unknown_gpu_names_it() -> None:
    """Asking about a UUID NVML does not know fails with that UUID in the message."""
    backend, _fake = backend_on(h200(0))
    with pytest.raises(GpuError, match="finding GPU GPU-missing: NVML error: Not Found"):
        backend.get_compute_mode("GPU-missing")


def test_check_passes_for_a_healthy_gpu() -> None:
    """A GPU that answers its memory query passes the check."""
    backend, _fake = backend_on(h200(0))
    backend.check(h200(0).uuid)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lost": True}, "checking GPU .*: NVML error: GPU is lost"),
        ({"removed": True}, "checking GPU .*: NVML no longer sees it"),
    ],
    ids=["fallen-off-the-bus", "gone"],
)
def test_check_reports_a_lost_gpu(change: dict[str, bool], message: str) -> None:
    """A GPU answering GPU_IS_LOST, or no longer found by UUID, raises GpuLostError."""
    backend, fake = backend_on(h200(0))
    for name, value in change.items():
        setattr(fake.devices[0], name, value)
    with pytest.raises(GpuLostError, match=message):
        backend.check(h200(0).uuid)


def test_check_passes_other_lookup_failures_on_as_plain_errors() -> None:
    """A lookup failing for another reason is a GpuError, not a lost GPU."""
    backend, fake = backend_on(h200(0))
    fake.fail("nvmlDeviceGetHandleByUUID", fake_pynvml.NVML_ERROR_UNKNOWN)
    with pytest.raises(GpuError, match="finding GPU") as raised:
        backend.check(h200(0).uuid)
    assert type(raised.value) is GpuError


def test_watch_events_registers_xid_ecc_and_unavailable_events() -> None:
    """Every GPU is registered for XID, double-bit ECC and GPU-unavailable events."""
    backend, fake = backend_on(h200(0), h200(1))
    assert backend.watch_events([h200(0).uuid, h200(1).uuid]) == []
    wanted = (
        fake_pynvml.nvmlEventTypeXidCriticalError
        | fake_pynvml.nvmlEventTypeDoubleBitEccError
        | fake_pynvml.nvmlEventTypeGpuUnavailableError
    )
    assert [device.registered_events for device in fake.devices] == [wanted, wanted]
    assert fake.event_sets_created == 1


@pytest.mark.parametrize(
    ("device_fields", "registered"),
    [
        (
            {"supported_events": fake_pynvml.nvmlEventTypeDoubleBitEccError},
            0,
        ),
        (
            {"register_error": fake_pynvml.NVMLError(fake_pynvml.NVML_ERROR_NOT_SUPPORTED)},
            0,
        ),
    ],
    ids=["no-xid-in-supported-types", "registration-not-supported"],
)
def test_gpus_without_xid_events_are_returned_for_polling(
    device_fields: dict[str, Any], registered: int
) -> None:
    """A GPU whose driver cannot report XIDs is returned (to be polled) and never raises."""
    backend, fake = backend_on(h200(0), h200(1, **device_fields))
    assert backend.watch_events([h200(0).uuid, h200(1).uuid]) == [h200(1).uuid]
    assert fake.devices[1].registered_events == registered


def test_an_old_driver_without_the_supported_types_query_is_tried_with_xid_and_ecc() -> None:
    """When the supported-types query fails, XID and double-bit ECC are registered anyway."""
    error = fake_pynvml.NVMLError(fake_pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    backend, fake = backend_on(h200(0, supported_events=error))
    assert backend.watch_events([h200(0).uuid]) == []
    assert fake.devices[0].registered_events == (
        fake_pynvml.nvmlEventTypeXidCriticalError | fake_pynvml.nvmlEventTypeDoubleBitEccError
    )


def test_a_registration_failure_other_than_not_supported_is_an_error() -> None:
    """Registering for events failing for another reason raises, naming the GPU."""
    error = fake_pynvml.NVMLError(fake_pynvml.NVML_ERROR_NO_PERMISSION)
    backend, _fake = backend_on(h200(0, register_error=error))
    with pytest.raises(GpuError, match=f"registering for fault events on GPU {h200(0).uuid}"):
        backend.watch_events([h200(0).uuid])


def test_event_set_creation_failure_is_an_error() -> None:
    """An event set NVML cannot create fails watch_events with a GpuError."""
    backend, fake = backend_on(h200(0))
    fake.fail("nvmlEventSetCreate", fake_pynvml.NVML_ERROR_UNKNOWN)
    with pytest.raises(GpuError, match="creating an NVML event set"):
        backend.watch_events([h200(0).uuid])


def watched(*devices: FakeDevice) -> tuple[nvml.NvmlBackend, FakePynvml]:
    """A backend on ``devices`` already watching all of them for events."""
    backend, fake = backend_on(*devices)
    backend.watch_events([device.uuid for device in devices])
    return backend, fake


def test_an_xid_event_names_the_gpu_by_its_handle_and_carries_the_xid() -> None:
    """An XID event's device handle maps back to its GPU, and eventData is the XID."""
    backend, fake = watched(h200(0), h200(1))
    fake.queue_event(1, fake_pynvml.nvmlEventTypeXidCriticalError, event_data=79)
    assert backend.wait_events(2.5) == [
        GpuEvent(GpuEventKind.XID, h200(1).uuid, xid=79, detail="XID 79")
    ]
    assert fake.wait_timeouts_ms == [2500]


def test_a_double_bit_ecc_event_is_reported_for_its_gpu() -> None:
    """A double-bit ECC event becomes a DOUBLE_BIT_ECC event on its GPU."""
    backend, fake = watched(h200(0))
    fake.queue_event(0, fake_pynvml.nvmlEventTypeDoubleBitEccError)
    assert backend.wait_events(1.0) == [
        GpuEvent(GpuEventKind.DOUBLE_BIT_ECC, h200(0).uuid, detail="double-bit ECC error")
    ]


def test_a_gpu_unavailable_event_means_the_gpu_is_lost() -> None:
    """A GPU-unavailable event becomes a LOST event naming the GPU and the event type."""
    backend, fake = watched(h200(0))
    fake.queue_event(0, fake_pynvml.nvmlEventTypeGpuUnavailableError)
    assert backend.wait_events(1.0) == [
        GpuEvent(GpuEventKind.LOST, h200(0).uuid, detail="NVML event 0x4000")
    ]


def test_an_event_with_no_device_concerns_every_gpu() -> None:
    """An XID event with a NULL device handle has no GPU UUID."""
    backend, fake = watched(h200(0))
    fake.queue_event(None, fake_pynvml.nvmlEventTypeXidCriticalError, event_data=48)
    [event] = backend.wait_events(1.0)
    assert (event.kind, event.gpu_uuid, event.xid) == (GpuEventKind.XID, None, 48)


def test_an_event_from_an_unwatched_device_has_no_gpu_uuid() -> None:
    """A handle the backend never registered maps to no GPU rather than a wrong one."""
    backend, fake = backend_on(h200(0), h200(1))
    backend.watch_events([h200(0).uuid])
    fake.queue_event(1, fake_pynvml.nvmlEventTypeXidCriticalError, event_data=31)
    [event] = backend.wait_events(1.0)
    assert (event.gpu_uuid, event.xid) == (None, 31)


@pytest.mark.parametrize(
    ("timeout_s", "timeout_ms"), [(0.25, 250), (0.0, 0), (-1.0, 0)], ids=["quarter", "zero", "neg"]
)
def test_a_wait_that_times_out_returns_no_events(timeout_s: float, timeout_ms: int) -> None:
    """NVML's TIMEOUT is no event; the timeout is passed in milliseconds, never negative."""
    backend, fake = watched(h200(0))
    assert backend.wait_events(timeout_s) == []
    assert fake.wait_timeouts_ms == [timeout_ms]


def test_a_wait_failing_with_gpu_is_lost_raises_gpu_lost() -> None:
    """GPU_IS_LOST from the event wait becomes GpuLostError."""
    backend, fake = watched(h200(0))
    fake.queue_wait_error(fake_pynvml.NVML_ERROR_GPU_IS_LOST)
    with pytest.raises(GpuLostError, match="waiting for GPU events: NVML error: GPU is lost"):
        backend.wait_events(1.0)


def test_a_wait_failing_otherwise_raises_gpu_error() -> None:
    """Any other failure of the event wait is a GpuError naming the wait."""
    backend, fake = watched(h200(0))
    fake.queue_wait_error(fake_pynvml.NVML_ERROR_UNKNOWN)
    with pytest.raises(GpuError, match="waiting for GPU events: NVML error: Unknown Error"):
        backend.wait_events(1.0)


def test_waiting_before_watching_or_after_close_is_an_error() -> None:
    """wait_events without an event set (never watched, or closed) says to watch first."""
    backend, fake = backend_on(h200(0))
    with pytest.raises(GpuError, match="no GPU is being watched"):
        backend.wait_events(1.0)
    backend.watch_events([h200(0).uuid])
    backend.close()
    with pytest.raises(GpuError, match="no GPU is being watched"):
        backend.wait_events(1.0)
    assert fake.wait_timeouts_ms == []


def test_interrupt_wait_is_harmless() -> None:
    """interrupt_wait does nothing (NVML's wait returns at its timeout) and the wait still works."""
    backend, fake = watched(h200(0))
    backend.interrupt_wait()
    fake.queue_event(0, fake_pynvml.nvmlEventTypeXidCriticalError, event_data=13)
    assert [event.xid for event in backend.wait_events(1.0)] == [13]


def test_close_survives_a_failing_event_set_free_but_reports_a_failing_shutdown() -> None:
    """Freeing the event set failing is only logged; nvmlShutdown failing is raised."""
    backend, fake = watched(h200(0))
    fake.fail("nvmlEventSetFree", fake_pynvml.NVML_ERROR_UNKNOWN)
    fake.fail("nvmlShutdown", fake_pynvml.NVML_ERROR_UNKNOWN)
    with pytest.raises(GpuError, match="shutting NVML down"):
        backend.close()
    assert fake.event_sets_freed == 0


def test_calls_after_close_are_uninitialised_errors() -> None:
    """After close, a query fails with NVML's UNINITIALIZED and our hint about closing."""
    backend, _fake = backend_on(h200(0))
    backend.close()
    with pytest.raises(GpuError, match="NVML is not initialised"):
        backend.list_gpus()


def test_driver_version_failure_names_the_query() -> None:
    """A failed driver-version query says so."""
    backend, fake = backend_on(h200(0))
    fake.fail("nvmlSystemGetDriverVersion", fake_pynvml.NVML_ERROR_UNKNOWN, times=1)
    with pytest.raises(GpuError, match="reading the driver version"):
        backend.driver_version()
    assert backend.driver_version() == "580.159.04"


def test_mps_client_processes_come_from_nvml_for_the_gpu() -> None:
    """The MPS client list of a GPU gives host pids and MiB; a failing query names the GPU."""
    backend, fake = backend_on(h200(0), h200(1))
    fake.devices[1].mps_processes = [(4242, 512 * 1024 * 1024), (4243, None)]
    assert backend.mps_client_processes(h200(0).uuid) == []
    assert [
        (process.pid, process.gpu_uuid, process.used_memory_mib)
        for process in backend.mps_client_processes(h200(1).uuid)
    ] == [(4242, h200(1).uuid, 512), (4243, h200(1).uuid, None)]
    fake.fail("nvmlDeviceGetMPSComputeRunningProcesses", fake_pynvml.NVML_ERROR_NO_PERMISSION)
    with pytest.raises(GpuError, match=f"listing the MPS client processes of GPU {h200(1).uuid}"):
        backend.mps_client_processes(h200(1).uuid)
