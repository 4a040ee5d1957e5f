"""The versioned config schema (``version = 1``) as frozen dataclasses.

``parse(text, source)`` turns TOML text into a :class:`Config`; ``load(path)`` reads a
file and parses it. Every error is a :class:`ConfigError` naming the file, the key path
and the bad value, and saying what is allowed. Unknown keys are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

DEFAULT_CONFIG_PATH = "/etc/vgpu/config.toml"
CONFIG_ENV_VAR = "VGPU_CONFIG"
SCHEMA_VERSION = 1

ComputeModeSetting = Literal["exclusive_process", "default", "unchanged"]
BackendName = Literal["nvml", "simulated"]
MpsManager = Literal["direct", "systemd", "external"]
#: "proportional", "none", or a fixed number (percent for threads, MiB for memory)
LimitPolicy = Union[Literal["proportional", "none"], int]
MultiUser = Literal["auto", "on", "off"]
LogLevel = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True)
class PluginConfig:
    """How the agent talks to the kubelet. ``[plugin]``"""

    resource_name: str = "eks.amazonaws.com/vgpu"
    plugin_dir: str = "/var/lib/kubelet/device-plugins"
    socket_name: str = "vgpu.sock"
    kubelet_socket_name: str = "kubelet.sock"
    #: Seconds a Register call may take before we retry.
    register_timeout_s: float = 5.0


@dataclass(frozen=True)
class SimulatedGpu:
    """One simulated GPU. ``[[simulated.gpus]]``"""

    uuid: str
    model: str = "NVIDIA H100 80GB HBM3"
    memory_mib: int = 81559
    compute_capability: tuple[int, int] = (9, 0)
    numa_node: Optional[int] = None
    mig_enabled: bool = False


@dataclass(frozen=True)
class SimulatedConfig:
    """The simulated backend. ``[simulated]``: either ``count`` GPUs of one model or a list."""

    count: int = 2
    model: str = "NVIDIA H100 80GB HBM3"
    memory_mib: int = 81559
    compute_capability: tuple[int, int] = (9, 0)
    #: Explicit GPUs; when non-empty, ``count``/``model``/``memory_mib`` are ignored.
    gpus: tuple[SimulatedGpu, ...] = ()


@dataclass(frozen=True)
class GpusConfig:
    """Which GPUs to serve and how to split them. ``[gpus]``"""

    backend: BackendName = "nvml"
    #: vGPUs advertised per physical GPU, unless a model override applies.
    replicas_per_gpu: int = 10
    #: Per-model overrides: case-insensitive substring of the GPU model name -> replicas.
    #: The longest matching key wins, e.g. {"A10G": 7, "H100": 20}.
    replicas_by_model: tuple[tuple[str, int], ...] = ()
    #: "all", or GPUs by UUID (str) or index (int).
    serve: Union[Literal["all"], tuple[Union[str, int], ...]] = "all"
    compute_mode: ComputeModeSetting = "exclusive_process"
    #: Put back the compute mode we found, on stop, for the GPUs we changed.
    restore_compute_mode: bool = False
    #: Serve GPUs where MPS cannot confine clients (pre-Volta, MIG) anyway.
    allow_unconfined_sharing: bool = False


@dataclass(frozen=True)
class MpsConfig:
    """The per-GPU MPS control daemons and what Allocate hands out. ``[mps]``"""

    enabled: bool = True
    #: "direct": the agent starts the daemons itself; "systemd": it starts vgpu-mps@<uuid>
    #: units; "external": someone else runs them, the agent only uses and watches them.
    manager: MpsManager = "systemd"
    pipe_root: str = "/run/nvidia-mps"
    log_root: str = "/var/log/nvidia-mps"
    control_binary: str = "nvidia-cuda-mps-control"
    multi_user: MultiUser = "auto"
    #: Where the GPU's pipe directory is mounted inside containers.
    container_pipe_dir: str = "/run/nvidia-mps"
    thread_limit: LimitPolicy = "proportional"
    memory_limit: LimitPolicy = "proportional"
    #: MiB kept back from each GPU before it is split into proportional memory slices.
    memory_headroom_mib: int = 0
    #: Mount the daemon's /dev/shm into containers (only for drivers that need it).
    share_host_shm: bool = False
    #: Seconds to wait for a daemon to answer a control command.
    control_timeout_s: float = 2.0


@dataclass(frozen=True)
class HealthConfig:
    """Health checks. ``[health]``"""

    xid_enabled: bool = True
    #: XIDs that mean an application fault, not a sick GPU: logged and ignored.
    ignored_xids: tuple[int, ...] = (13, 31, 43, 45, 68, 109)
    mps_liveness_enabled: bool = True
    mps_check_interval_s: float = 0.5
    #: Seconds without a new critical event before an XID-marked GPU is healthy again; 0 = never.
    recovery_quiet_period_s: float = 300.0
    #: Seconds between polls of GPUs whose events cannot be watched.
    poll_interval_s: float = 5.0


@dataclass(frozen=True)
class AgentConfig:
    """The agent process itself. ``[agent]``"""

    log_level: LogLevel = "info"
    #: Where the agent keeps its control socket and state.
    state_dir: str = "/run/vgpu-agent"


@dataclass(frozen=True)
class Config:
    """The whole config file."""

    version: int = SCHEMA_VERSION
    agent: AgentConfig = field(default_factory=AgentConfig)
    plugin: PluginConfig = field(default_factory=PluginConfig)
    gpus: GpusConfig = field(default_factory=GpusConfig)
    mps: MpsConfig = field(default_factory=MpsConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    simulated: SimulatedConfig = field(default_factory=SimulatedConfig)
    #: Where this config came from (a path, or "<defaults>"); not a key in the file.
    source: str = "<defaults>"

    def replicas_for_model(self, model: str) -> int:
        """vGPUs per GPU for a GPU of this model name (model overrides, else the default)."""
        lowered = model.lower()
        best: Optional[tuple[str, int]] = None
        for key, replicas in self.gpus.replicas_by_model:
            if key.lower() in lowered and (best is None or len(key) > len(best[0])):
                best = (key, replicas)
        return best[1] if best is not None else self.gpus.replicas_per_gpu
