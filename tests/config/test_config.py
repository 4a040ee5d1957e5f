"""Tests of the config schema: parsing, every error path, rendering, loading, advice."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import pytest

from vgpu_agent.config.dra import DraConfig
from vgpu_agent.config.parse import load, load_effective, load_or_default, parse, resolve_path
from vgpu_agent.config.plan import MIN_USEFUL_SLICE_MIB, slice_warnings
from vgpu_agent.config.render import to_toml
from vgpu_agent.config.schema import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_PATH,
    AgentConfig,
    Config,
    FaultsConfig,
    GpusConfig,
    HealthConfig,
    IsolationConfig,
    MpsConfig,
    PluginConfig,
    SimulatedConfig,
    SimulatedGpu,
)
from vgpu_agent.model.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

SOURCE = "/etc/vgpu/under-test.toml"
PACKAGED_CONFIG = Path(__file__).resolve().parents[2] / "packaging" / "config.toml"
UUID_A = "GPU-3f2a8c1e-0000-4000-8000-000000000001"
UUID_B = "GPU-3f2a8c1e-0000-4000-8000-000000000002"

FULL_FILE = f"""
version = 1

[agent]
log_level = "debug"
state_dir = "/run/vgpu-test"

[plugin]
resource_name = "example.com/shared-gpu"
plugin_dir = "/tmp/plugins"
socket_name = "shared.sock"
kubelet_socket_name = "kubelet-test.sock"
register_timeout_s = 2
device_list_strategy = "volume-mounts"

[gpus]
backend = "simulated"
replicas_per_gpu = 4
serve = [0, "{UUID_B}"]
compute_mode = "unchanged"
restore_compute_mode = true
allow_unconfined_sharing = true

[gpus.replicas_by_model]
"A10G" = 7
"H100" = 20
"H100 80GB" = 30

[mps]
enabled = true
manager = "direct"
pipe_root = "/tmp/mps"
log_root = "/tmp/mps-log"
control_binary = "/usr/bin/nvidia-cuda-mps-control"
multi_user = "on"
container_pipe_dir = "/mps"
thread_limit = 50
memory_limit = 4096
memory_headroom_mib = 512
share_host_shm = true
control_timeout_s = 1.5
confinement = "enforced"
max_vgpus_per_container = 2

[health]
xid_enabled = false
ignored_xids = [13, 79]
mps_liveness_enabled = false
mps_check_interval_s = 0.25
recovery_quiet_period_s = 0
poll_interval_s = 10

[isolation]
clients_per_vgpu = 2
excess_clients = "report"
check_interval_s = 0.5

[simulated]

[[simulated.gpus]]
uuid = "{UUID_A}"
model = "NVIDIA A10G"
memory_mib = 23028
compute_capability = "8.6"
numa_node = 1
mig_enabled = false

[[simulated.gpus]]
uuid = "{UUID_B}"
"""

FULL_CONFIG = Config(
    version=1,
    agent=AgentConfig(log_level="debug", state_dir="/run/vgpu-test"),
    plugin=PluginConfig(
        resource_name="example.com/shared-gpu",
        plugin_dir="/tmp/plugins",
        socket_name="shared.sock",
        kubelet_socket_name="kubelet-test.sock",
        register_timeout_s=2.0,
        device_list_strategy="volume-mounts",
    ),
    gpus=GpusConfig(
        backend="simulated",
        replicas_per_gpu=4,
        replicas_by_model=(("A10G", 7), ("H100", 20), ("H100 80GB", 30)),
        serve=(0, UUID_B),
        compute_mode="unchanged",
        restore_compute_mode=True,
        allow_unconfined_sharing=True,
    ),
    mps=MpsConfig(
        enabled=True,
        manager="direct",
        pipe_root="/tmp/mps",
        log_root="/tmp/mps-log",
        control_binary="/usr/bin/nvidia-cuda-mps-control",
        multi_user="on",
        container_pipe_dir="/mps",
        thread_limit=50,
        memory_limit=4096,
        memory_headroom_mib=512,
        share_host_shm=True,
        control_timeout_s=1.5,
        confinement="enforced",
        max_vgpus_per_container=2,
    ),
    health=HealthConfig(
        xid_enabled=False,
        ignored_xids=(13, 79),
        mps_liveness_enabled=False,
        mps_check_interval_s=0.25,
        recovery_quiet_period_s=0.0,
        poll_interval_s=10.0,
    ),
    isolation=IsolationConfig(clients_per_vgpu=2, excess_clients="report", check_interval_s=0.5),
    simulated=SimulatedConfig(
        gpus=(
            SimulatedGpu(
                uuid=UUID_A,
                model="NVIDIA A10G",
                memory_mib=23028,
                compute_capability=(8, 6),
                numa_node=1,
            ),
            SimulatedGpu(uuid=UUID_B),
        )
    ),
    source=SOURCE,
)


# ---------------------------------------------------------------------------- valid files


def _document_id(value: object) -> Optional[str]:
    return value.replace("\n", " ") if isinstance(value, str) and "=" in value else None


def test_empty_file_gives_the_defaults() -> None:
    """An empty document is the default config, with the source recorded."""
    assert parse("", SOURCE) == Config(source=SOURCE)


def test_defaults_are_the_documented_ones() -> None:
    """The defaults the issue promises: resource name, 10 vGPUs per GPU, all GPUs, schema 1."""
    config = Config()
    assert config.version == 1
    assert config.plugin.resource_name == "eks.amazonaws.com/vgpu"
    assert config.gpus.replicas_per_gpu == 10
    assert config.gpus.serve == "all"
    assert config.gpus.compute_mode == "exclusive_process"
    assert config.health.ignored_xids == (13, 31, 43, 45, 68, 109)
    assert config.health.recovery_quiet_period_s == 300.0
    assert config.mps.confinement == "enforced"
    assert config.mps.max_vgpus_per_container == 1
    assert config.plugin.device_list_strategy == "envvar"
    assert DEFAULT_CONFIG_PATH == "/etc/vgpu/config.toml"


def test_full_file_parses_to_every_value() -> None:
    """A file setting every key gives exactly those values, model overrides in file order."""
    assert parse(FULL_FILE, SOURCE) == FULL_CONFIG


@pytest.mark.parametrize(
    ("document", "attribute", "expected"),
    [
        ("", "version", 1),
        ("version = 1", "version", 1),
        ("[mps]\nmulti_user = true", "mps.multi_user", "on"),
        ("[mps]\nmulti_user = false", "mps.multi_user", "off"),
        ('[mps]\nmulti_user = "auto"', "mps.multi_user", "auto"),
        ('[mps]\nthread_limit = "none"', "mps.thread_limit", "none"),
        ("[mps]\nthread_limit = 100", "mps.thread_limit", 100),
        ("[mps]\nthread_limit = 1", "mps.thread_limit", 1),
        ('[mps]\nmemory_limit = "none"', "mps.memory_limit", "none"),
        ("[mps]\nmemory_limit = 1", "mps.memory_limit", 1),
        ("[gpus]\nreplicas_per_gpu = 1", "gpus.replicas_per_gpu", 1),
        ("[gpus]\nreplicas_per_gpu = 48", "gpus.replicas_per_gpu", 48),
        ('[gpus]\nserve = "all"', "gpus.serve", "all"),
        (f'[gpus]\nserve = ["{UUID_A}", 3]', "gpus.serve", (UUID_A, 3)),
        ("gpus.serve = [0]", "gpus.serve", (0,)),
        ("[health]\nignored_xids = []", "health.ignored_xids", ()),
        ("[health]\nignored_xids = [0, 65535]", "health.ignored_xids", (0, 65535)),
        ("[health]\nrecovery_quiet_period_s = 0", "health.recovery_quiet_period_s", 0.0),
        ("[health]\npoll_interval_s = 1", "health.poll_interval_s", 1.0),
        ("[health]\nmps_check_interval_s = 0.05", "health.mps_check_interval_s", 0.05),
        ("[health]\nrecovery_quiet_period_s = 604800", "health.recovery_quiet_period_s", 604800),
        ('[mps]\ncontainer_pipe_dir = "/run/mps-x"', "mps.container_pipe_dir", "/run/mps-x"),
        ('[simulated]\ncompute_capability = "12.0"', "simulated.compute_capability", (12, 0)),
        ('[simulated]\ncompute_capability = "6.1"', "simulated.compute_capability", (6, 1)),
        ("[simulated]\ncount = 64", "simulated.count", 64),
        ('[plugin]\nresource_name = "nvidia.com/gpu.shared"', "plugin.resource_name", None),
        ('[plugin]\nresource_name = "a/b"', "plugin.resource_name", None),
        ('[plugin]\nkubelet_socket_name = "k.sock"', "plugin.kubelet_socket_name", "k.sock"),
        ('[mps]\ncontrol_binary = "mps-control"', "mps.control_binary", "mps-control"),
        ("[gpus.replicas_by_model]\n'a10g' = 7", "gpus.replicas_by_model", (("a10g", 7),)),
        ("[gpus]\nreplicas_by_model = {}", "gpus.replicas_by_model", ()),
        ("[simulated]\ngpus = []", "simulated.gpus", ()),
        ('[mps]\nconfinement = "cooperative"', "mps.confinement", "cooperative"),
        ("[mps]\nmax_vgpus_per_container = 48", "mps.max_vgpus_per_container", 48),
        ('[plugin]\ndevice_list_strategy = "cdi"', "plugin.device_list_strategy", "cdi"),
        (
            '[plugin]\ndevice_list_strategy = "volume-mounts"',
            "plugin.device_list_strategy",
            "volume-mounts",
        ),
        # The one safe setting of the older keys still means the same in enforced mode.
        ('[mps]\ndaemon_thread_limit = "proportional"', "mps.daemon_thread_limit", "proportional"),
        (
            '[mps]\nconfinement = "cooperative"\ndaemon_memory_limit = 4096',
            "mps.daemon_memory_limit",
            4096,
        ),
        (
            '[mps]\nconfinement = "cooperative"\ndaemon_thread_limit = 30',
            "mps.daemon_thread_limit",
            30,
        ),
    ],
    ids=_document_id,
)
def test_valid_values(document: str, attribute: str, expected: object) -> None:
    """Each allowed spelling of a value parses to the typed value (None: the text itself)."""
    value: object = parse(document, SOURCE)
    for part in attribute.split("."):
        value = getattr(value, part)
    if expected is None:
        expected = document.split('"')[1]
    assert value == expected


# ---------------------------------------------------------------------------- errors

LONG_UUID = "GPU-" + "a" * 56
LONG_DIR = "/" + "d" * 100

# (id, document, key path the message names, value text the message shows)
ERROR_CASES: list[tuple[str, str, str, str]] = [
    # schema version
    ("version-2", "version = 2", "version", "2"),
    ("version-0", "version = 0", "version", "0"),
    ("version-string", 'version = "1"', "version", "'1'"),
    ("version-bool", "version = true", "version", "true"),
    ("version-checked-first", "version = 3\nbogus = 1", "version", "3"),
    # unknown keys at each level
    ("unknown-top", "colour = 1", "colour", "colour"),
    ("unknown-top-quoted", '"odd key" = 1', '"odd key"', "odd key"),
    ("unknown-agent", "[agent]\nverbose = true", "agent.verbose", "verbose"),
    ("unknown-plugin", "[plugin]\nendpoint = 'x'", "plugin.endpoint", "endpoint"),
    ("unknown-gpus", "[gpus]\nreplicas = 3", "gpus.replicas", "replicas"),
    ("unknown-mps", "[mps]\nlimit = 3", "mps.limit", "limit"),
    ("unknown-health", "[health]\nxids = [1]", "health.xids", "xids"),
    ("unknown-simulated", "[simulated]\ngpu_count = 3", "simulated.gpu_count", "gpu_count"),
    (
        "unknown-simulated-gpu",
        f'[[simulated.gpus]]\nuuid = "{UUID_A}"\nclock = 3',
        "simulated.gpus[0].clock",
        "clock",
    ),
    ("source-is-not-a-key", 'source = "x"', "source", "source"),
    # tables that are not tables
    ("agent-not-table", "agent = 1", "agent", "1"),
    ("plugin-not-table", 'plugin = "x"', "plugin", "'x'"),
    ("gpus-not-table", "gpus = [1]", "gpus", "[1]"),
    ("mps-not-table", "mps = true", "mps", "true"),
    ("health-not-table", "health = 1.5", "health", "1.5"),
    ("simulated-not-table", "simulated = 0", "simulated", "0"),
    ("simulated-gpus-not-array", "simulated.gpus = 1", "simulated.gpus", "1"),
    ("simulated-gpu-not-table", "simulated.gpus = [1]", "simulated.gpus[0]", "1"),
    ("replicas-by-model-not-table", "gpus.replicas_by_model = 7", "gpus.replicas_by_model", "7"),
    # [agent]
    ("log-level-enum", "agent.log_level = 'verbose'", "agent.log_level", "'verbose'"),
    ("log-level-case", "agent.log_level = 'INFO'", "agent.log_level", "'INFO'"),
    ("log-level-type", "agent.log_level = 1", "agent.log_level", "1"),
    ("log-level-date", "agent.log_level = 1979-05-27", "agent.log_level", "1979-05-27"),
    ("state-dir-relative", "agent.state_dir = 'run/x'", "agent.state_dir", "'run/x'"),
    ("state-dir-nul", 'agent.state_dir = "/run/\\u0000x"', "agent.state_dir", "/run/"),
    # [plugin]
    ("resource-no-slash", "plugin.resource_name = 'vgpu'", "plugin.resource_name", "'vgpu'"),
    (
        "resource-kubernetes-io",
        "plugin.resource_name = 'kubernetes.io/vgpu'",
        "plugin.resource_name",
        "'kubernetes.io/vgpu'",
    ),
    (
        "resource-sub-kubernetes-io",
        "plugin.resource_name = 'gpu.kubernetes.io/vgpu'",
        "plugin.resource_name",
        "'gpu.kubernetes.io/vgpu'",
    ),
    (
        "resource-upper-domain",
        "plugin.resource_name = 'Example.com/vgpu'",
        "plugin.resource_name",
        "'Example.com/vgpu'",
    ),
    (
        "resource-empty-label",
        "plugin.resource_name = 'example..com/vgpu'",
        "plugin.resource_name",
        "'example..com/vgpu'",
    ),
    (
        "resource-long-label",
        f"plugin.resource_name = '{'a' * 64}.com/vgpu'",
        "plugin.resource_name",
        "'aaaa",
    ),
    (
        "resource-empty-name",
        "plugin.resource_name = 'example.com/'",
        "plugin.resource_name",
        "'example.com/'",
    ),
    (
        "resource-bad-name",
        "plugin.resource_name = 'example.com/-vgpu'",
        "plugin.resource_name",
        "'example.com/-vgpu'",
    ),
    (
        "resource-two-slashes",
        "plugin.resource_name = 'example.com/a/b'",
        "plugin.resource_name",
        "'example.com/a/b'",
    ),
    (
        "resource-long-name",
        f"plugin.resource_name = 'example.com/{'n' * 64}'",
        "plugin.resource_name",
        "'example.com/nnn",
    ),
    ("resource-type", "plugin.resource_name = 1", "plugin.resource_name", "1"),
    ("plugin-dir-relative", "plugin.plugin_dir = 'plugins'", "plugin.plugin_dir", "'plugins'"),
    ("socket-no-suffix", "plugin.socket_name = 'vgpu'", "plugin.socket_name", "'vgpu'"),
    ("socket-slash", "plugin.socket_name = 'a/b.sock'", "plugin.socket_name", "'a/b.sock'"),
    ("socket-bare-suffix", "plugin.socket_name = '.sock'", "plugin.socket_name", "'.sock'"),
    ("socket-kubelet", "plugin.socket_name = 'kubelet.sock'", "plugin.socket_name", "'kubelet."),
    (
        "socket-same-as-kubelet",
        "[plugin]\nkubelet_socket_name = 'k.sock'\nsocket_name = 'k.sock'",
        "plugin.socket_name",
        "'k.sock'",
    ),
    (
        "kubelet-socket-type",
        "plugin.kubelet_socket_name = true",
        "plugin.kubelet_socket_name",
        "true",
    ),
    (
        "socket-path-too-long",
        f"plugin.plugin_dir = '{LONG_DIR}'",
        "plugin.plugin_dir",
        "'/ddd",
    ),
    (
        "socket-name-too-long",
        f"plugin.socket_name = '{'s' * 90}.sock'",
        "plugin.socket_name",
        "'sss",
    ),
    ("register-timeout-zero", "plugin.register_timeout_s = 0", "plugin.register_timeout_s", "0"),
    (
        "register-timeout-negative",
        "plugin.register_timeout_s = -1.5",
        "plugin.register_timeout_s",
        "-1.5",
    ),
    ("register-timeout-inf", "plugin.register_timeout_s = inf", "plugin.register_timeout_s", "inf"),
    (
        "register-timeout-bool",
        "plugin.register_timeout_s = true",
        "plugin.register_timeout_s",
        "true",
    ),
    ("register-timeout-str", "plugin.register_timeout_s = '5'", "plugin.register_timeout_s", "'5'"),
    # [gpus]
    ("backend-enum", "gpus.backend = 'cuda'", "gpus.backend", "'cuda'"),
    ("replicas-zero", "gpus.replicas_per_gpu = 0", "gpus.replicas_per_gpu", "0"),
    ("replicas-49", "gpus.replicas_per_gpu = 49", "gpus.replicas_per_gpu", "49"),
    ("replicas-bool", "gpus.replicas_per_gpu = true", "gpus.replicas_per_gpu", "true"),
    ("replicas-float", "gpus.replicas_per_gpu = 10.0", "gpus.replicas_per_gpu", "10.0"),
    ("replicas-string", "gpus.replicas_per_gpu = '10'", "gpus.replicas_per_gpu", "'10'"),
    (
        "model-replicas-zero",
        "[gpus.replicas_by_model]\nA10G = 0",
        'gpus.replicas_by_model."A10G"',
        "0",
    ),
    (
        "model-replicas-49",
        '[gpus.replicas_by_model]\n"H100 80GB" = 49',
        'gpus.replicas_by_model."H100 80GB"',
        "49",
    ),
    (
        "model-replicas-bool",
        "[gpus.replicas_by_model]\nA10G = true",
        'gpus.replicas_by_model."A10G"',
        "true",
    ),
    (
        "model-replicas-string",
        "[gpus.replicas_by_model]\nA10G = '7'",
        'gpus.replicas_by_model."A10G"',
        "'7'",
    ),
    ("model-key-empty", '[gpus.replicas_by_model]\n"" = 7', 'gpus.replicas_by_model.""', "7"),
    (
        "model-duplicate-case",
        "[gpus.replicas_by_model]\nA10G = 7\na10g = 8",
        'gpus.replicas_by_model."a10g"',
        "8",
    ),
    ("serve-word", "gpus.serve = 'some'", "gpus.serve", "'some'"),
    ("serve-empty", "gpus.serve = []", "gpus.serve", "[]"),
    ("serve-number", "gpus.serve = 0", "gpus.serve", "0"),
    ("serve-bool-item", "gpus.serve = [true]", "gpus.serve[0]", "true"),
    ("serve-negative", "gpus.serve = [0, -1]", "gpus.serve[1]", "-1"),
    ("serve-float", "gpus.serve = [1.5]", "gpus.serve[0]", "1.5"),
    ("serve-lower-prefix", "gpus.serve = ['gpu-1234']", "gpus.serve[0]", "'gpu-1234'"),
    ("serve-bare-prefix", "gpus.serve = ['GPU-']", "gpus.serve[0]", "'GPU-'"),
    ("serve-odd-chars", "gpus.serve = ['GPU-12:34']", "gpus.serve[0]", "'GPU-12:34'"),
    ("serve-long-uuid", f"gpus.serve = ['{LONG_UUID}']", "gpus.serve[0]", "'GPU-aaa"),
    ("serve-duplicate-index", "gpus.serve = [1, 2, 1]", "gpus.serve[2]", "1"),
    (
        "serve-duplicate-uuid",
        f"gpus.serve = ['{UUID_A}', '{UUID_A}']",
        "gpus.serve[1]",
        f"'{UUID_A}'",
    ),
    ("serve-table-item", "gpus.serve = [{a = 1}]", "gpus.serve[0]", "{'a': 1}"),
    ("compute-mode-enum", "gpus.compute_mode = 'exclusive'", "gpus.compute_mode", "'exclusive'"),
    ("restore-int", "gpus.restore_compute_mode = 1", "gpus.restore_compute_mode", "1"),
    (
        "unconfined-string",
        "gpus.allow_unconfined_sharing = 'yes'",
        "gpus.allow_unconfined_sharing",
        "'yes'",
    ),
    # [mps]
    ("mps-enabled-string", "mps.enabled = 'true'", "mps.enabled", "'true'"),
    ("manager-enum", "mps.manager = 'kubernetes'", "mps.manager", "'kubernetes'"),
    ("pipe-root-relative", "mps.pipe_root = 'run/mps'", "mps.pipe_root", "'run/mps'"),
    ("log-root-empty", "mps.log_root = ''", "mps.log_root", "''"),
    ("control-binary-empty", "mps.control_binary = ''", "mps.control_binary", "''"),
    (
        "control-binary-relative",
        "mps.control_binary = 'bin/mps'",
        "mps.control_binary",
        "'bin/mps'",
    ),
    ("multi-user-enum", "mps.multi_user = 'maybe'", "mps.multi_user", "'maybe'"),
    ("multi-user-int", "mps.multi_user = 1", "mps.multi_user", "1"),
    (
        "container-pipe-relative",
        "mps.container_pipe_dir = 'mps'",
        "mps.container_pipe_dir",
        "'mps'",
    ),
    # The pipe directory is mounted over the container's path: never one the pod has.
    ("container-pipe-root", "mps.container_pipe_dir = '/'", "mps.container_pipe_dir", "'/'"),
    ("container-pipe-etc", "mps.container_pipe_dir = '/etc'", "mps.container_pipe_dir", "'/etc'"),
    (
        "container-pipe-etc-dotdot",
        "mps.container_pipe_dir = '/run/../etc/'",
        "mps.container_pipe_dir",
        "'/run/../etc/'",
    ),
    ("container-pipe-tmp", "mps.container_pipe_dir = '/tmp'", "mps.container_pipe_dir", "'/tmp'"),
    (
        "container-pipe-proc",
        "mps.container_pipe_dir = '/proc/mps'",
        "mps.container_pipe_dir",
        "'/proc/mps'",
    ),
    (
        "container-pipe-secrets",
        "mps.container_pipe_dir = '/var/run/secrets/kubernetes.io'",
        "mps.container_pipe_dir",
        "'/var/run/secrets/kubernetes.io'",
    ),
    # Under /dev/shm every user writes and share_host_shm mounts it into pods.
    ("pipe-root-dev-shm", "mps.pipe_root = '/dev/shm/mps'", "mps.pipe_root", "'/dev/shm/mps'"),
    ("log-root-proc", "mps.log_root = '/proc/mps'", "mps.log_root", "'/proc/mps'"),
    ("pipe-root-sys", "mps.pipe_root = '//sys/x'", "mps.pipe_root", "'//sys/x'"),
    ("thread-limit-zero", "mps.thread_limit = 0", "mps.thread_limit", "0"),
    ("thread-limit-101", "mps.thread_limit = 101", "mps.thread_limit", "101"),
    ("thread-limit-word", "mps.thread_limit = 'half'", "mps.thread_limit", "'half'"),
    ("thread-limit-bool", "mps.thread_limit = true", "mps.thread_limit", "true"),
    ("thread-limit-float", "mps.thread_limit = 50.5", "mps.thread_limit", "50.5"),
    ("memory-limit-zero", "mps.memory_limit = 0", "mps.memory_limit", "0"),
    ("memory-limit-word", "mps.memory_limit = 'all'", "mps.memory_limit", "'all'"),
    ("memory-limit-bool", "mps.memory_limit = false", "mps.memory_limit", "false"),
    ("headroom-negative", "mps.memory_headroom_mib = -1", "mps.memory_headroom_mib", "-1"),
    ("headroom-float", "mps.memory_headroom_mib = 1.0", "mps.memory_headroom_mib", "1.0"),
    ("share-shm-int", "mps.share_host_shm = 0", "mps.share_host_shm", "0"),
    ("control-timeout-zero", "mps.control_timeout_s = 0.0", "mps.control_timeout_s", "0.0"),
    ("confinement-enum", "mps.confinement = 'strict'", "mps.confinement", "'strict'"),
    ("confinement-bool", "mps.confinement = true", "mps.confinement", "true"),
    ("max-vgpus-zero", "mps.max_vgpus_per_container = 0", "mps.max_vgpus_per_container", "0"),
    ("max-vgpus-49", "mps.max_vgpus_per_container = 49", "mps.max_vgpus_per_container", "49"),
    (
        "enforced-with-daemon-threads",
        "mps.daemon_thread_limit = 25",
        "mps.daemon_thread_limit",
        "25",
    ),
    (
        "enforced-with-daemon-memory",
        "[mps]\nconfinement = 'enforced'\ndaemon_memory_limit = 'proportional'\n"
        "max_vgpus_per_container = 2",
        "mps.daemon_memory_limit",
        "'proportional'",
    ),
    (
        "cooperative-with-max-vgpus",
        "[mps]\nconfinement = 'cooperative'\nmax_vgpus_per_container = 2",
        "mps.max_vgpus_per_container",
        "2",
    ),
    (
        "strategy-enum",
        "plugin.device_list_strategy = 'volume_mounts'",
        "plugin.device_list_strategy",
        "'volume_mounts'",
    ),
    # [health]
    ("xid-enabled-string", "health.xid_enabled = 'no'", "health.xid_enabled", "'no'"),
    ("xids-not-array", "health.ignored_xids = 13", "health.ignored_xids", "13"),
    ("xids-too-big", "health.ignored_xids = [13, 70000]", "health.ignored_xids[1]", "70000"),
    ("xids-negative", "health.ignored_xids = [-1]", "health.ignored_xids[0]", "-1"),
    ("xids-bool", "health.ignored_xids = [true]", "health.ignored_xids[0]", "true"),
    ("xids-string", "health.ignored_xids = ['13']", "health.ignored_xids[0]", "'13'"),
    ("xids-duplicate", "health.ignored_xids = [13, 13]", "health.ignored_xids[1]", "13"),
    ("liveness-int", "health.mps_liveness_enabled = 1", "health.mps_liveness_enabled", "1"),
    ("check-interval-zero", "health.mps_check_interval_s = 0", "health.mps_check_interval_s", "0"),
    (
        "quiet-negative",
        "health.recovery_quiet_period_s = -1",
        "health.recovery_quiet_period_s",
        "-1",
    ),
    ("quiet-nan", "health.recovery_quiet_period_s = nan", "health.recovery_quiet_period_s", "nan"),
    ("poll-zero", "health.poll_interval_s = 0", "health.poll_interval_s", "0"),
    # Intervals too short to be anything but a busy loop; durations too long to wait on.
    (
        "check-interval-tiny",
        "health.mps_check_interval_s = 1e-300",
        "health.mps_check_interval_s",
        "1e-300",
    ),
    ("poll-tiny", "health.poll_interval_s = 0.001", "health.poll_interval_s", "0.001"),
    (
        "refresh-tiny",
        "attribution.refresh_interval_s = 0.01",
        "attribution.refresh_interval_s",
        "0.01",
    ),
    (
        "control-timeout-tiny",
        "mps.control_timeout_s = 1e-9",
        "mps.control_timeout_s",
        "1e-09",
    ),
    (
        "check-interval-huge",
        "health.mps_check_interval_s = 1e300",
        "health.mps_check_interval_s",
        "1e+300",
    ),
    (
        "quiet-huge",
        "health.recovery_quiet_period_s = 604801",
        "health.recovery_quiet_period_s",
        "604801",
    ),
    # [simulated]
    ("count-zero", "simulated.count = 0", "simulated.count", "0"),
    ("count-65", "simulated.count = 65", "simulated.count", "65"),
    ("count-bool", "simulated.count = true", "simulated.count", "true"),
    ("model-empty", "simulated.model = ''", "simulated.model", "''"),
    ("model-blank", "simulated.model = '  '", "simulated.model", "'  '"),
    ("memory-zero", "simulated.memory_mib = 0", "simulated.memory_mib", "0"),
    ("cc-no-minor", "simulated.compute_capability = '9'", "simulated.compute_capability", "'9'"),
    ("cc-float", "simulated.compute_capability = 9.0", "simulated.compute_capability", "9.0"),
    (
        "cc-zero-major",
        "simulated.compute_capability = '0.5'",
        "simulated.compute_capability",
        "'0.5'",
    ),
    ("cc-letters", "simulated.compute_capability = 'a.b'", "simulated.compute_capability", "'a.b'"),
    ("cc-array", "simulated.compute_capability = [9, 0]", "simulated.compute_capability", "[9, 0]"),
    ("gpu-missing-uuid", "[[simulated.gpus]]\nmodel = 'x'", "simulated.gpus[0].uuid", "missing"),
    ("gpu-bad-uuid", "[[simulated.gpus]]\nuuid = 'gpu0'", "simulated.gpus[0].uuid", "'gpu0'"),
    (
        "gpu-duplicate-uuid",
        f"[[simulated.gpus]]\nuuid = '{UUID_A}'\n[[simulated.gpus]]\nuuid = '{UUID_A}'",
        "simulated.gpus[1]",
        UUID_A,
    ),
    (
        "gpu-memory-zero",
        f"[[simulated.gpus]]\nuuid = '{UUID_A}'\nmemory_mib = 0",
        "simulated.gpus[0].memory_mib",
        "0",
    ),
    (
        "gpu-numa-negative",
        f"[[simulated.gpus]]\nuuid = '{UUID_A}'\nnuma_node = -1",
        "simulated.gpus[0].numa_node",
        "-1",
    ),
    (
        "gpu-mig-string",
        f"[[simulated.gpus]]\nuuid = '{UUID_A}'\nmig_enabled = 'no'",
        "simulated.gpus[0].mig_enabled",
        "'no'",
    ),
    (
        "gpu-cc-bad",
        f"[[simulated.gpus]]\nuuid = '{UUID_A}'\ncompute_capability = '9.x'",
        "simulated.gpus[0].compute_capability",
        "'9.x'",
    ),
    (
        "gpu-model-empty",
        f"[[simulated.gpus]]\nuuid = '{UUID_A}'\nmodel = ''",
        "simulated.gpus[0].model",
        "''",
    ),
    (
        "gpus-too-many",
        "simulated.gpus = [" + ", ".join(f"{{uuid = 'GPU-{i}'}}" for i in range(65)) + "]",
        "simulated.gpus",
        "[{'uuid'",
    ),
    (
        "gpus-and-count",
        f"[simulated]\ncount = 3\n[[simulated.gpus]]\nuuid = '{UUID_A}'",
        "simulated.count",
        "3",
    ),
]


@pytest.mark.parametrize(
    ("document", "key_path", "shown_value"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_error_names_file_key_path_and_value(
    document: str, key_path: str, shown_value: str
) -> None:
    """Each bad document raises ConfigError naming the file, the key path and the value."""
    with pytest.raises(ConfigError) as caught:
        parse(document, SOURCE)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: {key_path}:"), message
    assert shown_value in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("document", "allowed"),
    [
        ("version = 2", "1 (the only schema version this agent understands)"),
        ("colour = 1", "version, agent, plugin, gpus, mps, health, simulated"),
        ("[gpus]\nreplicas = 3", "backend, replicas_per_gpu, replicas_by_model, serve"),
        ("gpus.replicas_per_gpu = 49", "from 1 to 48"),
        ("gpus.replicas_per_gpu = 49", "pre-Volta GPUs allow 16"),
        ("gpus.replicas_per_gpu = true", "(a boolean)"),
        ("gpus.backend = 'cuda'", '"nvml", "simulated"'),
        ("gpus.compute_mode = 'x'", '"exclusive_process", "default", "unchanged"'),
        ("mps.manager = 'x'", '"direct", "systemd", "external"'),
        ("mps.multi_user = 'x'", '"auto", "on", "off"'),
        ("agent.log_level = 'x'", '"debug", "info", "warning", "error"'),
        ("mps.thread_limit = 0", '"proportional", "none", or a fixed percentage'),
        ("plugin.resource_name = 'kubernetes.io/x'", "reserved"),
        ("plugin.socket_name = 'kubelet.sock'", "the kubelet's socket"),
        ("gpus.serve = ['gpu-1']", "'GPU-' followed by"),
        ("health.recovery_quiet_period_s = -1", "0 means never"),
        (
            "health.mps_check_interval_s = 1e-300",
            "from 0.05 to 604800 (a week); shorter is a busy loop",
        ),
        ("mps.container_pipe_dir = '/etc'", "it would hide that directory of the pod's own image"),
        ("mps.pipe_root = '/dev/shm/mps'", "share_host_shm mounts into pods"),
        ("mps.confinement = 'x'", '"enforced", "cooperative"'),
        ("plugin.device_list_strategy = 'x'", '"envvar", "volume-mounts", "cdi"'),
        ("mps.daemon_thread_limit = 25", 'or set mps.confinement = "cooperative"'),
        (
            "mps.confinement = 'cooperative'\nmps.max_vgpus_per_container = 3",
            'or set mps.confinement = "enforced"',
        ),
    ],
    ids=[
        "version",
        "top-keys",
        "gpus-keys",
        "replicas-range",
        "replicas-pre-volta",
        "bool-type",
        "backend",
        "compute-mode",
        "manager",
        "multi-user",
        "log-level",
        "thread-limit",
        "kubernetes-io",
        "kubelet-socket",
        "uuid",
        "quiet-period",
        "busy-loop",
        "container-pipe-hides",
        "pipe-root-dev-shm",
        "confinement",
        "device-list-strategy",
        "enforced-daemon-limit-says-what-to-do",
        "cooperative-max-vgpus-says-what-to-do",
    ],
)
def test_error_says_what_is_allowed(document: str, allowed: str) -> None:
    """The message tells the reader what the key accepts."""
    with pytest.raises(ConfigError, match=re.escape(allowed)):
        parse(document, SOURCE)


@pytest.mark.parametrize(
    ("document", "position"),
    [
        ("version = 1\n[agent]\nlog_level = \n", "line 3"),
        ("[gpus\n", "line 1"),
        ("a = 1\na = 2\n", "line 2"),
        ("x = [1,\n", "end of document"),
    ],
    ids=["missing-value", "open-header", "duplicate-key", "unclosed-array"],
)
def test_toml_syntax_error_names_file_and_position(document: str, position: str) -> None:
    """A TOML syntax error names the file and the parser's line and column."""
    with pytest.raises(ConfigError) as caught:
        parse(document, SOURCE)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: not valid TOML:")
    assert position in message


@pytest.mark.parametrize(
    "document",
    ["x = " + "[" * 5000, "x = " + "{a = " * 3000, "x = " + "9" * 5000],
    ids=["deep-arrays", "deep-inline-tables", "huge-integer"],
)
def test_pathological_toml_is_a_config_error(document: str) -> None:
    """Documents that break the parser's limits still end as ConfigError."""
    with pytest.raises(ConfigError, match=re.escape(SOURCE)):
        parse(document, SOURCE)


def test_first_error_is_reported_deterministically() -> None:
    """With several errors the same one is reported every time (fields in schema order)."""
    document = "[gpus]\nreplicas_per_gpu = 0\nbackend = 'x'\n[agent]\nlog_level = 'x'\n"
    messages = set()
    for _ in range(3):
        with pytest.raises(ConfigError) as caught:
            parse(document, SOURCE)
        messages.add(str(caught.value))
    assert len(messages) == 1
    assert "agent.log_level" in messages.pop()


# ---------------------------------------------------------------------------- model overrides


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("NVIDIA A10G", 7),
        ("NVIDIA H100 80GB HBM3", 30),
        ("NVIDIA H100 PCIe", 20),
        ("nvidia h100 80gb hbm3", 30),
        ("NVIDIA L4", 4),
        ("", 4),
    ],
    ids=["a10g", "longest-match-wins", "shorter-match", "case-insensitive", "no-match", "empty"],
)
def test_replicas_for_model(model: str, expected: int) -> None:
    """The longest case-insensitive model override applies, else replicas_per_gpu."""
    assert FULL_CONFIG.replicas_for_model(model) == expected


def test_replicas_for_model_ignores_file_order() -> None:
    """A longer key wins even when a shorter one comes after it in the file."""
    config = parse('[gpus.replicas_by_model]\n"H100 80GB" = 30\n"H100" = 20\n', SOURCE)
    assert config.gpus.replicas_by_model == (("H100 80GB", 30), ("H100", 20))
    assert config.replicas_for_model("NVIDIA H100 80GB HBM3") == 30


# ---------------------------------------------------------------------------- rendering


@pytest.mark.parametrize(
    "config",
    [
        Config(),
        FULL_CONFIG,
        dataclasses.replace(
            FULL_CONFIG, simulated=SimulatedConfig(count=5, model='Odd "name"\t\\')
        ),
        Config(gpus=GpusConfig(replicas_by_model=(("a.b", 3), ("ü \x01", 4)))),
        Config(mps=MpsConfig(multi_user="off", thread_limit="none", memory_limit="none")),
        Config(health=HealthConfig(ignored_xids=(), recovery_quiet_period_s=1e-05)),
        Config(source='weird\n"path"'),
    ],
    ids=["defaults", "full", "escapes", "model-keys", "policies", "floats", "odd-source"],
)
def test_to_toml_round_trips(config: Config) -> None:
    """to_toml renders a config that parse reads back to an equal config."""
    assert parse(to_toml(config), config.source) == config


def test_to_toml_spells_out_every_key() -> None:
    """The rendered defaults name every key of every table, so `config show` is complete."""
    rendered = to_toml(Config())
    for table, cls in _TABLES:
        assert f"\n[{table}]\n" in rendered
        for field in dataclasses.fields(cls):
            if (table, field.name) == ("gpus", "replicas_by_model"):
                assert "\n[gpus.replicas_by_model]\n" in rendered
            elif (table, field.name) != ("simulated", "gpus"):
                assert re.search(rf"^{field.name} = ", rendered, re.MULTILINE), field.name
    with_gpus = to_toml(FULL_CONFIG)
    assert with_gpus.count("\n[[simulated.gpus]]\n") == 2
    for field in dataclasses.fields(SimulatedGpu):
        assert re.search(rf"^{field.name} = ", with_gpus, re.MULTILINE), field.name


# ---------------------------------------------------------------------------- paths and files


@pytest.mark.parametrize(
    ("cli_value", "environ", "expected"),
    [
        ("/cli.toml", {CONFIG_ENV_VAR: "/env.toml"}, "/cli.toml"),
        (None, {CONFIG_ENV_VAR: "/env.toml"}, "/env.toml"),
        (None, {}, DEFAULT_CONFIG_PATH),
        (None, {CONFIG_ENV_VAR: ""}, DEFAULT_CONFIG_PATH),
        ("relative.toml", {}, "relative.toml"),
    ],
    ids=["cli-beats-env", "env-beats-default", "default", "empty-env-is-unset", "cli-relative"],
)
def test_resolve_path(cli_value: Optional[str], environ: dict[str, str], expected: str) -> None:
    """--config beats $VGPU_CONFIG beats /etc/vgpu/config.toml."""
    assert resolve_path(cli_value, environ) == expected


def test_load_reads_the_file_and_records_its_path(tmp_path: Path) -> None:
    """load parses the file and sets Config.source to its path."""
    path = tmp_path / "config.toml"
    path.write_text(FULL_FILE, encoding="utf-8")
    assert load(str(path)) == dataclasses.replace(FULL_CONFIG, source=str(path))


def test_load_error_names_the_file(tmp_path: Path) -> None:
    """A value error in a loaded file names that file."""
    path = tmp_path / "bad.toml"
    path.write_text("[gpus]\nreplicas_per_gpu = 99\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: gpus.replicas_per_gpu: ")):
        load(str(path))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda base: base / "missing.toml", "No such file"),
        (lambda base: base, "is a directory"),
        (lambda base: _write(base / "file", "") / "config.toml", "Not a directory"),
        (lambda base: _write_bytes(base / "latin1.toml", b"# caf\xe9\n"), "not UTF-8"),
        (lambda base: base / "missing-dir" / "config.toml", "No such file"),
    ],
    ids=["missing", "directory", "parent-is-a-file", "not-utf8", "missing-parent"],
)
def test_load_errors_name_path_and_reason(
    make: Callable[[Path], Path], reason: str, tmp_path: Path
) -> None:
    """Unreadable config files give a ConfigError with the path, the OS reason and advice."""
    path = make(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    message = str(caught.value)
    assert str(path) in message
    assert reason in message


def test_load_missing_file_says_what_to_do(tmp_path: Path) -> None:
    """A missing file's error says how to fix it."""
    with pytest.raises(ConfigError, match="--config"):
        load(str(tmp_path / "nope.toml"))


def test_load_empty_path_is_an_error() -> None:
    """An empty path is refused with a message, not an OS error."""
    with pytest.raises(ConfigError, match="empty"):
        load("")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_load_unreadable_file(tmp_path: Path) -> None:
    """A file without read permission gives a ConfigError that suggests the fix."""
    path = _write(tmp_path / "secret.toml", "")
    path.chmod(0)
    with pytest.raises(ConfigError, match="Permission denied"):
        load(str(path))


def test_load_or_default_missing_optional_file_gives_defaults(tmp_path: Path) -> None:
    """Without a file at a path nobody asked for, the agent runs on the defaults."""
    assert load_or_default(str(tmp_path / "absent.toml"), required=False) == Config()


def test_load_or_default_missing_required_file_is_an_error(tmp_path: Path) -> None:
    """A file someone named must exist."""
    with pytest.raises(ConfigError, match=re.escape("absent.toml")):
        load_or_default(str(tmp_path / "absent.toml"), required=True)


def test_load_or_default_still_refuses_a_bad_optional_file(tmp_path: Path) -> None:
    """An existing file at the default path is parsed and its errors reported."""
    path = _write(tmp_path / "config.toml", "bogus = 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_or_default(str(path), required=False)


def test_load_or_default_directory_is_an_error_even_when_optional(tmp_path: Path) -> None:
    """Only a missing file falls back to defaults; a directory in its place is an error."""
    with pytest.raises(ConfigError, match="directory"):
        load_or_default(str(tmp_path), required=False)


def test_load_effective_env_path_is_required(tmp_path: Path) -> None:
    """A path from $VGPU_CONFIG must exist; the CLI flag beats it."""
    missing = str(tmp_path / "from-env.toml")
    with pytest.raises(ConfigError, match=re.escape("from-env.toml")):
        load_effective(None, {CONFIG_ENV_VAR: missing})
    present = _write(tmp_path / "cli.toml", "gpus.replicas_per_gpu = 3\n")
    config = load_effective(str(present), {CONFIG_ENV_VAR: missing})
    assert config.gpus.replicas_per_gpu == 3
    assert config.source == str(present)


# ---------------------------------------------------------------------------- slice warnings


@pytest.mark.parametrize(
    ("mps", "replicas", "memory_mib", "expected_warnings"),
    [
        (MpsConfig(), 10, 81559, 0),
        (MpsConfig(), 48, 24576, 1),
        (MpsConfig(), 38, 24576, 0),
        (MpsConfig(memory_headroom_mib=20000), 10, 24576, 1),
        (MpsConfig(memory_headroom_mib=30000), 1, 24576, 1),
        (MpsConfig(enabled=False), 48, 24576, 0),
        (MpsConfig(memory_limit="none"), 48, 24576, 0),
        (MpsConfig(memory_limit=512), 1, 24576, 1),
        (MpsConfig(memory_limit=MIN_USEFUL_SLICE_MIB), 1, 24576, 0),
        (MpsConfig(memory_limit=30000), 1, 24576, 1),
    ],
    ids=[
        "h100-10",
        "24g-48",
        "24g-38",
        "headroom-eats-slice",
        "headroom-exceeds-gpu",
        "mps-off",
        "no-limit",
        "fixed-small",
        "fixed-threshold",
        "fixed-above-gpu",
    ],
)
def test_slice_warnings(
    mps: MpsConfig, replicas: int, memory_mib: int, expected_warnings: int
) -> None:
    """Memory slices under 640 MiB, or fixed limits that confine nothing, are warned about."""
    config = Config(gpus=GpusConfig(replicas_per_gpu=replicas), mps=mps)
    warnings = slice_warnings(config, "NVIDIA A10G", memory_mib)
    assert len(warnings) == expected_warnings
    for warning in warnings:
        assert "MiB" in warning


def test_slice_warnings_use_the_model_override() -> None:
    """The warning uses the model's own vGPU count and names the model."""
    config = Config(gpus=GpusConfig(replicas_per_gpu=2, replicas_by_model=(("A10G", 40),)))
    assert slice_warnings(config, "NVIDIA T4", 15360) == []
    (warning,) = slice_warnings(config, "NVIDIA A10G", 23028)
    assert "NVIDIA A10G" in warning
    assert "40 vGPUs" in warning
    assert "575 MiB" in warning


# ---------------------------------------------------------------------------- packaged file

_TABLES: list[tuple[str, type[DataclassInstance]]] = [
    ("agent", AgentConfig),
    ("plugin", PluginConfig),
    ("gpus", GpusConfig),
    ("mps", MpsConfig),
    ("health", HealthConfig),
    ("simulated", SimulatedConfig),
    ("dra", DraConfig),
    ("faults", FaultsConfig),
]
_SETTING_LINE = re.compile(r"^#(?=[\[a-z])")


def _packaged_text() -> str:
    return PACKAGED_CONFIG.read_text(encoding="utf-8")


def test_packaged_config_parses_to_the_defaults() -> None:
    """The shipped /etc/vgpu/config.toml, as shipped, is the defaults."""
    assert parse(_packaged_text(), str(PACKAGED_CONFIG)) == Config(source=str(PACKAGED_CONFIG))


def test_packaged_config_uncommented_is_still_the_defaults() -> None:
    """Uncommenting every setting changes nothing: each shows its true default."""
    uncommented = "\n".join(_SETTING_LINE.sub("", line) for line in _packaged_text().splitlines())
    assert uncommented != _packaged_text()
    assert parse(uncommented, "uncommented") == Config(source="uncommented")


def test_packaged_config_mentions_every_key() -> None:
    """Every field of every table appears in its section of the shipped file, so it cannot drift."""
    sections: dict[str, set[str]] = {"": set()}
    current = ""
    for line in _packaged_text().splitlines():
        header = re.match(r"^#\s*\[\[?([a-z_.]+)\]\]?\s*$", line)
        if header:
            current = header.group(1)
            sections.setdefault(current, set())
            continue
        setting = re.match(r"^#\s*([a-z_]+)\s*=", line)
        if setting:
            sections[current].add(setting.group(1))
    for field in dataclasses.fields(Config):
        if field.name != "source":
            assert field.name in sections[""] or field.name in sections, field.name
    checked: list[tuple[str, type[DataclassInstance]]] = [
        *_TABLES,
        ("simulated.gpus", SimulatedGpu),
    ]
    for table, cls in checked:
        for field in dataclasses.fields(cls):
            assert field.name in sections[table] or f"{table}.{field.name}" in sections, (
                f"packaging/config.toml does not document {table}.{field.name}"
            )


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
