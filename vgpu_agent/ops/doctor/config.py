"""The config check: whether the file the agent would read is valid (the checks after it
use the built-in defaults when it is not).
"""

from __future__ import annotations

from typing import Mapping, Optional

from vgpu_agent.config.parse import load_effective, resolve_path
from vgpu_agent.config.schema import Config
from vgpu_agent.model.errors import ConfigError
from vgpu_agent.ops.doctor.report import Report


def check_config(report: Report, option: Optional[str], environ: Mapping[str, str]) -> Config:
    """The config check; returns the config the checks after it use (the defaults if it is bad)."""
    path = resolve_path(option, environ)
    try:
        config = load_effective(option, environ)
    except ConfigError as exc:
        report.fail(
            "config",
            f"{exc}; fix it (`vgpu-agent config check` shows the same error); the checks "
            "below use the built-in defaults",
        )
        return Config()
    if config.source == Config().source:
        report.ok("config", f"no file at {path}; the agent runs with the built-in defaults")
    else:
        report.ok("config", f"{path} is valid")
    return config
