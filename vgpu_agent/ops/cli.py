"""The `vgpu-agent` command line: parses arguments, calls into the rest, prints.

Every error a person can cause or meet (bad config, no GPU, no agent running, no
permission) ends as one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import click

from vgpu_agent import __version__
from vgpu_agent.agent.loop import EXIT_CONFIG
from vgpu_agent.config import parse as config_module
from vgpu_agent.config.plan import plan_gpus, simulated_mps, slice_warnings
from vgpu_agent.config.render import to_toml
from vgpu_agent.config.schema import CONFIG_ENV_VAR, DEFAULT_CONFIG_PATH, Config
from vgpu_agent.host import control, instance
from vgpu_agent.model.commands import (
    ControlCommand,
    HealthResetCommand,
    SimulateAction,
    SimulateCommand,
    StatusCommand,
)
from vgpu_agent.model.daemons import SIMULATED_DAEMON_NOTE
from vgpu_agent.model.devices import HEALTHY, UNHEALTHY
from vgpu_agent.model.errors import AgentError, ConfigError, VgpuError
from vgpu_agent.model.gpu import ComputeMode, Gpu, set_compute_mode
from vgpu_agent.mps.ceilings import apply_daemon_defaults
from vgpu_agent.mps.control import probe_pipe_dir, quit_daemon
from vgpu_agent.mps.daemons import DirectMpsDaemons, exec_daemon, secure_pipe_dir
from vgpu_agent.observability.service import status_header_lines, status_lines

if TYPE_CHECKING:
    from vgpu_agent.frontends.deviceplugin.server import AdvertisedDevice

# The composition root and the plugin module are imported by the commands that use them:
# they bring in gRPC and the backends, a third of the CLI's start-up, which commands that
# only read the config or talk to the control socket (and every bad-config error) skip.

F = TypeVar("F", bound=Callable[..., Any])
EXIT_ERROR = 1
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


@dataclasses.dataclass
class _Options:
    config_path: Optional[str]


def _load(ctx: click.Context) -> Config:
    options: _Options = ctx.find_root().obj
    return config_module.load_effective(options.config_path, os.environ)


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
    ctx.obj = _Options(config_path)


# -- run ---------------------------------------------------------------------------------------


@cli.command()
@click.option("--simulate", type=click.IntRange(1, 64), metavar="N", help="Serve N simulated GPUs.")
@click.option("--plugin-dir", metavar="DIR", help="Kubelet device plugin directory.")
@click.pass_context
def run(ctx: click.Context, simulate: Optional[int], plugin_dir: Optional[str]) -> None:
    """Run the agent (the daemon systemd starts)."""
    from vgpu_agent.host.log import setup_logging
    from vgpu_agent.host.systemd import Notifier

    options: _Options = ctx.find_root().obj

    def load() -> Config:
        loaded = config_module.load_effective(options.config_path, os.environ)
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
    config_path = config_module.resolve_path(options.config_path, os.environ)
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


# -- config ------------------------------------------------------------------------------------


@cli.group("config")
def config_group() -> None:
    """Check and show the configuration."""


@config_group.command("check")
@click.argument("path", required=False)
@click.pass_context
def config_check(ctx: click.Context, path: Optional[str]) -> None:
    """Check a config file (default: the one the agent would use)."""
    loaded = config_module.load(path) if path is not None else _load(ctx)
    click.echo(f"{loaded.source}: ok")


@config_group.command("show")
@click.pass_context
def config_show(ctx: click.Context) -> None:
    """Print the effective config, defaults included."""
    loaded = _load(ctx)
    click.echo(to_toml(loaded), nl=False)


# -- gpus --------------------------------------------------------------------------------------


@cli.group("gpus", invoke_without_command=True)
@click.option("--simulate", type=click.IntRange(1, 64), metavar="N", help="Show N simulated GPUs.")
@click.pass_context
def gpus_group(ctx: click.Context, simulate: Optional[int]) -> None:
    """List the GPUs the backend sees and the vGPUs each would get."""
    if ctx.invoked_subcommand is not None:
        return
    loaded = with_overrides(_load(ctx), simulate=simulate)
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


def _pick(gpus: list[Gpu], refs: tuple[str, ...], what: str) -> list[Gpu]:
    """The GPUs named by UUID or index in ``refs``; VgpuError naming any that is not there."""
    chosen = [gpu for gpu in gpus if gpu.uuid in refs or str(gpu.index) in refs]
    missing = set(refs) - {g.uuid for g in chosen} - {str(g.index) for g in chosen}
    if missing:
        raise VgpuError(f"no such {what}: {', '.join(sorted(missing))}")
    return chosen


def _apply_modes(loaded: Config, mode: ComputeMode, refs: tuple[str, ...]) -> None:
    from vgpu_agent.runtime.compose import open_backend_for

    backend = open_backend_for(loaded)
    try:
        gpus = backend.list_gpus()
        if refs:
            chosen = _pick(gpus, refs, "GPU")
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

    loaded = _load(ctx)
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

    backend = open_backend_for(_load(ctx))
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
    _apply_modes(_load(ctx), ComputeMode(mode), gpus)


# -- talking to the running agent ----------------------------------------------------------------


def _agent_socket(ctx: click.Context) -> str:
    """The control socket of the agent this config file runs: where the file says, unless
    the agent started with it recorded another place (the file was broken or changed after
    it started), which is then said on stderr. The ConfigError when neither tells."""
    options: _Options = ctx.find_root().obj
    config_path = config_module.resolve_path(options.config_path, os.environ)
    recorded = instance.recorded_socket(config_path)
    try:
        configured = _load(ctx).agent.control_socket_path
    except ConfigError as exc:
        if recorded is None:
            raise
        click.echo(
            f"vgpu-agent: note: {exc}; asking the agent that runs with the config it "
            f"loaded, on {recorded}",
            err=True,
        )
        return recorded
    if recorded is not None and recorded != configured and not os.path.exists(configured):
        click.echo(
            f"vgpu-agent: note: {config_path} was changed since the agent started (restart "
            f"it to apply the file); asking it on {recorded}",
            err=True,
        )
        return recorded
    return configured


def _ask(ctx: click.Context, command: ControlCommand) -> dict[str, Any]:
    answer = control.request(_agent_socket(ctx), command)
    if not answer.get("ok"):
        raise VgpuError(str(answer.get("error", "the agent refused the request")))
    return answer


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the agent's answer as JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the running agent: each GPU, its vGPUs and their health."""
    try:
        answer = _ask(ctx, StatusCommand())
    except AgentError as control_error:
        # No control socket (another state_dir, no permission): the plugin socket still
        # tells the device list, as the kubelet sees it, without the reasons.
        from vgpu_agent.frontends.deviceplugin.server import query_devices

        plugin_socket = _load(ctx).plugin.socket_path
        try:
            devices = query_devices(plugin_socket)
        except AgentError:
            raise control_error from None
        _print_devices(devices, as_json)
        return
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    click.echo(answer["status"])
    for line in status_header_lines(answer):
        click.echo(line)
    confined = answer.get("confinement")
    if isinstance(confined, dict):
        click.echo(f"confinement: {confined.get('summary', confined.get('mode'))}")
        click.echo(f"device list: {confined.get('device_list_strategy')}")
    for gpu in answer["gpus"]:
        health = HEALTHY if gpu["healthy"] else f"{UNHEALTHY}: " + "; ".join(gpu["reasons"])
        ceiling = f", ceiling {gpu['ceiling']}" if "ceiling" in gpu else ""
        click.echo(
            f"GPU {gpu['index']} {gpu['uuid']} {gpu['model']}: {gpu['replicas']} vGPUs, "
            f"{health}{ceiling}"
        )
        for line in status_lines(gpu):
            click.echo(line)


def _print_devices(devices: tuple[AdvertisedDevice, ...], as_json: bool) -> None:
    if as_json:
        listed = [{"id": d.device_id, "health": d.health} for d in devices]
        click.echo(json.dumps({"devices": listed}, indent=2))
        return
    unhealthy = sum(device.health != HEALTHY for device in devices)
    click.echo(
        f"{len(devices)} vGPUs advertised, {unhealthy} unhealthy (from the plugin socket; "
        "the control socket is not reachable, so no reasons)"
    )
    for device in devices:
        click.echo(f"  {device.device_id}  {device.health}")


@cli.group("health")
def health_group() -> None:
    """Act on the running agent's health checks."""


@health_group.command("reset")
@click.argument("gpu")
@click.pass_context
def health_reset(ctx: click.Context, gpu: str) -> None:
    """Mark GPU (UUID or index) healthy again after XID errors, at once."""
    answer = _ask(ctx, HealthResetCommand(gpu))
    if answer["cleared"]:
        click.echo(f"GPU {answer['gpu']}: cleared {', '.join(answer['cleared'])}")
    else:
        click.echo(f"GPU {answer['gpu']}: no fault recorded, nothing to clear")


@cli.group("simulate")
def simulate_group() -> None:
    """Inject faults into a running agent that uses the simulated backend."""


def _simulate(
    ctx: click.Context, action: SimulateAction, gpu: str, xid: Optional[int] = None
) -> None:
    answer = _ask(ctx, SimulateCommand(action, gpu, xid))
    click.echo(f"GPU {answer['gpu']}: {action.value} injected")


MAX_XID = 65535


class _XidType(click.ParamType):
    """An XID number; its error says what one is (click.IntRange's talks of a "range")."""

    name = "xid"

    def convert(
        self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]
    ) -> int:
        try:
            xid = int(value, 10) if isinstance(value, str) else int(value)
        except ValueError:
            xid = -1
        if not 0 <= xid <= MAX_XID:
            self.fail(
                f"{value!r} is not an XID number (an integer from 0 to {MAX_XID})", param, ctx
            )
        return xid


@simulate_group.command("xid")
@click.argument("gpu")
@click.argument("xid", type=_XidType())
@click.pass_context
def simulate_xid(ctx: click.Context, gpu: str, xid: int) -> None:
    """An XID error on GPU."""
    _simulate(ctx, SimulateAction.XID, gpu, xid)


@simulate_group.command("mps-client")
@click.argument("gpu")
@click.argument("pid", type=click.IntRange(0))
@click.argument("memory_mib", type=click.IntRange(0))
@click.pass_context
def simulate_mps_client(ctx: click.Context, gpu: str, pid: int, memory_mib: int) -> None:
    """Process PID becomes an MPS client of GPU using MEMORY_MIB (attribution shows it)."""
    action = SimulateAction.MPS_CLIENT
    answer = _ask(ctx, SimulateCommand(action, gpu, pid=pid, memory_mib=memory_mib))
    click.echo(f"GPU {answer['gpu']}: {action.value} injected")


def _simple_simulation(action: SimulateAction, doc: str) -> None:
    @simulate_group.command(action.value)
    @click.argument("gpu")
    @click.pass_context
    def command(ctx: click.Context, gpu: str) -> None:
        _simulate(ctx, action, gpu)

    command.help = doc


_simple_simulation(SimulateAction.ECC, "A double-bit ECC error on GPU.")
_simple_simulation(SimulateAction.LOSE, "GPU falls off the bus.")
_simple_simulation(SimulateAction.RECOVER, "A lost GPU answers again.")
_simple_simulation(SimulateAction.MPS_DOWN, "GPU's MPS daemon stops answering.")
_simple_simulation(SimulateAction.MPS_UP, "GPU's MPS daemon answers again.")


# -- mps ----------------------------------------------------------------------------------------


@cli.group("mps")
def mps_group() -> None:
    """Run and check the per-GPU MPS control daemons (without systemd, or for its units)."""


def _served_gpus(loaded: Config, refs: tuple[str, ...]) -> list[Gpu]:
    from vgpu_agent.runtime.compose import open_backend_for

    backend = open_backend_for(loaded)
    try:
        gpus = [gpu for gpu, _ in plan_gpus(loaded, backend.list_gpus()).served]
    finally:
        backend.close()
    return _pick(gpus, refs, "served GPU") if refs else gpus


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
    loaded = _load(ctx)
    _refuse_simulated(loaded, f"run the MPS daemon of {gpu_uuid}")
    # Check the GPU before creating its directories: a typo must leave nothing behind.
    _served_gpus(loaded, (gpu_uuid,))
    exec_daemon(loaded.mps, gpu_uuid)


@mps_group.command("quit")
@click.argument("gpu_uuid")
@click.pass_context
def mps_quit(ctx: click.Context, gpu_uuid: str) -> None:
    """Ask GPU_UUID's MPS control daemon to quit (vgpu-mps@.service's ExecStop)."""
    loaded = _load(ctx)
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
    loaded = _load(ctx)
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
    loaded = _load(ctx)
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
    loaded = _load(ctx)
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
    loaded = _load(ctx)
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
        loaded = _load(ctx)
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


# -- doctor -------------------------------------------------------------------------------------


@cli.command()
@click.pass_context
def doctor(ctx: click.Context) -> None:
    """Check this node the way an operator would before trusting it."""
    from vgpu_agent.ops.doctor import run_doctor

    options: _Options = ctx.find_root().obj
    sys.exit(run_doctor(options.config_path, os.environ, click.echo))


# -- demo --------------------------------------------------------------------------------------


@cli.command()
def demo() -> None:
    """Run the agent on simulated GPUs against a built-in kubelet stand-in, and show it work."""
    from vgpu_agent.ops.demo import run_demo

    sys.exit(run_demo(click.echo))


def main() -> None:
    """Entry point of the `vgpu-agent` program."""
    cli(prog_name="vgpu-agent")
