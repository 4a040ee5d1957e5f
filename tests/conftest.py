"""Shared fixtures: short temp directories for unix sockets, inventories built from plain
values, and a kubelet stand-in serving in a temp plugin directory."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from typing import Callable, Optional

import pytest

from vgpu_agent.devices import Inventory, ServedGpu
from vgpu_agent.gpu import Gpu
from vgpu_agent.kubelet_standin import KubeletStandin

#: The resource name the tests register.
RESOURCE = "eks.amazonaws.com/vgpu"


def make_gpu(index: int, numa_node: Optional[int] = None, memory_mib: int = 24_576) -> Gpu:
    """A physical GPU with a predictable UUID, ``GPU-<index>-...``."""
    return Gpu(
        index=index,
        uuid=f"GPU-{index:08d}-aaaa-bbbb-cccc-dddddddddddd",
        model="NVIDIA A10G",
        memory_mib=memory_mib,
        compute_capability=(8, 6),
        pci_bus_id=f"00000000:{index + 1:02x}:00.0",
        numa_node=numa_node,
    )


def make_inventory(
    replicas: tuple[int, ...] = (4, 4),
    numa_nodes: Optional[tuple[Optional[int], ...]] = None,
    pipe_root: Optional[str] = "/run/vgpu/mps",
) -> Inventory:
    """GPUs 0..n-1 with ``replicas[i]`` vGPUs each, healthy, with MPS pipe directories."""
    nodes = numa_nodes if numa_nodes is not None else (None,) * len(replicas)
    return Inventory(
        tuple(
            ServedGpu(
                gpu=make_gpu(index, numa_node=nodes[index]),
                replicas=count,
                pipe_dir=None if pipe_root is None else f"{pipe_root}/{make_gpu(index).uuid}",
            )
            for index, count in enumerate(replicas)
        )
    )


@pytest.fixture
def short_tmp_dir() -> Iterator[str]:
    """A fresh directory under /tmp with a short path (unix socket paths are < 108 bytes)."""
    path = tempfile.mkdtemp(prefix="vg", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def plugin_dir(short_tmp_dir: str) -> str:
    """The device plugin directory of a test."""
    return short_tmp_dir


@pytest.fixture
def kubelet_standin(plugin_dir: str) -> Iterator[KubeletStandin]:
    """A running kubelet stand-in on ``<plugin_dir>/kubelet.sock``."""
    standin = KubeletStandin(plugin_dir)
    standin.start()
    yield standin
    standin.stop()


@pytest.fixture
def inventory_factory() -> Callable[..., Inventory]:
    """:func:`make_inventory`, for tests that want another shape of node."""
    return make_inventory
