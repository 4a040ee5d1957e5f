"""`vgpu-agent gpus`: list the GPUs and the vGPUs each would get, and set, apply and restore
their compute modes.
"""

from __future__ import annotations

import sys
from typing import Optional

import click

from vgpu_agent.config.plan import plan_gpus, slice_warnings
from vgpu_agent.config.schema import Config
from vgpu_agent.model.gpu import ComputeMode, set_compute_mode
from vgpu_agent.ops.cli.context import EXIT_ERROR, load_config, pick_gpus, with_overrides


@click.group("gpus", invoke_without_command=True)
@click.option("--simulate", type=click.IntRange(1, 64), metavar="N", help="Show N simulated GPUs.")
@click.pass_context
def gpus_group(ctx: click.Context, simulate: Optional[int]) -> None:
    """List the GPUs the backend sees and the vGPUs each would get."""
    if ctx.invoked_subcommand is not None:
        return
    loaded = with_overrides(load_config(ctx), simulate=simulate)
    from vgpu_agent.runtime.compose import open_backend_for

    backend = open_backend_for(loaded)
    try:
        gpus = backend.list_gpus()
        plan = plan_gpus(loaded, gpus)
        served = {gpu.uuid: replicas for gpu, replicas in plan.served}
        header = f"{'IDX':<4}{'UUID':<42}{'MODEL':<28}{'MEMORY':>11}  {'COMPUTE MODE':<18}VGPUS"
        click.echo(header)
        for gpu in gpus:
            mode = backend.get_compute_mode(gpu.uuid).value
            vgpus = str(served.get(gpu.uuid, "-"))
            click.echo(
                f"{gpu.index:<4}{gpu.uuid:<42}{gpu.model[:27]:<28}"
                f"{gpu.memory_mib:>7} MiB  {mode:<18}{vgpus}"
            )
        for problem in plan.refused:
            click.echo(f"not served: {problem}")
        for gpu in gpus:
            for warning in slice_warnings(loaded, gpu.model, gpu.memory_mib):
                click.echo(f"warning: GPU {gpu.index}: {warning}")
    finally:
        backend.close()


def _apply_modes(loaded: Config, mode: ComputeMode, refs: tuple[str, ...]) -> None:
    from vgpu_agent.runtime.compose import open_backend_for

    backend = open_backend_for(loaded)
    try:
        gpus = backend.list_gpus()
        if refs:
            chosen = pick_gpus(gpus, refs, "GPU")
        else:
            chosen = [gpu for gpu, _ in plan_gpus(loaded, gpus).served]
        for gpu in chosen:
            before = set_compute_mode(backend, gpu.uuid, mode)
            click.echo(f"GPU {gpu.index} {gpu.uuid}: {before.value} -> {mode.value}")
    finally:
        backend.close()


@gpus_group.command("apply-compute-mode")
@click.option(
    "--record",
    "record_path",
    metavar="FILE",
    default="",
    help="Remember there each changed GPU's previous mode (for restore-compute-mode).",
)
@click.pass_context
def gpus_apply(ctx: click.Context, record_path: str) -> None:
    """Set every served GPU's compute mode to gpus.compute_mode (for the boot unit)."""
    from vgpu_agent.mps.compute_mode import apply_compute_mode

    loaded = load_config(ctx)
    if loaded.gpus.compute_mode == "unchanged":
        click.echo("gpus.compute_mode is 'unchanged': leaving every GPU as it is")
        return
    from vgpu_agent.runtime.compose import open_backend_for

    backend = open_backend_for(loaded)
    try:
        served = [gpu for gpu, _ in plan_gpus(loaded, backend.list_gpus()).served]
        mode = ComputeMode(loaded.gpus.compute_mode)
        for line in apply_compute_mode(backend, served, mode, record_path):
            click.echo(line)
    finally:
        backend.close()


@gpus_group.command("restore-compute-mode")
@click.argument("record_path", metavar="FILE")
@click.pass_context
def gpus_restore(ctx: click.Context, record_path: str) -> None:
    """Set back the compute modes apply-compute-mode --record FILE changed (ExecStop)."""
    from vgpu_agent.mps.compute_mode import restore_compute_modes
    from vgpu_agent.runtime.compose import open_backend_for

    backend = open_backend_for(load_config(ctx))
    try:
        lines, problems = restore_compute_modes(backend, record_path)
    finally:
        backend.close()
    for line in lines:
        click.echo(line)
    for problem in problems:
        click.echo(f"vgpu-agent: error: {problem}", err=True)
    if problems:
        sys.exit(EXIT_ERROR)


@gpus_group.command("set-compute-mode")
@click.argument("mode", type=click.Choice(["exclusive_process", "default"]))
@click.argument("gpus", nargs=-1, metavar="[GPU]...")
@click.pass_context
def gpus_set(ctx: click.Context, mode: str, gpus: tuple[str, ...]) -> None:
    """Set the compute mode of the given GPUs (UUID or index; default: every served GPU)."""
    _apply_modes(load_config(ctx), ComputeMode(mode), gpus)
