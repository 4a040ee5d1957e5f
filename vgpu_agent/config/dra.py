"""The ``[dra]`` table: whether the node offers its GPUs through Dynamic Resource Allocation
instead of the device plugin, and the DRA kubelet plugin's names and directories.

Self-contained on purpose: :class:`DraConfig` and :func:`parse_dra` (raw TOML table -> typed
config, every error naming the file, the key path and the bad value like the rest of the
schema) and :func:`dra_toml_pairs` (the other way) are all the schema needs to hook the
table in. None of these keys can change while the agent runs (:data:`DRA_RESTART_ONLY_KEYS`):
the frontend, the sockets and the CDI directory are chosen once, at start.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import NoReturn, Optional

from vgpu_agent.host.sockets import MAX_UNIX_SOCKET_PATH_BYTES
from vgpu_agent.model.errors import ConfigError

#: The kubelet's plugin watcher directory: a registration socket here is found and dialled.
DEFAULT_REGISTRY_DIR = "/var/lib/kubelet/plugins_registry"
#: Where DRA plugins conventionally keep their service socket, one directory per driver.
DEFAULT_PLUGINS_DIR = "/var/lib/kubelet/plugins"
#: A CDI spec directory every CDI-enabled runtime reads (the other is /etc/cdi).
DEFAULT_CDI_DIR = "/var/run/cdi"
#: The DRA plugin's service socket name in ``<plugins_dir>/<driver>``.
DRA_SOCKET_NAME = "dra.sock"
#: ResourceSlice.spec.driver is a DNS subdomain of at most this many characters.
MAX_DRIVER_NAME_LENGTH = 63
#: A node name is a DNS subdomain.
MAX_NODE_NAME_LENGTH = 253

_DNS_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_SHOW_LIMIT = 60


@dataclass(frozen=True)
class DraConfig:
    """The DRA kubelet plugin. ``[dra]``"""

    #: True: the node's GPUs are offered through DRA (ResourceSlices, NodePrepareResources)
    #: and the device plugin is not served; False: the device plugin (never both).
    enabled: bool = False
    #: The DRA driver name: ResourceSlice.spec.driver, the DeviceClass selector, the CDI
    #: vendor and the socket names.
    driver_name: str = "vgpu.eks.amazonaws.com"
    #: The Kubernetes node this agent runs on; "" takes $NODE_NAME, else the host name.
    node_name: str = ""
    #: Credentials for the API server (ResourceSlices, ResourceClaims): the kubelet's own,
    #: so the Node authorizer limits the agent to what its node may do.
    kubeconfig: str = "/var/lib/kubelet/kubeconfig"
    #: The kubelet's plugin registration directory.
    registry_dir: str = DEFAULT_REGISTRY_DIR
    #: The parent of the plugin's own directory (``<plugins_dir>/<driver_name>/dra.sock``).
    plugins_dir: str = DEFAULT_PLUGINS_DIR
    #: Where the per-claim CDI spec files are written.
    cdi_dir: str = DEFAULT_CDI_DIR
    #: Seconds between republishing the node's ResourceSlice unchanged, so a slice deleted
    #: behind the agent's back (a restarting kubelet wipes them) comes back.
    resync_interval_s: float = 60.0

    @property
    def registration_socket_path(self) -> str:
        """The registration socket the kubelet's plugin watcher finds."""
        return os.path.join(self.registry_dir, f"{self.driver_name}-reg.sock")

    @property
    def plugin_socket_path(self) -> str:
        """The DRAPlugin service socket (the endpoint GetInfo names)."""
        return os.path.join(self.plugins_dir, self.driver_name, DRA_SOCKET_NAME)

    @property
    def cdi_kind(self) -> str:
        """The CDI kind of the per-claim specs, ``<driver>/vgpu``."""
        return f"{self.driver_name}/vgpu"


#: Every key of the table; none may change while the agent runs.
DRA_KEYS = tuple(f.name for f in fields(DraConfig))
DRA_RESTART_ONLY_KEYS = tuple(("dra", key) for key in DRA_KEYS)


def resolve_node_name(dra: DraConfig, environ: Mapping[str, str], hostname: str) -> str:
    """The node name to publish under: ``dra.node_name``, else ``$NODE_NAME``, else the
    host name (lower-cased, as the kubelet names its node by default)."""
    if dra.node_name:
        return dra.node_name
    from_env = environ.get("NODE_NAME", "").strip()
    if from_env:
        return from_env
    return hostname.lower()


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 3] + "..."


def _type_name(value: object) -> str:
    names: tuple[tuple[type, str], ...] = (
        (bool, "a boolean"),  # before int: bool is an int subclass
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (list, "an array"),
        (dict, "a table"),
    )
    for kind, name in names:
        if isinstance(value, kind):
            return name
    return f"a {type(value).__name__}"


class _Key:
    """One raw value of the table and where it came from, to fail with."""

    def __init__(self, source: str, path: str, raw: object) -> None:
        self.source = source
        self.path = path
        self.raw = raw

    def fail(
        self, expected: str, reason: Optional[str] = None, *, wrong_type: bool = False
    ) -> NoReturn:
        shown = _show(self.raw)
        if wrong_type:
            shown += f" ({_type_name(self.raw)})"
        because = f": {reason}" if reason else ""
        raise ConfigError(
            f"{self.source}: {self.path}: invalid value {shown}{because}; expected {expected}"
        )

    def string(self, expected: str) -> str:
        if not isinstance(self.raw, str):
            self.fail(expected, wrong_type=True)
        if "\x00" in self.raw:
            self.fail(expected, "contains a NUL character")
        return self.raw


def _bool(key: _Key) -> bool:
    if not isinstance(key.raw, bool):
        key.fail("true or false", wrong_type=True)
    return key.raw


def _driver_name(key: _Key) -> str:
    expected = (
        "a DNS subdomain of lower-case letters, digits, '-' and '.' of at most "
        f"{MAX_DRIVER_NAME_LENGTH} characters, in a domain you own (e.g. "
        "'vgpu.eks.amazonaws.com')"
    )
    name = key.string(expected)
    if len(name) > MAX_DRIVER_NAME_LENGTH:
        key.fail(expected, "too long")
    if not _DNS_SUBDOMAIN_RE.fullmatch(name):
        key.fail(expected, "not a DNS subdomain")
    if "." not in name:
        key.fail(expected, "not qualified by a domain")
    return name


def _node_name(key: _Key) -> str:
    expected = 'the Kubernetes node name (a DNS subdomain), or "" for $NODE_NAME or the host name'
    name = key.string(expected)
    if name and (len(name) > MAX_NODE_NAME_LENGTH or not _DNS_SUBDOMAIN_RE.fullmatch(name)):
        key.fail(expected, "not a DNS subdomain")
    return name


def _absolute_path(key: _Key) -> str:
    expected = "an absolute path (starting with '/')"
    path = key.string(expected)
    if not path.startswith("/"):
        key.fail(expected, "not absolute")
    return path


def _seconds(key: _Key) -> float:
    expected = "a number of seconds > 0"
    raw = key.raw
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        key.fail(expected, wrong_type=True)
    if isinstance(raw, int) and abs(raw) > 2**63 - 1:
        key.fail(expected, "out of range (beyond the 64-bit limit)")
    seconds = float(raw)
    if not math.isfinite(seconds):
        key.fail(expected, "not a finite number")
    if seconds <= 0:
        key.fail(expected, "out of range")
    return seconds


_CONVERTERS = {
    "enabled": _bool,
    "driver_name": _driver_name,
    "node_name": _node_name,
    "kubeconfig": _absolute_path,
    "registry_dir": _absolute_path,
    "plugins_dir": _absolute_path,
    "cdi_dir": _absolute_path,
    "resync_interval_s": _seconds,
}


def parse_dra(raw: object, source: str, path: str = "dra") -> DraConfig:
    """The ``[dra]`` table ``raw`` (a TOML table, or None when the file has none) read
    from ``source``; ConfigError naming the key path and the bad value."""
    if raw is None:
        return DraConfig()
    if not isinstance(raw, dict):
        _Key(source, path, raw).fail("a table", wrong_type=True)
    for key in raw:
        if key not in DRA_KEYS:
            raise ConfigError(
                f"{source}: {path}.{key}: unknown key; the keys allowed in [dra] are: "
                + ", ".join(DRA_KEYS)
            )
    values: dict[str, object] = {}
    for name in DRA_KEYS:  # in field order, so the same document gives the same message
        if name in raw:
            values[name] = _CONVERTERS[name](_Key(source, f"{path}.{name}", raw[name]))
    dra = DraConfig(**values)  # type: ignore[arg-type]  # each converter returns its field's type
    for key, socket_path in (
        ("registry_dir", dra.registration_socket_path),
        ("plugins_dir", dra.plugin_socket_path),
    ):
        if len(os.fsencode(socket_path)) > MAX_UNIX_SOCKET_PATH_BYTES:
            blamed = key if key in raw else "driver_name"
            _Key(source, f"{path}.{blamed}", getattr(dra, blamed)).fail(
                "a directory and driver name whose socket path fits a unix socket "
                f"(at most {MAX_UNIX_SOCKET_PATH_BYTES} bytes)",
                f"{socket_path!r} is too long",
            )
    return dra


def dra_toml_pairs(dra: DraConfig) -> list[tuple[str, object]]:
    """The table's keys and values in order, for rendering the effective config."""
    return [(name, getattr(dra, name)) for name in DRA_KEYS]
