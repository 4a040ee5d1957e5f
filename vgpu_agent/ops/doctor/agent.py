"""The agent check: whether the agent runs, is registered with the kubelet and finds every
GPU healthy, asked over its control socket.
"""

from __future__ import annotations

from vgpu_agent.config.schema import Config
from vgpu_agent.model.commands import StatusCommand
from vgpu_agent.model.errors import VgpuError
from vgpu_agent.ops.doctor.probes import DoctorProbes
from vgpu_agent.ops.doctor.report import Report


def check_agent(report: Report, config: Config, probes: DoctorProbes) -> None:
    """Whether the agent runs, is registered and finds every GPU healthy."""
    check = "agent"
    socket_path = config.agent.control_socket_path
    try:
        answer = probes.agent_request(socket_path, StatusCommand())
    except VgpuError as exc:
        report.warn(check, str(exc))
        return
    if not answer.get("ok"):
        report.fail(
            check,
            f"the agent on {socket_path} answered with an error: "
            f"{answer.get('error', 'no reason given')}; see `journalctl -u vgpu-agent`",
        )
        return
    line = str(answer.get("status", "no status line"))
    unhealthy: list[str] = []
    gpus = answer.get("gpus", [])
    for gpu in gpus if isinstance(gpus, list) else []:
        if isinstance(gpu, dict) and not gpu.get("healthy", True):
            reasons = gpu.get("reasons", [])
            causes = "; ".join(str(reason) for reason in reasons) if reasons else "no reason"
            unhealthy.append(f"GPU {gpu.get('index', '?')}: {causes}")
    if answer.get("backend") == "simulated" and config.gpus.backend != "simulated":
        # `run --simulate N` beside a config for the real GPUs: the checks above looked at
        # the driver, the agent serves GPUs that are not there.
        report.warn(
            check,
            f"running on simulated GPUs (run --simulate), not this node's: {line}; the "
            "checks above are of the real driver; give doctor the agent's config "
            "(vgpu-agent --config PATH doctor, e.g. examples/laptop.toml)",
        )
    elif line.startswith("waiting for the GPU driver"):
        report.warn(check, f"running, but {line}; see the driver check above")
    elif unhealthy:
        report.warn(
            check,
            f"running: {line}; unhealthy {', '.join(unhealthy)}; once fixed, "
            "`vgpu-agent health reset <gpu>` marks an XID-marked GPU healthy again",
        )
    elif not answer.get("registered", False):
        report.warn(
            check,
            f"running but not registered with the kubelet: {line}; see the kubelet checks above",
        )
    else:
        report.ok(check, f"running: {line}")
