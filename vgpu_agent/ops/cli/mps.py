"""`vgpu-agent mps`: run and check the per-GPU MPS control daemons (without systemd, or for
its units).
"""

from __future__ import annotations

import sys
from typing import Optional

import click

from vgpu_agent.config.plan import plan_gpus, simulated_mps
from vgpu_agent.config.schema import Config
from vgpu_agent.model.daemons import SIMULATED_DAEMON_NOTE
from vgpu_agent.model.errors import ConfigError, VgpuError
from vgpu_agent.model.gpu import Gpu
from vgpu_agent.mps.ceilings import apply_daemon_defaults
from vgpu_agent.mps.control import probe_pipe_dir, quit_daemon
from vgpu_agent.mps.daemons import DirectMpsDaemons, exec_daemon, secure_pipe_dir
from vgpu_agent.ops.cli.context import EXIT_ERROR, load_config, pick_gpus


@click.group("mps")
def mps_group() -> None:
    """Run and check the per-GPU MPS control daemons (without systemd, or for its units)."""


def _served_gpus(loaded: Config, refs: tuple[str, ...]) -> list[Gpu]:
    from vgpu_agent.runtime.compose import open_backend_for

    backend = open_backend_for(loaded)
    try:
        gpus = [gpu for gpu, _ in plan_gpus(loaded, backend.list_gpus()).served]
    finally:
        backend.close()
    return pick_gpus(gpus, refs, "served GPU") if refs else gpus


def _apply_defaults(loaded: Config, gpu: Gpu) -> None:
    replicas = loaded.replicas_for_model(gpu.model)
    pipe_dir = loaded.mps.pipe_dir(gpu.uuid)
    for command in apply_daemon_defaults(loaded.mps, pipe_dir, gpu.memory_mib, replicas):
        click.echo(f"GPU {gpu.index} {gpu.uuid}: {command}")


def _refuse_simulated(loaded: Config, what: str) -> None:
    """A VgpuError when the config's MPS daemons are simulated: no process to ``what``."""
    if simulated_mps(loaded):
        raise VgpuError(
            f"cannot {what}: with simulated GPUs the MPS daemons are {SIMULATED_DAEMON_NOTE}; "
            "set mps.control_binary to a stand-in program to run real daemon processes"
        )


@mps_group.command("exec-daemon")
@click.argument("gpu_uuid")
@click.pass_context
def mps_exec_daemon(ctx: click.Context, gpu_uuid: str) -> None:
    """Become GPU_UUID's MPS control daemon in the foreground (vgpu-mps@.service)."""
    loaded = load_config(ctx)
    _refuse_simulated(loaded, f"run the MPS daemon of {gpu_uuid}")
    # Check the GPU before creating its directories: a typo must leave nothing behind.
    _served_gpus(loaded, (gpu_uuid,))
    exec_daemon(loaded.mps, gpu_uuid)


@mps_group.command("quit")
@click.argument("gpu_uuid")
@click.pass_context
def mps_quit(ctx: click.Context, gpu_uuid: str) -> None:
    """Ask GPU_UUID's MPS control daemon to quit (vgpu-mps@.service's ExecStop)."""
    loaded = load_config(ctx)
    _refuse_simulated(loaded, f"ask the MPS daemon of {gpu_uuid} to quit")
    quit_daemon(loaded.mps, gpu_uuid)


@mps_group.command("apply-defaults")
@click.argument("gpu_uuid")
@click.pass_context
def mps_apply_defaults(ctx: click.Context, gpu_uuid: str) -> None:
    """Once GPU_UUID's daemon answers, lock its pipe directory down (multi-user) and set
    its ceiling (vgpu-mps@.service's ExecStartPost), so a daemon systemd restarts is never
    unconfined. The ceiling is mps.confinement's (enforced: mps.max_vgpus_per_container
    vGPUs' share; cooperative: mps.daemon_*_limit)."""
    loaded = load_config(ctx)
    _refuse_simulated(loaded, f"secure the pipe directory of {gpu_uuid}")
    gpu: Optional[Gpu] = None
    cooperative_without_ceiling = (
        loaded.mps.confinement == "cooperative"
        and loaded.mps.daemon_thread_limit == "none"
        and loaded.mps.daemon_memory_limit == "none"
    )
    if not cooperative_without_ceiling:
        served = {gpu.uuid: gpu for gpu in _served_gpus(loaded, ())}
        gpu = served.get(gpu_uuid)
        if gpu is None:
            raise VgpuError(f"GPU {gpu_uuid} is not served by this config (see `vgpu-agent gpus`)")
    if secure_pipe_dir(loaded.mps, gpu_uuid):
        click.echo(f"GPU {gpu_uuid}: pipe directory {loaded.mps.pipe_dir(gpu_uuid)} locked down")
    if gpu is not None:
        _apply_defaults(loaded, gpu)


@mps_group.command("start")
@click.argument("gpus", nargs=-1, metavar="[GPU]...")
@click.pass_context
def mps_start(ctx: click.Context, gpus: tuple[str, ...]) -> None:
    """Start the MPS daemons of the served GPUs directly (no systemd); they keep running."""
    loaded = load_config(ctx)
    if simulated_mps(loaded):
        for gpu in _served_gpus(loaded, gpus):
            click.echo(f"GPU {gpu.index} {gpu.uuid}: nothing to start: {SIMULATED_DAEMON_NOTE}")
        return
    daemons = DirectMpsDaemons(loaded.mps)
    for gpu in _served_gpus(loaded, gpus):
        info = daemons.start(gpu)
        mode = "multi-user" if info.multi_user else "single-user"
        click.echo(f"GPU {gpu.index} {gpu.uuid}: MPS daemon answers on {info.pipe_dir} ({mode})")
        _apply_defaults(loaded, gpu)


@mps_group.command("stop")
@click.argument("gpus", nargs=-1, metavar="[GPU]...")
@click.pass_context
def mps_stop(ctx: click.Context, gpus: tuple[str, ...]) -> None:
    """Ask the served GPUs' MPS daemons to quit."""
    loaded = load_config(ctx)
    for gpu in _served_gpus(loaded, gpus):
        if simulated_mps(loaded):
            click.echo(f"GPU {gpu.index} {gpu.uuid}: nothing to stop: {SIMULATED_DAEMON_NOTE}")
            continue
        problem = probe_pipe_dir(loaded.mps, loaded.mps.pipe_dir(gpu.uuid))
        if problem is not None:
            click.echo(f"GPU {gpu.index} {gpu.uuid}: nothing to stop ({problem})")
            continue
        quit_daemon(loaded.mps, gpu.uuid)
        click.echo(f"GPU {gpu.index} {gpu.uuid}: MPS daemon asked to quit")


@mps_group.command("status")
@click.argument("gpus", nargs=-1, metavar="[GPU]...")
@click.pass_context
def mps_status(ctx: click.Context, gpus: tuple[str, ...]) -> None:
    """Whether the served GPUs' MPS daemons answer (exit 1 if one does not)."""
    loaded = load_config(ctx)
    failed = False
    for gpu in _served_gpus(loaded, gpus):
        if simulated_mps(loaded):
            click.echo(f"GPU {gpu.index} {gpu.uuid}: {SIMULATED_DAEMON_NOTE}")
            continue
        pipe_dir = loaded.mps.pipe_dir(gpu.uuid)
        problem = probe_pipe_dir(loaded.mps, pipe_dir)
        failed = failed or problem is not None
        # Each problem names the pipe directory already.
        click.echo(f"GPU {gpu.index} {gpu.uuid}: {problem or f'answers on {pipe_dir}'}")
    if failed:
        sys.exit(EXIT_ERROR)


@mps_group.command("unit-request", hidden=True)
@click.pass_context
def mps_unit_request(ctx: click.Context) -> None:
    """Answer one request of the agent on stdin (vgpu-mps-units@.service, socket-activated):
    start the MPS unit of a GPU the config serves."""
    from vgpu_agent.mps import units as mps_units

    try:
        loaded = load_config(ctx)
    except ConfigError as exc:
        # The agent waits for one line on the socket; the journal gets the same (stderr).
        sys.stdout.buffer.write(f"error config error: {exc}\n".encode("utf-8", "replace"))
        sys.stdout.buffer.flush()
        raise

    def served_uuids() -> set[str]:
        return {gpu.uuid for gpu in _served_gpus(loaded, ())}

    problem = mps_units.handle_request(sys.stdin.buffer, sys.stdout.buffer, served_uuids)
    if problem is not None:
        click.echo(f"vgpu-agent: error: request refused: {problem}", err=True)
        sys.exit(EXIT_ERROR)
