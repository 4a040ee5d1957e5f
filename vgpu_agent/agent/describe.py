"""Describing the node: the one-line state systemd shows, and what `vgpu-agent status` prints.

Pure: both are made from values the loop hands in (the config, the node's inventory, the
registration counts, what the observer found).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from vgpu_agent.agent.isolation import excess_client_warnings, isolation_status
from vgpu_agent.config.plan import confinement_line, gpu_ceiling
from vgpu_agent.config.schema import Config
from vgpu_agent.model.devices import Inventory
from vgpu_agent.model.gpu import GpuBackend

#: How the STATUS line of an agent that serves nothing yet (no GPU driver) begins.
WAITING_FOR_DRIVER = "waiting for the GPU driver"

#: How long `vgpu-agent status` waits for a fresh attribution before showing the last one.
STATUS_ATTRIBUTION_WAIT_S = 1.0


def status_line(
    inventory: Inventory,
    resource_name: str,
    *,
    registered: bool,
    waiting_for: str,
    waiting_for_driver: Optional[str] = None,
) -> str:
    """The one-line state systemd shows (STATUS=) and `vgpu-agent status` prints first;
    ``waiting_for_driver`` says why the GPU backend is not open yet (nothing served)."""
    if waiting_for_driver is not None:
        return f"{WAITING_FOR_DRIVER}: {waiting_for_driver}"
    line = f"serving {inventory.vgpu_count} vGPUs on {len(inventory.gpus)} GPUs as {resource_name}"
    unhealthy = [served for served in inventory.gpus if not served.healthy]
    if unhealthy:
        causes = "; ".join(
            f"GPU {served.gpu.index}: {', '.join(served.reason_texts)}" for served in unhealthy
        )
        line += f"; {inventory.unhealthy_vgpu_count} unhealthy ({causes})"
    if registered:
        line += "; registered with kubelet"
    elif waiting_for:
        line += f"; waiting for {waiting_for}"
    return line


@dataclass(frozen=True)
class Registrations:
    """The agent's standing with the kubelet, as `status` shows it."""

    registered: bool
    #: Registrations since the agent started.
    count: int
    kubelet_restarts: int


def describe_node(
    config: Config,
    inventory: Inventory,
    *,
    status: str,
    registrations: Registrations,
    observed: dict[str, Any],
    faults: Optional[list[dict[str, Any]]] = None,
    offenders: Optional[list[dict[str, Any]]] = None,
    backend: Optional[GpuBackend] = None,
) -> dict[str, Any]:
    """What `vgpu-agent status` shows: the agent, each GPU, its health and who uses it.
    ``observed`` is what the observer found (who uses each GPU under ``"gpus"``, by UUID,
    and fields of its own)."""
    observed = dict(observed)
    users: dict[str, Any] = observed.pop("gpus", {})
    return {
        "status": status,
        # "simulated" on a real node is a mistake worth seeing at once (gpus.backend).
        "backend": config.gpus.backend,
        "resource_name": config.plugin.resource_name,
        "registered": registrations.registered,
        "registrations": registrations.count,
        "confinement": {
            "mode": config.mps.confinement if config.mps.enabled else "none",
            "summary": confinement_line(config),
            "max_vgpus_per_container": config.mps.max_vgpus_per_container,
            "device_list_strategy": config.plugin.device_list_strategy,
        },
        "kubelet_restarts": registrations.kubelet_restarts,
        "mps_faults": faults or [],
        "mps_offenders": offenders or [],
        **observed,
        "gpus": [
            {
                "index": served.gpu.index,
                "uuid": served.gpu.uuid,
                "model": served.gpu.model,
                "memory_mib": served.gpu.memory_mib,
                "replicas": served.replicas,
                "healthy": served.healthy,
                "reasons": served.reason_texts,
                "pipe_dir": served.pipe_dir,
                "ceiling": gpu_ceiling(config, served.gpu.memory_mib, served.replicas).describe(),
                "vgpu_ids": served.vgpu_ids,
                "attribution": users.get(served.gpu.uuid),
                **isolation_status(
                    config,
                    backend,
                    served.gpu.uuid,
                    excess_client_warnings(users.get(served.gpu.uuid), config),
                ),
            }
            for served in inventory.gpus
        ],
    }


#: How many of the recent MPS faults the text form of `vgpu-agent status` prints.
STATUS_FAULT_LINES = 5


def fault_lines(answer: Mapping[str, Any]) -> list[str]:
    """The lines `vgpu-agent status` prints for the latest MPS faults (culprit and pods
    hit) and the repeat offenders, from its answer."""
    lines = []
    for fault in answer.get("mps_faults", [])[-STATUS_FAULT_LINES:]:
        pods = ", ".join(fault["pods"]) or "no pod with MPS clients known"
        culprit = fault.get("culprit", "unknown")
        if fault.get("culprit_pid") is not None:
            culprit += f" (pid {fault['culprit_pid']})"
        if fault.get("culprit_evidence") == "named":
            culprit += ", a lead (other pods' clients were torn down too)"
        elif fault.get("culprit_evidence") == "sole-client":
            culprit += ", its clients the only ones torn down"
        lines.append(
            f"MPS fault {fault['at']}: GPU {fault['gpu_uuid']} XID {fault['xid']}: "
            f"culprit {culprit}; hit {pods}"
        )
    for offender in answer.get("mps_offenders", []):
        state = "HELD" if offender["held"] else "repeat offender, reported"
        lines.append(
            f"MPS {state}: pod {offender['pod']} ({offender['pod_uid']}): {offender['reason']}"
        )
    return lines
