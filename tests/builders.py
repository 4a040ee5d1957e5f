"""Small builders of device-model values for tests: GPUs, served GPUs, inventories, ids.

Every GPU gets a predictable UUID of the real length (``GPU-<index:08d>-aaaa-...``, 40
characters), so tables can name GPUs by index and ids by (index, replica).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

from vgpu_agent.config.schema import MpsConfig
from vgpu_agent.model.devices import HealthReason, Inventory, ReasonKind, ServedGpu, make_vgpu_id
from vgpu_agent.model.gpu import Gpu

DEFAULT_MODEL = "NVIDIA A10G"
DEFAULT_MEMORY_MIB = 24_576
DEFAULT_PIPE_ROOT = "/run/nvidia-mps"


def gpu_uuid(index: int) -> str:
    """The UUID of test GPU ``index``: 40 characters like a real one."""
    return f"GPU-{index:08d}-aaaa-bbbb-cccc-dddddddddddd"


def vgpu_id(index: int, replica: int) -> str:
    """The id of replica ``replica`` of test GPU ``index``."""
    return make_vgpu_id(gpu_uuid(index), replica)


def make_gpu(
    index: int = 0,
    *,
    model: str = DEFAULT_MODEL,
    memory_mib: int = DEFAULT_MEMORY_MIB,
    compute_capability: tuple[int, int] = (8, 6),
    numa_node: Optional[int] = None,
    uuid: Optional[str] = None,
) -> Gpu:
    """A physical GPU; its UUID is :func:`gpu_uuid` of ``index`` unless given."""
    return Gpu(
        index=index,
        uuid=uuid if uuid is not None else gpu_uuid(index),
        model=model,
        memory_mib=memory_mib,
        compute_capability=compute_capability,
        pci_bus_id=f"00000000:{index + 1:02x}:00.0",
        numa_node=numa_node,
    )


def make_served(
    index: int = 0,
    replicas: int = 4,
    *,
    reasons: tuple[str, ...] = (),
    pipe_root: Optional[str] = DEFAULT_PIPE_ROOT,
    memory_mib: int = DEFAULT_MEMORY_MIB,
    numa_node: Optional[int] = None,
) -> ServedGpu:
    """A served GPU split into ``replicas`` vGPUs, with a pipe directory unless
    ``pipe_root`` is None, Unhealthy for each of ``reasons``."""
    gpu = make_gpu(index, memory_mib=memory_mib, numa_node=numa_node)
    return ServedGpu(
        gpu=gpu,
        replicas=replicas,
        unhealthy_reasons=tuple(reason_of(text) for text in reasons),
        pipe_dir=None if pipe_root is None else f"{pipe_root}/{gpu.uuid}",
    )


def reason_of(text: str) -> HealthReason:
    """The typed health reason a test names by its text ("xid 79", "GPU lost", ...); any
    other text is an MPS reason with exactly that text."""
    if text.startswith("xid "):
        return HealthReason.xid_fault(int(text.split()[1]))
    for reason in (HealthReason.lost(), HealthReason.ecc_fault()):
        if text == reason.text:
            return reason
    return HealthReason(ReasonKind.MPS, text)


def make_inventory(
    counts: Sequence[int] = (4, 4),
    *,
    numa_nodes: Optional[Sequence[Optional[int]]] = None,
    unhealthy: Optional[Mapping[int, tuple[str, ...]]] = None,
    pipe_root: Optional[str] = DEFAULT_PIPE_ROOT,
) -> Inventory:
    """GPUs 0..n-1 with ``counts[i]`` vGPUs each; ``unhealthy`` maps a GPU index to its
    reasons; ``numa_nodes[i]`` is GPU i's NUMA node."""
    nodes = list(numa_nodes) if numa_nodes is not None else [None] * len(counts)
    reasons = unhealthy or {}
    return Inventory(
        tuple(
            make_served(
                index,
                count,
                reasons=reasons.get(index, ()),
                pipe_root=pipe_root,
                numa_node=nodes[index],
            )
            for index, count in enumerate(counts)
        )
    )


def ids_of(*pairs: tuple[int, int]) -> list[str]:
    """vGPU ids for (GPU index, replica) pairs, in the order given."""
    return [vgpu_id(index, replica) for index, replica in pairs]


def all_ids(inventory: Inventory) -> list[str]:
    """Every vGPU id of an inventory, GPU by GPU."""
    return [vgpu for served in inventory.gpus for vgpu in served.vgpu_ids]


#: The stand-in for nvidia-cuda-mps-control (its docstring says what it does).
FAKE_CONTROL = Path(__file__).parent / "fakes" / "fake_mps_control.py"


def write_fake_control(binary: Path) -> Path:
    """Make ``binary`` an executable that runs the stand-in control program. ``-S`` (no
    site): the stand-in needs only the standard library, and the tests start it some five
    hundred times."""
    binary.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{FAKE_CONTROL}" "$@"\n')
    binary.chmod(0o755)
    return binary


def standin_mps_config(root: Path, control_timeout_s: float = 2.0) -> MpsConfig:
    """A direct MPS manager under ``root`` (pipe directories in ``mps``, logs in ``mpslog``)
    whose control program is the stand-in, written as ``root/nvidia-cuda-mps-control`` the
    first time (never over a program a daemon may be running)."""
    binary = root / "nvidia-cuda-mps-control"
    if not binary.exists():
        write_fake_control(binary)
    return MpsConfig(
        manager="direct",
        pipe_root=str(root / "mps"),
        log_root=str(root / "mpslog"),
        control_binary=str(binary),
        control_timeout_s=control_timeout_s,
    )
