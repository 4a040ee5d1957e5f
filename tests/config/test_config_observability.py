"""The [attribution], [metrics] and [labels] config tables: defaults, accepted values, errors
that name the key path and the value, and rendering back to TOML."""

from __future__ import annotations

import pytest

from vgpu_agent.config.parse import parse
from vgpu_agent.config.render import to_toml
from vgpu_agent.config.schema import AttributionConfig, Config, LabelsConfig, MetricsConfig
from vgpu_agent.config.values import split_listen_address
from vgpu_agent.model.errors import ConfigError

SOURCE = "/etc/vgpu/config.toml"


def test_observability_is_off_by_default() -> None:
    """Metrics and labels are off unless a key turns them on; metrics listen on loopback."""
    config = parse("", SOURCE)
    assert config.metrics == MetricsConfig(False, "127.0.0.1:9402", "")
    assert config.labels == LabelsConfig(False, "/etc/kubernetes/node-feature-discovery/features.d")
    assert config.attribution == AttributionConfig(
        "/var/lib/kubelet/pod-resources/kubelet.sock", 10.0
    )


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("127.0.0.1:9402", "127.0.0.1", 9402),
        ("0.0.0.0:80", "0.0.0.0", 80),
        ("[::1]:9402", "::1", 9402),
        ("[::]:0", "::", 0),
        ("localhost:65535", "localhost", 65535),
        ("node-1.example.com:9402", "node-1.example.com", 9402),
    ],
    ids=["loopback", "any", "ipv6-loopback", "ipv6-any-free-port", "hostname", "fqdn"],
)
def test_listen_addresses_are_accepted_and_split(address: str, host: str, port: int) -> None:
    """IPv4, bracketed IPv6 and host names with a port 0..65535 are accepted."""
    config = parse(f'[metrics]\nenabled = true\nlisten_address = "{address}"', SOURCE)
    assert config.metrics.enabled
    assert split_listen_address(config.metrics.listen_address) == (host, port)


def test_an_empty_listen_address_with_a_textfile_serves_no_http() -> None:
    """listen_address = "" turns the HTTP endpoint off; the textfile alone is written."""
    config = parse(
        '[metrics]\nenabled = true\nlisten_address = ""\n'
        'textfile_path = "/var/lib/node_exporter/textfile_collector/vgpu.prom"',
        SOURCE,
    )
    assert config.metrics.listen_address == ""
    assert config.metrics.textfile_path.endswith("vgpu.prom")


@pytest.mark.parametrize(
    ("document", "key_path", "reason"),
    [
        ('metrics.listen_address = "9402"', "metrics.listen_address", "no host and port"),
        ('metrics.listen_address = ":9402"', "metrics.listen_address", "no host and port"),
        ('metrics.listen_address = "localhost:http"', "metrics.listen_address", "bad port"),
        ('metrics.listen_address = "localhost:70000"', "metrics.listen_address", "bad port"),
        ('metrics.listen_address = "::1:9402"', "metrics.listen_address", "needs [brackets]"),
        ('metrics.listen_address = "[zz]:9402"', "metrics.listen_address", "bad IPv6"),
        ('metrics.listen_address = "a b:1"', "metrics.listen_address", "bad host"),
        ("metrics.listen_address = 9402", "metrics.listen_address", "(an integer)"),
        ('metrics.enabled = "yes"', "metrics.enabled", "true or false"),
        ('metrics.textfile_path = "vgpu.prom"', "metrics.textfile_path", "not absolute"),
        ('metrics.textfile_path = "/tmp/vgpu.txt"', "metrics.textfile_path", "*.prom"),
        ('metrics.textfile_path = "/tmp/.prom"', "metrics.textfile_path", "*.prom"),
        ("metrics.port = 1", "metrics.port", "unknown key"),
        ('labels.features_dir = "features.d"', "labels.features_dir", "not absolute"),
        ("labels.enabled = 1", "labels.enabled", "true or false"),
        ('attribution.pod_resources_socket = "k.sock"', "attribution.pod_resources_socket", "abs"),
        ("attribution.refresh_interval_s = 0", "attribution.refresh_interval_s", "out of range"),
    ],
    ids=[
        "port-only",
        "no-host",
        "named-port",
        "port-too-big",
        "ipv6-without-brackets",
        "bad-ipv6",
        "bad-host",
        "integer",
        "enabled-string",
        "textfile-relative",
        "textfile-not-prom",
        "textfile-dotprom",
        "unknown-key",
        "features-relative",
        "labels-enabled-int",
        "socket-relative",
        "refresh-zero",
    ],
)
def test_bad_observability_values_name_the_key(document: str, key_path: str, reason: str) -> None:
    """Each bad value is one error naming the file, the key path and what is wrong."""
    with pytest.raises(ConfigError) as caught:
        parse(document, SOURCE)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: {key_path}:"), message
    assert reason in message


def test_observability_tables_render_back() -> None:
    """to_toml writes the three tables so parse reads back the same config."""
    config = parse(
        '[metrics]\nenabled = true\nlisten_address = "[::1]:9999"\n'
        'textfile_path = "/run/vgpu.prom"\n'
        '[labels]\nenabled = true\nfeatures_dir = "/tmp/features.d"\n'
        '[attribution]\npod_resources_socket = "/tmp/pr.sock"\nrefresh_interval_s = 2.5\n',
        SOURCE,
    )
    again = parse(to_toml(config), SOURCE)
    assert again == config
    assert again != Config(source=SOURCE)
