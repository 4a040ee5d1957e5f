"""Per pod, not per process (issue 20 item 1), through the whole agent without a GPU: a
simulated GPU whose MPS daemon is the stand-in control program, a pod's client processes in
a /proc and checkpoint of the test's own, the PodResources stand-in. A container running
more MPS clients than its vGPUs allow gets its newest ones ended with ``terminate_client``
(one journal entry and one count each, listed in status); report mode ends nothing; a held
pod gets no client; cooperative confinement does nothing; a reload changes the allowance."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from click.testing import CliRunner

from tests.builders import standin_mps_config
from tests.harness import AgentRun, agent_runs, scrape_metrics, wait_until
from tests.mps.test_daemon_log import fatal_line, torn_down_line
from tests.observability.test_observability_e2e import POD_UID, RESOURCE, WAIT_S, pod_process
from vgpu_agent.config.render import to_toml
from vgpu_agent.config.schema import (
    AgentConfig,
    AttributionConfig,
    Config,
    Confinement,
    FaultsConfig,
    GpusConfig,
    HealthConfig,
    IsolationConfig,
    MetricsConfig,
    PluginConfig,
    SimulatedConfig,
)
from vgpu_agent.model.commands import SimulateAction, SimulateCommand
from vgpu_agent.mps.control import control_command, server_pids
from vgpu_agent.mps.daemons import DirectMpsDaemons
from vgpu_agent.mps.directories import log_dir_for
from vgpu_agent.observability.attribution import gather
from vgpu_agent.observability.checkpoint import CHECKPOINT_NAME
from vgpu_agent.observability.enforcement import process_start_s
from vgpu_agent.ops.cli.root import cli
from vgpu_agent.standins.podresources import PodResourcesStandin, StandinContainer, StandinPod
from vgpu_agent.standins.simulated import Simulation

#: The pod's four client processes, oldest first (their start times, in clock ticks).
CLIENTS = {4242: 100, 4343: 200, 4444: 300, 4545: 400}
TICKS_PER_S = 100


def tenant_config(root: Path, **isolation: Any) -> Config:
    """One simulated H100 as 8 vGPUs, its daemon the stand-in, attribution refreshed only
    every 10 s (the default) and the client policy looking every 0.1 s."""
    return Config(
        agent=AgentConfig(state_dir=str(root / "state")),
        plugin=PluginConfig(plugin_dir=str(root / "dp")),
        gpus=GpusConfig(backend="simulated", replicas_per_gpu=8),
        mps=standin_mps_config(root),
        health=HealthConfig(mps_check_interval_s=0.05, poll_interval_s=0.2),
        simulated=SimulatedConfig(count=1),
        attribution=AttributionConfig(pod_resources_socket=str(root / "pr" / "kubelet.sock")),
        isolation=replace(IsolationConfig(check_interval_s=0.1), **isolation),
        metrics=MetricsConfig(enabled=True, listen_address="127.0.0.1:0"),
    )


@dataclass
class Tenant:
    """A running agent and a pod on its one GPU whose processes the test starts."""

    run: AgentRun
    config: Config
    simulation: Simulation
    root: Path
    pipe_dir: str = ""
    server: int = 0
    managers: list[DirectMpsDaemons] = field(default_factory=list)

    @property
    def gpu_uuid(self) -> str:
        """The one GPU."""
        uuid: str = self.run.agent.describe(0)["gpus"][0]["uuid"]
        return uuid

    def control(self, command: str) -> str:
        """One control command to the GPU's stand-in daemon."""
        return control_command(self.config.mps, self.pipe_dir, command)

    def start_client(self, pid: int) -> None:
        """Process ``pid`` of the pod connects to the MPS server and gets a context: the
        daemon lists it, NVML lists it, /proc shows its pod and start time."""
        directory = pod_process(self.root / "proc", pid)
        ticks = CLIENTS[pid]
        (directory / "stat").write_text(
            f"{pid} (python3) S 1 {pid} {pid} 0 -1 0 0 0 0 0 5 1 0 0 20 0 3 0 {ticks} 0\n"
        )
        self.control(f"fake_add_client {self.server} {pid}")
        self.simulation.backend.add_mps_client(self.gpu_uuid, pid, 206)

    def served(self) -> list[int]:
        """The clients the daemon's server lists."""
        return [int(pid) for pid in self.control(f"get_client_list {self.server}").split()]

    def commands(self) -> list[str]:
        """Every command the stand-in daemon received, in order."""
        path = self.root / "commands"
        return path.read_text(encoding="utf-8").splitlines() if path.exists() else []

    def terminated(self) -> list[str]:
        """The terminate_client commands sent so far."""
        return [command for command in self.commands() if command.startswith("terminate_client")]

    def policy(self) -> dict[str, Any]:
        """The per-pod client policy as status shows it."""
        shown: dict[str, Any] = self.run.agent.describe(0)["mps_client_policy"]
        return shown

    def attributed(self) -> list[int]:
        """The pod's client pids in a fresh attribution."""
        containers = self.run.agent.describe()["gpus"][0]["attribution"]["containers"]
        return list(containers[0]["pids"]) if containers else []


@pytest.fixture
def start_tenant(
    short_tmp_dir: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Tenant]]:
    """Start an agent, allocate one vGPU to pod ns/web (container app) and name it in the
    PodResources stand-in and the checkpoint; everything is stopped afterwards."""
    root = Path(short_tmp_dir)
    monkeypatch.setenv("FAKE_MPS_COMMAND_LOG", str(root / "commands"))
    runs = agent_runs(short_tmp_dir)
    start = next(runs)
    standins: list[PodResourcesStandin] = []
    tenants: list[Tenant] = []

    def begin(
        *,
        held: Optional[Mapping[str, str]] = None,
        confinement: Confinement = "enforced",
        faults: Optional[FaultsConfig] = None,
        reload_to: Optional[dict[str, Any]] = None,
        **isolation: Any,
    ) -> Tenant:
        """The agent with ``isolation`` keys (and ``confinement``); a reload reads the
        config with the ``reload_to`` keys instead."""
        config = tenant_config(root, **isolation)
        config = replace(config, mps=replace(config.mps, confinement=confinement))
        if faults is not None:
            config = replace(config, faults=faults)
        config_loader = None
        if reload_to is not None:
            reloaded = tenant_config(root, **reload_to)
            config_loader = lambda: reloaded  # noqa: E731 - one value, read on reload
        simulation = Simulation.from_config(config)
        managers: list[DirectMpsDaemons] = []

        def direct(config: Config) -> DirectMpsDaemons:
            built = DirectMpsDaemons(config.mps)
            managers.append(built)
            return built

        proc = root / "proc"
        proc.mkdir(exist_ok=True)
        run = start(
            config,
            open_backend=lambda _config: simulation.backend,
            make_mps=direct,
            faults=simulation,
            gather_attribution=functools.partial(
                gather, proc_root=str(proc), cgroup_root=str(root / "cgroup")
            ),
            client_start_time=functools.partial(
                process_start_s, proc_root=str(proc), ticks_per_s=TICKS_PER_S
            ),
            # None: the agent's own repeat offenders (agent/offenders.py), as on a node.
            held_pods=(lambda: held) if held is not None else None,
            config_loader=config_loader,
        )
        devices = run.devices(lambda devs: len(devs) == 8)
        ids = [devices[0].device_id]
        run.standin.allocate(RESOURCE, ids)
        pods = PodResourcesStandin(
            config.attribution.pod_resources_socket,
            [StandinPod("ns", "web", POD_UID, (StandinContainer("app", RESOURCE, tuple(ids)),))],
            checkpoint_path=str(root / "dp" / CHECKPOINT_NAME),
        )
        pods.start()
        standins.append(pods)
        tenant = Tenant(run, config, simulation, root, managers=managers)
        tenants.append(tenant)
        tenant.pipe_dir = config.mps.pipe_dir(tenant.gpu_uuid)
        # The agent starts the server once the ceiling is set (mps/holding).
        wait_until(lambda: bool(server_pids(config.mps, tenant.pipe_dir)), WAIT_S, "the MPS server")
        (tenant.server,) = server_pids(config.mps, tenant.pipe_dir)
        return tenant

    yield begin
    with contextlib.suppress(StopIteration):
        next(runs)
    for pods in standins:
        pods.stop()
    for tenant in tenants:
        for manager in tenant.managers:
            manager.stop_all()
    for pid_file in (root / "mps").glob("*/nvidia-cuda-mps-control.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def _ended_events(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    return [
        record.__dict__["fields"]
        for record in caplog.records
        if record.__dict__.get("fields", {}).get("VGPU_EVENT") == "mps-client-ended"
    ]


def _status_text(tenant: Tenant) -> str:
    path = tenant.root / "config.toml"
    path.write_text(to_toml(tenant.config), encoding="utf-8")
    result = CliRunner(mix_stderr=False).invoke(cli, ["--config", str(path), "status"])
    assert result.exit_code == 0, result.stderr
    return result.stdout


def test_a_pods_newest_clients_beyond_its_vgpu_are_ended(
    start_tenant: Callable[..., Tenant], caplog: pytest.LogCaptureFixture
) -> None:
    """A 1-vGPU pod starts 4 MPS clients: the three newest are ended through the daemon,
    newest first, once each; the journal, the counter and status say so; the oldest runs."""
    caplog.set_level(logging.INFO, logger="vgpu_agent")
    tenant = start_tenant()
    for pid in CLIENTS:
        tenant.start_client(pid)
    wait_until(lambda: len(tenant.policy()["recent"]) == 3, WAIT_S, "three clients ended")
    server = tenant.server
    # The clients come one by one, so one check may see two and the next the third: which
    # ones are ended is certain (all but the oldest), their order across checks is not.
    assert sorted(tenant.terminated()) == [
        f"terminate_client {server} 4343",
        f"terminate_client {server} 4444",
        f"terminate_client {server} 4545",
    ]
    assert tenant.served() == [4242]
    recent = tenant.policy()["recent"]
    assert sorted((entry["pid"], entry["action"], entry["reason"]) for entry in recent) == [
        (4343, "ended", "excess"),
        (4444, "ended", "excess"),
        (4545, "ended", "excess"),
    ]
    assert {entry["detail"] for entry in recent} == {f"MPS server {server}"}
    events = _ended_events(caplog)
    assert sorted(event["CLIENT_PID"] for event in events) == ["4343", "4444", "4545"]
    assert events[0] == {
        "VGPU_EVENT": "mps-client-ended",
        "GPU_UUID": tenant.gpu_uuid,
        "VGPU_POD": "ns/web",
        "VGPU_CONTAINER": "app",
        "CLIENT_PID": events[0]["CLIENT_PID"],
        "VGPU_REASON": "excess",
        "VGPU_ACTION": "ended",
    }
    described = tenant.run.agent.describe()
    samples = scrape_metrics(described["metrics_address"])
    key = f"vgpu_mps_clients_ended_total{{gpu_uuid={tenant.gpu_uuid},pod=ns/web,reason=excess}}"
    assert samples[key] == 3
    # NVML (simulated) still lists the ended clients; some checks later none is ended twice.
    assert len(tenant.attributed()) == 4
    time.sleep(0.5)
    assert len(tenant.terminated()) == 3
    assert len(_ended_events(caplog)) == 3
    text = _status_text(tenant)
    assert (
        "per-pod MPS clients: a pod may run 1 MPS client process per vGPU it holds on a GPU; "
        "the newest beyond that are ended (terminate_client); checked every 0.1 s"
    ) in text
    assert "  MPS client ended " in text
    assert f"GPU {tenant.gpu_uuid} pid 4343, ns/web app: " in text
    assert "MPS clients on 1 vGPU(s) of this GPU, 1 allowed (isolation.clients_per_vgpu = 1)" in (
        text
    )
    assert "UNSAFE: container ns/web/app runs 4 MPS client processes on 1 vGPU(s)" in text
    assert "the agent ends its newest 3" in text


def test_a_new_client_is_ended_within_the_check_interval(
    start_tenant: Callable[..., Tenant],
) -> None:
    """One client runs; a second one comes and is ended long before the attribution's own
    10 s refresh: the policy looks every check interval."""
    tenant = start_tenant()
    tenant.start_client(4242)
    wait_until(lambda: tenant.attributed() == [4242], WAIT_S, "the first client")
    tenant.start_client(4343)
    wait_until(lambda: bool(tenant.policy()["recent"]), 5.0, "the second client ended")
    assert tenant.terminated() == [f"terminate_client {tenant.server} 4343"]


def test_report_mode_ends_nothing(start_tenant: Callable[..., Tenant]) -> None:
    """excess_clients = "report": the three clients beyond the allowance are listed as
    reported, no terminate_client is sent, all four keep running."""
    tenant = start_tenant(excess_clients="report")
    for pid in CLIENTS:
        tenant.start_client(pid)
    wait_until(lambda: len(tenant.policy()["recent"]) == 3, WAIT_S, "three clients reported")
    assert {entry["action"] for entry in tenant.policy()["recent"]} == {"reported"}
    assert tenant.terminated() == []
    assert tenant.served() == list(CLIENTS)
    unsafe = tenant.run.agent.describe()["gpus"][0]["unsafe"]
    assert unsafe[-1].endswith(
        'only reported (isolation.excess_clients = "report"): 3 beyond the 1 '
        "isolation.clients_per_vgpu = 1 lets it run"
    )


def test_a_held_pod_gets_no_client(start_tenant: Callable[..., Tenant]) -> None:
    """A pod the fault policy holds: its only client is ended, as held, and status names
    the pod and why."""
    tenant = start_tenant(held={POD_UID: "3 faults in 10 min"})
    tenant.start_client(4242)
    wait_until(lambda: bool(tenant.policy()["recent"]), WAIT_S, "the held pod's client ended")
    assert tenant.terminated() == [f"terminate_client {tenant.server} 4242"]
    policy = tenant.policy()
    assert policy["held"] == {POD_UID: "3 faults in 10 min"}
    (entry,) = policy["recent"]
    assert (entry["reason"], entry["why"]) == (
        "held",
        "pod held at 0 MPS clients: 3 faults in 10 min",
    )


def test_cooperative_confinement_does_nothing(start_tenant: Callable[..., Tenant]) -> None:
    """Cooperative confinement: four clients on one vGPU run on; status says the policy is
    off and the warning that nothing is done."""
    tenant = start_tenant(confinement="cooperative")
    for pid in CLIENTS:
        tenant.start_client(pid)
    wait_until(lambda: len(tenant.attributed()) == 4, WAIT_S, "four clients attributed")
    assert tenant.terminated() == []
    policy = tenant.policy()
    assert not policy["active"]
    assert policy["recent"] == []
    unsafe = tenant.run.agent.describe()["gpus"][0]["unsafe"]
    assert unsafe[-1].endswith(
        "not acted on: the agent holds a pod's processes to its share only under enforced "
        'confinement (mps.confinement = "enforced")'
    )


def test_a_reload_changes_the_allowance(start_tenant: Callable[..., Tenant]) -> None:
    """clients_per_vgpu = 4 lets all four run; reloaded with 2, the two newest are ended."""
    tenant = start_tenant(clients_per_vgpu=4, reload_to={"clients_per_vgpu": 2})
    for pid in CLIENTS:
        tenant.start_client(pid)
    wait_until(lambda: len(tenant.attributed()) == 4, WAIT_S, "four clients attributed")
    assert tenant.terminated() == []
    assert "accepted: isolation.clients_per_vgpu = 4 lets it run 4" in json.dumps(
        tenant.run.agent.describe()["gpus"][0]["unsafe"]
    )
    tenant.run.agent.request_reload()
    wait_until(lambda: len(tenant.terminated()) == 2, WAIT_S, "two clients ended")
    assert tenant.terminated() == [
        f"terminate_client {tenant.server} 4545",
        f"terminate_client {tenant.server} 4444",
    ]
    assert tenant.policy()["clients_per_vgpu"] == 2


def test_a_repeat_offender_of_the_fault_policy_gets_no_client(
    start_tenant: Callable[..., Tenant],
) -> None:
    """The two policies together, as the agent wires them, with the default evidence and
    action: a pod the daemon's output names as the culprit of a fault where its client was
    the only one torn down (faults.repeat_limit = 1) becomes a repeat offender, and the
    per-pod client policy ends its client, as held."""
    tenant = start_tenant(faults=FaultsConfig(repeat_limit=1))
    tenant.start_client(4242)
    wait_until(lambda: tenant.attributed() == [4242], WAIT_S, "the pod's client attributed")
    assert tenant.terminated() == []
    control_log = Path(log_dir_for(tenant.config.mps.log_root, tenant.gpu_uuid)) / "control.log"
    with control_log.open("a") as written:
        now = time.time()
        written.write(fatal_line(4242, now) + "\n" + torn_down_line(4242, now) + "\n")
    tenant.run.agent.submit(SimulateCommand(SimulateAction.XID, "0", xid=31))
    wait_until(lambda: bool(tenant.terminated()), WAIT_S, "the offender's client ended")
    assert tenant.terminated() == [f"terminate_client {tenant.server} 4242"]
    assert list(tenant.run.agent.offenders.held()) == [POD_UID]
    wait_until(lambda: bool(tenant.policy()["recent"]), WAIT_S, "the ending shown")
    policy = tenant.policy()
    assert list(policy["held"]) == [POD_UID]
    (entry,) = policy["recent"]
    assert entry["reason"] == "held"
