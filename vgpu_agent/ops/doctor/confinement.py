"""The confinement checks: which confinement the node runs, whether each daemon holds its
GPU's ceiling, and whether pods get (and cannot forge) their GPU with the chosen device
list strategy.
"""

from __future__ import annotations

from vgpu_agent.config.plan import confinement_line, gpu_ceiling
from vgpu_agent.config.schema import Config
from vgpu_agent.model.errors import VgpuError
from vgpu_agent.mps import confinement
from vgpu_agent.ops.doctor.containerd import containerd_cdi
from vgpu_agent.ops.doctor.gpus import GpuFindings
from vgpu_agent.ops.doctor.probes import DoctorProbes
from vgpu_agent.ops.doctor.report import Report, Status


def check_confinement(
    report: Report, config: Config, probes: DoctorProbes, node: GpuFindings
) -> None:
    """Which confinement the node runs, each GPU's ceiling, and whether its daemon holds it."""
    check = "confinement"
    line = confinement_line(config)
    if not config.mps.enabled or config.mps.confinement == "cooperative":
        report.warn(
            check,
            f"{line}; a pod that unsets its variables gets the whole GPU: set "
            'mps.confinement = "enforced" unless every tenant is trusted '
            "(/usr/share/doc/vgpu-agent/security.md)",
        )
        if not config.mps.enabled:
            return
    else:
        report.ok(check, line)
    if config.gpus.allow_unconfined_sharing:
        report.warn(
            check,
            "gpus.allow_unconfined_sharing = true: pre-Volta and MIG GPUs, if served, hold no "
            "ceiling (MPS cannot confine clients there)",
        )
    for gpu in node.served:
        ceiling = gpu_ceiling(config, gpu.memory_mib, node.replicas[gpu.uuid])
        if ceiling.empty:
            report.ok(check, f"GPU {gpu.index}: no daemon ceiling")
            continue
        if gpu.uuid not in node.answering:
            report.warn(
                check,
                f"GPU {gpu.index}: ceiling {ceiling.describe()} not checked: its daemon "
                "does not answer (see the mps daemon line)",
            )
            continue
        try:
            gaps = probes.mps_ceiling_gaps(config, gpu.uuid, ceiling)
        except VgpuError as exc:
            report.warn(check, f"GPU {gpu.index}: ceiling not read back: {exc}")
            continue
        if gaps:
            report.fail(
                check,
                f"GPU {gpu.index}: the daemon does not hold its ceiling ({'; '.join(gaps)}): "
                "clients can take more than their share; the agent sets it at start and puts "
                "it back on every full probe: check `systemctl status vgpu-agent`, or run "
                f"`vgpu-agent mps apply-defaults {gpu.uuid}`",
            )
            continue
        report.ok(check, f"GPU {gpu.index}: the daemon holds every client to {ceiling.describe()}")


def check_device_list(
    report: Report, config: Config, probes: DoctorProbes, node: GpuFindings
) -> None:
    """Whether pods get their GPU with the chosen strategy, and whether they can forge it."""
    check = "device list"
    toolkit = confinement.read_toolkit_config(probes.toolkit_config)
    names, _ = confinement.cdi_gpu_names(probes.cdi_spec_dirs)
    verdicts = confinement.judge_device_list(
        config.plugin.device_list_strategy,
        toolkit,
        names,
        [gpu.uuid for gpu in node.served],
        containerd_cdi(probes.containerd_config),
    )
    for verdict, message in verdicts:
        report.add(Status(verdict), check, message)
