"""Observability wired together: the refresher's attribution from a real PodResources
stand-in and the simulated backend, metrics scraped over HTTP, the textfile, node labels,
reconfiguration and problems reported once."""

from __future__ import annotations

import logging
import urllib.error
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.builders import make_inventory, vgpu_id
from tests.harness import scrape_metrics
from vgpu_agent.config.schema import (
    AttributionConfig,
    Config,
    LabelsConfig,
    MetricsConfig,
    PluginConfig,
)
from vgpu_agent.model.devices import MpsGrantPolicy
from vgpu_agent.observability.checkpoint import CHECKPOINT_NAME
from vgpu_agent.observability.labels import LABEL_PREFIX, read_feature_file
from vgpu_agent.observability.podresources import list_pod_resources
from vgpu_agent.observability.service import AgentCounts, Observability
from vgpu_agent.standins.podresources import PodResourcesStandin, StandinContainer, StandinPod
from vgpu_agent.standins.simulated import SimulatedBackend

RESOURCE = "eks.amazonaws.com/vgpu"
UID = "11111111-2222-3333-4444-555555555555"
CID = "c" * 64


class _Node:
    """A node for the tests: simulated GPUs, a PodResources stand-in, a /proc of its own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inventory = make_inventory((4, 4))
        self.backend = SimulatedBackend([served.gpu for served in self.inventory.gpus])
        self.plugin_dir = root / "plugins"
        self.socket_path = str(root / "pr" / "kubelet.sock")
        self.standin = PodResourcesStandin(
            self.socket_path,
            [StandinPod("ns", "web", UID, (StandinContainer("app", RESOURCE, (vgpu_id(0, 0),)),))],
            checkpoint_path=str(self.plugin_dir / CHECKPOINT_NAME),
        )
        self.registered = True

    def config(self, **tables: object) -> Config:
        base = Config(
            plugin=PluginConfig(plugin_dir=str(self.plugin_dir)),
            attribution=AttributionConfig(pod_resources_socket=self.socket_path),
        )
        return replace(base, **tables)  # type: ignore[arg-type]

    def build(self, config: Config) -> Observability:
        return Observability(
            config,
            inventory=lambda: self.inventory,
            counts=lambda: AgentCounts(self.registered, 4, 1),
            policy=MpsGrantPolicy,
            list_pods=list_pod_resources,
        )


@pytest.fixture
def node(short_tmp_dir: str) -> Iterator[_Node]:
    """A node whose PodResources stand-in names one pod holding vGPU 0 of GPU 0."""
    built = _Node(Path(short_tmp_dir))
    built.standin.start()
    yield built
    built.standin.stop()


def test_metrics_show_the_pods_the_refresher_found(node: _Node) -> None:
    """With metrics on, a scrape over HTTP shows the container and its vGPUs."""
    observability = node.build(
        node.config(metrics=MetricsConfig(enabled=True, listen_address="127.0.0.1:0"))
    )
    observability.start(node.backend)
    try:
        snapshot = observability.fresh(10.0)
        assert [usage.pod for usage in snapshot.attribution.containers] == ["web"]
        samples = scrape_metrics(observability.metrics_address)
        described = observability.describe(node.inventory, 5.0)
    finally:
        observability.stop()
    gpu = node.inventory.gpus[0].gpu.uuid
    assert described["attribution"]["problems"] == []
    assert described["metrics_address"].startswith("127.0.0.1:")
    assert [c["pod"] for c in described["gpus"][gpu]["containers"]] == ["web"]
    key = f"vgpu_container_vgpus{{container=app,gpu_uuid={gpu},namespace=ns,pod=web}}"
    assert samples[key] == 1
    assert samples[f"vgpu_vgpus{{gpu_uuid={gpu},state=allocated}}"] == 1
    assert samples["vgpu_registered{}"] == 1
    assert samples["vgpu_registrations_total{}"] == 4
    assert samples["vgpu_kubelet_restarts_total{}"] == 1


def test_metrics_are_off_by_default(node: _Node) -> None:
    """With the default config nothing listens and no textfile or labels are written."""
    observability = node.build(node.config())
    observability.start(node.backend)
    try:
        observability.fresh(10.0)
    finally:
        observability.stop()
    assert observability.metrics is None
    assert observability.metrics_address == ""


def test_the_textfile_follows_each_refresh(node: _Node) -> None:
    """textfile_path alone (no HTTP): each refresh rewrites the file with the memory used."""
    textfile = node.root / "vgpu.prom"
    observability = node.build(
        node.config(
            metrics=MetricsConfig(enabled=True, listen_address="", textfile_path=str(textfile))
        )
    )
    observability.start(node.backend)
    try:
        observability.fresh(10.0)
        assert observability.metrics_address == ""
        first = textfile.read_text()
        node.standin.set_pods([])
        observability.fresh(10.0)
        second = textfile.read_text()
    finally:
        observability.stop()
    assert 'pod="web"' in first
    assert 'pod="web"' not in second


def test_labels_are_written_when_the_node_changes(node: _Node) -> None:
    """With labels on, the feature file is written at start and again when GPUs change."""
    features = node.root / "features.d"
    observability = node.build(
        node.config(labels=LabelsConfig(enabled=True, features_dir=str(features)))
    )
    observability.start(node.backend)
    try:
        first = read_feature_file(str(features))
        node.inventory = make_inventory((4, 4, 4))
        observability.inventory_changed()
        second = read_feature_file(str(features))
    finally:
        observability.stop()
    assert first is not None
    assert second is not None
    assert first[f"{LABEL_PREFIX}vgpu.count"] == "8"
    assert second[f"{LABEL_PREFIX}vgpu.count"] == "12"


def test_reload_turning_labels_off_removes_the_file(node: _Node) -> None:
    """Labels turned off by a reload are withdrawn: the feature file is deleted."""
    features = node.root / "features.d"
    labelled = node.config(labels=LabelsConfig(enabled=True, features_dir=str(features)))
    observability = node.build(labelled)
    observability.start(node.backend)
    try:
        assert read_feature_file(str(features)) is not None
        observability.reconfigure(node.config())
        assert read_feature_file(str(features)) is None
        observability.reconfigure(labelled)
        assert read_feature_file(str(features)) is not None
    finally:
        observability.stop()


def test_reload_turns_metrics_off_and_frees_the_port(node: _Node) -> None:
    """Reconfiguring with metrics off closes the endpoint."""
    observability = node.build(
        node.config(metrics=MetricsConfig(enabled=True, listen_address="127.0.0.1:0"))
    )
    observability.start(node.backend)
    try:
        address = observability.metrics_address
        scrape_metrics(address)
        observability.reconfigure(node.config())
        assert observability.metrics is None
        with pytest.raises(urllib.error.URLError):
            scrape_metrics(address)
    finally:
        observability.stop()


def test_a_missing_kubelet_is_reported_once(node: _Node, caplog: pytest.LogCaptureFixture) -> None:
    """No PodResources socket: one warning however often the refresher runs, and a note
    when it answers again."""
    node.standin.stop()
    observability = node.build(node.config())
    caplog.set_level(logging.INFO, logger="vgpu_agent.observability.service")
    observability.start(node.backend)
    observability.stop()
    for _ in range(3):
        observability.refresh_once()
    node.standin.start()
    snapshot = observability.refresh_once()
    warnings = [r for r in caplog.records if "PodResources socket" in r.getMessage()]
    assert [record.levelno for record in warnings] == [logging.WARNING, logging.INFO]
    assert snapshot.attribution.problems == ()


def test_a_taken_metrics_port_does_not_stop_the_rest(node: _Node) -> None:
    """A listen address in use is reported; attribution still refreshes."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    observability = node.build(
        node.config(metrics=MetricsConfig(enabled=True, listen_address=f"127.0.0.1:{port}"))
    )
    try:
        observability.start(node.backend)
        snapshot = observability.fresh(10.0)
    finally:
        observability.stop()
        taken.close()
    assert observability.metrics_address == ""
    assert [usage.pod for usage in snapshot.attribution.containers] == ["web"]


def test_status_shows_each_container_its_limits_and_memory() -> None:
    """Under a GPU: each container with vGPUs, limits and memory; strays; ids with holders."""
    from vgpu_agent.observability.attribution import (
        Attribution,
        ContainerUsage,
        PodGpuUsage,
        StrayProcess,
    )
    from vgpu_agent.observability.service import describe_gpu, status_lines

    gpu = "GPU-x"
    attribution = Attribution(
        containers=(
            ContainerUsage(
                "ns", "web", "app", "u1", gpu, ("GPU-x::0", "GPU-x::1"), 50, 8000, (7, 8), 900
            ),
            ContainerUsage(
                "ns", "job", "left", "u2", gpu, ("GPU-x::2",), None, None, (), None, ("right",)
            ),
            ContainerUsage("", "", "solo", "u3", gpu, ("GPU-x::3",), 25, 4000, (), 0),
        ),
        pods=(PodGpuUsage("ns", "job", "u2", gpu, ("left", "right"), (9,), 300),),
        strays=(StrayProcess(99, gpu, None, "not in a pod"),),
        clients_by_gpu=((gpu, 4),),
    )
    described = describe_gpu(attribution, gpu)
    assert described["mps_clients"] == 4
    assert described["containers"][1]["pod_memory_used_mib"] == 300
    entry = {
        "attribution": described,
        "healthy": True,
        "vgpu_ids": ["GPU-x::0", "GPU-x::1", "GPU-x::2", "GPU-x::3", "GPU-x::4"],
    }
    assert status_lines(entry) == [
        "  ns/web app: 2 vGPUs, limit 50% of SMs and 8000 MiB; uses 900 MiB (pids 7, 8)",
        "  ns/job left: 1 vGPU, no limits; shares 300 MiB used by its pod's clients with right",
        "  pod u3 solo: 1 vGPU, limit 25% of SMs and 4000 MiB; uses 0 MiB",
        "  unattributed MPS client pid 99: uses unknown (not in a pod)",
        "  GPU-x::0  Healthy  ns/web app",
        "  GPU-x::1  Healthy  ns/web app",
        "  GPU-x::2  Healthy  ns/job left",
        "  GPU-x::3  Healthy  pod u3 solo",
        "  GPU-x::4  Healthy",
    ]


def test_the_refresher_gathers_only_what_is_read(node: _Node) -> None:
    """No reader, no refresh: a scrape's read, a status request or a textfile make the next
    refresh due (and full); an unread attribution is not gathered again."""
    observability = node.build(node.config(metrics=MetricsConfig(enabled=True, listen_address="")))
    assert observability._due() == (False, False)
    observability._read_for_scrape()
    assert observability._due() == (True, True)
    assert observability._due() == (False, False)
    observability.request_refresh()
    assert observability._due() == (True, True)
    with_textfile = node.build(
        node.config(
            metrics=MetricsConfig(
                enabled=True, listen_address="", textfile_path=str(node.root / "v.prom")
            )
        )
    )
    assert with_textfile._due() == (True, True)
    assert with_textfile._due() == (True, True)


def test_a_stale_attribution_is_refreshed_for_a_scrape(node: _Node) -> None:
    """A scrape after a long quiet spell waits for a new attribution instead of an old one."""
    now = [1000.0]
    observability = Observability(
        node.config(metrics=MetricsConfig(enabled=True, listen_address="")),
        inventory=lambda: node.inventory,
        counts=lambda: AgentCounts(True),
        policy=MpsGrantPolicy,
        list_pods=list_pod_resources,
        clock=lambda: now[0],
    )
    observability.start(node.backend)
    try:
        first = observability.fresh(10.0)
        now[0] += 3600.0
        read = observability._read_for_scrape()
    finally:
        observability.stop()
    assert read.taken_at == now[0]
    assert read.taken_at > first.taken_at
