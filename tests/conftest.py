"""Shared fixtures: short temp directories for unix sockets, inventories built from plain
values, a kubelet stand-in serving in a temp plugin directory, and running agents."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest

from tests import builders
from tests.harness import AgentRun, agent_runs
from vgpu_agent.devices import Inventory
from vgpu_agent.kubelet_standin import KubeletStandin

#: The resource name the tests register.
RESOURCE = "eks.amazonaws.com/vgpu"


def make_inventory(
    replicas: tuple[int, ...] = (4, 4),
    numa_nodes: Optional[tuple[Optional[int], ...]] = None,
    pipe_root: Optional[str] = "/run/vgpu/mps",
) -> Inventory:
    """GPUs 0..n-1 with ``replicas[i]`` vGPUs each, healthy, with MPS pipe directories
    (:func:`tests.builders.make_inventory` with this file's defaults)."""
    return builders.make_inventory(replicas, numa_nodes=numa_nodes, pipe_root=pipe_root)


@pytest.fixture(autouse=True)
def _no_cover(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests marked ``no_cover`` (property searches) run with coverage measurement paused.
    pytest-cov's own marker pauses its controller's Coverage; in an xdist worker a second
    one is started too and keeps tracing (sys.gettrace() stays set), so every running
    Coverage is paused here, and started again in the reverse order."""
    paused: list[Any] = []
    # Looked up, not imported: without --cov, coverage may not even be loaded.
    coverage = sys.modules.get("coverage")
    if coverage is not None and request.node.get_closest_marker("no_cover") is not None:
        while (current := coverage.Coverage.current()) is not None:
            current.stop()
            paused.append(current)
    try:
        yield
    finally:
        for current in reversed(paused):
            current.start()


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


@pytest.fixture
def run_agent(short_tmp_dir: str) -> Iterator[Callable[..., AgentRun]]:
    """Start agents in threads with kubelet stand-ins (see :mod:`tests.harness`); all are
    stopped and closed at the end."""
    yield from agent_runs(short_tmp_dir)
