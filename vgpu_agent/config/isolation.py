"""Judgements about a node's isolation made from the config and what the GPUs report
(pure): which settings leave pods a way around MPS.

`vgpu-agent doctor` and `vgpu-agent status` say the same thing from the same rules.
"""

from __future__ import annotations

from typing import Optional

from vgpu_agent.config.schema import Config
from vgpu_agent.model.gpu import ComputeMode

#: Why compute mode Default breaks enforced confinement (measured on an H100, issue 20).
DEFAULT_MODE_RISK = (
    "unsafe under enforced confinement: in compute mode Default a process that does not go "
    "through MPS (a pod that points CUDA_MPS_PIPE_DIRECTORY elsewhere) runs beside the MPS "
    "server, time-sliced against it, with no limit (its MPS neighbours lost about 40% of "
    'their throughput); set gpus.compute_mode = "exclusive_process" and run '
    "`vgpu-agent gpus apply-compute-mode`, so that the MPS server holds the GPU alone"
)


def compute_mode_risk(config: Config, mode: ComputeMode) -> Optional[str]:
    """Why a served GPU in compute ``mode`` lets pods around MPS under ``config``; None
    when it does not (or when nothing is promised: MPS off, cooperative confinement)."""
    if not config.mps.enabled or config.mps.confinement != "enforced":
        return None
    if mode is ComputeMode.DEFAULT:
        return DEFAULT_MODE_RISK
    return None
