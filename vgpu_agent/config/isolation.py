"""Judgements about a node's isolation made from the config and what the GPUs report
(pure): which settings leave pods a way around MPS, and what the agent does about a pod
running more MPS clients than it may (``[isolation]``).

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


# -- a pod's MPS clients, held together (isolation.*) ------------------------------------------


def clients_enforced(config: Config) -> bool:
    """Whether the agent acts on the pods' MPS clients (``[isolation]``): only with MPS on
    and enforced confinement, where a pod is promised no more than its share."""
    return config.mps.enabled and config.mps.confinement == "enforced"


def client_allowance(config: Config, vgpus: int) -> int:
    """How many MPS client processes a pod may run on a GPU where it holds ``vgpus``."""
    return config.isolation.clients_per_vgpu * vgpus


def client_policy_line(config: Config) -> str:
    """One line saying what the agent does about a pod's MPS clients (for `status`)."""
    if not config.mps.enabled:
        return "off: MPS is off (mps.enabled = false)"
    if not clients_enforced(config):
        return (
            "off: in cooperative confinement a pod's processes are not held to its share "
            '(mps.confinement = "cooperative")'
        )
    isolation = config.isolation
    per_vgpu = isolation.clients_per_vgpu
    allowance = f"{per_vgpu} MPS client process{'es' if per_vgpu != 1 else ''} per vGPU"
    done = (
        "the newest beyond that are ended (terminate_client)"
        if isolation.excess_clients == "end"
        else 'those beyond that are only reported (isolation.excess_clients = "report")'
    )
    return (
        f"a pod may run {allowance} it holds on a GPU; {done}; checked every "
        f"{isolation.check_interval_s:g} s"
    )


def excess_client_action(config: Config, clients: int, vgpus: int) -> str:
    """What the agent does about a pod running ``clients`` MPS clients on a GPU where it
    holds ``vgpus`` vGPUs (the end of status's warning about it)."""
    if not clients_enforced(config):
        return (
            "not acted on: the agent holds a pod's processes to its share only under "
            'enforced confinement (mps.confinement = "enforced")'
        )
    per_vgpu = config.isolation.clients_per_vgpu
    allowed = client_allowance(config, vgpus)
    if clients <= allowed:
        return f"accepted: isolation.clients_per_vgpu = {per_vgpu} lets it run {allowed}"
    beyond = clients - allowed
    if config.isolation.excess_clients == "end":
        return (
            f"the agent ends its newest {beyond} (isolation.clients_per_vgpu = {per_vgpu} "
            f"lets it run {allowed})"
        )
    return (
        f'only reported (isolation.excess_clients = "report"): {beyond} beyond the '
        f"{allowed} isolation.clients_per_vgpu = {per_vgpu} lets it run"
    )
