"""Node labels without API credentials: a node-feature-discovery feature file.

nfd-worker's local source reads every file in ``/etc/kubernetes/node-feature-discovery/
features.d/`` and publishes each ``<namespace>/<name>=<value>`` line as a node label (through
nfd-master). The agent writes one file there, ``vgpu-agent``, describing what the node
offers; it is rewritten atomically (a dotfile in the same directory renamed over it, so
nfd-worker never reads half a file) whenever what the node offers changes, and removed when
a reload turns labels off (the package removes it on uninstall). It stays while the agent
restarts: the node still offers what it says. nfd-worker must run in the cluster: without
it the file labels nothing.

With GPUs of different models on one node the labels describe the least a pod can count on:
the first GPU's model (by index), the fewest vGPUs per GPU and the smallest memory per vGPU.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from vgpu_agent.config.schema import Config
from vgpu_agent.model.devices import Inventory, LimitPolicy, memory_limit_mib
from vgpu_agent.model.errors import AgentError

#: The label namespace (nfd-master allows any outside kubernetes.io by default).
LABEL_PREFIX = "vgpu.eks.amazonaws.com/"
FEATURE_FILE_NAME = "vgpu-agent"
#: nfd-worker ignores feature files larger than this.
MAX_FEATURE_FILE_BYTES = 64 * 1024
_LABEL_VALUE_MAX = 63
_BAD_VALUE_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


def label_value(text: str) -> str:
    """``text`` as a valid label value: letters, digits, '-', '_', '.', at most 63, starting
    and ending with a letter or digit ("NVIDIA H100 80GB HBM3" -> "NVIDIA-H100-80GB-HBM3")."""
    value = _BAD_VALUE_CHARS.sub("-", text)[:_LABEL_VALUE_MAX]
    return value.strip("-_.")


@dataclass(frozen=True)
class NodeLabels:
    """The labels the feature file publishes, in a fixed order."""

    pairs: tuple[tuple[str, str], ...]

    def render(self) -> str:
        """The feature file's text: a comment, then one ``name=value`` per line."""
        lines = ["# Written by vgpu-agent; nfd-worker publishes these as node labels."]
        lines.extend(f"{LABEL_PREFIX}{name}={value}" for name, value in self.pairs)
        return "\n".join(lines) + "\n"


def mps_confined(config: Config) -> bool:
    """Whether MPS confines clients that bring no limits of their own: the daemons hold a
    thread ceiling (mps.confinement = "enforced", or mps.daemon_thread_limit when
    cooperative)."""
    if not config.mps.enabled:
        return False
    return config.mps.confinement == "enforced" or config.mps.daemon_thread_limit != "none"


def node_labels(config: Config, inventory: Inventory) -> NodeLabels:
    """The labels for the GPUs this node serves (healthy or not: labels describe capacity)."""
    gpus = inventory.gpus
    if not gpus:
        return NodeLabels((("gpu.count", "0"), ("vgpu.count", "0")))
    replicas = sorted({served.replicas for served in gpus})
    # A fixed per-vGPU memory limit is what a vGPU gets; otherwise its proportional slice
    # (also with no limit at all: the share a vGPU stands for).
    limit = config.mps.memory_limit
    policy: LimitPolicy = limit if isinstance(limit, int) else "proportional"
    per_vgpu = [
        memory_limit_mib(
            policy, 1, served.replicas, served.gpu.memory_mib, config.mps.memory_headroom_mib
        )
        or 0
        for served in gpus
    ]
    pairs: list[tuple[str, str]] = [
        ("gpu.count", str(len(gpus))),
        ("gpu.product", label_value(gpus[0].gpu.model)),
        ("vgpu.count", str(inventory.vgpu_count)),
        ("vgpu.replicas-per-gpu", str(replicas[0])),
        ("vgpu.memory-mib", str(min(per_vgpu))),
        ("sharing-strategy", "mps" if config.mps.enabled else "time-slicing"),
        ("mps.confined", "true" if mps_confined(config) else "false"),
        ("resource-name", label_value(config.plugin.resource_name.replace("/", "."))),
    ]
    return NodeLabels(tuple(pairs))


def write_feature_file(directory: str, labels: NodeLabels) -> str:
    """Write the labels to ``<directory>/vgpu-agent`` atomically; returns the path."""
    text = labels.render()
    if len(text.encode("utf-8")) > MAX_FEATURE_FILE_BYTES:
        raise AgentError(
            f"writing node labels: {len(text)} bytes is over nfd-worker's "
            f"{MAX_FEATURE_FILE_BYTES} byte limit"
        )
    path = os.path.join(directory, FEATURE_FILE_NAME)
    # A dotfile: nfd-worker skips hidden files, so it never reads the partial one.
    temporary = os.path.join(directory, f".{FEATURE_FILE_NAME}.{os.getpid()}.tmp")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as feature_file:
            feature_file.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise AgentError(
            f"writing node labels to {path}: {exc.strerror or exc}; check labels.features_dir "
            "(it must be writable by the agent)"
        ) from exc
    return path


def remove_feature_file(directory: str) -> bool:
    """Remove our feature file from ``directory``; whether there was one."""
    path = os.path.join(directory, FEATURE_FILE_NAME)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise AgentError(
            f"removing node labels {path}: {exc.strerror or exc}; delete it by hand"
        ) from exc
    return True


def read_feature_file(directory: str) -> Optional[dict[str, str]]:
    """The labels in our feature file (for status and tests); None when there is none."""
    path = os.path.join(directory, FEATURE_FILE_NAME)
    try:
        with open(path, encoding="utf-8") as feature_file:
            lines: Sequence[str] = feature_file.read().splitlines()
    except OSError:
        return None
    labels: dict[str, str] = {}
    for line in lines:
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        labels[name] = value or "true"
    return labels
