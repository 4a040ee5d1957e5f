"""What the agent's loop adds to keep pods inside MPS (docs/security.md, "No way around
MPS"): Allocate asks whether the GPU's daemon is up at that moment, not only what the last
health check said.

The daemon's quick check (the pipe directory, its control socket, the daemon's process in
/proc) starts no process and never blocks, so it can run inside every Allocate (and when
its process is gone but its socket is still there, a control command decides): a daemon
that died a moment ago, which the liveness thread has not seen yet (it looks every
``health.mps_check_interval_s``), is not handed out. A container given the pipe directory
of a daemon that is down would run outside MPS: its CUDA calls find no control socket and
go straight to the GPU, with no error.

`vgpu-agent status` also shows each GPU's compute mode, and says when it lets pods around
MPS (:func:`vgpu_agent.config.isolation.compute_mode_risk`), and each container that runs
more MPS clients than it holds vGPUs, with what the per-pod policy does about it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Optional

from vgpu_agent.config.isolation import compute_mode_risk, excess_client_action
from vgpu_agent.config.schema import Config
from vgpu_agent.model.daemons import MpsDaemons
from vgpu_agent.model.errors import GpuError
from vgpu_agent.model.gpu import GpuBackend
from vgpu_agent.model.node import DaemonGate

log = logging.getLogger(__name__)


def daemon_gate(daemons: MpsDaemons) -> DaemonGate:
    """The check Allocate runs on a GPU's daemon: None when nothing cheap to see is wrong,
    else why it is down."""

    def down(gpu_uuid: str) -> Optional[str]:
        try:
            seen = daemons.quick_check(gpu_uuid)
        except Exception as exc:  # an Allocate must get an answer, not a traceback
            log.warning(
                "checking the MPS daemon of GPU %s for an Allocate failed: %s", gpu_uuid, exc
            )
            return f"its liveness check failed: {exc}"
        if not seen.unsure:
            return seen.problem
        # The pid file names a process that is gone: the daemon was killed (its control
        # socket stays behind) or, rarely, one started since did not rewrite the file.
        # Only asking tells; a dead daemon refuses at once, a hung one within
        # mps.control_timeout_s.
        try:
            return daemons.full_check(gpu_uuid)
        except Exception as exc:  # as above
            return f"its liveness check failed: {exc}"

    return down


def isolation_status(
    config: Config,
    backend: Optional[GpuBackend],
    gpu_uuid: str,
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """The GPU's compute mode for `vgpu-agent status`, and ``unsafe``: why it lets pods
    around MPS, then ``warnings`` (absent when there is nothing to say)."""
    shown: dict[str, Any] = {}
    unsafe: list[str] = []
    if backend is not None:
        try:
            mode = backend.get_compute_mode(gpu_uuid)
        except GpuError as exc:
            shown["compute_mode"] = f"unknown ({exc})"
        else:
            shown["compute_mode"] = mode.value
            risk = compute_mode_risk(config, mode)
            if risk is not None:
                unsafe.append(f"compute mode {mode.value}: {risk}")
    unsafe.extend(warnings)
    if unsafe:
        shown["unsafe"] = unsafe
    return shown


def excess_client_warnings(gpu_users: Optional[dict[str, Any]], config: Config) -> list[str]:
    """Why a GPU's containers get more than their share: each container running more MPS
    client processes than it holds vGPUs (MPS limits each process, not the pod: a 1-vGPU
    container with 4 processes got 3.99 shares on an H100), and what the per-pod policy
    (``[isolation]``) does about it. From `status`'s attribution of the GPU (None: not
    known)."""
    warnings = []
    for container in (gpu_users or {}).get("containers", []):
        clients, vgpus = len(container.get("pids", [])), len(container.get("vgpu_ids", []))
        if vgpus and clients > vgpus:
            name = "/".join(
                part for part in (container.get("namespace"), container.get("pod")) if part
            ) or str(container.get("pod_uid", "?"))
            warnings.append(
                f"container {name}/{container.get('container', '?')} runs {clients} MPS client "
                f"processes on {vgpus} vGPU(s): MPS holds each process, not the container, to "
                f"the ceiling, so it can use up to {clients} shares; "
                + excess_client_action(config, clients, vgpus)
            )
    return warnings
