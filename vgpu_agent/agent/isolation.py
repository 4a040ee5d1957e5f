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
MPS (:func:`vgpu_agent.config.isolation.compute_mode_risk`).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from vgpu_agent.config.isolation import compute_mode_risk
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
    config: Config, backend: Optional[GpuBackend], gpu_uuid: str
) -> dict[str, Any]:
    """The GPU's compute mode for `vgpu-agent status`, and ``unsafe`` saying why it lets
    pods around MPS (absent when it does not)."""
    if backend is None:
        return {}
    try:
        mode = backend.get_compute_mode(gpu_uuid)
    except GpuError as exc:
        return {"compute_mode": f"unknown ({exc})"}
    shown: dict[str, Any] = {"compute_mode": mode.value}
    risk = compute_mode_risk(config, mode)
    if risk is not None:
        shown["unsafe"] = [f"compute mode {mode.value}: {risk}"]
    return shown
