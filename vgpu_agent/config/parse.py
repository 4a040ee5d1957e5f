"""Reading the config: TOML text into a :class:`Config`, and the file it comes from.

``parse(text, source)`` turns TOML text into a Config; ``load(path)`` reads a file and
parses it; ``load_effective`` finds the file (``--config``, ``$VGPU_CONFIG``, the default)
first. Every error is a :class:`ConfigError` naming the file, the key path and the bad
value, and saying what is allowed. Unknown keys are errors.

The first error found wins; tables are checked for unknown keys before their values and
values in the order of the dataclass fields, so the same document always gives the same
message.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from typing import Mapping, Optional

from vgpu_agent.config.dra import parse_dra
from vgpu_agent.config.schema import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_PATH,
    MAX_REPLICAS_PER_GPU,
    MAX_SIMULATED_GPUS,
    MIN_INTERVAL_S,
    MIN_TIMEOUT_S,
    SCHEMA_VERSION,
    AgentConfig,
    AttributionConfig,
    Config,
    FaultsConfig,
    GpusConfig,
    HealthConfig,
    IsolationConfig,
    LabelsConfig,
    MetricsConfig,
    MpsConfig,
    PluginConfig,
    SimulatedConfig,
    SimulatedGpu,
)
from vgpu_agent.config.values import (
    _BACKENDS,
    _COMPUTE_MODES,
    _CONFINEMENTS,
    _DEVICE_LIST_STRATEGIES,
    _EXCESS_CLIENTS,
    _LOG_LEVELS,
    _MPS_MANAGERS,
    _OFFENDER_ACTIONS,
    _OFFENDER_EVIDENCE,
    _REPLICAS_ALLOWED,
    _UUID_ALLOWED,
    _absolute_path,
    _as_list,
    _as_table,
    _bool,
    _choice,
    _compute_capability,
    _container_directory,
    _gpu_uuid,
    _int,
    _int_range,
    _item,
    _join,
    _keys,
    _limit,
    _listen_address,
    _multi_user,
    _own_directory,
    _program,
    _replicas_by_model,
    _resource_name,
    _seconds,
    _serve,
    _show,
    _socket_file_name,
    _Table,
    _text,
    _textfile_path,
    _Value,
    _xids,
)
from vgpu_agent.host.sockets import MAX_UNIX_SOCKET_PATH_BYTES
from vgpu_agent.model.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

# --------------------------------------------------------------------------------------
# Tables: each of the document's tables into its dataclass, then the document itself.
# --------------------------------------------------------------------------------------

_MEMORY_ALLOWED = "the GPU's memory in MiB (an integer >= 1)"
#: A periodic check: at least MIN_INTERVAL_S apart, or it is a busy loop.
_INTERVAL = _seconds(
    allow_zero=False, minimum=MIN_INTERVAL_S, why_minimum="; shorter is a busy loop"
)
#: How long to wait for an answer: at least MIN_TIMEOUT_S, or no answer is ever in time.
_TIMEOUT = _seconds(
    allow_zero=False, minimum=MIN_TIMEOUT_S, why_minimum="; shorter never leaves time to answer"
)


def _simulated_gpu(value: _Value) -> SimulatedGpu:
    table = _Table(
        value.source, value.path, "[[simulated.gpus]]", _as_table(value), _keys(SimulatedGpu)
    )
    if not table.has("uuid"):
        raise ConfigError(
            f"{value.source}: {_join(value.path, 'uuid')}: missing; every [[simulated.gpus]] "
            f"entry needs a uuid, {_UUID_ALLOWED}"
        )
    return SimulatedGpu(
        uuid=_gpu_uuid(table.value("uuid")),
        model=table.get("model", SimulatedGpu.model, _text),
        memory_mib=table.get(
            "memory_mib", SimulatedGpu.memory_mib, _int_range(1, None, _MEMORY_ALLOWED)
        ),
        compute_capability=table.get(
            "compute_capability", SimulatedGpu.compute_capability, _compute_capability
        ),
        numa_node=table.get(
            "numa_node", None, _int_range(0, None, "a NUMA node number (an integer >= 0)")
        ),
        mig_enabled=table.get("mig_enabled", False, _bool),
    )


def _simulated_gpus(value: _Value) -> tuple[SimulatedGpu, ...]:
    expected = f"an array of tables ([[simulated.gpus]]), at most {MAX_SIMULATED_GPUS}"
    items = _as_list(value, expected)
    if len(items) > MAX_SIMULATED_GPUS:
        value.fail(expected, f"{len(items)} GPUs")
    gpus: list[SimulatedGpu] = []
    for index, raw in enumerate(items):
        gpu = _simulated_gpu(_item(value, index, raw))
        if any(other.uuid == gpu.uuid for other in gpus):
            _item(value, index, raw).fail(
                "GPUs with distinct uuids", f"uuid {gpu.uuid!r} is used twice"
            )
        gpus.append(gpu)
    return tuple(gpus)


def _parse_agent(table: _Table) -> AgentConfig:
    defaults = AgentConfig()
    return AgentConfig(
        log_level=table.get("log_level", defaults.log_level, _choice(_LOG_LEVELS)),
        state_dir=table.get("state_dir", defaults.state_dir, _absolute_path),
    )


def _parse_plugin(table: _Table) -> PluginConfig:
    defaults = PluginConfig()
    plugin = PluginConfig(
        resource_name=table.get("resource_name", defaults.resource_name, _resource_name),
        plugin_dir=table.get("plugin_dir", defaults.plugin_dir, _absolute_path),
        socket_name=table.get("socket_name", defaults.socket_name, _socket_file_name),
        kubelet_socket_name=table.get(
            "kubelet_socket_name", defaults.kubelet_socket_name, _socket_file_name
        ),
        register_timeout_s=table.get("register_timeout_s", defaults.register_timeout_s, _TIMEOUT),
        device_list_strategy=table.get(
            "device_list_strategy",
            defaults.device_list_strategy,
            _choice(_DEVICE_LIST_STRATEGIES),
        ),
    )
    if plugin.socket_name in (plugin.kubelet_socket_name, "kubelet.sock"):
        table.value_of("socket_name", plugin.socket_name).fail(
            "a socket name of our own", "that is the kubelet's socket"
        )
    for key, name in (
        ("socket_name", plugin.socket_name),
        ("kubelet_socket_name", plugin.kubelet_socket_name),
    ):
        path = os.path.join(plugin.plugin_dir, name)
        if len(path.encode("utf-8", "surrogatepass")) > MAX_UNIX_SOCKET_PATH_BYTES:
            # Blame the directory when the file sets it: that is the long part.
            blamed = (
                table.value_of("plugin_dir", plugin.plugin_dir)
                if table.has("plugin_dir")
                else table.value_of(key, name)
            )
            blamed.fail(
                "a plugin_dir and socket name whose joined path fits a unix socket "
                f"(at most {MAX_UNIX_SOCKET_PATH_BYTES} bytes)",
                f"{path!r} is too long",
            )
    return plugin


def _parse_gpus(table: _Table) -> GpusConfig:
    defaults = GpusConfig()
    return GpusConfig(
        backend=table.get("backend", defaults.backend, _choice(_BACKENDS)),
        replicas_per_gpu=table.get(
            "replicas_per_gpu",
            defaults.replicas_per_gpu,
            _int_range(1, MAX_REPLICAS_PER_GPU, _REPLICAS_ALLOWED),
        ),
        replicas_by_model=table.get(
            "replicas_by_model", defaults.replicas_by_model, _replicas_by_model
        ),
        serve=table.get("serve", defaults.serve, _serve),
        compute_mode=table.get("compute_mode", defaults.compute_mode, _choice(_COMPUTE_MODES)),
        restore_compute_mode=table.get(
            "restore_compute_mode", defaults.restore_compute_mode, _bool
        ),
        allow_unconfined_sharing=table.get(
            "allow_unconfined_sharing", defaults.allow_unconfined_sharing, _bool
        ),
    )


def _parse_mps(table: _Table) -> MpsConfig:
    mps = _parse_mps_keys(table)
    _check_confinement(table, mps)
    return mps


def _check_confinement(table: _Table, mps: MpsConfig) -> None:
    """The combinations of mps.confinement with the keys it decides over."""
    if mps.confinement == "cooperative":
        if mps.max_vgpus_per_container != 1:
            table.value_of("max_vgpus_per_container", mps.max_vgpus_per_container).fail(
                'the default 1 with mps.confinement = "cooperative"',
                "it applies only in enforced mode, where it sets the daemon's ceiling "
                '(remove it, or set mps.confinement = "enforced")',
            )
        return
    for key, policy in (
        ("daemon_thread_limit", mps.daemon_thread_limit),
        ("daemon_memory_limit", mps.daemon_memory_limit),
    ):
        # "proportional" names one vGPU's share: exactly the enforced ceiling of 1 vGPU.
        if policy == "none" or (policy == "proportional" and mps.max_vgpus_per_container == 1):
            continue
        table.value_of(key, policy).fail(
            '"none" with mps.confinement = "enforced" (the default)',
            "in enforced mode the daemon's ceiling is mps.max_vgpus_per_container vGPUs' "
            'share (remove this key, or set mps.confinement = "cooperative" to choose '
            "the daemon defaults yourself)",
        )


def _parse_mps_keys(table: _Table) -> MpsConfig:
    defaults = MpsConfig()
    return MpsConfig(
        enabled=table.get("enabled", defaults.enabled, _bool),
        manager=table.get("manager", defaults.manager, _choice(_MPS_MANAGERS)),
        pipe_root=table.get("pipe_root", defaults.pipe_root, _own_directory),
        log_root=table.get("log_root", defaults.log_root, _own_directory),
        control_binary=table.get("control_binary", defaults.control_binary, _program),
        multi_user=table.get("multi_user", defaults.multi_user, _multi_user),
        container_pipe_dir=table.get(
            "container_pipe_dir", defaults.container_pipe_dir, _container_directory
        ),
        thread_limit=table.get(
            "thread_limit", defaults.thread_limit, _limit(unit="percentage", high=100)
        ),
        memory_limit=table.get(
            "memory_limit", defaults.memory_limit, _limit(unit="number of MiB", high=None)
        ),
        memory_headroom_mib=table.get(
            "memory_headroom_mib",
            defaults.memory_headroom_mib,
            _int_range(0, None, "a number of MiB (an integer >= 0)"),
        ),
        share_host_shm=table.get("share_host_shm", defaults.share_host_shm, _bool),
        control_timeout_s=table.get("control_timeout_s", defaults.control_timeout_s, _TIMEOUT),
        daemon_thread_limit=table.get(
            "daemon_thread_limit",
            defaults.daemon_thread_limit,
            _limit(unit="percentage", high=100),
        ),
        daemon_memory_limit=table.get(
            "daemon_memory_limit",
            defaults.daemon_memory_limit,
            _limit(unit="number of MiB", high=None),
        ),
        confinement=table.get("confinement", defaults.confinement, _choice(_CONFINEMENTS)),
        max_vgpus_per_container=table.get(
            "max_vgpus_per_container",
            defaults.max_vgpus_per_container,
            _int_range(
                1,
                MAX_REPLICAS_PER_GPU,
                f"an integer from 1 to {MAX_REPLICAS_PER_GPU} (vGPUs one container may hold)",
            ),
        ),
    )


def _parse_health(table: _Table) -> HealthConfig:
    defaults = HealthConfig()
    return HealthConfig(
        xid_enabled=table.get("xid_enabled", defaults.xid_enabled, _bool),
        ignored_xids=table.get("ignored_xids", defaults.ignored_xids, _xids),
        mps_liveness_enabled=table.get(
            "mps_liveness_enabled", defaults.mps_liveness_enabled, _bool
        ),
        mps_check_interval_s=table.get(
            "mps_check_interval_s", defaults.mps_check_interval_s, _INTERVAL
        ),
        recovery_quiet_period_s=table.get(
            "recovery_quiet_period_s",
            defaults.recovery_quiet_period_s,
            _seconds(allow_zero=True, note=" (0 means never: only 'vgpu-agent health reset')"),
        ),
        poll_interval_s=table.get("poll_interval_s", defaults.poll_interval_s, _INTERVAL),
    )


def _parse_faults(table: _Table) -> FaultsConfig:
    defaults = FaultsConfig()
    return FaultsConfig(
        repeat_limit=table.get(
            "repeat_limit",
            defaults.repeat_limit,
            _int_range(1, None, "an integer >= 1 (faults counted against one pod within window_s)"),
        ),
        window_s=table.get("window_s", defaults.window_s, _seconds(allow_zero=False)),
        offender_evidence=table.get(
            "offender_evidence", defaults.offender_evidence, _choice(_OFFENDER_EVIDENCE)
        ),
        offender_action=table.get(
            "offender_action", defaults.offender_action, _choice(_OFFENDER_ACTIONS)
        ),
        hold_s=table.get(
            "hold_s",
            defaults.hold_s,
            _seconds(allow_zero=True, note=" (0 means until the pod is gone)"),
        ),
    )


def _parse_attribution(table: _Table) -> AttributionConfig:
    defaults = AttributionConfig()
    return AttributionConfig(
        pod_resources_socket=table.get(
            "pod_resources_socket", defaults.pod_resources_socket, _absolute_path
        ),
        refresh_interval_s=table.get("refresh_interval_s", defaults.refresh_interval_s, _INTERVAL),
    )


def _parse_isolation(table: _Table) -> IsolationConfig:
    defaults = IsolationConfig()
    return IsolationConfig(
        clients_per_vgpu=table.get(
            "clients_per_vgpu",
            defaults.clients_per_vgpu,
            _int_range(
                1,
                MAX_REPLICAS_PER_GPU,
                f"an integer from 1 to {MAX_REPLICAS_PER_GPU} (MPS client processes a pod "
                "may run per vGPU it holds; a GPU serves at most that many clients)",
            ),
        ),
        excess_clients=table.get(
            "excess_clients", defaults.excess_clients, _choice(_EXCESS_CLIENTS)
        ),
        check_interval_s=table.get("check_interval_s", defaults.check_interval_s, _INTERVAL),
    )


def _parse_metrics(table: _Table) -> MetricsConfig:
    defaults = MetricsConfig()
    return MetricsConfig(
        enabled=table.get("enabled", defaults.enabled, _bool),
        listen_address=table.get("listen_address", defaults.listen_address, _listen_address),
        textfile_path=table.get("textfile_path", defaults.textfile_path, _textfile_path),
    )


def _parse_labels(table: _Table) -> LabelsConfig:
    defaults = LabelsConfig()
    return LabelsConfig(
        enabled=table.get("enabled", defaults.enabled, _bool),
        features_dir=table.get("features_dir", defaults.features_dir, _absolute_path),
    )


_SINGLE_MODEL_KEYS = ("count", "model", "memory_mib", "compute_capability")


def _parse_simulated(table: _Table) -> SimulatedConfig:
    defaults = SimulatedConfig()
    gpus = table.get("gpus", defaults.gpus, _simulated_gpus)
    if gpus:
        # Both forms at once would leave some keys silently unused.
        for key in _SINGLE_MODEL_KEYS:
            if table.has(key):
                value = table.value(key)
                raise ConfigError(
                    f"{table.source}: {value.path}: invalid value {_show(value.raw)}: "
                    f"[[simulated.gpus]] lists the GPUs, so {key} would be ignored; "
                    f"expected either {', '.join(_SINGLE_MODEL_KEYS)} or [[simulated.gpus]], "
                    "not both"
                )
    return SimulatedConfig(
        count=table.get(
            "count",
            defaults.count,
            _int_range(1, MAX_SIMULATED_GPUS, f"an integer from 1 to {MAX_SIMULATED_GPUS}"),
        ),
        model=table.get("model", defaults.model, _text),
        memory_mib=table.get(
            "memory_mib", defaults.memory_mib, _int_range(1, None, _MEMORY_ALLOWED)
        ),
        compute_capability=table.get(
            "compute_capability", defaults.compute_capability, _compute_capability
        ),
        gpus=gpus,
    )


def _version(value: _Value) -> int:
    expected = f"{SCHEMA_VERSION} (the only schema version this agent understands)"
    version = _int(value, expected, 0)
    if version != SCHEMA_VERSION:
        value.fail(expected, "this agent does not understand that schema version")
    return version


def parse(text: str, source: str = "<string>") -> Config:
    """Parse config TOML ``text`` read from ``source`` (used in messages) into a Config."""
    try:
        document: dict[str, object] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    except ValueError as exc:  # an integer with more digits than Python converts
        reason = str(exc).split(";")[0]
        raise ConfigError(f"{source}: not valid TOML: a value cannot be read: {reason}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{source}: not valid TOML: arrays or tables nested too deeply") from exc
    # The version decides what the rest means, so it is checked before anything else.
    version = SCHEMA_VERSION
    if "version" in document:
        version = _version(_Value(source, "version", document["version"]))
    root = _Table(source, "", "the top level", document, _keys(Config))
    return Config(
        version=version,
        agent=_parse_agent(root.table("agent", "[agent]", _keys(AgentConfig))),
        plugin=_parse_plugin(root.table("plugin", "[plugin]", _keys(PluginConfig))),
        gpus=_parse_gpus(root.table("gpus", "[gpus]", _keys(GpusConfig))),
        mps=_parse_mps(root.table("mps", "[mps]", _keys(MpsConfig))),
        health=_parse_health(root.table("health", "[health]", _keys(HealthConfig))),
        simulated=_parse_simulated(root.table("simulated", "[simulated]", _keys(SimulatedConfig))),
        attribution=_parse_attribution(
            root.table("attribution", "[attribution]", _keys(AttributionConfig))
        ),
        isolation=_parse_isolation(root.table("isolation", "[isolation]", _keys(IsolationConfig))),
        metrics=_parse_metrics(root.table("metrics", "[metrics]", _keys(MetricsConfig))),
        labels=_parse_labels(root.table("labels", "[labels]", _keys(LabelsConfig))),
        dra=parse_dra(document.get("dra"), source),
        faults=_parse_faults(root.table("faults", "[faults]", _keys(FaultsConfig))),
        source=source,
    )


# --------------------------------------------------------------------------------------
# Files and paths: the only I/O in this module.
# --------------------------------------------------------------------------------------


def resolve_path(cli_value: Optional[str], environ: Mapping[str, str]) -> str:
    """The config path to use: ``--config``, else ``$VGPU_CONFIG``, else the default."""
    if cli_value is not None:
        return cli_value
    from_env = environ.get(CONFIG_ENV_VAR, "")
    return from_env if from_env else DEFAULT_CONFIG_PATH


def _read_text(path: str, *, missing_ok: bool) -> Optional[str]:
    """The file's text; None when it is missing and ``missing_ok``; else a ConfigError."""
    action = f"reading config file {path}"
    if not path:
        raise ConfigError("reading config file: the path is empty; give a file name")
    try:
        data = _read_regular_file(path, action)
    except FileNotFoundError as exc:
        if missing_ok:
            return None
        raise ConfigError(
            f"{action}: {exc.strerror or 'no such file'}; create it (see the commented "
            f"example shipped as {DEFAULT_CONFIG_PATH}) or point --config or "
            f"${CONFIG_ENV_VAR} at an existing file"
        ) from exc
    except IsADirectoryError as exc:
        raise ConfigError(
            f"{action}: it is a directory; give the path of the TOML file inside it"
        ) from exc
    except PermissionError as exc:
        raise ConfigError(
            f"{action}: {exc.strerror or 'permission denied'}; run as root or make the "
            "file readable by the agent's user"
        ) from exc
    except OSError as exc:
        raise ConfigError(
            f"{action}: {exc.strerror or exc}; check that the path names a readable file"
        ) from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{action}: not UTF-8 text (byte {exc.start}); TOML files must be UTF-8"
        ) from exc


def _read_regular_file(path: str, action: str) -> bytes:
    """The bytes of ``path``; OSError as open() raises it, ConfigError for a FIFO, device
    or socket (which a read could block on or never end)."""
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):
            raise ConfigError(
                f"{action}: not a regular file ({_file_kind(mode)}); give the path of a TOML file"
            )
        return handle.read()


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def load(path: str) -> Config:
    """Read and parse the config file at ``path``; its path becomes ``Config.source``."""
    text = _read_text(path, missing_ok=False)
    assert text is not None  # noqa: S101 - missing_ok=False never returns None
    return parse(text, source=path)


def load_or_default(path: str, required: bool) -> Config:
    """Like ``load``, but a missing file gives the defaults unless ``required``.

    The agent runs without a config file at the default path; a file someone named
    (``--config``, ``$VGPU_CONFIG``) must exist.
    """
    text = _read_text(path, missing_ok=not required)
    if text is None:
        return Config()
    return parse(text, source=path)


def load_effective(cli_value: Optional[str], environ: Mapping[str, str]) -> Config:
    """The config the agent runs with: resolve the path, then load it (required when named)."""
    path = resolve_path(cli_value, environ)
    explicit = cli_value is not None or bool(environ.get(CONFIG_ENV_VAR, ""))
    return load_or_default(path, required=explicit)
