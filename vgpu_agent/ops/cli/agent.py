"""The commands that talk to the running agent over its control socket: `vgpu-agent status`,
`health` and `simulate`.

`status` is a contract for scripts and monitoring: ``--json`` always prints one JSON
document on stdout, and the exit code names the node's state (README, "status --json"):

====================  ====  ============================================================
state                 exit  meaning
====================  ====  ============================================================
serving               0     every served vGPU healthy and registered with the kubelet
waiting-for-driver    3     the agent runs but serves nothing: the GPU driver is missing
degraded              4     serving, but some vGPUs are unhealthy or the kubelet has not
                            registered the plugin (yet)
not-running           5     no agent answers where the config says (nor recorded it ran)
====================  ====  ============================================================

A config that cannot be read is ``config-error`` (exit 78, the document with its
``error``); other errors (no permission) exit 1 as every command does.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn, Optional

import click

from vgpu_agent.agent.describe import WAITING_FOR_DRIVER, fault_lines
from vgpu_agent.config.parse import resolve_path
from vgpu_agent.host import control, instance
from vgpu_agent.model.commands import (
    ControlCommand,
    HealthResetCommand,
    SimulateAction,
    SimulateCommand,
    StatusCommand,
)
from vgpu_agent.model.devices import HEALTHY, UNHEALTHY
from vgpu_agent.model.errors import AgentError, AgentNotRunningError, ConfigError, VgpuError
from vgpu_agent.observability.service import status_header_lines, status_lines
from vgpu_agent.ops.cli.context import RootOptions, load_config

if TYPE_CHECKING:
    from vgpu_agent.frontends.deviceplugin.server import AdvertisedDevice


def _agent_socket(ctx: click.Context) -> str:
    """The control socket of the agent this config file runs: where the file says, unless
    the agent started with it recorded another place (the file was broken or changed after
    it started), which is then said on stderr. The ConfigError when neither tells."""
    options: RootOptions = ctx.find_root().obj
    config_path = resolve_path(options.config_path, os.environ)
    recorded = instance.recorded_socket(config_path)
    try:
        configured = load_config(ctx).agent.control_socket_path
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


#: The exit code of `vgpu-agent status` for each state of the node (the module docstring).
STATUS_EXIT_CODES = {
    "serving": 0,
    "waiting-for-driver": 3,
    "degraded": 4,
    "not-running": 5,
    "config-error": 78,
}
#: At most this many other running agents are named when none runs where the config says.
MAX_NAMED_AGENTS = 3


def node_state(answer: dict[str, Any]) -> str:
    """The node's state from the agent's status answer (STATUS_EXIT_CODES's keys)."""
    if str(answer.get("status", "")).startswith(WAITING_FOR_DRIVER):
        return "waiting-for-driver"
    gpus = answer.get("gpus") or []
    if answer.get("registered") and gpus and all(gpu.get("healthy") for gpu in gpus):
        return "serving"
    return "degraded"


def _document(state: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The --json document: the state, whether all is well and the exit code first."""
    rest = {key: value for key, value in fields.items() if key != "ok"}
    return {"state": state, "ok": state == "serving", "exit_code": STATUS_EXIT_CODES[state], **rest}


def _running_elsewhere(ctx: click.Context) -> str:
    """Where agents run that this config does not lead to, as a hint (or "")."""
    options: RootOptions = ctx.find_root().obj
    mine = os.path.realpath(resolve_path(options.config_path, os.environ))
    others = [record for record in instance.live_records() if record[0] != mine]
    named = "".join(
        f"; an agent runs with config {config} (pid {pid}): vgpu-agent --config {config} status"
        for config, _socket, pid in others[:MAX_NAMED_AGENTS]
    )
    if len(others) > MAX_NAMED_AGENTS:
        named += f"; and {len(others) - MAX_NAMED_AGENTS} more (/run/vgpu-agent/by-config)"
    return named


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (always).")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the running agent: each GPU, its vGPUs and their health. Exit code: 0 serving,
    3 waiting for the GPU driver, 4 degraded, 5 not running, 78 bad config."""
    try:
        answer = _ask(ctx, StatusCommand())
    except ConfigError as exc:
        if as_json:
            fields = {"status": "config error", "error": str(exc), "gpus": []}
            click.echo(json.dumps(_document("config-error", fields), indent=2))
        raise
    except AgentError as control_error:
        # No control socket (another state_dir, no permission): the plugin socket still
        # tells the device list, as the kubelet sees it, without the reasons.
        from vgpu_agent.frontends.deviceplugin.server import query_devices

        plugin_socket = load_config(ctx).plugin.socket_path
        try:
            devices = query_devices(plugin_socket)
        except AgentError:
            if not isinstance(control_error, AgentNotRunningError):
                raise control_error from None
            _not_running(f"{control_error}{_running_elsewhere(ctx)}", as_json)
        state = "degraded" if any(d.health != HEALTHY for d in devices) else "serving"
        _print_devices(devices, as_json, state)
        sys.exit(STATUS_EXIT_CODES[state])
    state = node_state(answer)
    if as_json:
        click.echo(json.dumps(_document(state, answer), indent=2))
        sys.exit(STATUS_EXIT_CODES[state])
    click.echo(answer["status"])
    if answer.get("backend") == "simulated":
        click.echo("backend: simulated GPUs (gpus.backend), not the node's real ones")
    for line in status_header_lines(answer):
        click.echo(line)
    confined = answer.get("confinement")
    if isinstance(confined, dict):
        click.echo(f"confinement: {confined.get('summary', confined.get('mode'))}")
        click.echo(f"device list: {confined.get('device_list_strategy')}")
    for line in fault_lines(answer):
        click.echo(line)
    for gpu in answer["gpus"]:
        health = HEALTHY if gpu["healthy"] else f"{UNHEALTHY}: " + "; ".join(gpu["reasons"])
        ceiling = f", ceiling {gpu['ceiling']}" if "ceiling" in gpu else ""
        click.echo(
            f"GPU {gpu['index']} {gpu['uuid']} {gpu['model']}: {gpu['replicas']} vGPUs, "
            f"{health}{ceiling}"
        )
        for line in status_lines(gpu):
            click.echo(line)
        for line in gpu.get("unsafe", []):
            click.echo(f"  UNSAFE: {line}")
    sys.exit(STATUS_EXIT_CODES[state])


def _not_running(message: str, as_json: bool) -> NoReturn:
    """No agent: one line on stderr, the not-running document on stdout with --json."""
    if as_json:
        fields = {"status": "not running", "error": message, "gpus": []}
        click.echo(json.dumps(_document("not-running", fields), indent=2))
    click.echo(f"vgpu-agent: error: {message}", err=True)
    sys.exit(STATUS_EXIT_CODES["not-running"])


def _print_devices(devices: tuple[AdvertisedDevice, ...], as_json: bool, state: str) -> None:
    if as_json:
        listed = [{"id": d.device_id, "health": d.health} for d in devices]
        fields = {
            "status": "the control socket is not reachable; the device list from the plugin socket",
            "devices": listed,
        }
        click.echo(json.dumps(_document(state, fields), indent=2))
        return
    unhealthy = sum(device.health != HEALTHY for device in devices)
    click.echo(
        f"{len(devices)} vGPUs advertised, {unhealthy} unhealthy (from the plugin socket; "
        "the control socket is not reachable, so no reasons)"
    )
    for device in devices:
        click.echo(f"  {device.device_id}  {device.health}")


@click.group("health")
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


@click.group("simulate")
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
