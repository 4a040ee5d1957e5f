"""`vgpu-agent config`: check and show the configuration."""

from __future__ import annotations

from typing import Optional

import click

from vgpu_agent.config.parse import load
from vgpu_agent.config.render import to_toml
from vgpu_agent.ops.cli.context import load_config


@click.group("config")
def config_group() -> None:
    """Check and show the configuration."""


@config_group.command("check")
@click.argument("path", required=False)
@click.pass_context
def config_check(ctx: click.Context, path: Optional[str]) -> None:
    """Check a config file (default: the one the agent would use)."""
    loaded = load(path) if path is not None else load_config(ctx)
    click.echo(f"{loaded.source}: ok")


@config_group.command("show")
@click.pass_context
def config_show(ctx: click.Context) -> None:
    """Print the effective config, defaults included."""
    loaded = load_config(ctx)
    click.echo(to_toml(loaded), nl=False)
