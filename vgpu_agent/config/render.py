"""Writing a config back: ``to_toml(config)`` renders a Config as TOML, every key spelled
out, that ``parse`` reads back to an equal Config (``vgpu-agent config show``).
"""

from __future__ import annotations

from typing import Sequence

from vgpu_agent.config.dra import dra_toml_pairs
from vgpu_agent.config.schema import Config

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_string(text: str) -> str:
    """``text`` as a TOML basic string."""
    out = ['"']
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


def _compute_capability_text(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


def to_toml(config: Config) -> str:
    """The config as TOML, every key spelled out, that ``parse`` reads back unchanged."""
    lines = [f"# vgpu-agent effective configuration (from {_toml_string(config.source)})", ""]
    lines.append(f"version = {config.version}")

    def table(name: str, pairs: Sequence[tuple[str, object]]) -> None:
        lines.extend(["", f"[{name}]"])
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in pairs)

    agent, plugin, gpus, mps = config.agent, config.plugin, config.gpus, config.mps
    table("agent", [("log_level", agent.log_level), ("state_dir", agent.state_dir)])
    table(
        "plugin",
        [
            ("resource_name", plugin.resource_name),
            ("plugin_dir", plugin.plugin_dir),
            ("socket_name", plugin.socket_name),
            ("kubelet_socket_name", plugin.kubelet_socket_name),
            ("register_timeout_s", plugin.register_timeout_s),
            ("device_list_strategy", plugin.device_list_strategy),
        ],
    )
    table(
        "gpus",
        [
            ("backend", gpus.backend),
            ("replicas_per_gpu", gpus.replicas_per_gpu),
            ("serve", gpus.serve),
            ("compute_mode", gpus.compute_mode),
            ("restore_compute_mode", gpus.restore_compute_mode),
            ("allow_unconfined_sharing", gpus.allow_unconfined_sharing),
        ],
    )
    table(
        "gpus.replicas_by_model", [(_toml_string(model), n) for model, n in gpus.replicas_by_model]
    )
    table(
        "mps",
        [
            ("enabled", mps.enabled),
            ("manager", mps.manager),
            ("pipe_root", mps.pipe_root),
            ("log_root", mps.log_root),
            ("control_binary", mps.control_binary),
            ("multi_user", mps.multi_user),
            ("container_pipe_dir", mps.container_pipe_dir),
            ("thread_limit", mps.thread_limit),
            ("memory_limit", mps.memory_limit),
            ("memory_headroom_mib", mps.memory_headroom_mib),
            ("share_host_shm", mps.share_host_shm),
            ("control_timeout_s", mps.control_timeout_s),
            ("daemon_thread_limit", mps.daemon_thread_limit),
            ("daemon_memory_limit", mps.daemon_memory_limit),
            ("confinement", mps.confinement),
            ("max_vgpus_per_container", mps.max_vgpus_per_container),
        ],
    )
    health = config.health
    table(
        "health",
        [
            ("xid_enabled", health.xid_enabled),
            ("ignored_xids", health.ignored_xids),
            ("mps_liveness_enabled", health.mps_liveness_enabled),
            ("mps_check_interval_s", health.mps_check_interval_s),
            ("recovery_quiet_period_s", health.recovery_quiet_period_s),
            ("poll_interval_s", health.poll_interval_s),
        ],
    )
    faults = config.faults
    table(
        "faults",
        [
            ("repeat_limit", faults.repeat_limit),
            ("window_s", faults.window_s),
            ("offender_evidence", faults.offender_evidence),
            ("offender_action", faults.offender_action),
            ("hold_s", faults.hold_s),
        ],
    )
    table(
        "attribution",
        [
            ("pod_resources_socket", config.attribution.pod_resources_socket),
            ("refresh_interval_s", config.attribution.refresh_interval_s),
        ],
    )
    isolation = config.isolation
    table(
        "isolation",
        [
            ("clients_per_vgpu", isolation.clients_per_vgpu),
            ("excess_clients", isolation.excess_clients),
            ("check_interval_s", isolation.check_interval_s),
        ],
    )
    table(
        "metrics",
        [
            ("enabled", config.metrics.enabled),
            ("listen_address", config.metrics.listen_address),
            ("textfile_path", config.metrics.textfile_path),
        ],
    )
    table(
        "labels",
        [("enabled", config.labels.enabled), ("features_dir", config.labels.features_dir)],
    )
    table("dra", dra_toml_pairs(config.dra))
    simulated = config.simulated
    if simulated.gpus:
        # parse() refuses the single-model keys next to an explicit list.
        table("simulated", [])
        for gpu in simulated.gpus:
            lines.extend(["", "[[simulated.gpus]]"])
            pairs: list[tuple[str, object]] = [
                ("uuid", gpu.uuid),
                ("model", gpu.model),
                ("memory_mib", gpu.memory_mib),
                ("compute_capability", _compute_capability_text(gpu.compute_capability)),
            ]
            if gpu.numa_node is not None:
                pairs.append(("numa_node", gpu.numa_node))
            pairs.append(("mig_enabled", gpu.mig_enabled))
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in pairs)
    else:
        table(
            "simulated",
            [
                ("count", simulated.count),
                ("model", simulated.model),
                ("memory_mib", simulated.memory_mib),
                ("compute_capability", _compute_capability_text(simulated.compute_capability)),
            ],
        )
    return "\n".join(lines) + "\n"
