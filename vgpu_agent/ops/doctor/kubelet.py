"""The kubelet checks: the plugin directory, the kubelet's socket and the agent's own, and
whether another GPU device plugin serves on the node.
"""

from __future__ import annotations

import os

from vgpu_agent.config.schema import Config
from vgpu_agent.host.sockets import socket_state
from vgpu_agent.ops.doctor.probes import DoctorProbes
from vgpu_agent.ops.doctor.report import Report


def check_sockets(report: Report, config: Config, probes: DoctorProbes) -> None:
    """Whether the plugin directory, the kubelet's socket and the agent's own are there."""
    plugin = config.plugin
    if not os.path.isdir(plugin.plugin_dir):
        report.warn(
            "kubelet",
            f"{plugin.plugin_dir} does not exist: the kubelet has not run on this node yet, "
            "or plugin.plugin_dir is wrong; the agent waits for it",
        )
        return
    kubelet_socket = plugin.kubelet_socket_path
    state = socket_state(kubelet_socket, probes.socket_timeout_s)
    if state == "listening":
        report.ok("kubelet", f"{kubelet_socket} answers")
    elif state == "not a socket":
        report.fail("kubelet", f"{kubelet_socket} is not a socket; check plugin.plugin_dir")
    else:
        why = "is missing" if state == "missing" else "is there but nothing answers on it"
        report.warn(
            "kubelet",
            f"{kubelet_socket} {why}: the kubelet is not running yet (the agent registers "
            "once it is); check `systemctl status kubelet`",
        )
    own_socket = plugin.socket_path
    state = socket_state(own_socket, probes.socket_timeout_s)
    if state == "listening":
        report.ok("plugin socket", f"{own_socket} answers")
    elif state == "not a socket":
        report.fail(
            "plugin socket", f"{own_socket} is not a socket; remove it or change plugin.socket_name"
        )
    elif state == "stale":
        report.warn(
            "plugin socket",
            f"{own_socket} is left over: nothing answers on it; the agent replaces it when "
            "it starts (systemctl start vgpu-agent)",
        )
    else:
        report.warn(
            "plugin socket",
            f"{own_socket} is missing: the agent is not serving (not running, or still "
            "waiting for GPUs); see `systemctl status vgpu-agent`",
        )


def _is_gpu_plugin(socket_name: str) -> bool:
    lowered = socket_name.lower()
    return lowered.startswith("nvidia") or "gpu" in lowered


def check_other_plugins(report: Report, config: Config, probes: DoctorProbes) -> None:
    """Whether another GPU device plugin serves in the plugin directory."""
    check = "other plugins"
    plugin = config.plugin
    if not os.path.isdir(plugin.plugin_dir):
        report.ok(check, f"none: {plugin.plugin_dir} does not exist")
        return
    ours = {plugin.kubelet_socket_name, plugin.socket_name}
    others: list[str] = []
    for name in sorted(os.listdir(plugin.plugin_dir)):
        path = os.path.join(plugin.plugin_dir, name)
        if name in ours or not name.endswith(".sock"):
            continue
        state = socket_state(path, probes.socket_timeout_s)
        if state in ("missing", "not a socket"):
            continue
        if not _is_gpu_plugin(name):
            others.append(name)
        elif state == "stale":
            report.warn(
                check,
                f"{path} is left over from a GPU device plugin that is gone (nothing answers); "
                "remove it",
            )
        else:
            report.fail(
                check,
                f"{path}: another GPU device plugin serves on this node (NVIDIA's uses "
                "nvidia-gpu.sock), so two plugins hand out the same GPUs; keep it off this "
                "node (a nodeSelector or affinity on its DaemonSet that excludes vGPU nodes)",
            )
    if others:
        report.ok(check, f"other device plugins, not for GPUs by name: {', '.join(others)}")
    elif not any(line.check == check for line in report.lines):
        report.ok(check, "no other device plugin serves GPUs on this node")
