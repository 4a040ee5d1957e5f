"""Per-GPU CUDA MPS control daemons: directories, start/stop, control commands, liveness.

(Skeleton: the Protocol below is the contract the agent uses; implementations follow.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

from vgpu_agent.gpu import Gpu


@dataclass(frozen=True)
class MpsDaemonInfo:
    """Where a GPU's MPS daemon lives."""

    gpu_uuid: str
    pipe_dir: str
    log_dir: str
    multi_user: bool


class MpsDaemons(Protocol):
    """Runs (or finds) one MPS control daemon per served GPU and checks that each answers."""

    def start(self, gpu: Gpu) -> MpsDaemonInfo:
        """Make sure the GPU's daemon runs and answers; raises MpsError if it cannot."""
        ...

    def stop(self, gpu_uuid: str) -> None:
        """Quit the GPU's daemon if this object started it (no-op otherwise)."""
        ...

    def probe(self, gpu_uuid: str) -> Optional[str]:
        """None if the GPU's daemon answers a control command; else why it does not."""
        ...
