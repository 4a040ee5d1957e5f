"""The root of the `vgpu-agent` command line: the ``cli`` group and its ``--config`` option,
the commands that hand over to another module (``doctor``, ``demo``), and :func:`main`.

Every error a person can cause or meet (bad config, no GPU, no agent running, no
permission) ends as one line on stderr and a non-zero exit code, never a traceback: the
root group turns our errors into that line here, for every command.
"""

from __future__ import annotations

import os
import sys
import textwrap
from typing import Any, Optional

import click

from vgpu_agent import __version__
from vgpu_agent.agent.loop import EXIT_CONFIG
from vgpu_agent.config.schema import CONFIG_ENV_VAR, DEFAULT_CONFIG_PATH
from vgpu_agent.model.errors import ConfigError, VgpuError
from vgpu_agent.ops.cli.agent import health_group, simulate_group, status
from vgpu_agent.ops.cli.config import config_group
from vgpu_agent.ops.cli.context import EXIT_ERROR, RootOptions
from vgpu_agent.ops.cli.gpus import gpus_group
from vgpu_agent.ops.cli.mps import mps_group
from vgpu_agent.ops.cli.run import run

#: EX_SOFTWARE: an internal error (a bug), as opposed to a problem a person can fix.
EXIT_INTERNAL = 70


class _Group(click.Group):
    """A click group that turns our errors into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            click.echo(f"vgpu-agent: config error: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
        except VgpuError as exc:
            click.echo(f"vgpu-agent: error: {exc}", err=True)
            sys.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            click.echo("vgpu-agent: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            # The reader went away (`vgpu-agent status | head`): stop quietly, as cat does.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(0)
        except click.NoSuchOption as exc:
            if exc.option_name == "--config" and exc.ctx is not None and exc.ctx.parent:
                # `vgpu-agent status --config X`: the option is the root's, not the command's.
                exc.message = (
                    "--config goes before the command: "
                    f"vgpu-agent --config PATH {exc.ctx.command_path.split(' ', 1)[-1]} ..."
                )
                exc.possibilities = None
            raise
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if os.environ.get("VGPU_DEBUG"):
                raise
            click.echo(
                f"vgpu-agent: internal error: {type(exc).__name__}: {exc} "
                "(a bug: please report it; VGPU_DEBUG=1 shows the traceback)",
                err=True,
            )
            sys.exit(EXIT_INTERNAL)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    help=f"Config file (default: ${CONFIG_ENV_VAR} or {DEFAULT_CONFIG_PATH}).",
)
@click.version_option(__version__, prog_name="vgpu-agent")
@click.pass_context
def cli(ctx: click.Context, config_path: Optional[str]) -> None:
    """Share NVIDIA GPUs between Kubernetes pods through CUDA MPS."""
    ctx.obj = RootOptions(config_path)


for command in (run, config_group, gpus_group, status, health_group, simulate_group, mps_group):
    cli.add_command(command)


@cli.command()
@click.pass_context
def doctor(ctx: click.Context) -> None:
    """Check this node the way an operator would before trusting it."""
    from vgpu_agent.ops.doctor.runner import run_doctor

    options: RootOptions = ctx.find_root().obj
    sys.exit(run_doctor(options.config_path, os.environ, _echo_wrapped))


#: doctor's lines are wrapped to this width; continuation lines are indented past the tag.
DOCTOR_WIDTH = 100


def _echo_wrapped(line: str) -> None:
    """One doctor line, wrapped at DOCTOR_WIDTH (paths and words are never split)."""
    click.echo(
        textwrap.fill(
            line,
            width=DOCTOR_WIDTH,
            subsequent_indent=" " * len("[ ok ] "),
            break_long_words=False,
            break_on_hyphens=False,
        )
    )


@cli.command()
def demo() -> None:
    """Run the agent on simulated GPUs against a built-in kubelet stand-in, and show it work."""
    from vgpu_agent.ops.demo import run_demo

    sys.exit(run_demo(click.echo))


def main() -> None:
    """Entry point of the `vgpu-agent` program."""
    cli(prog_name="vgpu-agent")
