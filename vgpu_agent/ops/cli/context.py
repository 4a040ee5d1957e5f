"""What the commands share: the options given before the command, the effective config they
name (with a command's overrides), and the GPUs a command names.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import click

from vgpu_agent.config.parse import load_effective
from vgpu_agent.config.schema import Config
from vgpu_agent.model.errors import VgpuError
from vgpu_agent.model.gpu import Gpu

EXIT_ERROR = 1


@dataclasses.dataclass
class RootOptions:
    """The options given before the command (``vgpu-agent --config PATH ...``)."""

    config_path: Optional[str]


def load_config(ctx: click.Context) -> Config:
    """The effective config of the file the root's ``--config`` names (or the default)."""
    options: RootOptions = ctx.find_root().obj
    return load_effective(options.config_path, os.environ)


def with_overrides(
    config: Config, *, simulate: Optional[int] = None, plugin_dir: Optional[str] = None
) -> Config:
    """The config with command-line overrides applied."""
    if simulate is not None:
        config = dataclasses.replace(
            config,
            gpus=dataclasses.replace(config.gpus, backend="simulated", serve="all"),
            simulated=dataclasses.replace(config.simulated, count=simulate, gpus=()),
        )
    if plugin_dir is not None:
        config = dataclasses.replace(
            config,
            plugin=dataclasses.replace(config.plugin, plugin_dir=os.path.abspath(plugin_dir)),
        )
    return config


def pick_gpus(gpus: list[Gpu], refs: tuple[str, ...], what: str) -> list[Gpu]:
    """The GPUs named by UUID or index in ``refs``; VgpuError naming any that is not there."""
    chosen = [gpu for gpu in gpus if gpu.uuid in refs or str(gpu.index) in refs]
    missing = set(refs) - {g.uuid for g in chosen} - {str(g.index) for g in chosen}
    if missing:
        raise VgpuError(f"no such {what}: {', '.join(sorted(missing))}")
    return chosen
