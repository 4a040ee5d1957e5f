"""The NVML backend's parts that need no GPU: error translation, PCI/NUMA lookup, and how it
fails on a machine without the NVIDIA driver."""

from __future__ import annotations

import ctypes.util
from pathlib import Path
from typing import Optional

import pytest

from vgpu_agent import nvml
from vgpu_agent.errors import GpuError, GpuLostError


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
