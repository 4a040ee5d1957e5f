"""Metrics: the node's gauges from a view of the node, the event counters and histograms,
a real HTTP scrape, and the textfile written for node-exporter."""

from __future__ import annotations

import os
import socket
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.builders import gpu_uuid, make_inventory, vgpu_id
from vgpu_agent.model.devices import HealthReason
from vgpu_agent.model.errors import AgentError
from vgpu_agent.observability.attribution import (
    Attribution,
    ContainerUsage,
    PodGpuUsage,
    StrayProcess,
)
from vgpu_agent.observability.metrics import (
    MIB,
    PRESET_XIDS,
    AgentMetrics,
    MetricsServer,
    NodeView,
    reason_kind,
    write_textfile,
)

G0, G1 = gpu_uuid(0), gpu_uuid(1)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _usage(pod: str, container: str, gpu: str, ids: tuple[str, ...], used: int) -> ContainerUsage:
    return ContainerUsage(
        namespace="team",
        pod=pod,
        container=container,
        pod_uid=f"uid-{pod}",
        gpu_uuid=gpu,
        vgpu_ids=ids,
        thread_limit_percent=25 * len(ids),
        memory_limit_mib=6144 * len(ids),
        pids=(1,),
        memory_used_mib=used,
    )


ATTRIBUTION = Attribution(
    containers=(
        _usage("a", "main", G0, (vgpu_id(0, 0),), 500),
        _usage("b", "main", G0, (vgpu_id(0, 1), vgpu_id(0, 2)), 3000),
    ),
    pods=(
        PodGpuUsage("team", "a", "uid-a", G0, ("main",), (1,), 500),
        PodGpuUsage("team", "b", "uid-b", G0, ("main",), (2,), 3000),
    ),
    strays=(StrayProcess(9, G1, 100, "not in a pod"), StrayProcess(10, G1, None, "not in a pod")),
    clients_by_gpu=((G0, 2), (G1, 2)),
)


def _samples(text: bytes) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _view(**changes: object) -> NodeView:
    base = {
        "inventory": make_inventory((4, 4), unhealthy={1: ("xid 79", "MPS daemon down")}),
        "attribution": ATTRIBUTION,
        "mps_enabled": True,
        "registered": True,
    }
    base.update(changes)
    return NodeView(**base)  # type: ignore[arg-type]


def test_gpu_gauges_give_vgpus_by_state_and_why() -> None:
    """Per GPU: allocatable, allocated and unhealthy vGPUs, reason kinds, daemon, clients."""
    samples = _samples(AgentMetrics(_view).render())
    assert samples[("vgpu_vgpus", (("gpu_uuid", G0), ("state", "allocatable")))] == 4
    assert samples[("vgpu_vgpus", (("gpu_uuid", G0), ("state", "allocated")))] == 3
    assert samples[("vgpu_vgpus", (("gpu_uuid", G0), ("state", "unhealthy")))] == 0
    assert samples[("vgpu_vgpus", (("gpu_uuid", G1), ("state", "allocatable")))] == 0
    assert samples[("vgpu_vgpus", (("gpu_uuid", G1), ("state", "unhealthy")))] == 4
    assert samples[("vgpu_gpu_unhealthy", (("gpu_uuid", G1), ("reason", "xid")))] == 1
    assert samples[("vgpu_gpu_unhealthy", (("gpu_uuid", G1), ("reason", "mps_daemon")))] == 1
    assert not any(
        name == "vgpu_gpu_unhealthy" and ("gpu_uuid", G0) in labels for name, labels in samples
    )
    assert samples[("vgpu_mps_daemon_up", (("gpu_uuid", G0),))] == 1
    assert samples[("vgpu_mps_daemon_up", (("gpu_uuid", G1),))] == 0
    assert samples[("vgpu_mps_clients", (("gpu_uuid", G1),))] == 2
    assert samples[("vgpu_registered", ())] == 1
    info = ("vgpu_gpu_info", (("gpu_index", "1"), ("gpu_uuid", G1), ("model", "NVIDIA A10G")))
    assert samples[info] == 1


def test_a_lost_ceiling_is_its_own_reason_and_the_daemon_is_still_up() -> None:
    """A daemon that answers without its ceiling is reason mps_ceiling, not mps_daemon, and
    vgpu_mps_daemon_up stays 1."""
    inventory = make_inventory((4,), unhealthy={0: ("MPS daemon ceiling lost (threads 100)",)})
    samples = _samples(AgentMetrics(lambda: _view(inventory=inventory)).render())
    assert samples[("vgpu_gpu_unhealthy", (("gpu_uuid", G0), ("reason", "mps_ceiling")))] == 1
    assert ("vgpu_gpu_unhealthy", (("gpu_uuid", G0), ("reason", "mps_daemon"))) not in samples
    assert samples[("vgpu_mps_daemon_up", (("gpu_uuid", G0),))] == 1
    assert samples[("vgpu_vgpus", (("gpu_uuid", G0), ("state", "unhealthy")))] == 4


def test_container_gauges_give_vgpus_limits_and_memory() -> None:
    """Per container: vGPUs held, thread and memory limits, memory used, in base units."""
    samples = _samples(AgentMetrics(_view).render())
    labels = (("container", "main"), ("gpu_uuid", G0), ("namespace", "team"), ("pod", "b"))
    assert samples[("vgpu_container_vgpus", labels)] == 2
    assert samples[("vgpu_container_thread_limit_percent", labels)] == 50
    assert samples[("vgpu_container_memory_limit_bytes", labels)] == 12288 * MIB
    assert samples[("vgpu_container_memory_used_bytes", labels)] == 3000 * MIB
    pod = (("gpu_uuid", G0), ("namespace", "team"), ("pod", "a"))
    assert samples[("vgpu_pod_memory_used_bytes", pod)] == 500 * MIB
    assert samples[("vgpu_unattributed_clients", (("gpu_uuid", G1),))] == 2
    assert samples[("vgpu_unattributed_memory_used_bytes", (("gpu_uuid", G1),))] == 100 * MIB


def test_unknown_memory_and_missing_limits_are_absent_not_zero() -> None:
    """A container with shared memory and no limits has no used, thread or memory samples."""
    shared = ContainerUsage("ns", "p", "c", "u", G0, (vgpu_id(0, 3),), None, None, (), None, ("d",))
    view = _view(attribution=Attribution(containers=(shared,)), mps_enabled=False)
    samples = _samples(AgentMetrics(lambda: view).render())
    names = {name for name, _labels in samples}
    assert "vgpu_container_vgpus" in names
    assert not names & {
        "vgpu_container_thread_limit_percent",
        "vgpu_container_memory_limit_bytes",
        "vgpu_container_memory_used_bytes",
        "vgpu_mps_daemon_up",
    }


def test_without_pod_names_the_pod_label_is_the_uid() -> None:
    """With no PodResources answer, a container's pod label holds its pod UID."""
    usage = ContainerUsage("", "", "c", "uid-7", G0, (vgpu_id(0, 0),), None, None, (), 0)
    view = _view(attribution=Attribution(containers=(usage,)))
    samples = _samples(AgentMetrics(lambda: view).render())
    labels = (("container", "c"), ("gpu_uuid", G0), ("namespace", ""), ("pod", "uid-7"))
    assert samples[("vgpu_container_vgpus", labels)] == 1


def test_registrations_and_kubelet_restarts_come_from_the_view() -> None:
    """The agent's own counts of registrations and kubelet restarts are exported as counters."""
    view = _view(registrations=3, kubelet_restarts=2)
    samples = _samples(AgentMetrics(lambda: view).render())
    assert samples[("vgpu_registrations_total", ())] == 3
    assert samples[("vgpu_kubelet_restarts_total", ())] == 2


def test_counters_and_histograms_count_events() -> None:
    """XIDs, health changes and latencies are counted as they are reported."""
    metrics = AgentMetrics(_view)
    metrics.xid_event(G0, 79)
    metrics.xid_event(G0, 79)
    metrics.xid_event(G1, 13)
    metrics.health_changed(G0, healthy=False)
    metrics.health_changed(G0, healthy=True)
    metrics.observe_allocate(0.0003)
    metrics.observe_allocate(0.02)
    metrics.observe_preferred_allocation(0.0001)
    samples = _samples(metrics.render())
    assert samples[("vgpu_xid_events_total", (("gpu_uuid", G0), ("xid", "79")))] == 2
    assert samples[("vgpu_xid_events_total", (("gpu_uuid", G1), ("xid", "13")))] == 1
    assert samples[("vgpu_health_changes_total", (("gpu_uuid", G0), ("health", "healthy")))] == 1
    assert samples[("vgpu_allocate_duration_seconds_count", ())] == 2
    assert samples[("vgpu_allocate_duration_seconds_bucket", (("le", "0.0005"),))] == 1
    assert samples[("vgpu_preferred_allocation_duration_seconds_count", ())] == 1


def _event_samples(samples: Samples) -> Samples:
    return {
        key: value
        for key, value in samples.items()
        if key[0] in ("vgpu_xid_events_total", "vgpu_health_changes_total")
    }


def test_event_counters_of_served_gpus_start_at_zero() -> None:
    """Before any event, each served GPU has its health-change series and one series per
    preset XID at 0 (not those the config ignores), so increase() sees the first event."""
    view = _view(ignored_xids=(13, 79))
    metrics = AgentMetrics(lambda: view)
    before = _event_samples(_samples(metrics.render()))
    preset = [xid for xid in PRESET_XIDS if xid != 79]
    expected = {
        ("vgpu_xid_events_total", (("gpu_uuid", gpu), ("xid", str(xid)))): 0.0
        for gpu in (G0, G1)
        for xid in preset
    }
    expected.update(
        {
            ("vgpu_health_changes_total", (("gpu_uuid", gpu), ("health", health))): 0.0
            for gpu in (G0, G1)
            for health in ("healthy", "unhealthy")
        }
    )
    assert before == expected
    metrics.xid_event(G1, 48)
    metrics.xid_event(G1, 62)  # not preset: its series appears with its first event
    metrics.health_changed(G1, healthy=False)
    after = _event_samples(_samples(metrics.render()))
    assert after[("vgpu_xid_events_total", (("gpu_uuid", G1), ("xid", "48")))] == 1
    assert after[("vgpu_xid_events_total", (("gpu_uuid", G1), ("xid", "62")))] == 1
    assert after[("vgpu_health_changes_total", (("gpu_uuid", G1), ("health", "unhealthy")))] == 1
    changed = {key for key in after if after[key] != before.get(key)}
    assert len(changed) == 3


def test_a_gpu_no_longer_served_keeps_its_counts() -> None:
    """A counter does not vanish when its GPU leaves the served set (a reload): its counted
    series stay, its zero series go."""
    views = [_view()]
    metrics = AgentMetrics(lambda: views[-1])
    metrics.xid_event(G1, 79)
    views.append(_view(inventory=make_inventory((4,))))
    samples = _event_samples(_samples(metrics.render()))
    assert samples[("vgpu_xid_events_total", (("gpu_uuid", G1), ("xid", "79")))] == 1
    assert {labels for _name, labels in samples if ("gpu_uuid", G1) in labels} == {
        (("gpu_uuid", G1), ("xid", "79"))
    }


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        (HealthReason.xid_fault(79), "xid"),
        (HealthReason.ecc_fault(), "double_bit_ecc"),
        (HealthReason.lost(), "gpu_lost"),
        (HealthReason.mps_down("MPS daemon down (simulated)"), "mps_daemon"),
        (HealthReason.mps_down("could not start: refused"), "mps_daemon"),
        (HealthReason.mps_down("MPS daemon ceiling lost (thread percentage 100)"), "mps_ceiling"),
        (HealthReason.mps_down("MPS daemon ceiling not set: refused"), "mps_ceiling"),
    ],
    ids=["xid", "dbe", "lost", "mps-down", "mps-start", "ceiling-lost", "ceiling-not-set"],
)
def test_reasons_map_to_a_bounded_kind(reason: HealthReason, kind: str) -> None:
    """Typed unhealthy reasons become one of a fixed set of label values."""
    assert reason_kind(reason) == kind


def test_a_scrape_over_http_reads_the_node_now(short_tmp_dir: str) -> None:
    """GET /metrics on the server returns the text format, built from the view at that time."""
    views = [_view(registered=False)]
    metrics = AgentMetrics(lambda: views[-1])
    server = MetricsServer(metrics, "127.0.0.1", 0)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            first = _samples(response.read())
            assert response.headers["Content-Type"].startswith("text/plain")
        views.append(_view(registered=True))
        with urllib.request.urlopen(url, timeout=5) as response:
            second = _samples(response.read())
    finally:
        server.stop()
    assert first[("vgpu_registered", ())] == 0
    assert second[("vgpu_registered", ())] == 1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_the_server_listens_on_ipv6() -> None:
    """An IPv6 host is served over IPv6, and stop() closes it."""
    server = MetricsServer(AgentMetrics(_view), "::1", 0)
    server.start()
    try:
        with urllib.request.urlopen(f"http://[::1]:{server.port}/metrics", timeout=5) as response:
            assert _samples(response.read())[("vgpu_registered", ())] == 1
    finally:
        server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("::1", server.port), timeout=1).close()


def test_stop_wakes_the_idle_server_thread_at_once() -> None:
    """The serving thread waits for a request with no timeout; stop() wakes and ends it
    (and a second stop is harmless)."""
    before = set(threading.enumerate())
    server = MetricsServer(AgentMetrics(_view), "127.0.0.1", 0)
    server.start()
    (thread,) = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert thread.name == "vgpu-metrics-http"
    server.stop()
    assert not thread.is_alive(), "stop() gave up joining a thread still waiting"
    server.stop()


def test_a_taken_port_is_a_clear_error() -> None:
    """Listening where another socket listens raises AgentError naming the address and key."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(AgentError) as caught:
            MetricsServer(AgentMetrics(_view), "127.0.0.1", port).start()
    finally:
        taken.close()
    assert str(caught.value).startswith(f"serving metrics on 127.0.0.1:{port}: ")
    assert "metrics.listen_address" in str(caught.value)


def test_the_textfile_is_replaced_whole(tmp_path: Path) -> None:
    """The textfile holds the full metrics after each write and no temporary file is left."""
    path = tmp_path / "vgpu.prom"
    path.write_text("old content\n")
    old_inode = path.stat().st_ino
    write_textfile(str(path), AgentMetrics(_view))
    assert path.stat().st_ino != old_inode  # a new file renamed over the old one
    samples = _samples(path.read_bytes())
    assert samples[("vgpu_registered", ())] == 1
    assert os.listdir(tmp_path) == ["vgpu.prom"]


def test_a_textfile_in_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    """A textfile path whose directory does not exist names the path and the key."""
    path = tmp_path / "absent" / "vgpu.prom"
    with pytest.raises(AgentError, match=r"metrics\.textfile_path") as caught:
        write_textfile(str(path), AgentMetrics(_view))
    assert str(path) in str(caught.value)
