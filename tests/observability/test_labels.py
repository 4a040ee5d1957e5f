"""Node labels: what the node-feature-discovery feature file says, and how it is written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.builders import make_inventory
from vgpu_agent.config.parse import parse
from vgpu_agent.model.devices import Inventory
from vgpu_agent.model.errors import AgentError
from vgpu_agent.observability.labels import (
    FEATURE_FILE_NAME,
    LABEL_PREFIX,
    label_value,
    node_labels,
    read_feature_file,
    write_feature_file,
)


def test_labels_describe_the_served_gpus() -> None:
    """Count, model, vGPUs, memory per vGPU, strategy and confinement of a default node."""
    labels = dict(node_labels(parse(""), make_inventory((4, 4))).pairs)
    assert labels == {
        "gpu.count": "2",
        "gpu.product": "NVIDIA-A10G",
        "vgpu.count": "8",
        "vgpu.replicas-per-gpu": "4",
        "vgpu.memory-mib": str(24_576 // 4),
        "sharing-strategy": "mps",
        "mps.confined": "true",
        "resource-name": "eks.amazonaws.com.vgpu",
    }


@pytest.mark.parametrize(
    ("document", "key", "value"),
    [
        ("mps.daemon_thread_limit = 'proportional'", "mps.confined", "true"),
        ("mps.confinement = 'cooperative'\nmps.daemon_thread_limit = 30", "mps.confined", "true"),
        ("mps.confinement = 'cooperative'", "mps.confined", "false"),
        ("mps.enabled = false", "mps.confined", "false"),
        ("mps.enabled = false", "sharing-strategy", "time-slicing"),
        ("mps.memory_limit = 2048", "vgpu.memory-mib", "2048"),
        ("mps.memory_headroom_mib = 576", "vgpu.memory-mib", str((24_576 - 576) // 4)),
        ("mps.memory_limit = 'none'", "vgpu.memory-mib", str(24_576 // 4)),
    ],
    ids=[
        "daemon-proportional",
        "cooperative-daemon-fixed",
        "cooperative-not-confined",
        "no-mps-not-confined",
        "time-slicing",
        "fixed-memory",
        "headroom",
        "no-memory-limit",
    ],
)
def test_labels_follow_the_config(document: str, key: str, value: str) -> None:
    """Strategy, confinement and memory per vGPU come from the [mps] settings."""
    assert dict(node_labels(parse(document), make_inventory((4, 4))).pairs)[key] == value


def test_mixed_gpus_label_the_least_a_pod_gets() -> None:
    """With different splits, the fewest vGPUs per GPU and the smallest slice are labelled."""
    labels = dict(node_labels(parse(""), make_inventory((4, 8))).pairs)
    assert labels["vgpu.replicas-per-gpu"] == "4"
    assert labels["vgpu.memory-mib"] == str(24_576 // 8)
    assert labels["vgpu.count"] == "12"


def test_a_node_without_gpus_says_zero() -> None:
    """No served GPU: the counts are 0 and nothing else is claimed."""
    assert dict(node_labels(parse(""), Inventory()).pairs) == {"gpu.count": "0", "vgpu.count": "0"}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA-H100-80GB-HBM3"),
        ("Tesla V100-SXM2-16GB", "Tesla-V100-SXM2-16GB"),
        (" (odd) name! ", "odd-name"),
        ("x" * 80, "x" * 63),
    ],
    ids=["h100", "v100", "punctuation", "too-long"],
)
def test_label_values_are_valid(text: str, value: str) -> None:
    """Model names become valid label values: allowed characters, 63 at most."""
    assert label_value(text) == value


def test_the_feature_file_is_written_whole_in_nfd_format(tmp_path: Path) -> None:
    """One <namespace>/<name>=<value> per line, replaced by rename, no temp file left."""
    directory = tmp_path / "features.d"
    labels = node_labels(parse(""), make_inventory((4,)))
    path = write_feature_file(str(directory), labels)
    assert path == str(directory / FEATURE_FILE_NAME)
    first_inode = os.stat(path).st_ino
    write_feature_file(str(directory), labels)
    assert os.stat(path).st_ino != first_inode
    assert os.listdir(directory) == [FEATURE_FILE_NAME]
    lines = Path(path).read_text().splitlines()
    assert lines[0].startswith("#")
    assert all(line.startswith(LABEL_PREFIX) and "=" in line for line in lines[1:])
    assert os.stat(path).st_mode & 0o777 == 0o644
    read = read_feature_file(str(directory))
    assert read is not None
    assert read[f"{LABEL_PREFIX}gpu.count"] == "1"


def test_an_unwritable_features_dir_is_a_clear_error(tmp_path: Path) -> None:
    """A features_dir that is a file names the path and the key to fix."""
    blocker = tmp_path / "features.d"
    blocker.write_text("")
    with pytest.raises(AgentError, match=r"labels\.features_dir"):
        write_feature_file(str(blocker), node_labels(parse(""), make_inventory((4,))))


def test_no_feature_file_reads_as_none(tmp_path: Path) -> None:
    """Before the first write there are no labels to read."""
    assert read_feature_file(str(tmp_path)) is None
