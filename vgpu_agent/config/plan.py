"""Decisions made from the config alone (pure): which GPUs to serve with how many vGPUs,
what Allocate grants for MPS, each daemon's ceiling, the memory-slice advice that depends
on the GPU, and whether MPS is simulated. What a reload changes is in :mod:`.reload`.

No I/O: everything takes values and returns values, so it is tested with tables, and
`vgpu-agent doctor` and `gpus` use the same rules as the agent without starting it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from vgpu_agent.config.schema import Config, MpsConfig
from vgpu_agent.model.devices import (
    Ceiling,
    MpsGrantPolicy,
    enforced_ceiling,
    memory_limit_mib,
    proportional_memory_mib,
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


# -- advice and facts from the config ------------------------------------------------------------

#: A proportional memory slice below this leaves an MPS client almost nothing once its own
#: CUDA context is counted against the limit (measured: a 1 GiB limit left 0.39 GiB free).
MIN_USEFUL_SLICE_MIB = 640


def slice_warnings(config: Config, model: str, memory_mib: int) -> list[str]:
    """Warnings about the MPS memory slices a GPU of ``model`` with ``memory_mib`` would get."""
    mps = config.mps
    if not mps.enabled:
        return []
    replicas = config.replicas_for_model(model)
    if mps.memory_limit == "none":
        return []
    if mps.memory_limit == "proportional":
        slice_mib = proportional_memory_mib(memory_mib, mps.memory_headroom_mib, 1, replicas)
        if slice_mib >= MIN_USEFUL_SLICE_MIB:
            return []
        return [
            f"{model} ({memory_mib} MiB, {mps.memory_headroom_mib} MiB headroom) split into "
            f"{replicas} vGPUs gives each {slice_mib} MiB of memory; below "
            f"{MIN_USEFUL_SLICE_MIB} MiB a client has almost nothing left after its CUDA "
            "context: lower gpus.replicas_per_gpu or add a gpus.replicas_by_model entry "
            "for this model, or lower mps.memory_headroom_mib"
        ]
    warnings: list[str] = []
    if mps.memory_limit < MIN_USEFUL_SLICE_MIB:
        warnings.append(
            f"mps.memory_limit = {mps.memory_limit} MiB per vGPU leaves a client almost "
            f"nothing after its CUDA context (below {MIN_USEFUL_SLICE_MIB} MiB)"
        )
    if mps.memory_limit > memory_mib:
        warnings.append(
            f"mps.memory_limit = {mps.memory_limit} MiB per vGPU is more than the "
            f"{memory_mib} MiB of {model}: the limit confines nothing"
        )
    return warnings


def offered_as(config: Config) -> str:
    """What the node's vGPUs are offered as, for the status line: the device plugin's
    extended resource, or the DRA driver (``dra.enabled``)."""
    if config.dra.enabled:
        return f"DRA driver {config.dra.driver_name}"
    return config.plugin.resource_name


def simulated_mps(config: Config) -> bool:
    """Whether the MPS daemons are simulated: with simulated GPUs, unless the config names a
    control program (a stand-in, as the fault and system tests use), which the configured
    manager then runs or watches."""
    return (
        config.gpus.backend == "simulated" and config.mps.control_binary == MpsConfig.control_binary
    )
