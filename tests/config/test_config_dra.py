"""The [dra] table: defaults, every bad value named by its key path, rendering back, and
that a reload cannot change it."""

from __future__ import annotations

import pytest

from tests.builders import make_gpu
from vgpu_agent.config.dra import DraConfig, resolve_node_name
from vgpu_agent.config.parse import parse
from vgpu_agent.config.reload import KeepRunningConfig, plan_reload
from vgpu_agent.config.render import to_toml
from vgpu_agent.config.schema import Config
from vgpu_agent.model.errors import ConfigError


def test_dra_is_off_by_default_with_the_conventional_paths() -> None:
    """Without [dra] the device plugin serves; the DRA paths are the kubelet's usual ones."""
    dra = parse("").dra
    assert dra == DraConfig()
    assert dra.enabled is False
    assert dra.registration_socket_path == (
        "/var/lib/kubelet/plugins_registry/vgpu.eks.amazonaws.com-reg.sock"
    )
    assert dra.plugin_socket_path == "/var/lib/kubelet/plugins/vgpu.eks.amazonaws.com/dra.sock"
    assert dra.cdi_kind == "vgpu.eks.amazonaws.com/vgpu"


def test_a_full_dra_table_parses_and_renders_back() -> None:
    """Every key is read, and the effective config renders to TOML that reads back equal."""
    config = parse(
        "[dra]\n"
        "enabled = true\n"
        'driver_name = "vgpu.example.com"\n'
        'node_name = "ip-10-0-0-1.ec2.internal"\n'
        'kubeconfig = "/etc/vgpu/kc"\n'
        'registry_dir = "/k/reg"\n'
        'plugins_dir = "/k/plugins"\n'
        'cdi_dir = "/etc/cdi"\n'
        "resync_interval_s = 30\n",
        "c.toml",
    )
    assert config.dra == DraConfig(
        enabled=True,
        driver_name="vgpu.example.com",
        node_name="ip-10-0-0-1.ec2.internal",
        kubeconfig="/etc/vgpu/kc",
        registry_dir="/k/reg",
        plugins_dir="/k/plugins",
        cdi_dir="/etc/cdi",
        resync_interval_s=30.0,
    )
    assert parse(to_toml(config), "c.toml") == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dra = 1", "c.toml: dra: invalid value 1 (an integer); expected a table"),
        ("[dra]\nenabled = 1", "c.toml: dra.enabled: invalid value 1 (an integer); expected true"),
        ("[dra]\nfrontend = 'dra'", "c.toml: dra.frontend: unknown key; the keys allowed in [dra]"),
        ('[dra]\ndriver_name = "Vgpu.example.com"', "dra.driver_name: invalid value 'Vgpu"),
        ('[dra]\ndriver_name = "vgpu"', "not qualified by a domain"),
        ('[dra]\ndriver_name = "' + "a" * 60 + '.com"', "dra.driver_name: invalid value"),
        ('[dra]\nnode_name = "Node_1"', "dra.node_name: invalid value 'Node_1'"),
        ('[dra]\ncdi_dir = "cdi"', "dra.cdi_dir: invalid value 'cdi': not absolute"),
        ("[dra]\nkubeconfig = 3", "dra.kubeconfig: invalid value 3 (an integer)"),
        ("[dra]\nresync_interval_s = 0", "dra.resync_interval_s: invalid value 0: out of range"),
        ("[dra]\nresync_interval_s = nan", "not a finite number"),
        ('[dra]\nregistry_dir = "/' + "r" * 90 + '"', "dra.registry_dir: invalid value"),
    ],
    ids=[
        "not-a-table",
        "enabled-not-bool",
        "unknown-key",
        "driver-upper-case",
        "driver-no-domain",
        "driver-too-long",
        "node-not-dns",
        "cdi-relative",
        "kubeconfig-not-string",
        "resync-zero",
        "resync-nan",
        "socket-path-too-long",
    ],
)
def test_bad_dra_values_name_their_key_path(text: str, message: str) -> None:
    """Every bad [dra] value is a ConfigError naming the file, the key path and the value."""
    with pytest.raises(ConfigError) as error:
        parse(text, "c.toml")
    assert message in str(error.value)


def test_a_reload_cannot_switch_the_frontend() -> None:
    """dra.enabled (and every other [dra] key) takes a restart: the reload is refused."""
    running = parse('[gpus]\nbackend = "simulated"\n')
    new = parse('[gpus]\nbackend = "simulated"\n[dra]\nenabled = true\n')
    (action,) = plan_reload(running, new, [make_gpu(0)], {})
    assert isinstance(action, KeepRunningConfig)
    assert "restart needed: dra.enabled" in action.why


@pytest.mark.parametrize(
    ("configured", "environ", "expected"),
    [("n1", {"NODE_NAME": "n2"}, "n1"), ("", {"NODE_NAME": "n2"}, "n2"), ("", {}, "host-a")],
    ids=["config", "env", "hostname"],
)
def test_the_node_name_comes_from_config_env_or_host(
    configured: str, environ: dict[str, str], expected: str
) -> None:
    """dra.node_name wins, then $NODE_NAME, then the (lower-cased) host name."""
    assert resolve_node_name(DraConfig(node_name=configured), environ, "Host-A") == expected


def test_config_default_has_dra_off() -> None:
    """The default Config serves the device plugin."""
    assert Config().dra.enabled is False
