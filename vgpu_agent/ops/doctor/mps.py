"""The MPS checks: the control and server programs, whether each served GPU's daemon
answers (and in multi-user mode), and whether the driver's MPS offers multi-user mode.
"""

from __future__ import annotations

import os

from vgpu_agent.config.schema import Config, MultiUser
from vgpu_agent.model.daemons import SIMULATED_DAEMON_NOTE
from vgpu_agent.model.errors import VgpuError
from vgpu_agent.mps.control import MULTI_USER_OFF, MULTI_USER_UNSUPPORTED
from vgpu_agent.mps.daemons import SYSTEMD_UNIT_TEMPLATE
from vgpu_agent.ops.doctor.gpus import GpuFindings, served_backend
from vgpu_agent.ops.doctor.probes import DoctorProbes
from vgpu_agent.ops.doctor.report import Report, Status

MPS_SERVER_BINARY = "nvidia-cuda-mps-server"

_MPS_PACKAGES = (
    "install the NVIDIA driver's MPS binaries (Ubuntu: nvidia-compute-utils-<branch>; "
    "Amazon Linux and RHEL: nvidia-driver-cuda)"
)


def judge_multi_user(setting: MultiUser, supported: bool) -> tuple[Status, str]:
    """Whether pods of different users can share a GPU at once: status and advice."""
    if setting == "off":
        return (
            Status.WARN,
            f'{MULTI_USER_OFF}; set mps.multi_user = "auto" unless every GPU pod runs as one user',
        )
    if supported:
        return (
            Status.OK,
            "the driver's MPS offers multi-user mode: pods running as different users share "
            "a GPU at the same time",
        )
    if setting == "on":
        return (
            Status.FAIL,
            'mps.multi_user = "on", but the driver\'s MPS has no multi-user mode (-M), so the '
            'daemons cannot start; upgrade the NVIDIA driver, or set mps.multi_user = "auto" '
            "(pods running as different users will then queue on a GPU)",
        )
    return (
        Status.WARN,
        f"{MULTI_USER_UNSUPPORTED}; run every GPU pod as one user, or upgrade the NVIDIA driver",
    )


def check_mps_binaries(report: Report, config: Config, probes: DoctorProbes) -> None:
    """Whether the MPS control program and its server are there and safe to run."""
    check = "mps binaries"
    if not config.mps.enabled:
        report.ok(check, "not needed: MPS is off (mps.enabled = false)")
        return
    in_agent = probes.mps_in_agent(config)
    if in_agent is not None:
        report.ok(check, f"not needed: the MPS daemons are {in_agent} inside the agent")
        return
    control_binary = config.mps.control_binary
    control_path = probes.which(control_binary)
    if control_path is None:
        where = "is not an executable file" if os.path.isabs(control_binary) else "is not on PATH"
        report.fail(
            check,
            f"{control_binary} {where}; {_MPS_PACKAGES}, or set mps.control_binary to its path",
        )
        return
    untrusted = probes.untrusted_program(control_binary)
    if untrusted is not None:
        report.fail(check, untrusted)
        return
    # The control daemon starts the server; it ships next to it.
    beside = os.path.join(os.path.dirname(control_path), MPS_SERVER_BINARY)
    server_path = probes.which(beside) or probes.which(MPS_SERVER_BINARY)
    if server_path is None:
        report.fail(
            check,
            f"{control_path} is there, but {MPS_SERVER_BINARY} is neither beside it nor on "
            f"PATH, so the daemons cannot start a server; {_MPS_PACKAGES}",
        )
        return
    report.ok(check, f"{control_path} and {server_path}")


def _daemon_hint(config: Config, gpu_uuid: str) -> str:
    manager = config.mps.manager
    if manager == "systemd":
        unit = SYSTEMD_UNIT_TEMPLATE.format(gpu_uuid=gpu_uuid)
        return f"see `systemctl status {unit}` and `journalctl -u {unit}`"
    if manager == "direct":
        return 'the agent starts it (mps.manager = "direct"): start the agent and read its log'
    return 'mps.manager = "external": start the daemon the way this node runs it'


def _restart_hint(config: Config, gpu_uuid: str) -> str:
    when = "once no job uses the GPU (restarting it ends the jobs on it)"
    if config.mps.manager == "systemd":
        unit = SYSTEMD_UNIT_TEMPLATE.format(gpu_uuid=gpu_uuid)
        return f"`systemctl restart {unit}` {when}"
    if config.mps.manager == "direct":
        return f"quit it and restart the agent, which starts it in multi-user mode, {when}"
    return f"restart it with -M, {when}"


def check_mps_daemons(
    report: Report, config: Config, probes: DoctorProbes, node: GpuFindings
) -> None:
    """Whether each served GPU's MPS daemon answers, and in multi-user mode."""
    check = "mps daemon"
    if not config.mps.enabled:
        report.ok(check, "not checked: MPS is off (mps.enabled = false)")
        return
    if served_backend(report, check, node) is None:
        return
    in_agent = probes.mps_in_agent(config)
    for gpu in node.served:
        pipe_dir = config.mps.pipe_dir(gpu.uuid)
        try:
            why = probes.mps_probe(config, gpu.uuid)
        except VgpuError as exc:
            why = str(exc)
        if why is not None:
            report.fail(
                check,
                f"GPU {gpu.index}: the daemon on {pipe_dir} does not answer ({why}); "
                f"{_daemon_hint(config, gpu.uuid)}",
            )
            continue
        node.answering.add(gpu.uuid)
        running_multi_user = probes.mps_daemon_multi_user(config, gpu.uuid)
        if running_multi_user is False and config.mps.multi_user != "off":
            report.warn(
                check,
                f"GPU {gpu.index}: the daemon on {pipe_dir} answers but runs without "
                "multi-user mode (-M): pods running as different users will queue on a GPU; "
                f"{_restart_hint(config, gpu.uuid)}",
            )
            continue
        if in_agent is not None:
            # As `mps status` says it: there is no daemon on disk to answer.
            report.ok(check, f"GPU {gpu.index}: {SIMULATED_DAEMON_NOTE}")
        else:
            report.ok(check, f"GPU {gpu.index}: the daemon on {pipe_dir} answers")


def check_multi_user(report: Report, config: Config, probes: DoctorProbes) -> None:
    """Whether the driver's MPS offers the multi-user mode the config asks for."""
    check = "mps multi-user"
    if not config.mps.enabled:
        report.ok(check, "not checked: MPS is off (mps.enabled = false)")
        return
    if config.mps.multi_user == "off":
        status, message = judge_multi_user("off", supported=False)
        report.add(status, check, message)
        return
    try:
        supported = probes.mps_multi_user_supported(config)
    except VgpuError as exc:
        report.warn(
            check,
            f"cannot tell whether the driver's MPS offers multi-user mode ({exc}); without it "
            "pods running as different users will queue on a GPU",
        )
        return
    status, message = judge_multi_user(config.mps.multi_user, supported)
    report.add(status, check, message)
