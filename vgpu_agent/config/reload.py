"""Reloads: what a running agent does with a new config, decided from the two configs alone.

The reload table (:data:`RESTART_ONLY_KEYS`: the settings only a restart applies) and
:func:`plan_reload`, which turns a running config and a new one into typed actions the
agent's loop executes in order. Pure: values in, values out, tested with tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

from vgpu_agent.config.dra import DRA_RESTART_ONLY_KEYS
from vgpu_agent.config.plan import gpu_ceiling, grant_policy, plan_gpus
from vgpu_agent.config.schema import Config, FaultsConfig
from vgpu_agent.host.log import LogLevel
from vgpu_agent.model.devices import MpsGrantPolicy
from vgpu_agent.model.gpu import Gpu


@dataclass(frozen=True)
class KeepRunningConfig:
    """Refuse the new config and keep serving as before (the only action when present)."""

    why: str


@dataclass(frozen=True)
class UseLogLevel:
    """Log at a new level."""

    level: LogLevel


@dataclass(frozen=True)
class UseGrantPolicy:
    """Allocate hands out a new MPS policy from now on."""

    policy: Optional[MpsGrantPolicy]


@dataclass(frozen=True)
class WarnNotServed:
    """A GPU the new config names, or would split, cannot be served: say why."""

    problem: str


@dataclass(frozen=True)
class ServeGpu:
    """Start serving a GPU the running config did not: compute mode, MPS daemon, vGPUs."""

    gpu: Gpu
    replicas: int


@dataclass(frozen=True)
class ResizeGpu:
    """Advertise a served GPU as a different number of vGPUs."""

    gpu_uuid: str
    replicas: int


@dataclass(frozen=True)
class WithdrawGpu:
    """Stop advertising a served GPU (its MPS daemon keeps running for the jobs on it)."""

    gpu_uuid: str


@dataclass(frozen=True)
class Reregister:
    """The plugin settings changed: serve on the new socket and register again."""


@dataclass(frozen=True)
class RestartHealthChecks:
    """The health settings changed: restart the watchers with them."""


@dataclass(frozen=True)
class UseDeviceListStrategy:
    """Allocate names GPUs to the container toolkit another way from now on."""

    strategy: str


@dataclass(frozen=True)
class UseFaultsConfig:
    """Count MPS faults and hold offenders by new ``[faults]`` settings from now on."""

    faults: FaultsConfig


@dataclass(frozen=True)
class ApplyCeiling:
    """Set a kept GPU's daemon ceiling anew: confinement or the vGPU count changed."""

    gpu: Gpu
    replicas: int


ReloadAction = Union[
    KeepRunningConfig,
    UseLogLevel,
    UseGrantPolicy,
    WarnNotServed,
    ServeGpu,
    ResizeGpu,
    WithdrawGpu,
    Reregister,
    RestartHealthChecks,
    UseDeviceListStrategy,
    UseFaultsConfig,
    ApplyCeiling,
]


#: Settings a running agent cannot take on: its control socket's directory, the GPU
#: backend, and how the MPS daemons are run (they were started with the old ones).
RESTART_ONLY_KEYS = (
    ("agent", "state_dir"),
    ("gpus", "backend"),
    ("gpus", "compute_mode"),
    ("mps", "enabled"),
    ("mps", "manager"),
    ("mps", "pipe_root"),
    ("mps", "log_root"),
    ("mps", "control_binary"),
    ("mps", "multi_user"),
    # Not the daemon defaults (mps.confinement, max_vgpus_per_container, daemon_*_limit):
    # a reload sets the new ceiling on the running daemons (ApplyCeiling). Nor [isolation]:
    # the observer's per-pod client policy takes the new config when it is reconfigured.
    # The frontend and everything DRA mode names (sockets, CDI directory) are chosen at start.
    *DRA_RESTART_ONLY_KEYS,
)


def restart_only_changes(running: Config, new: Config) -> list[str]:
    """The keys (``table.key``) that differ between the configs but only apply at start."""
    changed = [
        f"{table}.{key}"
        for table, key in RESTART_ONLY_KEYS
        if getattr(getattr(running, table), key) != getattr(getattr(new, table), key)
    ]
    if running.gpus.backend == "simulated" and new.simulated != running.simulated:
        changed.append("[simulated]")
    return changed


def plan_reload(
    running: Config, new: Config, gpus: Sequence[Gpu], served: Mapping[str, int]
) -> list[ReloadAction]:
    """What changes when the agent that runs ``running`` and serves ``served`` (GPU UUID ->
    vGPUs) reloads ``new`` on a node with ``gpus``, in the order to do it.

    A new config that serves no GPU is refused: at start it would be an error, and on
    reload it would silently withdraw every vGPU from the kubelet.
    """
    fixed = restart_only_changes(running, new)
    if fixed:
        return [
            KeepRunningConfig(
                f"restart needed: {', '.join(fixed)} cannot change while the agent runs; "
                "restart it to apply the new config (systemctl restart vgpu-agent)"
            )
        ]
    plan = plan_gpus(new, gpus)
    if not plan.served:
        return [
            KeepRunningConfig(
                "the new one serves no GPU: " + ("; ".join(plan.refused) or "no GPU selected")
            )
        ]
    actions: list[ReloadAction] = []
    if new.agent.log_level != running.agent.log_level:
        actions.append(UseLogLevel(new.agent.log_level))
    if grant_policy(new) != grant_policy(running):
        actions.append(UseGrantPolicy(grant_policy(new)))
    actions.extend(WarnNotServed(problem) for problem in plan.refused)
    wanted = {gpu.uuid: replicas for gpu, replicas in plan.served}
    actions.extend(
        ServeGpu(gpu, replicas) for gpu, replicas in plan.served if gpu.uuid not in served
    )
    for gpu_uuid, replicas in served.items():
        if gpu_uuid not in wanted:
            actions.append(WithdrawGpu(gpu_uuid))
        elif wanted[gpu_uuid] != replicas:
            actions.append(ResizeGpu(gpu_uuid, wanted[gpu_uuid]))
    if new.plugin.device_list_strategy != running.plugin.device_list_strategy:
        actions.append(UseDeviceListStrategy(new.plugin.device_list_strategy))
    if new.faults != running.faults:
        actions.append(UseFaultsConfig(new.faults))
    by_uuid = {gpu.uuid: gpu for gpu in gpus}
    for gpu_uuid, replicas in served.items():
        gpu = by_uuid.get(gpu_uuid)
        if gpu is None or gpu_uuid not in wanted:
            continue
        before = gpu_ceiling(running, gpu.memory_mib, replicas)
        after = gpu_ceiling(new, gpu.memory_mib, wanted[gpu_uuid])
        if after != before and not after.empty:
            actions.append(ApplyCeiling(gpu, wanted[gpu_uuid]))
    if new.plugin != running.plugin:
        actions.append(Reregister())
    if new.health != running.health:
        actions.append(RestartHealthChecks())
    return actions
