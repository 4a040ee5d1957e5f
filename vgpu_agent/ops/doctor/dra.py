"""The DRA checks (``dra.enabled``): the kubelet's registry directory, the agent's two
sockets, the CDI directory and the credentials, in place of the device plugin's sockets.
"""

from __future__ import annotations

import os

from vgpu_agent.config.schema import Config
from vgpu_agent.host.sockets import socket_state
from vgpu_agent.ops.doctor.probes import DoctorProbes
from vgpu_agent.ops.doctor.report import Report


def check_dra(report: Report, config: Config, probes: DoctorProbes) -> None:
    """Whether the node can serve DRA: registry directory, sockets, CDI dir, kubeconfig."""
    dra = config.dra
    check = "dra"
    if not os.path.isdir(dra.registry_dir):
        report.warn(
            check,
            f"{dra.registry_dir} does not exist: the kubelet has not run on this node yet, or "
            "dra.registry_dir is not its plugins_registry directory; the agent waits for it",
        )
    else:
        for path, what in (
            (dra.registration_socket_path, "registration socket"),
            (dra.plugin_socket_path, "DRA plugin socket"),
        ):
            state = socket_state(path, probes.socket_timeout_s)
            if state == "listening":
                report.ok(check, f"the {what} {path} answers")
            elif state == "not a socket":
                report.fail(check, f"{path} is not a socket; remove it")
            else:
                report.warn(
                    check,
                    f"the {what} {path} is {state}: the agent is not serving DRA (not running, "
                    "or still waiting for GPUs); see `systemctl status vgpu-agent`",
                )
    cdi_parent = dra.cdi_dir if os.path.isdir(dra.cdi_dir) else os.path.dirname(dra.cdi_dir)
    if os.path.isdir(cdi_parent) and os.access(cdi_parent, os.W_OK):
        report.ok(check, f"claims' CDI specs go to {dra.cdi_dir} (the runtime must read it)")
    else:
        report.fail(
            check,
            f"{dra.cdi_dir} cannot be written: claims cannot be prepared; make it (and allow "
            "it in the unit's ReadWritePaths=, docs/dra.md) or set dra.cdi_dir",
        )
    if os.access(dra.kubeconfig, os.R_OK):
        report.ok(check, f"credentials from {dra.kubeconfig}")
    else:
        report.fail(
            check,
            f"{dra.kubeconfig} cannot be read: the agent cannot reach the API server; set "
            "dra.kubeconfig to the kubelet's kubeconfig",
        )
