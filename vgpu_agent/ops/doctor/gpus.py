"""The driver and GPU checks: whether the backend opens, which GPUs it sees and which are
served, and each served GPU's compute mode. :class:`GpuFindings` carries what they found
to the checks that follow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from vgpu_agent.config.plan import plan_gpus, slice_warnings
from vgpu_agent.config.schema import ComputeModeSetting, Config
from vgpu_agent.model.errors import VgpuError
from vgpu_agent.model.gpu import ComputeMode, Gpu, GpuBackend
from vgpu_agent.ops.doctor.probes import DoctorProbes
from vgpu_agent.ops.doctor.report import Report, Status


@dataclass
class GpuFindings:
    """What the GPU check found, for the checks that follow it."""

    backend: Optional[GpuBackend] = None
    served: list[Gpu] = field(default_factory=list)
    replicas: dict[str, int] = field(default_factory=dict)
    #: GPUs whose MPS daemon answered, so their ceiling can be read back.
    answering: set[str] = field(default_factory=set)


def judge_compute_mode(
    setting: ComputeModeSetting, mps_enabled: bool, mode: ComputeMode
) -> tuple[Status, str]:
    """What a served GPU's compute ``mode`` means under the config: status and advice."""
    apply_hint = (
        "run `vgpu-agent gpus apply-compute-mode` as root (the agent also sets it when it starts)"
    )
    if mode is ComputeMode.PROHIBITED:
        return (
            Status.FAIL,
            "prohibited: no process can use the GPU; "
            + (
                apply_hint
                if setting != "unchanged"
                else 'set gpus.compute_mode = "exclusive_process" or run nvidia-smi -c 3'
            ),
        )
    if not mps_enabled:
        if mode is ComputeMode.DEFAULT:
            return Status.OK, "default (MPS is off: pods share the GPU by time slicing)"
        return (
            Status.WARN,
            f"{mode.value} while MPS is off: one process at a time can use the GPU, so pods "
            'beyond the first get no CUDA context; set gpus.compute_mode = "default" and '
            "run `vgpu-agent gpus apply-compute-mode`",
        )
    if setting == "exclusive_process":
        if mode is ComputeMode.EXCLUSIVE_PROCESS:
            return Status.OK, "exclusive_process, as configured"
        return (
            Status.FAIL,
            f'{mode.value}, but gpus.compute_mode = "exclusive_process": processes could use '
            f"the GPU outside MPS and its limits; {apply_hint}",
        )
    if setting == "default":
        if mode is ComputeMode.DEFAULT:
            return Status.OK, "default, as configured"
        return Status.WARN, f'{mode.value}, but gpus.compute_mode = "default"; {apply_hint}'
    # "unchanged": the agent leaves the mode as it finds it.
    if mode is ComputeMode.EXCLUSIVE_PROCESS:
        return Status.OK, 'exclusive_process (gpus.compute_mode = "unchanged" keeps it)'
    return (
        Status.WARN,
        f'{mode.value} and gpus.compute_mode = "unchanged": clients could bypass MPS (a '
        "process that ignores the pipe directory gets its own context, outside MPS's limits); "
        'set gpus.compute_mode = "exclusive_process"',
    )


def check_gpus(report: Report, config: Config, probes: DoctorProbes, node: GpuFindings) -> None:
    """The driver and GPU checks; fills ``node`` with the open backend and the served GPUs."""
    simulated = config.gpus.backend == "simulated"
    check = "driver"
    try:
        node.backend = probes.open_backend(config)
    except VgpuError as exc:
        # The backend's own error already says what to install or use instead (a simulated
        # backend among them); doctor adds only where to look first.
        hint = "check the [simulated] table" if simulated else "check that `nvidia-smi` works"
        report.fail(check, f"{exc}; {hint}")
        return
    if simulated:
        report.ok(
            check, 'the simulated backend is in use (gpus.backend = "simulated"): no driver needed'
        )
    else:
        version_of = getattr(node.backend, "driver_version", None)
        version = version_of() if callable(version_of) else None
        report.ok(check, f"NVML loaded, NVIDIA driver {version or 'version unknown'}")
    try:
        gpus = node.backend.list_gpus()
    except VgpuError as exc:
        report.fail("gpus", f"{exc}; check `nvidia-smi -L` and the kernel log")
        return
    if not gpus:
        report.fail("gpus", "the backend sees no GPU; check `nvidia-smi -L` and the kernel log")
        return
    plan = plan_gpus(config, gpus)
    replicas_by_uuid = {gpu.uuid: replicas for gpu, replicas in plan.served}
    for gpu in gpus:
        major, minor = gpu.compute_capability
        described = (
            f"GPU {gpu.index} {gpu.uuid} {gpu.model}, {gpu.memory_mib} MiB, "
            f"compute capability {major}.{minor}"
        )
        replicas = replicas_by_uuid.get(gpu.uuid)
        served = f"serves {replicas} vGPUs" if replicas is not None else "not served"
        report.ok("gpus", f"{described}: {served}")
    for refusal in plan.refused:
        report.warn("gpus", refusal)
    node.served = [gpu for gpu, _ in plan.served]
    node.replicas = dict(replicas_by_uuid)
    if not node.served:
        report.fail(
            "gpus",
            "no GPU would be served, so the agent advertises no vGPU; see gpus.serve and "
            "the lines above",
        )
    for gpu in node.served:
        for warning in slice_warnings(config, gpu.model, gpu.memory_mib):
            report.warn("gpus", f"GPU {gpu.index}: {warning}")


def served_backend(report: Report, check: str, node: GpuFindings) -> Optional[GpuBackend]:
    """The open backend when there are served GPUs to check; else say why not, and None."""
    if node.backend is None:
        report.warn(check, "not checked: the GPU backend did not open (see above)")
        return None
    if not node.served:
        report.warn(check, "not checked: no GPU is served (see above)")
        return None
    return node.backend


def check_compute_modes(report: Report, config: Config, node: GpuFindings) -> None:
    """Each served GPU's compute mode, judged against the config."""
    check = "compute mode"
    backend = served_backend(report, check, node)
    if backend is None:
        return
    for gpu in node.served:
        try:
            mode = backend.get_compute_mode(gpu.uuid)
        except VgpuError as exc:
            report.fail(check, f"GPU {gpu.index}: {exc}")
            continue
        status, message = judge_compute_mode(config.gpus.compute_mode, config.mps.enabled, mode)
        report.add(status, check, f"GPU {gpu.index} {gpu.uuid}: {message}")
