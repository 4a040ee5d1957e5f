"""The agent end to end: simulated GPUs, a kubelet stand-in on real unix sockets, a real
sd_notify datagram socket, the control socket, signals on a real process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import grpc
import pytest

from tests.harness import RESOURCE, WAIT_S, AgentRun, NotifyListener, make_config
from vgpu_agent.agent.loop import EXIT_CONFIG, EXIT_OK
from vgpu_agent.config.parse import parse
from vgpu_agent.config.schema import (
    Config,
    DeviceListStrategy,
    GpusConfig,
    HealthConfig,
    SimulatedConfig,
    SimulatedGpu,
)
from vgpu_agent.host import control
from vgpu_agent.host.systemd import Notifier
from vgpu_agent.model.commands import parse_command
from vgpu_agent.model.daemons import MpsDaemonInfo, QuickCheck
from vgpu_agent.model.devices import Ceiling
from vgpu_agent.model.errors import ConfigError, GpuError, MpsError
from vgpu_agent.model.gpu import ComputeMode, Gpu, GpuBackend
from vgpu_agent.runtime.compose import build_agent, open_backend_for, real_mps
from vgpu_agent.standins.kubelet import KubeletStandin
from vgpu_agent.standins.simulated import SimulatedBackend, gpus_from_config

#: Generous bound for "promptly" on a loaded 2-core CI machine; bench/ has the real numbers.
PROMPT_S = 3.0


def test_registers_and_advertises(run_agent: Callable[..., AgentRun]) -> None:
    """The agent registers and lists 4 healthy vGPUs per GPU with NUMA nodes."""
    harness = run_agent()
    registration = harness.standin.wait_for_registration(1, WAIT_S)
    assert (registration.version, registration.resource_name) == ("v1beta1", RESOURCE)
    assert registration.endpoint == "vgpu.sock"
    devices = harness.devices(lambda devs: len(devs) == 8)
    assert all(device.health == "Healthy" for device in devices)
    assert {device.numa_nodes for device in devices} == {(0,), (1,)}
    harness.notify.wait_for(lambda m: "READY=1" in m)
    harness.notify.wait_for(
        lambda m: (
            "STATUS=serving 8 vGPUs on 2 GPUs as eks.amazonaws.com/vgpu; "
            "registered with kubelet" in m
        )
    )


def test_allocate_through_kubelet(run_agent: Callable[..., AgentRun]) -> None:
    """Allocate over the wire gives the GPU, the pipe directory and proportional limits."""
    harness = run_agent()
    devices = harness.devices(lambda devs: len(devs) == 8)
    ids = [devices[0].device_id]
    response = harness.standin.allocate(RESOURCE, ids).container_responses[0]
    gpu_uuid = ids[0].split("::")[0]
    assert response.envs["NVIDIA_VISIBLE_DEVICES"] == gpu_uuid
    assert response.envs["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    assert response.envs["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={81559 // 4}M"
    assert [(m.host_path, m.container_path) for m in response.mounts] == [
        (f"{harness.root}/mps/{gpu_uuid}", "/run/nvidia-mps")
    ]


def test_allocate_refuses_more_vgpus_than_enforced_confinement_allows(
    run_agent: Callable[..., AgentRun],
) -> None:
    """Default config (enforced, 1 vGPU per container): a 2-vGPU request is INVALID_ARGUMENT
    saying what to do."""
    harness = run_agent()
    devices = harness.devices(lambda devs: len(devs) == 8)
    ids = [device.device_id for device in devices[:2]]
    with pytest.raises(grpc.RpcError) as caught:
        harness.standin.allocate(RESOURCE, ids)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "request at most 1" in str(caught.value.details())
    assert "mps.max_vgpus_per_container" in str(caught.value.details())


def test_allocate_gives_two_shares_when_two_vgpus_are_allowed(
    run_agent: Callable[..., AgentRun], short_tmp_dir: str
) -> None:
    """With mps.max_vgpus_per_container = 2 a 2-vGPU request gets two shares (2 of 4: 50%)."""
    config = make_config(short_tmp_dir)
    harness = run_agent(replace(config, mps=replace(config.mps, max_vgpus_per_container=2)))
    devices = harness.devices(lambda devs: len(devs) == 8)
    ids = [device.device_id for device in devices[:2]]
    response = harness.standin.allocate(RESOURCE, ids).container_responses[0]
    assert response.envs["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    assert response.envs["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={81559 // 2}M"


@pytest.mark.parametrize(
    ("strategy", "visible", "mounted", "cdi"),
    [
        ("envvar", "{uuid}", [], []),
        (
            "volume-mounts",
            "/var/run/nvidia-container-devices",
            [("/dev/null", "/var/run/nvidia-container-devices/{uuid}")],
            [],
        ),
        ("cdi", "void", [], ["nvidia.com/gpu={uuid}"]),
    ],
    ids=["envvar", "volume-mounts", "cdi"],
)
def test_allocate_names_the_gpu_by_device_list_strategy(  # noqa: PLR0917 - table columns
    run_agent: Callable[..., AgentRun],
    short_tmp_dir: str,
    strategy: DeviceListStrategy,
    visible: str,
    mounted: list[tuple[str, str]],
    cdi: list[str],
) -> None:
    """plugin.device_list_strategy decides how the Allocate response names the GPU: the
    variable, a /dev/null mount per GPU, or the CDI device (field 5), MPS as before."""
    config = make_config(short_tmp_dir)
    config = replace(config, plugin=replace(config.plugin, device_list_strategy=strategy))
    harness = run_agent(config)
    devices = harness.devices(lambda devs: len(devs) == 8)
    gpu_uuid = devices[0].device_id.split("::")[0]
    response = harness.standin.allocate(RESOURCE, [devices[0].device_id]).container_responses[0]
    assert response.envs["NVIDIA_VISIBLE_DEVICES"] == visible.format(uuid=gpu_uuid)
    assert [(m.host_path, m.container_path) for m in response.mounts] == [
        *((host, path.format(uuid=gpu_uuid)) for host, path in mounted),
        (f"{harness.root}/mps/{gpu_uuid}", "/run/nvidia-mps"),
    ]
    assert [device.name for device in response.cdi_devices] == [
        name.format(uuid=gpu_uuid) for name in cdi
    ]
    assert response.envs["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"


def test_waits_for_kubelet_then_registers(run_agent: Callable[..., AgentRun]) -> None:
    """Without kubelet.sock the agent waits (STATUS says so) and registers when it appears."""
    harness = run_agent(kubelet=False)
    harness.notify.wait_for(lambda m: "waiting for kubelet" in m)
    assert harness.thread.is_alive()
    harness.standin.start()
    harness.standin.wait_for_registration(1, WAIT_S)
    harness.notify.wait_for(lambda m: "registered with kubelet" in m)


def test_kubelet_restart_reregisters(run_agent: Callable[..., AgentRun]) -> None:
    """A kubelet restart (socket files deleted, new kubelet.sock) is followed by a new
    registration, promptly, and the device list flows again."""
    harness = run_agent()
    harness.standin.wait_for_registration(1, WAIT_S)
    for round_number in range(2, 5):
        restarted = time.monotonic()
        harness.standin.restart()
        harness.standin.wait_for_registration(round_number, WAIT_S)
        assert time.monotonic() - restarted < PROMPT_S
    harness.devices(lambda devs: len(devs) == 8)
    assert os.path.exists(os.path.join(harness.agent.config.plugin.plugin_dir, "vgpu.sock"))


def test_plugin_socket_deleted_reregisters(run_agent: Callable[..., AgentRun]) -> None:
    """If only our socket is deleted, the agent recreates it and registers again."""
    harness = run_agent()
    harness.standin.wait_for_registration(1, WAIT_S)
    os.unlink(os.path.join(harness.agent.config.plugin.plugin_dir, "vgpu.sock"))
    harness.standin.wait_for_registration(2, WAIT_S)


def test_stale_socket_replaced(short_tmp_dir: str, run_agent: Callable[..., AgentRun]) -> None:
    """A socket file left by a killed agent is replaced at start."""
    config = make_config(short_tmp_dir)
    os.makedirs(config.plugin.plugin_dir)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(config.plugin.plugin_dir, "vgpu.sock"))
    stale.close()
    harness = run_agent(config)
    harness.standin.wait_for_registration(1, WAIT_S)
    harness.devices(lambda devs: len(devs) == 8)


@pytest.mark.parametrize(
    ("xid", "unhealthy"),
    [(79, 4), (48, 4), (13, 0), (43, 0)],
    ids=["xid79-fallen-off-bus", "xid48-dbe", "xid13-app-fault-ignored", "xid43-ignored"],
)
def test_xid_marks_gpu(
    short_tmp_dir: str, run_agent: Callable[..., AgentRun], xid: int, unhealthy: int
) -> None:
    """A critical XID marks the GPU's vGPUs Unhealthy promptly; application XIDs do not."""
    health = HealthConfig(recovery_quiet_period_s=0, poll_interval_s=0.05)
    harness = run_agent(make_config(short_tmp_dir, health=health))
    harness.devices(lambda devs: len(devs) == 8)
    sent = time.monotonic()
    harness.agent.submit(
        parse_command({"command": "simulate", "action": "xid", "gpu": "1", "xid": xid})
    )
    if unhealthy:
        devices = harness.devices(lambda devs: sum(d.health == "Unhealthy" for d in devs) == 4)
        assert time.monotonic() - sent < PROMPT_S
        assert {d.device_id.split("::")[0] for d in devices if d.health == "Unhealthy"} == {
            harness.agent.describe()["gpus"][1]["uuid"]
        }
        harness.notify.wait_for(lambda m: f"4 unhealthy (GPU 1: xid {xid})" in m)
    else:
        # A critical XID on GPU 0 after it: once GPU 0 turns Unhealthy, the event thread
        # has handled the application XID too (events are handled in order).
        harness.agent.submit(
            parse_command({"command": "simulate", "action": "xid", "gpu": "0", "xid": 79})
        )
        devices = harness.devices(lambda devs: sum(d.health == "Unhealthy" for d in devs) == 4)
        gpu1 = harness.agent.describe()["gpus"][1]
        assert gpu1["healthy"], "an application XID leaves its GPU Healthy"
        assert all(d.health == "Healthy" for d in devices if d.device_id.startswith(gpu1["uuid"]))


def test_xid_recovers_after_quiet_period(run_agent: Callable[..., AgentRun]) -> None:
    """After the quiet period with no new event and a good query, the GPU is Healthy again."""
    harness = run_agent()
    harness.devices(lambda devs: len(devs) == 8)
    harness.agent.submit(
        parse_command({"command": "simulate", "action": "xid", "gpu": "0", "xid": 79})
    )
    harness.devices(lambda devs: sum(d.health == "Unhealthy" for d in devs) == 4)
    harness.devices(lambda devs: all(d.health == "Healthy" for d in devs))


def test_health_reset_clears_xid(short_tmp_dir: str, run_agent: Callable[..., AgentRun]) -> None:
    """`health reset` over the control socket clears an XID at once, even with no quiet period."""
    config = make_config(
        short_tmp_dir,
        health=HealthConfig(recovery_quiet_period_s=0, poll_interval_s=0.05),
    )
    harness = run_agent(config)
    harness.devices(lambda devs: len(devs) == 8)
    sock = os.path.join(config.agent.state_dir, "control.sock")
    assert control.request(
        sock, parse_command({"command": "simulate", "action": "xid", "gpu": "0", "xid": 94})
    )["ok"]
    harness.devices(lambda devs: sum(d.health == "Unhealthy" for d in devs) == 4)
    status = control.request(sock, parse_command({"command": "status"}))
    assert status["gpus"][0]["reasons"] == ["xid 94"]
    answer = control.request(sock, parse_command({"command": "health-reset", "gpu": "0"}))
    assert answer["cleared"] == ["xid 94"]
    harness.devices(lambda devs: all(d.health == "Healthy" for d in devs))


def test_gpu_lost_until_it_answers(run_agent: Callable[..., AgentRun]) -> None:
    """A lost GPU stays Unhealthy until a query succeeds again."""
    harness = run_agent()
    harness.devices(lambda devs: len(devs) == 8)
    harness.agent.submit(parse_command({"command": "simulate", "action": "lose", "gpu": "1"}))
    harness.devices(lambda devs: sum(d.health == "Unhealthy" for d in devs) == 4)
    # An XID on GPU 0 clears after the quiet period: once it has, a quiet period has passed
    # for the lost GPU 1 too, which time alone must not heal.
    harness.agent.submit(
        parse_command({"command": "simulate", "action": "xid", "gpu": "0", "xid": 79})
    )
    harness.devices(lambda devs: sum(d.health == "Unhealthy" for d in devs) == 8)
    harness.devices(lambda devs: sum(d.health == "Unhealthy" for d in devs) == 4)
    assert harness.agent.describe()["gpus"][1]["reasons"] == ["GPU lost"]
    harness.agent.submit(parse_command({"command": "simulate", "action": "recover", "gpu": "1"}))
    harness.devices(lambda devs: all(d.health == "Healthy" for d in devs))


def test_mps_down_and_up(run_agent: Callable[..., AgentRun]) -> None:
    """A dead MPS daemon marks its GPU Unhealthy; when it answers again the GPU heals."""
    harness = run_agent()
    harness.devices(lambda devs: len(devs) == 8)
    harness.agent.submit(parse_command({"command": "simulate", "action": "mps-down", "gpu": "0"}))
    harness.devices(lambda devs: sum(d.health == "Unhealthy" for d in devs) == 4)
    reasons = harness.agent.describe()["gpus"][0]["reasons"]
    assert reasons == ["MPS daemon down (simulated)"]
    harness.agent.submit(parse_command({"command": "simulate", "action": "mps-up", "gpu": "0"}))
    harness.devices(lambda devs: all(d.health == "Healthy" for d in devs))


def test_reload_changes_replicas(short_tmp_dir: str, run_agent: Callable[..., AgentRun]) -> None:
    """A reload with a new vGPU count advertises the new list; a bad file keeps the old."""
    configs: list[Callable[[], Config]] = []

    def loader() -> Config:
        return configs[-1]()

    base = make_config(short_tmp_dir)
    harness = run_agent(base, config_loader=loader)
    harness.devices(lambda devs: len(devs) == 8)
    configs.append(lambda: replace(base, gpus=replace(base.gpus, replicas_per_gpu=6)))
    harness.agent.request_reload()
    harness.devices(lambda devs: len(devs) == 12)
    harness.notify.wait_for(lambda m: "RELOADING=1" in m)

    def bad() -> Config:
        return parse("[gpus]\nreplicas_per_gpu = 99\n", "bad.toml")

    configs.append(bad)
    harness.agent.request_reload()
    # Every reload ends with READY=1: the start, the good reload and the refused one.
    harness.notify.wait_for_count(lambda m: m.startswith("READY=1"), 3)
    assert harness.agent.config.gpus.replicas_per_gpu == 6
    assert len(harness.standin.latest_devices(RESOURCE) or ()) == 12


def test_stop_removes_socket(run_agent: Callable[..., AgentRun]) -> None:
    """Stopping removes our socket, sends STOPPING=1 and returns exit code 0."""
    harness = run_agent()
    harness.standin.wait_for_registration(1, WAIT_S)
    sock = os.path.join(harness.agent.config.plugin.plugin_dir, "vgpu.sock")
    assert os.path.exists(sock)
    assert harness.stop() == EXIT_OK
    assert not os.path.exists(sock)
    harness.notify.wait_for(lambda m: "STOPPING=1" in m)


def test_watchdog_pings(run_agent: Callable[..., AgentRun]) -> None:
    """With WATCHDOG_USEC set, the loop sends WATCHDOG=1 at half the interval."""
    harness = run_agent(watchdog_usec=200_000)
    harness.standin.wait_for_registration(1, WAIT_S)
    started = time.monotonic()
    harness.notify.wait_for_count(lambda m: m == "WATCHDOG=1", 3)
    assert time.monotonic() - started < PROMPT_S


def test_backend_retries_until_driver(run_agent: Callable[..., AgentRun]) -> None:
    """An NVML that fails at boot is retried with a STATUS that says why; no exit."""
    attempts: list[int] = []

    def flaky(config: Config) -> GpuBackend:
        attempts.append(1)
        if len(attempts) < 2:
            raise GpuError("NVML: driver not loaded (is the NVIDIA driver installed?)")
        return open_backend_for(config)

    harness = run_agent(open_backend=flaky)
    harness.notify.wait_for(lambda m: "waiting for the GPU driver" in m)
    harness.standin.wait_for_registration(1, WAIT_S)
    assert len(attempts) == 2


def test_no_servable_gpu_fails(short_tmp_dir: str, run_agent: Callable[..., AgentRun]) -> None:
    """When every GPU is refused the agent exits 78 (a config the node cannot serve, which
    systemd does not restart) and says why."""
    config = make_config(
        short_tmp_dir,
        simulated=SimulatedConfig(
            gpus=(SimulatedGpu(uuid="GPU-old", model="Tesla P100", compute_capability=(6, 0)),)
        ),
    )
    harness = run_agent(config)
    harness.thread.join(timeout=WAIT_S)
    assert harness.exit_code == [EXIT_CONFIG]


def test_compute_mode_applied_and_restored(short_tmp_dir: str) -> None:
    """exclusive_process is set and read back at start; restored on stop when asked."""
    config = make_config(
        short_tmp_dir,
        gpus=GpusConfig(
            backend="simulated", compute_mode="exclusive_process", restore_compute_mode=True
        ),
    )
    backend = SimulatedBackend(gpus_from_config(config.simulated))
    standin = KubeletStandin(config.plugin.plugin_dir)
    standin.start()
    agent = build_agent(config, notifier=Notifier(None), open_backend=lambda _c: backend)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        standin.wait_for_registration(1, WAIT_S)
        modes = {backend.get_compute_mode(gpu.uuid) for gpu in backend.list_gpus()}
        assert modes == {ComputeMode.EXCLUSIVE_PROCESS}
    finally:
        agent.request_stop()
        thread.join(WAIT_S)
        standin.stop()
    modes = {backend.get_compute_mode(gpu.uuid) for gpu in backend.list_gpus()}
    assert modes == {ComputeMode.DEFAULT}


def test_build_mps_off() -> None:
    """With MPS disabled there is no daemon manager and Allocate hands out only the GPU."""
    assert real_mps(parse("[mps]\nenabled = false\n")) is None


# -- the real process: signals -----------------------------------------------------------------


def _spawn(config_path: Path, notify: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NOTIFY_SOCKET": notify, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "vgpu_agent", "--config", str(config_path), "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_process_signals(short_tmp_dir: str) -> None:
    """The real process: SIGHUP reloads (bad config kept out), SIGTERM stops with exit 0."""
    root = short_tmp_dir
    config_path = Path(root) / "config.toml"
    body = (
        f'[agent]\nstate_dir = "{root}/state"\n[plugin]\nplugin_dir = "{root}/dp"\n'
        f'[mps]\npipe_root = "{root}/mps"\n[gpus]\nbackend = "simulated"\n'
    )
    config_path.write_text(body + "replicas_per_gpu = 3\n")
    standin = KubeletStandin(f"{root}/dp")
    standin.start()
    notify = NotifyListener(f"{root}/notify")
    process = _spawn(config_path, notify.path)
    try:
        standin.wait_for_devices(lambda devs: len(devs) == 6, WAIT_S, RESOURCE)
        notify.wait_for(lambda m: "READY=1" in m)
        config_path.write_text(body + "replicas_per_gpu = 5\n")
        process.send_signal(signal.SIGHUP)
        standin.wait_for_devices(lambda devs: len(devs) == 10, WAIT_S, RESOURCE)
        config_path.write_text(body + "replicas_per_gpu = 'many'\n")
        process.send_signal(signal.SIGHUP)
        # The refused reload ends with READY=1 too (the start, the good reload, this one).
        notify.wait_for_count(lambda m: m.startswith("READY=1"), 3)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT_S) == 0
        output = process.stdout.read().decode() if process.stdout else ""
        assert "keeping the running config" in output
        assert "gpus.replicas_per_gpu" in output
        assert "Traceback" not in output
        assert not os.path.exists(f"{root}/dp/vgpu.sock")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        standin.stop()
        notify.close()


def test_config_error_is_config_error() -> None:
    """parse() raises our ConfigError (the run command maps it to exit 78)."""
    with pytest.raises(ConfigError):
        parse("[gpus]\nreplicas_per_gpu = 0\n")


class LateMpsDaemons:
    """MPS daemons that fail to start with the agent and come up later (systemd restarts)."""

    def __init__(self) -> None:
        self.up = threading.Event()

    def start(self, gpu: Gpu) -> MpsDaemonInfo:
        raise MpsError(f"starting the MPS daemon of GPU {gpu.uuid}: not answering yet")

    def apply_defaults(self, gpu: Gpu, ceiling: Ceiling) -> list[str]:
        """Nothing to set."""
        return []

    def stop(self, gpu_uuid: str) -> None:
        """Nothing to stop."""

    def quick_check(self, gpu_uuid: str) -> QuickCheck:
        """Nothing to see cheaply: the full check decides."""
        return QuickCheck()

    def full_check(self, gpu_uuid: str) -> Optional[str]:
        """Answers once ``up`` is set."""
        return None if self.up.is_set() else "MPS daemon not answering"


def test_mps_daemon_late_at_start_heals(
    short_tmp_dir: str, run_agent: Callable[..., AgentRun]
) -> None:
    """A daemon that does not answer when the agent starts leaves its GPU Unhealthy only
    until it answers."""
    daemons = LateMpsDaemons()
    config = make_config(short_tmp_dir)
    harness = run_agent(config, make_mps=lambda _c: daemons)
    harness.devices(lambda devs: len(devs) == 8 and all(d.health == "Unhealthy" for d in devs))
    reasons = harness.agent.describe()["gpus"][0]["reasons"]
    # The start failure, replaced (new reason first, never a gap) by what the probes see.
    assert reasons
    assert all(reason.startswith("MPS daemon") for reason in reasons)
    daemons.up.set()
    harness.devices(lambda devs: all(d.health == "Healthy" for d in devs))


def test_cli_status_falls_back_to_plugin_socket(
    short_tmp_dir: str, run_agent: Callable[..., AgentRun]
) -> None:
    """Without its control socket, `vgpu-agent status` reads the device list from the
    plugin socket, as the kubelet sees it; with it, it shows the reasons too."""
    from click.testing import CliRunner

    from vgpu_agent.ops.cli.root import cli

    harness = run_agent()
    harness.devices(lambda devs: len(devs) == 8)
    harness.agent.submit(parse_command({"command": "simulate", "action": "lose", "gpu": "1"}))
    harness.devices(lambda devs: sum(d.health == "Unhealthy" for d in devs) == 4)
    config = harness.agent.config
    for state_dir, expected in [
        (config.agent.state_dir, "GPU lost"),
        (f"{short_tmp_dir}/elsewhere", "8 vGPUs advertised, 4 unhealthy (from the plugin socket"),
    ]:
        path = os.path.join(short_tmp_dir, "status.toml")
        with open(path, "w") as config_file:
            config_file.write(
                f'[agent]\nstate_dir = "{state_dir}"\n'
                f'[plugin]\nplugin_dir = "{config.plugin.plugin_dir}"\n'
            )
        result = CliRunner(mix_stderr=False).invoke(cli, ["--config", path, "status"])
        assert result.exit_code == 4, result.stderr  # degraded: a lost GPU (issue 23)
        assert expected in result.stdout


def test_reload_adds_and_removes_gpus(
    short_tmp_dir: str, run_agent: Callable[..., AgentRun]
) -> None:
    """A reload that changes gpus.serve starts serving the added GPU (compute mode, MPS,
    health watch) and withdraws the removed one."""
    base = make_config(short_tmp_dir)
    configs = [replace(base, gpus=replace(base.gpus, serve=(0,)))]
    harness = run_agent(configs[0], config_loader=lambda: configs[-1])
    first = harness.devices(lambda devs: len(devs) == 4)
    gpu0 = first[0].device_id.split("::")[0]
    configs.append(replace(base, gpus=replace(base.gpus, serve="all")))
    harness.agent.request_reload()
    devices = harness.devices(lambda devs: len(devs) == 8)
    gpu1 = next(d.device_id.split("::")[0] for d in devices if not d.device_id.startswith(gpu0))
    # The added GPU is watched: an XID on it turns its vGPUs Unhealthy.
    harness.agent.submit(
        parse_command({"command": "simulate", "action": "xid", "gpu": gpu1, "xid": 79})
    )
    harness.devices(
        lambda devs: all(d.health == "Unhealthy" for d in devs if d.device_id.startswith(gpu1))
    )
    configs.append(replace(base, gpus=replace(base.gpus, serve=(1,))))
    harness.agent.request_reload()
    devices = harness.devices(lambda devs: len(devs) == 4)
    assert all(d.device_id.startswith(gpu1) for d in devices)
    assert [gpu["uuid"] for gpu in harness.agent.describe()["gpus"]] == [gpu1]
