"""The versioned config schema (``version = 1``) as frozen dataclasses: every table and
key, its type (``Literal`` choices included) and default, and the limits values are held to.

No parsing and no I/O: ``parse`` reads text and files into these classes, ``render`` writes
them back as TOML, ``plan`` decides from them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from vgpu_agent.config.dra import DraConfig
from vgpu_agent.host.log import LogLevel
from vgpu_agent.model.devices import LimitPolicy, pipe_dir_for
from vgpu_agent.model.gpu import MPS_CLIENT_LIMIT_VOLTA

DEFAULT_CONFIG_PATH = "/etc/vgpu/config.toml"
CONFIG_ENV_VAR = "VGPU_CONFIG"
SCHEMA_VERSION = 1
#: The agent's control socket, in agent.state_dir.
CONTROL_SOCKET_NAME = "control.sock"

#: Replicas above this fail on every GPU; pre-Volta GPUs (16) are checked per GPU at start.
MAX_REPLICAS_PER_GPU = MPS_CLIENT_LIMIT_VOLTA
#: The most GPUs the simulated backend will invent.
MAX_SIMULATED_GPUS = 64
#: TOML's integers are signed 64-bit; larger ones are refused as out of range.
MAX_INTEGER = 2**63 - 1
#: vGPU ids are "<uuid>::<replica>" and at most 63 characters; replicas need up to 2 digits.
MAX_GPU_UUID_LENGTH = 63 - len("::") - len(str(MAX_REPLICAS_PER_GPU - 1))

#: The shortest interval of a periodic check: a shorter one (down to 1e-300) makes the
#: check a busy loop that spends a core on nothing.
MIN_INTERVAL_S = 0.05
#: The shortest timeout: below it a daemon or the kubelet never answers in time.
MIN_TIMEOUT_S = 0.01
#: The longest duration any key accepts (a week): beyond it waits overflow
#: (``threading.Event.wait`` refuses 1e300) and nothing would ever happen.
MAX_SECONDS = 7 * 24 * 3600

#: Directories the system or every user shares: the agent makes and chmods its MPS
#: directories in mps.pipe_root and mps.log_root, so neither may be one of these.
SHARED_SYSTEM_DIRECTORIES = frozenset(
    {
        "/", "/bin", "/boot", "/dev", "/dev/shm", "/etc", "/home", "/lib", "/lib64",
        "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/run/lock", "/run/user",
        "/sbin", "/srv", "/sys", "/tmp", "/usr", "/usr/bin", "/usr/lib", "/usr/local",
        "/usr/sbin", "/var", "/var/lib", "/var/lib/kubelet", "/var/log", "/var/run",
        "/var/tmp",
    }
)  # fmt: skip

#: Where no directory of the agent may be: kernel file systems, and /dev with /dev/shm,
#: which every user may write and which ``mps.share_host_shm`` mounts into pods.
PSEUDO_FILESYSTEM_ROOTS = ("/dev", "/proc", "/sys")

ComputeModeSetting = Literal["exclusive_process", "default", "unchanged"]
BackendName = Literal["nvml", "simulated"]
MpsManager = Literal["direct", "systemd", "external"]
MultiUser = Literal["auto", "on", "off"]
#: "enforced": the daemon's defaults hold every client to a ceiling; "cooperative": only the
#: container's own environment limits it (docs/security.md).
Confinement = Literal["enforced", "cooperative"]
#: How Allocate names a container's GPU to the NVIDIA container toolkit.
DeviceListStrategy = Literal["envvar", "volume-mounts", "cdi"]
#: What becomes of a pod named as the culprit of too many MPS faults (docs/security.md).
OffenderAction = Literal["hold", "report"]
#: Which faults count against the pod named their culprit: only those where every client
#: the MPS server tore down was that pod's ("sole-client"), or any it was named for
#: ("named": the server's name was measured to be an innocent neighbour's).
OffenderEvidence = Literal["sole-client", "named"]
#: What the agent does with a pod's MPS clients beyond its allowance: "end" them
#: (``terminate_client``), or only "report" them (docs/security.md, "Per pod").
ExcessClients = Literal["end", "report"]


@dataclass(frozen=True)
class PluginConfig:
    """How the agent talks to the kubelet. ``[plugin]``"""

    resource_name: str = "eks.amazonaws.com/vgpu"
    plugin_dir: str = "/var/lib/kubelet/device-plugins"
    socket_name: str = "vgpu.sock"
    kubelet_socket_name: str = "kubelet.sock"
    #: Seconds a Register call may take before we retry.
    register_timeout_s: float = 5.0
    #: "envvar" (NVIDIA_VISIBLE_DEVICES), "volume-mounts" (/var/run/nvidia-container-devices)
    #: or "cdi" (cdi_devices); only the last two are beyond a pod's reach (docs/security.md).
    device_list_strategy: DeviceListStrategy = "envvar"

    @property
    def socket_path(self) -> str:
        """Our plugin socket, where the kubelet dials us."""
        return os.path.join(self.plugin_dir, self.socket_name)

    @property
    def kubelet_socket_path(self) -> str:
        """The kubelet's registration socket."""
        return os.path.join(self.plugin_dir, self.kubelet_socket_name)


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
    #: The daemon's own default thread percentage for clients that set none ("proportional":
    #: one vGPU's share), set through its control pipe after it starts.
    daemon_thread_limit: LimitPolicy = "none"
    #: The daemon's default pinned memory limit for clients that set none ("proportional":
    #: one vGPU's slice; or MiB), set through its control pipe after it starts.
    daemon_memory_limit: LimitPolicy = "none"
    #: "enforced": the daemon's defaults are a ceiling of ``max_vgpus_per_container`` shares
    #: and larger requests are refused; "cooperative": no refusal, the ceiling comes from
    #: ``daemon_*_limit`` (none by default) and limits only from the container's environment.
    confinement: Confinement = "enforced"
    #: The most vGPUs one container may hold in enforced mode; also the ceiling's size.
    max_vgpus_per_container: int = 1

    def pipe_dir(self, gpu_uuid: str) -> str:
        """The host pipe directory of a GPU's MPS daemon."""
        return pipe_dir_for(self.pipe_root, gpu_uuid)


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
class FaultsConfig:
    """Pods whose MPS clients keep faulting (each fault ends every client of its GPU).
    ``[faults]``"""

    #: Faults counted against one pod within ``window_s`` that make it an offender.
    repeat_limit: int = 3
    #: Seconds over which a pod's faults are counted.
    window_s: float = 600.0
    #: "hold": an offender is held (allowed no MPS clients; those it has are ended);
    #: "report": it is only logged and shown.
    offender_action: OffenderAction = "hold"
    #: Seconds an offender stays held after its last fault; 0 = until the pod is gone.
    hold_s: float = 3600.0
    #: Which faults count against the pod named their culprit: "sole-client" (the server
    #: tore down that pod's clients only, so it faulted) or "named" (any it was named for).
    offender_evidence: OffenderEvidence = "sole-client"


@dataclass(frozen=True)
class AgentConfig:
    """The agent process itself. ``[agent]``"""

    log_level: LogLevel = "info"
    #: Where the agent keeps its control socket and state.
    state_dir: str = "/run/vgpu-agent"

    @property
    def control_socket_path(self) -> str:
        """The agent's control socket (`vgpu-agent status`, `health reset`, `simulate`)."""
        return os.path.join(self.state_dir, CONTROL_SOCKET_NAME)


@dataclass(frozen=True)
class AttributionConfig:
    """Finding which pods use which vGPUs. ``[attribution]``"""

    #: The kubelet's PodResources API socket.
    pod_resources_socket: str = "/var/lib/kubelet/pod-resources/kubelet.sock"
    #: Seconds between refreshes of the attribution that metrics and the textfile show.
    refresh_interval_s: float = 10.0


@dataclass(frozen=True)
class IsolationConfig:
    """Holding a pod's processes together to its share. ``[isolation]``

    MPS limits each client process, not the pod; so under enforced confinement the agent
    watches each pod's MPS clients and acts on those beyond its allowance. Nothing here
    acts with MPS off or in cooperative confinement.
    """

    #: MPS client processes a pod may run on a GPU per vGPU it holds there; each runs with
    #: the whole ceiling, so N clients per vGPU are up to N shares.
    clients_per_vgpu: int = 1
    #: "end": the newest clients beyond the allowance are ended (``terminate_client``);
    #: "report": they are logged, counted and shown in status, and keep running.
    excess_clients: ExcessClients = "end"
    #: Seconds between looks at the pods' MPS clients (the attribution is refreshed this
    #: often while enforcement is on).
    check_interval_s: float = 1.0


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics. ``[metrics]``"""

    enabled: bool = False
    #: "<host>:<port>" for the HTTP endpoint (/metrics); "" serves none (textfile only).
    listen_address: str = "127.0.0.1:9402"
    #: node-exporter textfile collector output ("" for none), rewritten atomically.
    textfile_path: str = ""


@dataclass(frozen=True)
class LabelsConfig:
    """Node labels through node-feature-discovery's local feature files. ``[labels]``"""

    enabled: bool = False
    features_dir: str = "/etc/kubernetes/node-feature-discovery/features.d"


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
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    isolation: IsolationConfig = field(default_factory=IsolationConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    dra: DraConfig = field(default_factory=DraConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
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
