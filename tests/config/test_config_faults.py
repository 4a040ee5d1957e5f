"""The [faults] config table: defaults, accepted values, errors that name the key path and
the value, rendering back to TOML, and what a reload of it does."""

from __future__ import annotations

import pytest

from tests.builders import gpu_uuid, make_gpu
from vgpu_agent.config.parse import parse
from vgpu_agent.config.reload import UseFaultsConfig, plan_reload
from vgpu_agent.config.render import to_toml
from vgpu_agent.config.schema import Config, FaultsConfig
from vgpu_agent.model.errors import ConfigError

SOURCE = "/etc/vgpu/config.toml"


def test_faults_defaults() -> None:
    """Three faults surely the pod's (its clients the only ones torn down) within 10
    minutes hold it for an hour."""
    assert parse("", SOURCE).faults == FaultsConfig(3, 600.0, "hold", 3600.0, "sole-client")


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ("[faults]\nrepeat_limit = 1", FaultsConfig(repeat_limit=1)),
        ("[faults]\nwindow_s = 0.5", FaultsConfig(window_s=0.5)),
        ("[faults]\nwindow_s = 604800", FaultsConfig(window_s=604800.0)),
        ('[faults]\noffender_action = "report"', FaultsConfig(offender_action="report")),
        ("[faults]\nhold_s = 0", FaultsConfig(hold_s=0.0)),
        ("faults.hold_s = 60", FaultsConfig(hold_s=60.0)),
        ('faults.offender_evidence = "named"', FaultsConfig(offender_evidence="named")),
        (
            'faults.offender_evidence = "sole-client"',
            FaultsConfig(offender_evidence="sole-client"),
        ),
    ],
    ids=[
        "limit-1",
        "short-window",
        "week-window",
        "report",
        "until-gone",
        "dotted-key",
        "named",
        "sole-client",
    ],
)
def test_faults_values(document: str, expected: FaultsConfig) -> None:
    """Each allowed value parses to the typed value."""
    assert parse(document, SOURCE).faults == expected


@pytest.mark.parametrize(
    ("document", "key_path", "reason"),
    [
        ("faults.repeat_limit = 0", "faults.repeat_limit", "an integer >= 1"),
        ("faults.repeat_limit = 2.5", "faults.repeat_limit", "an integer >= 1"),
        ("faults.window_s = 0", "faults.window_s", "out of range"),
        ("faults.window_s = 604801", "faults.window_s", "too long"),
        ('faults.window_s = "10m"', "faults.window_s", "a number of seconds"),
        ('faults.offender_action = "kill"', "faults.offender_action", '"hold", "report"'),
        ("faults.hold_s = -1", "faults.hold_s", "0 means until the pod is gone"),
        ("faults.limit = 3", "faults.limit", "unknown key"),
        ('faults.offender_evidence = "xid"', "faults.offender_evidence", '"sole-client", "named"'),
        ("faults.offender_evidence = 1", "faults.offender_evidence", '"sole-client", "named"'),
    ],
    ids=[
        "limit-zero",
        "limit-float",
        "window-zero",
        "window-too-long",
        "window-string",
        "unknown-action",
        "hold-negative",
        "unknown-key",
        "unknown-evidence",
        "evidence-not-text",
    ],
)
def test_bad_faults_values_name_the_key(document: str, key_path: str, reason: str) -> None:
    """Each bad value is one error naming the file, the key path and what is allowed."""
    with pytest.raises(ConfigError) as caught:
        parse(document, SOURCE)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: {key_path}:"), message
    assert reason in message


def test_faults_table_renders_back() -> None:
    """to_toml writes [faults] so parse reads back the same config."""
    config = parse(
        '[faults]\nrepeat_limit = 2\nwindow_s = 30.5\noffender_action = "report"\nhold_s = 0\n'
        'offender_evidence = "named"\n',
        SOURCE,
    )
    assert parse(to_toml(config), SOURCE) == config
    assert config != Config(source=SOURCE)


def test_a_reload_applies_new_faults_settings() -> None:
    """A changed [faults] table is taken on by the running agent (no restart)."""
    running = parse("", SOURCE)
    new = parse('[faults]\noffender_action = "report"\n', SOURCE)
    gpus = [make_gpu(0)]
    assert plan_reload(running, new, gpus, {gpu_uuid(0): 10}) == [
        UseFaultsConfig(FaultsConfig(offender_action="report"))
    ]
    assert plan_reload(running, running, gpus, {gpu_uuid(0): 10}) == []
