"""Control-plane benchmark: the real `vgpu-agent run` process on 8 simulated GPUs x 48 vGPUs.

Prints: time from process start to READY=1, RSS after start, Allocate and
GetPreferredAllocation latency (p50/p99 over 5,000 calls each over the unix socket),
re-registration time after a simulated kubelet restart, time from an injected XID and from
a dead MPS daemon to the ListAndWatch update, and CPU used while idle.

Usage: python bench/control_plane.py [--calls 5000] [--idle-seconds 60]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, TextIO

from vgpu_agent.frontends.deviceplugin.server import AdvertisedDevice
from vgpu_agent.host import control
from vgpu_agent.model.commands import HealthResetCommand, SimulateAction, SimulateCommand
from vgpu_agent.standins.kubelet import KubeletStandin

RESOURCE = "eks.amazonaws.com/vgpu"
GPUS = 8
REPLICAS = 48
WAIT_S = 30.0

CONFIG = """
version = 1
[agent]
state_dir = "{root}/state"
log_level = "warning"
[plugin]
plugin_dir = "{root}/dp"
[gpus]
backend = "simulated"
replicas_per_gpu = {replicas}
[mps]
pipe_root = "{root}/mps"
log_root = "{root}/mpslog"
[health]
mps_check_interval_s = 0.5
[simulated]
count = {gpus}
"""


def percentile(samples: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``samples`` (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def wait_ready(notify: socket.socket, deadline_s: float) -> float:
    """Block until READY=1 arrives on the notify socket; returns the time it did. Then
    keep reading it in the background, as systemd does, so the agent's sends never stall."""
    notify.settimeout(deadline_s)
    while True:
        if b"READY=1" in notify.recv(65536):
            ready_at = time.monotonic()
            break
    notify.settimeout(None)

    def drain() -> None:
        with contextlib.suppress(OSError):
            while notify.recv(65536):
                pass

    threading.Thread(target=drain, daemon=True).start()
    return ready_at


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process from /proc."""
    with open(f"/proc/{pid}/stat") as stat_file:
        fields = stat_file.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB."""
    with open(f"/proc/{pid}/status") as status_file:
        for line in status_file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def timed(calls: int, call: Callable[[], object]) -> list[float]:
    """Latencies of ``calls`` calls in milliseconds."""
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def time_to_update(
    standin: KubeletStandin,
    predicate: Callable[[tuple[AdvertisedDevice, ...]], bool],
    act: Callable[[], object],
) -> float:
    """Milliseconds from ``act`` to a ListAndWatch update that satisfies ``predicate``."""
    started = time.monotonic()
    act()
    standin.wait_for_devices(predicate, WAIT_S, RESOURCE)
    return (time.monotonic() - started) * 1000


def show_log(agent_log: TextIO) -> None:
    """Print the agent's log (kept out of the numbers) after a failure, to show why."""
    agent_log.seek(0)
    print("the benchmark failed; the agent's log:", file=sys.stderr)
    sys.stderr.write(agent_log.read())


def at_least_one(text: str) -> int:
    """An argparse type: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return value


def main() -> int:
    """Run the benchmark and print its numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=at_least_one, default=5000)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--restarts", type=at_least_one, default=10, help="kubelet restarts timed")
    parser.add_argument(
        "--daemon-gpus",
        type=at_least_one,
        default=GPUS,
        help="GPUs (daemon processes) of the fault part",
    )
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="vgb", dir="/tmp")
    config_path = os.path.join(root, "config.toml")
    with open(config_path, "w") as config_file:
        config_file.write(CONFIG.format(root=root, gpus=GPUS, replicas=REPLICAS))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(os.path.join(root, "notify"))
    standin = KubeletStandin(os.path.join(root, "dp"))
    standin.start()
    env = {**os.environ, "NOTIFY_SOCKET": os.path.join(root, "notify")}
    started = time.monotonic()
    # The agent's log goes to a file, not between the numbers; shown if the bench fails.
    agent_log = open(os.path.join(root, "agent.log"), "w+")  # noqa: SIM115 - closed below
    agent = subprocess.Popen(
        [sys.executable, "-m", "vgpu_agent", "--config", config_path, "run"],
        env=env,
        stderr=agent_log,
    )
    try:
        ready_s = wait_ready(notify, WAIT_S) - started
        total = GPUS * REPLICAS
        devices = standin.wait_for_devices(lambda devs: len(devs) == total, WAIT_S, RESOURCE)
        time.sleep(0.5)
        rss = rss_mib(agent.pid)
        ids = [device.device_id for device in devices]
        print(f"GPUs x vGPUs:                 {GPUS} x {REPLICAS} = {total} vGPUs")
        print(f"process start -> READY:       {ready_s * 1000:.0f} ms")
        print(f"RSS after start:              {rss:.1f} MiB")

        one_gpu = ids[:REPLICAS]
        # One vGPU: what a container may hold under the default (enforced) confinement.
        allocate = timed(args.calls, lambda: standin.allocate(RESOURCE, one_gpu[:1]))
        print(
            f"Allocate (1 vGPU):            p50 {percentile(allocate, 0.5):.3f} ms  "
            f"p99 {percentile(allocate, 0.99):.3f} ms  ({args.calls} calls)"
        )
        preferred = timed(args.calls, lambda: standin.preferred_allocation(RESOURCE, ids, [], 4))
        print(
            f"GetPreferredAllocation (4 of {total}): p50 {percentile(preferred, 0.5):.3f} ms  "
            f"p99 {percentile(preferred, 0.99):.3f} ms  ({args.calls} calls)"
        )

        reregister = []
        for round_number in range(2, 2 + args.restarts):
            standin.restart()
            # The stand-in deleted the sockets and listens again: from here it is the agent.
            listening_at = time.monotonic()
            standin.wait_for_registration(round_number, WAIT_S)
            reregister.append((time.monotonic() - listening_at) * 1000)
        print(
            "re-registration after kubelet restart (new kubelet.sock -> Register): "
            f"median {statistics.median(reregister):.0f} ms  max {max(reregister):.0f} ms  "
            f"({len(reregister)} restarts)"
        )
        standin.wait_for_devices(lambda devs: len(devs) == total, WAIT_S, RESOURCE)

        sock = os.path.join(root, "state", "control.sock")
        gpu0 = ids[0].split("::")[0]

        def unhealthy_on_gpu0(devs: tuple[AdvertisedDevice, ...]) -> bool:
            return (
                sum(d.health == "Unhealthy" and d.device_id.startswith(gpu0) for d in devs)
                == REPLICAS
            )

        def all_healthy(devs: tuple[AdvertisedDevice, ...]) -> bool:
            return all(d.health == "Healthy" for d in devs)

        xid_ms = time_to_update(
            standin,
            unhealthy_on_gpu0,
            lambda: control.request(sock, SimulateCommand(SimulateAction.XID, "0", 79)),
        )
        print(f"injected XID -> ListAndWatch update:      {xid_ms:.1f} ms")
        control.request(sock, HealthResetCommand("0"))
        standin.wait_for_devices(all_healthy, WAIT_S, RESOURCE)
        mps_ms = time_to_update(
            standin,
            unhealthy_on_gpu0,
            lambda: control.request(sock, SimulateCommand(SimulateAction.MPS_DOWN, "0")),
        )
        print(
            f"dead MPS daemon -> ListAndWatch update:   {mps_ms:.1f} ms "
            "(simulated daemon; probe interval 0.5 s)"
        )
        control.request(sock, SimulateCommand(SimulateAction.MPS_UP, "0"))
        standin.wait_for_devices(all_healthy, WAIT_S, RESOURCE)

        time.sleep(1.0)
        cpu_before = cpu_seconds(agent.pid)
        time.sleep(args.idle_seconds)
        cpu_used = cpu_seconds(agent.pid) - cpu_before
        print(
            f"idle CPU over {args.idle_seconds:.0f} s:            "
            f"{cpu_used / args.idle_seconds * 100:.3f} % of one core"
        )
    except BaseException:
        show_log(agent_log)
        raise
    finally:
        agent.terminate()
        agent.wait(WAIT_S)
        agent_log.close()
        standin.stop()
        notify.close()
        shutil.rmtree(root, ignore_errors=True)
    daemon_faults(args.daemon_gpus)
    return 0


def daemon_faults(gpus: int) -> None:
    """Time from a killed / stopped MPS daemon process to the ListAndWatch update, with the
    agent running real daemon processes (the stand-in control program of the tests) on
    ``gpus`` simulated GPUs, probing every 0.5 s."""
    root = tempfile.mkdtemp(prefix="vgd", dir="/tmp")
    program = os.path.join(os.path.dirname(__file__), "..", "tests", "fakes", "fake_mps_control.py")
    control_binary = os.path.join(root, "nvidia-cuda-mps-control")
    with open(control_binary, "w") as wrapper:
        wrapper.write(f'#!/bin/sh\nexec "{sys.executable}" "{os.path.abspath(program)}" "$@"\n')
    os.chmod(control_binary, 0o700)
    config_path = os.path.join(root, "config.toml")
    text = CONFIG.format(root=root, gpus=gpus, replicas=REPLICAS).replace(
        "[mps]\n", f'[mps]\nmanager = "direct"\ncontrol_binary = "{control_binary}"\n'
    )
    with open(config_path, "w") as config_file:
        config_file.write(text)
    standin = KubeletStandin(os.path.join(root, "dp"))
    standin.start()
    agent_log = open(os.path.join(root, "agent.log"), "w+")  # noqa: SIM115 - closed below
    agent = subprocess.Popen(
        [sys.executable, "-m", "vgpu_agent", "--config", config_path, "run"], stderr=agent_log
    )
    pids: list[int] = []
    try:
        total = gpus * REPLICAS
        devices = standin.wait_for_devices(
            lambda devs: len(devs) == total and all(d.health == "Healthy" for d in devs),
            WAIT_S,
            RESOURCE,
        )
        gpu0 = devices[0].device_id.split("::")[0]
        pid_file = os.path.join(root, "mps", gpu0, "nvidia-cuda-mps-control.pid")
        for name in sorted(os.listdir(os.path.join(root, "mps"))):
            with open(os.path.join(root, "mps", name, "nvidia-cuda-mps-control.pid")) as f:
                pids.append(int(f.read()))

        def gpu0_is(health: str) -> Callable[[tuple[AdvertisedDevice, ...]], bool]:
            return lambda devs: all(
                d.health == health for d in devs if d.device_id.startswith(gpu0)
            )

        with open(pid_file) as f:
            pid = int(f.read())
        time.sleep(1.0)
        stopped_ms = time_to_update(
            standin, gpu0_is("Unhealthy"), lambda: os.kill(pid, signal.SIGSTOP)
        )
        os.kill(pid, signal.SIGCONT)
        standin.wait_for_devices(gpu0_is("Healthy"), WAIT_S, RESOURCE)
        time.sleep(1.0)
        killed_ms = time_to_update(
            standin, gpu0_is("Unhealthy"), lambda: os.kill(pid, signal.SIGKILL)
        )
        print(
            f"stopped (SIGSTOP) MPS daemon -> update:  {stopped_ms:.0f} ms  "
            f"killed (SIGKILL) -> update: {killed_ms:.0f} ms  "
            f"({gpus} daemon processes, probe interval 0.5 s)"
        )
    except BaseException:
        show_log(agent_log)
        raise
    finally:
        agent.terminate()
        agent.wait(WAIT_S)
        agent_log.close()
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        standin.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
