"""Property tests of the config parser: hostile documents end as a Config or a ConfigError
naming the key path, never another exception; valid configs survive to_toml and back.

They run without coverage measurement (``no_cover``, pytest-cov's marker): they search
inputs, while the coverage of config.py is held by tests/config/test_config.py, whose cases each
name what they cover; under the tracer these searches took twice their time, a sixth of
the suite's CPU."""

from __future__ import annotations

import datetime
import math
import posixpath
import sys
from typing import Union

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vgpu_agent.config.parse import parse
from vgpu_agent.config.render import to_toml
from vgpu_agent.config.schema import (
    MAX_SECONDS,
    MIN_INTERVAL_S,
    MIN_TIMEOUT_S,
    PSEUDO_FILESYSTEM_ROOTS,
    SHARED_SYSTEM_DIRECTORIES,
    AgentConfig,
    Config,
    GpusConfig,
    HealthConfig,
    IsolationConfig,
    MpsConfig,
    PluginConfig,
    SimulatedConfig,
    SimulatedGpu,
)
from vgpu_agent.host.sockets import MAX_UNIX_SOCKET_PATH_BYTES
from vgpu_agent.model.devices import LimitPolicy
from vgpu_agent.model.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

pytestmark = pytest.mark.no_cover

SOURCE = "/etc/vgpu/property.toml"
PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

#: A TOML value as the test builds it (the same shapes tomllib returns).
Toml = Union[
    bool,
    int,
    float,
    str,
    datetime.datetime,
    datetime.date,
    datetime.time,
    list["Toml"],
    dict[str, "Toml"],
]

# ------------------------------------------------------------------ a tiny TOML writer

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _string(text: str) -> str:
    escaped = "".join(
        _ESCAPES.get(char, f"\\u{ord(char):04x}" if ord(char) < 0x20 or ord(char) == 0x7F else char)
        for char in text
    )
    return f'"{escaped}"'


def _inline(value: Toml) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_inline(item) for item in value) + "]"
    return "{" + ", ".join(f"{_string(key)} = {_inline(item)}" for key, item in value.items()) + "}"


def write_toml(document: dict[str, Toml]) -> str:
    """The document as TOML: top-level tables as [sections], everything inside inline."""
    lines = [
        f"{_string(key)} = {_inline(value)}"
        for key, value in document.items()
        if not isinstance(value, dict)
    ]
    for key, value in document.items():
        if isinstance(value, dict):
            lines.append(f"[{_string(key)}]")
            lines.extend(f"{_string(name)} = {_inline(item)}" for name, item in value.items())
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ arbitrary documents

_SCHEMA_KEYS = sorted(
    {
        "version",
        *(name for name in Config.__dataclass_fields__ if name != "source"),
        *AgentConfig.__dataclass_fields__,
        *PluginConfig.__dataclass_fields__,
        *GpusConfig.__dataclass_fields__,
        *MpsConfig.__dataclass_fields__,
        *HealthConfig.__dataclass_fields__,
        *IsolationConfig.__dataclass_fields__,
        *SimulatedConfig.__dataclass_fields__,
        *SimulatedGpu.__dataclass_fields__,
        "A10G",
    }
)
_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12)
_keys = st.one_of(st.sampled_from(_SCHEMA_KEYS), _text)
_special_strings = st.sampled_from(
    [
        "all",
        "proportional",
        "none",
        "on",
        "auto",
        "9.0",
        "/abs",
        "GPU-1",
        "x.sock",
        "kubelet.sock",
        "example.com/x",
        "",
    ]
)
_scalars: st.SearchStrategy[Toml] = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=-2, max_value=70),
    st.floats(),
    _text,
    _special_strings,
    st.datetimes(),
    st.dates(),
    st.times(),
)
_values: st.SearchStrategy[Toml] = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(_keys, children, max_size=5),
    ),
    max_leaves=20,
)
_TABLE_KEYS: dict[str, list[str]] = {
    "agent": list(AgentConfig.__dataclass_fields__),
    "plugin": list(PluginConfig.__dataclass_fields__),
    "gpus": list(GpusConfig.__dataclass_fields__),
    "mps": list(MpsConfig.__dataclass_fields__),
    "health": list(HealthConfig.__dataclass_fields__),
    "simulated": list(SimulatedConfig.__dataclass_fields__),
}
_simulated_gpu_tables = st.dictionaries(
    st.sampled_from(list(SimulatedGpu.__dataclass_fields__)), _values, max_size=4
)


def _schema_table(name: str) -> st.SearchStrategy[Toml]:
    """Tables with the schema's own keys and random values, to get past the unknown-key check."""
    values = _values
    if name == "simulated":
        values = st.one_of(_values, st.lists(_simulated_gpu_tables, max_size=3))
    return st.dictionaries(st.sampled_from(_TABLE_KEYS[name]), values, max_size=4)


_schema_shaped = st.fixed_dictionaries(
    {},
    optional={
        "version": st.just(1),
        **{name: _schema_table(name) for name in _TABLE_KEYS},
    },
)
_documents = st.one_of(st.dictionaries(_keys, _values, max_size=8), _schema_shaped)


def _assert_config_or_config_error(text: str) -> Union[Config, ConfigError]:
    try:
        config = parse(text, SOURCE)
    except ConfigError as error:
        message = str(error)
        assert message.startswith(f"{SOURCE}: "), message
        assert "\n" not in message
        event("ConfigError: " + message[len(SOURCE) + 2 :].split(":", 1)[0].split("[", 1)[0])
        return error
    event("Config")
    return config


@pytest.mark.slow
@PROPERTY_SETTINGS
@given(_documents)
def test_arbitrary_documents_give_config_or_config_error(document: dict[str, Toml]) -> None:
    """Any TOML document parses to a Config or raises ConfigError, never anything else."""
    text = write_toml(document)
    tomllib.loads(text)  # the writer itself must produce valid TOML
    _assert_config_or_config_error(text)


@PROPERTY_SETTINGS
@given(st.text(max_size=200))
def test_arbitrary_text_gives_config_or_config_error(text: str) -> None:
    """Even text that is not TOML ends as a ConfigError."""
    _assert_config_or_config_error(text)


# ------------------------------------------------------------------ valid configs

_path_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    max_size=20,
)
# A first character that str.strip() keeps, so names are never blank without a filter.
_first_chars = st.characters(
    exclude_categories=["Cs", "Cc", "Z"], exclude_characters="/\x1c\x1d\x1e\x1f\x85"
)
_names = st.builds(lambda first, rest: first + rest, _first_chars, _path_text)
_plain_names = st.builds(
    lambda first, rest: first + rest,
    _first_chars,
    st.text(
        alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00/"),
        max_size=20,
    ),
)
_absolute_paths = _path_text.map(lambda text: "/" + text)


def _normal(path: str) -> str:
    return "/" + posixpath.normpath(path).lstrip("/")


def _is_under(path: str, roots: tuple[str, ...]) -> bool:
    return any(_normal(path) == root or _normal(path).startswith(root + "/") for root in roots)


#: MPS directory roots: any absolute path but the shared system ones (/, /tmp, ...) and
#: those under kernel file systems (/dev, /proc, /sys).
_own_directories: st.SearchStrategy[str] = _absolute_paths.filter(
    lambda path: (
        _normal(path) not in SHARED_SYSTEM_DIRECTORIES
        and not _is_under(path, PSEUDO_FILESYSTEM_ROOTS)
    )
)
#: Where containers see the pipe directory: the same, and not the service account's secrets.
_container_directories: st.SearchStrategy[str] = _own_directories.filter(
    lambda path: not _is_under(path, ("/run/secrets", "/var/run/secrets"))
)
_seconds = st.floats(min_value=0, max_value=MAX_SECONDS, exclude_min=True)
_intervals = st.floats(min_value=MIN_INTERVAL_S, max_value=MAX_SECONDS)
_timeouts = st.floats(min_value=MIN_TIMEOUT_S, max_value=MAX_SECONDS)
_uuids = st.from_regex(r"GPU-[A-Za-z0-9-]{1,55}", fullmatch=True)
_resource_names: st.SearchStrategy[str] = st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?){0,3}"
    r"/[A-Za-z0-9]([A-Za-z0-9_.-]{0,20}[A-Za-z0-9])?",
    fullmatch=True,
).filter(lambda name: "kubernetes.io/" not in name)
_socket_names = st.from_regex(r"[A-Za-z0-9_.-]{1,20}\.sock", fullmatch=True)
_int64 = st.integers(min_value=1, max_value=2**63 - 1)


@st.composite
def _plugins(draw: st.DrawFn) -> PluginConfig:
    plugin_dir = draw(_absolute_paths)
    kubelet_socket_name = draw(_socket_names)
    socket_name = draw(
        _socket_names.filter(lambda name: name not in (kubelet_socket_name, "kubelet.sock"))
    )
    for name in (socket_name, kubelet_socket_name):
        if len(f"{plugin_dir}/{name}".encode()) > MAX_UNIX_SOCKET_PATH_BYTES:
            plugin_dir = "/p"
    return PluginConfig(
        resource_name=draw(_resource_names),
        plugin_dir=plugin_dir,
        socket_name=socket_name,
        kubelet_socket_name=kubelet_socket_name,
        register_timeout_s=draw(_timeouts),
        device_list_strategy=draw(st.sampled_from(["envvar", "volume-mounts", "cdi"])),
    )


@st.composite
def _model_overrides(draw: st.DrawFn) -> tuple[tuple[str, int], ...]:
    models = draw(
        st.lists(
            _names,
            unique_by=lambda model: model.lower(),
            max_size=4,
        )
    )
    return tuple((model, draw(st.integers(1, 48))) for model in models)


_serve = st.one_of(
    st.just("all"),
    st.lists(
        st.one_of(st.integers(min_value=0, max_value=2**63 - 1), _uuids),
        min_size=1,
        max_size=4,
        unique=True,
    ).map(tuple),
)
_limits = st.one_of(st.sampled_from(["proportional", "none"]), st.integers(1, 100))
_memory_limits: st.SearchStrategy[LimitPolicy] = st.one_of(
    st.sampled_from(["proportional", "none"]), _int64
)
_programs = st.one_of(_plain_names, _absolute_paths)
_capabilities = st.tuples(st.integers(1, 99), st.integers(0, 99))
_simulated_gpus = st.lists(
    st.builds(
        SimulatedGpu,
        uuid=_uuids,
        model=_names,
        memory_mib=_int64,
        compute_capability=_capabilities,
        numa_node=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
        mig_enabled=st.booleans(),
    ),
    min_size=1,
    max_size=4,
    unique_by=lambda gpu: gpu.uuid,
).map(tuple)
_simulated = st.one_of(
    st.builds(
        SimulatedConfig,
        count=st.integers(1, 64),
        model=_names,
        memory_mib=_int64,
        compute_capability=_capabilities,
    ),
    st.builds(SimulatedConfig, gpus=_simulated_gpus),
)


def _confinements() -> st.SearchStrategy[dict[str, st.SearchStrategy[object]]]:
    """The valid combinations of mps.confinement with the keys it decides over."""
    enforced = st.fixed_dictionaries(
        {
            "confinement": st.just(st.just("enforced")),
            "max_vgpus_per_container": st.integers(1, 48).map(st.just),
        }
    )
    cooperative = st.fixed_dictionaries(
        {
            "confinement": st.just(st.just("cooperative")),
            "daemon_thread_limit": st.just(_limits),
            "daemon_memory_limit": st.just(_memory_limits),
        }
    )
    return st.one_of(enforced, cooperative)


valid_configs = st.builds(
    Config,
    agent=st.builds(
        AgentConfig,
        log_level=st.sampled_from(["debug", "info", "warning", "error"]),
        state_dir=_absolute_paths,
    ),
    plugin=_plugins(),
    gpus=st.builds(
        GpusConfig,
        backend=st.sampled_from(["nvml", "simulated"]),
        replicas_per_gpu=st.integers(1, 48),
        replicas_by_model=_model_overrides(),
        serve=_serve,
        compute_mode=st.sampled_from(["exclusive_process", "default", "unchanged"]),
        restore_compute_mode=st.booleans(),
        allow_unconfined_sharing=st.booleans(),
    ),
    mps=_confinements().flatmap(
        lambda confinement: st.builds(
            MpsConfig,
            **confinement,
            enabled=st.booleans(),
            manager=st.sampled_from(["direct", "systemd", "external"]),
            pipe_root=_own_directories,
            log_root=_own_directories,
            control_binary=_programs,
            multi_user=st.sampled_from(["auto", "on", "off"]),
            container_pipe_dir=_container_directories,
            thread_limit=_limits,
            memory_limit=_memory_limits,
            memory_headroom_mib=st.integers(0, 2**63 - 1),
            share_host_shm=st.booleans(),
            control_timeout_s=_timeouts,
        )
    ),
    health=st.builds(
        HealthConfig,
        xid_enabled=st.booleans(),
        ignored_xids=st.lists(st.integers(0, 65535), unique=True, max_size=8).map(tuple),
        mps_liveness_enabled=st.booleans(),
        mps_check_interval_s=_intervals,
        recovery_quiet_period_s=st.one_of(st.just(0.0), _seconds),
        poll_interval_s=_intervals,
    ),
    isolation=st.builds(
        IsolationConfig,
        clients_per_vgpu=st.integers(1, 48),
        excess_clients=st.sampled_from(["end", "report"]),
        check_interval_s=_intervals,
    ),
    simulated=_simulated,
    source=st.text(max_size=30),
)


@pytest.mark.slow
@PROPERTY_SETTINGS
@given(valid_configs)
def test_to_toml_round_trips_valid_configs(config: Config) -> None:
    """parse(to_toml(c)) == c for every valid config."""
    assert parse(to_toml(config), config.source) == config


# ------------------------------------------------------------------ mutated valid configs


def _type_of(value: Toml) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "int" if isinstance(value, int) else "float"
    if isinstance(value, datetime.datetime):
        return "datetime"
    return type(value).__name__


def _nodes(value: Toml, path: tuple[Union[str, int], ...]) -> list[tuple[Union[str, int], ...]]:
    """Every replaceable position below ``value`` (its own path included, unless the root)."""
    found = [path] if path else []
    if isinstance(value, dict):
        for key, item in value.items():
            found.extend(_nodes(item, (*path, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(_nodes(item, (*path, index)))
    return found


def _child(node: Toml, step: Union[str, int]) -> Toml:
    if isinstance(node, list) and isinstance(step, int):
        return node[step]
    if isinstance(node, dict) and isinstance(step, str):
        return node[step]
    raise AssertionError(f"no {step!r} in {node!r}")


def _replace(document: Toml, path: tuple[Union[str, int], ...], new: Toml) -> None:
    parent = document
    for step in path[:-1]:
        parent = _child(parent, step)
    last = path[-1]
    if isinstance(parent, list):
        assert isinstance(last, int)
        parent[last] = new
    else:
        assert isinstance(parent, dict)
        assert isinstance(last, str)
        parent[last] = new


def _values_of_another_type(kind: str) -> st.SearchStrategy[Toml]:
    return _values.filter(lambda value: _type_of(value) != kind)


#: Keys mutated in each valid config. Eight keys in each of half as many configs check as
#: many mutated documents as four in each of 200 did, for half the cost: drawing a valid
#: config is the dear part.
MUTATIONS_PER_CONFIG = 8


@pytest.mark.slow
@settings(PROPERTY_SETTINGS, max_examples=100)
@given(valid_configs, st.data())
def test_mutated_valid_configs_blame_the_mutated_key(config: Config, data: st.DataObject) -> None:
    """Values swapped for another type, one at a time: a Config, or an error naming that key."""
    rendered = to_toml(config)
    nodes = _nodes(tomllib.loads(rendered), ())
    # A seeded sample spreads over all keys; sampled_from would favour the first (version).
    chooser = data.draw(st.randoms(use_true_random=False), label="chooser")
    for path in chooser.sample(nodes, min(MUTATIONS_PER_CONFIG, len(nodes))):
        document: dict[str, Toml] = tomllib.loads(rendered)
        original: Toml = document
        for step in path:
            original = _child(original, step)
        new = data.draw(
            _values_of_another_type(_type_of(original)),
            label=f"new value at {path}",
        )
        _replace(document, path, new)
        outcome = _assert_config_or_config_error(write_toml(document))
        if isinstance(outcome, ConfigError):
            # Errors in an array or model table may name an element; the key above is certain.
            key_path = ".".join(str(step) for step in path[:2])
            assert str(outcome).startswith(f"{SOURCE}: {key_path}"), (path, str(outcome))
