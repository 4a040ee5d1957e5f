"""The [isolation] table (a pod's MPS clients held to its allowance): defaults, accepted
values, errors that name the key path and the value, rendering back to TOML, and the pure
judgements status makes from it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vgpu_agent.config.isolation import (
    client_allowance,
    client_policy_line,
    clients_enforced,
    excess_client_action,
)
from vgpu_agent.config.parse import parse
from vgpu_agent.config.render import to_toml
from vgpu_agent.config.schema import Config, IsolationConfig, MpsConfig
from vgpu_agent.model.errors import ConfigError

SOURCE = "/etc/vgpu/config.toml"


def test_isolation_defaults_end_clients_beyond_one_per_vgpu() -> None:
    """By default a pod may run one MPS client per vGPU; the rest are ended, checked every
    second, under the default enforced confinement."""
    config = parse("", SOURCE)
    assert config.isolation == IsolationConfig(1, "end", 1.0)
    assert clients_enforced(config)
    assert client_allowance(config, 3) == 3


def test_isolation_values_are_read() -> None:
    """Every key of the table is read, and rendered back to the same config."""
    config = parse(
        '[isolation]\nclients_per_vgpu = 4\nexcess_clients = "report"\ncheck_interval_s = 0.5\n',
        SOURCE,
    )
    assert config.isolation == IsolationConfig(4, "report", 0.5)
    assert "[isolation]\nclients_per_vgpu = 4\n" in to_toml(config)
    assert parse(to_toml(config), SOURCE) == config


@pytest.mark.parametrize(
    ("document", "key_path", "reason"),
    [
        ("isolation.clients_per_vgpu = 0", "isolation.clients_per_vgpu", "out of range"),
        ("isolation.clients_per_vgpu = 49", "isolation.clients_per_vgpu", "out of range"),
        ('isolation.clients_per_vgpu = "2"', "isolation.clients_per_vgpu", "a string"),
        ('isolation.excess_clients = "kill"', "isolation.excess_clients", '"end", "report"'),
        ("isolation.excess_clients = true", "isolation.excess_clients", '"end", "report"'),
        ("isolation.check_interval_s = 0", "isolation.check_interval_s", "out of range"),
        ("isolation.check_interval_s = 0.01", "isolation.check_interval_s", "too short"),
        ("isolation.interval = 1", "isolation.interval", "unknown key"),
    ],
    ids=[
        "no-clients",
        "more-than-a-gpu-serves",
        "string-count",
        "unknown-action",
        "bool-action",
        "zero-interval",
        "busy-loop",
        "unknown-key",
    ],
)
def test_bad_isolation_values_name_the_key(document: str, key_path: str, reason: str) -> None:
    """A bad value is a ConfigError naming the file, the key path and what is wrong."""
    with pytest.raises(ConfigError) as caught:
        parse(document, SOURCE)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: {key_path}"), message
    assert reason in message, message


def _config(confinement: str = "enforced", enabled: bool = True, **isolation: object) -> Config:
    return Config(
        mps=MpsConfig(enabled=enabled, confinement=confinement),  # type: ignore[arg-type]
        isolation=replace(IsolationConfig(), **isolation),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("config", "line"),
    [
        (
            _config(),
            "a pod may run 1 MPS client process per vGPU it holds on a GPU; the newest beyond "
            "that are ended (terminate_client); checked every 1 s",
        ),
        (
            _config(clients_per_vgpu=4, excess_clients="report", check_interval_s=0.5),
            "a pod may run 4 MPS client processes per vGPU it holds on a GPU; those beyond that "
            'are only reported (isolation.excess_clients = "report"); checked every 0.5 s',
        ),
        (
            _config("cooperative"),
            "off: in cooperative confinement a pod's processes are not held to its share "
            '(mps.confinement = "cooperative")',
        ),
        (_config(enabled=False), "off: MPS is off (mps.enabled = false)"),
    ],
    ids=["default", "report", "cooperative", "no-mps"],
)
def test_status_says_what_the_client_policy_does(config: Config, line: str) -> None:
    """The policy's one line for status: what a pod may run and what happens beyond it."""
    assert client_policy_line(config) == line
    assert clients_enforced(config) == line.startswith("a pod")


@pytest.mark.parametrize(
    ("config", "clients", "vgpus", "action"),
    [
        (_config(), 3, 1, "the agent ends its newest 2 (isolation.clients_per_vgpu = 1 lets "
         "it run 1)"),
        (_config(clients_per_vgpu=2), 3, 2, "accepted: isolation.clients_per_vgpu = 2 lets it "
         "run 4"),
        (_config(excess_clients="report"), 4, 1, 'only reported (isolation.excess_clients = '
         '"report"): 3 beyond the 1 isolation.clients_per_vgpu = 1 lets it run'),
        (_config("cooperative"), 4, 1, "not acted on: the agent holds a pod's processes to its "
         'share only under enforced confinement (mps.confinement = "enforced")'),
    ],
    ids=["end", "accepted", "report", "cooperative"],
)  # fmt: skip
def test_a_container_over_its_share_is_told_what_happens(
    config: Config, clients: int, vgpus: int, action: str
) -> None:
    """The end of status's warning about a container with more clients than vGPUs."""
    assert excess_client_action(config, clients, vgpus) == action
