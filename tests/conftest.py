"""Shared fixtures: short temp directories for unix sockets, inventories built from plain
values, a kubelet stand-in serving in a temp plugin directory, and running agents."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest

from tests import builders
from tests.harness import AgentRun, agent_runs
from vgpu_agent.host import instance
from vgpu_agent.model.devices import Inventory
from vgpu_agent.standins.kubelet import KubeletStandin

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` first: the xdist workers hand out tests in collection order,
    and a test of many seconds started last held the whole run up after the others were
    done (stable sort: the order within each part is kept)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Leave the host as found: the agents the tests started (some killed on purpose)
    recorded their control sockets under /run/vgpu-agent/by-config; once every worker is
    done, the records of agents that are gone go, with the directories left empty."""
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller cleans up after all of them
    instance.prune_records()
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(instance.RECORD_DIR))


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Tests marked ``no_cover`` (property searches) run with the coverage tracer of their
    thread stopped. pytest-cov's own handling of the marker (the outer wrapper) stops its
    Coverage, but in an xdist worker a second Coverage sits below it, whose tracer then
    takes over (sys.gettrace() stayed set and the searches ran at half speed); this inner
    wrapper stops whichever tracer runs, and starts it again after the test."""
    tracer: Any = sys.gettrace()
    stoppable = hasattr(tracer, "start") and hasattr(tracer, "stop")  # coverage's CTracer
    if item.get_closest_marker("no_cover") is None or not stoppable:
        yield
        return
    tracer.stop()
    try:
        yield
    finally:
        tracer.start()


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
