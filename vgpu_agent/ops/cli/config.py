"""`vgpu-agent config`: check and show the configuration."""

from __future__ import annotations

import os
from typing import Optional

import click

from vgpu_agent.config.parse import load, resolve_path
from vgpu_agent.config.render import to_toml
from vgpu_agent.config.schema import Config
from vgpu_agent.ops.cli.context import RootOptions, load_config


@click.group("config")
def config_group() -> None:
    """Check and show the configuration."""


@config_group.command("check")
@click.argument("path", required=False)
@click.pass_context
def config_check(ctx: click.Context, path: Optional[str]) -> None:
    """Check a config file (default: the one the agent would use)."""
    loaded = load(path) if path is not None else load_config(ctx)
    if loaded.source == Config().source:
        # No file at the default path: say so, not "<defaults>: ok" (as doctor does).
        options: RootOptions = ctx.find_root().obj
        missing = resolve_path(options.config_path, os.environ)
        click.echo(f"no file at {missing}: the agent runs with the built-in defaults (ok)")
        return
    click.echo(f"{loaded.source}: ok")


@config_group.command("show")
@click.pass_context
def config_show(ctx: click.Context) -> None:
    """Print the effective config, defaults included."""
    loaded = load_config(ctx)
    click.echo(to_toml(loaded), nl=False)
