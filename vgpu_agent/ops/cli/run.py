"""`vgpu-agent run`: the daemon systemd starts."""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Optional

import click

from vgpu_agent.agent.loop import EXIT_CONFIG
from vgpu_agent.config.parse import load_effective, resolve_path
from vgpu_agent.config.schema import Config
from vgpu_agent.host import instance
from vgpu_agent.model.errors import ConfigError
from vgpu_agent.ops.cli.context import RootOptions, with_overrides


@click.command()
@click.option("--simulate", type=click.IntRange(1, 64), metavar="N", help="Serve N simulated GPUs.")
@click.option("--plugin-dir", metavar="DIR", help="Kubelet device plugin directory.")
@click.pass_context
def run(ctx: click.Context, simulate: Optional[int], plugin_dir: Optional[str]) -> None:
    """Run the agent (the daemon systemd starts)."""
    from vgpu_agent.host.log import setup_logging
    from vgpu_agent.host.systemd import Notifier

    options: RootOptions = ctx.find_root().obj

    def load() -> Config:
        loaded = load_effective(options.config_path, os.environ)
        return with_overrides(loaded, simulate=simulate, plugin_dir=plugin_dir)

    notifier = Notifier.from_environ(os.environ)
    try:
        config = load()
    except ConfigError as exc:
        setup_logging("info", os.environ)
        notifier.status(f"bad config: {exc}")
        click.echo(f"vgpu-agent: config error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    setup_logging(config.agent.log_level, os.environ)
    # Before anything is touched: a second agent beside a running one stops here.
    lock = instance.InstanceLock(config.agent.state_dir)
    lock.acquire()
    config_path = resolve_path(options.config_path, os.environ)
    instance.write_record(config_path, config.agent.control_socket_path)
    from vgpu_agent.runtime.compose import build_agent

    agent = build_agent(config, notifier=notifier, config_loader=load)

    def on_stop(signum: int, _frame: Optional[FrameType]) -> None:
        agent.request_stop(f"signal {signal.Signals(signum).name}")

    def on_reload(_signum: int, _frame: Optional[FrameType]) -> None:
        agent.request_reload()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_reload)
    try:
        code = agent.run()
    finally:
        instance.remove_record(config_path)
        lock.release()
    sys.exit(code)
