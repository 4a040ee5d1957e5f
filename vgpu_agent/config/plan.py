"""Decisions made from the config alone (pure): which GPUs to serve with how many vGPUs,
what Allocate grants for MPS, and what a reload changes.

No I/O: everything takes values and returns values, so it is tested with tables, and
`vgpu-agent doctor` and `gpus` use the same rules as the agent without starting it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

from vgpu_agent.config.dra import DRA_RESTART_ONLY_KEYS
from vgpu_agent.config.schema import Config, MpsConfig
from vgpu_agent.host.log import LogLevel
from vgpu_agent.model.devices import (
    Ceiling,
    MpsGrantPolicy,
    enforced_ceiling,
    memory_limit_mib,
    thread_percentage,
)
from vgpu_agent.model.gpu import Gpu


@dataclass(frozen=True)
class GpuPlan:
    """Which GPUs to serve with how many vGPUs, and why the others are not served."""

    served: tuple[tuple[Gpu, int], ...]
    refused: tuple[str, ...] = ()


def plan_gpus(config: Config, gpus: Sequence[Gpu]) -> GpuPlan:
    """Choose the GPUs to serve: the config's selection, each within MPS's limits."""
    selection = config.gpus.serve
    refused: list[str] = []
    chosen: list[Gpu] = []
    if selection == "all":
        chosen = list(gpus)
    else:
        for wanted in selection:
            match = [
                gpu
                for gpu in gpus
                if (isinstance(wanted, int) and gpu.index == wanted) or gpu.uuid == wanted
            ]
            if not match:
                refused.append(f"gpus.serve names {wanted!r}, but no such GPU is on this node")
            chosen.extend(gpu for gpu in match if gpu not in chosen)
    served: list[tuple[Gpu, int]] = []
    for gpu in chosen:
        replicas = config.replicas_for_model(gpu.model)
        unconfined = config.gpus.allow_unconfined_sharing
        if config.mps.enabled and gpu.mig_enabled and not unconfined:
            refused.append(
                f"GPU {gpu.index} ({gpu.uuid}, {gpu.model}) is in MIG mode, where MPS cannot "
                "confine clients; disable MIG or set gpus.allow_unconfined_sharing = true"
            )
            continue
        if config.mps.enabled and not gpu.volta_or_newer and not unconfined:
            refused.append(
                f"GPU {gpu.index} ({gpu.uuid}, {gpu.model}) is older than Volta: MPS gives it no "
                "per-client memory or thread limits; set gpus.allow_unconfined_sharing = true "
                "to share it unconfined"
            )
            continue
        if replicas > gpu.mps_client_limit:
            refused.append(
                f"GPU {gpu.index} ({gpu.uuid}, {gpu.model}) would get {replicas} vGPUs, more "
                f"than the {gpu.mps_client_limit} MPS clients it serves; lower "
                "gpus.replicas_per_gpu or add a gpus.replicas_by_model entry"
            )
            continue
        if config.mps.enabled and config.mps.memory_limit == "proportional":
            headroom_mib = config.mps.memory_headroom_mib
            if (gpu.memory_mib - headroom_mib) // replicas < 1:
                # Every pod would get a memory limit of 0 (1M) and fail at CUDA init.
                refused.append(
                    f"GPU {gpu.index} ({gpu.uuid}, {gpu.model}) has {gpu.memory_mib} MiB: "
                    f"after mps.memory_headroom_mib = {headroom_mib} its {replicas} vGPUs "
                    "would get no memory each; lower mps.memory_headroom_mib or the vGPUs "
                    "per GPU"
                )
                continue
        served.append((gpu, replicas))
    return GpuPlan(tuple(served), tuple(refused))


def grant_policy(config: Config) -> Optional[MpsGrantPolicy]:
    """What Allocate hands out for MPS under ``config`` (None when MPS is off)."""
    if not config.mps.enabled:
        return None
    return MpsGrantPolicy(
        container_pipe_dir=config.mps.container_pipe_dir,
        thread_limit=config.mps.thread_limit,
        memory_limit=config.mps.memory_limit,
        memory_headroom_mib=config.mps.memory_headroom_mib,
        share_host_shm=config.mps.share_host_shm,
        # Clients only connect to the daemon's sockets (shown on an H200, docs/mps.md);
        # read-only keeps pods from touching its lock and pid files.
        pipe_dir_read_only=True,
        max_vgpus_per_container=(
            config.mps.max_vgpus_per_container if config.mps.confinement == "enforced" else None
        ),
    )


# -- confinement (docs/security.md) ----------------------------------------------------------


def daemon_ceiling(mps: MpsConfig, memory_mib: int, replicas: int) -> Ceiling:
    """The defaults a GPU's MPS daemon holds every client to.

    Enforced confinement: ``mps.max_vgpus_per_container`` vGPUs' share of the SMs and of the
    memory (:func:`vgpu_agent.model.devices.enforced_ceiling`). Cooperative: what
    ``mps.daemon_thread_limit`` / ``daemon_memory_limit`` ask for (none by default).
    """
    if mps.confinement == "enforced":
        return enforced_ceiling(
            mps.max_vgpus_per_container, replicas, memory_mib, mps.memory_headroom_mib
        )
    return Ceiling(
        thread_percentage(mps.daemon_thread_limit, 1, replicas),
        memory_limit_mib(mps.daemon_memory_limit, 1, replicas, memory_mib, mps.memory_headroom_mib),
    )


def gpu_ceiling(config: Config, memory_mib: int, replicas: int) -> Ceiling:
    """The ceiling the GPU's daemon holds clients to (none without MPS)."""
    if not config.mps.enabled:
        return Ceiling()
    return daemon_ceiling(config.mps, memory_mib, replicas)


def confinement_line(config: Config) -> str:
    """One line saying which confinement the node runs: who holds a pod to its share."""
    mps = config.mps
    if not mps.enabled:
        return "none: MPS is off (mps.enabled = false), pods time-slice whole GPUs with no limits"
    if mps.confinement == "enforced":
        vgpus = mps.max_vgpus_per_container
        share = "1 vGPU's share" if vgpus == 1 else f"{vgpus} vGPUs' share"
        return (
            f"enforced: each MPS daemon holds every client to at most {share} of the SMs and "
            f"memory, whatever its environment says; containers may ask for at most {vgpus} "
            "vGPU" + ("" if vgpus == 1 else "s")
        )
    ceiling = (
        "no daemon ceiling"
        if mps.daemon_thread_limit == "none" and mps.daemon_memory_limit == "none"
        else "a daemon ceiling from mps.daemon_*_limit"
    )
    return (
        "cooperative: each container's limits are its own environment variables, which it "
        f"can unset or raise; {ceiling} (for trusted tenants only)"
    )


# -- reload --------------------------------------------------------------------------------------


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
    # a reload sets the new ceiling on the running daemons (ApplyCeiling).
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
