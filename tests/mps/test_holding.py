"""No way around MPS (docs/security.md): a server holds each GPU before any client, a stale
lock cannot keep the next daemon from starting, Allocate never hands out the pipe directory
of a daemon that is down, and status and doctor call compute mode Default unsafe under
enforced confinement. Against the stand-in MPS control program, without a GPU."""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Callable

import grpc
import pytest

from tests.builders import standin_mps_config
from tests.mps import test_confinement as confinement
from tests.mps.test_confinement import (
    WAIT_S,
    Node,
    node_config,
    node_gpu,
    wait_until,
)
from vgpu_agent.config.isolation import DEFAULT_MODE_RISK, compute_mode_risk
from vgpu_agent.config.schema import Config, HealthConfig, MpsConfig
from vgpu_agent.model.devices import Ceiling
from vgpu_agent.model.errors import MpsError
from vgpu_agent.model.gpu import ComputeMode
from vgpu_agent.mps.control import control_command, server_pids
from vgpu_agent.mps.daemons import DirectMpsDaemons
from vgpu_agent.mps.directories import LOCK_FILE, daemon_pid
from vgpu_agent.mps.holding import hold_gpu, prepare_lock

RESOURCE = "eks.amazonaws.com/vgpu"


#: Start an agent on the stand-in daemon: test_confinement's fixture, under this name.
start_agent = confinement.start_node


@pytest.fixture
def direct(short_tmp_dir: str) -> Iterator[tuple[DirectMpsDaemons, MpsConfig]]:
    """A direct manager on the stand-in (multi-user), its daemons quit afterwards."""
    config = standin_mps_config(Path(short_tmp_dir))
    daemons = DirectMpsDaemons(config, start_timeout_s=10.0)
    yield daemons, config
    daemons.stop_all()


# -- a server before the first client -----------------------------------------------------------


def test_a_multi_user_daemon_gets_its_server_before_any_client_with_the_ceiling(
    direct: tuple[DirectMpsDaemons, MpsConfig],
) -> None:
    """Setting the ceiling also starts the server, after the ceiling, so the server holds
    the GPU from then on and was born with the ceiling."""
    daemons, config = direct
    gpu = node_gpu()
    info = daemons.start(gpu)
    assert server_pids(config, info.pipe_dir) == [], "no client has come"
    sent = daemons.apply_defaults(gpu, Ceiling(Decimal("12.5"), 10194))
    assert sent == [
        "set_default_active_thread_percentage 12.5",
        "set_default_device_pinned_mem_limit 0 10194M",
        "start_server -uid 0",
    ]
    (server,) = server_pids(config, info.pipe_dir)
    assert control_command(config, info.pipe_dir, f"get_active_thread_percentage {server}") == (
        "12.5"
    )


def test_cooperative_mode_without_a_ceiling_still_gets_a_server(
    direct: tuple[DirectMpsDaemons, MpsConfig],
) -> None:
    """Holding the GPU does not depend on confinement: an empty ceiling starts the server
    too."""
    daemons, config = direct
    gpu = node_gpu()
    info = daemons.start(gpu)
    assert daemons.apply_defaults(gpu, Ceiling(None, None)) == ["start_server -uid 0"]
    assert len(server_pids(config, info.pipe_dir)) == 1


def test_a_single_user_daemon_is_left_without_a_server(short_tmp_dir: str) -> None:
    """A single-user daemon's server runs as its first client's uid, unknown beforehand:
    nothing is started."""
    config = replace(standin_mps_config(Path(short_tmp_dir)), multi_user="off")
    daemons = DirectMpsDaemons(config, start_timeout_s=10.0)
    try:
        info = daemons.start(node_gpu())
        assert not info.multi_user
        assert hold_gpu(config, info.pipe_dir) is None
        assert server_pids(config, info.pipe_dir) == []
    finally:
        daemons.stop_all()


def test_the_full_check_starts_a_gone_server_again(
    direct: tuple[DirectMpsDaemons, MpsConfig],
) -> None:
    """A server that ended (killed, or ended by a fault) is started again by the next full
    check, which passes."""
    daemons, config = direct
    gpu = node_gpu()
    info = daemons.start(gpu)
    daemons.apply_defaults(gpu, Ceiling(Decimal("12.5"), 10194))
    control_command(config, info.pipe_dir, "fake_end_servers")
    assert server_pids(config, info.pipe_dir) == []
    assert daemons.full_check(gpu.uuid) is None
    assert len(server_pids(config, info.pipe_dir)) == 1


def test_a_server_that_does_not_start_is_reported(
    short_tmp_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When no server appears (something outside MPS holds the GPU), hold_gpu says so and
    what to do."""
    monkeypatch.setenv("FAKE_MPS_NO_SERVER", "1")
    config = standin_mps_config(Path(short_tmp_dir))
    daemons = DirectMpsDaemons(config, start_timeout_s=10.0)
    try:
        info = daemons.start(node_gpu())
        with pytest.raises(MpsError, match=r"MPS server not started: .* no server appeared"):
            hold_gpu(config, info.pipe_dir, wait_s=0.2)
    finally:
        daemons.stop_all()


def test_the_agent_serves_a_gpu_whose_server_runs_before_any_pod(
    start_agent: Callable[..., Node],
) -> None:
    """Through the agent: once its vGPUs are Healthy, the GPU's daemon runs a server."""
    node = start_agent()
    assert node.control("get_server_list").split() != []
    assert "start_server -uid 0" in node.commands()


# -- a stale lock ------------------------------------------------------------------------------


def _kill_daemon(pipe_dir: str) -> None:
    pid = daemon_pid(pipe_dir)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}/cmdline") or _zombie(pid), "its end")


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat_file:
        return stat_file.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_a_held_stale_lock_blocks_a_bare_daemon_but_not_the_agents(
    direct: tuple[DirectMpsDaemons, MpsConfig],
) -> None:
    """A process that opened control_lock while the daemon ran takes a read lock on it once
    the daemon dies: a daemon started as is exits "already running", while the agent removes
    the stale file first and its daemon starts."""
    daemons, config = direct
    gpu = node_gpu()
    info = daemons.start(gpu)
    lock_path = os.path.join(info.pipe_dir, LOCK_FILE)
    with open(lock_path, encoding="ascii") as held:  # opened while the daemon runs
        _kill_daemon(info.pipe_dir)
        # What a read-only descriptor allows, and enough to stop a daemon (driver 580).
        fcntl.lockf(held, fcntl.LOCK_SH | fcntl.LOCK_NB)
        bare = subprocess.run(
            [config.control_binary, "-f", "-M"],
            env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": info.pipe_dir},
            capture_output=True,
            timeout=WAIT_S,
            check=False,
        )
        assert bare.returncode == 1
        assert b"already running" in bare.stdout
        again = DirectMpsDaemons(config, start_timeout_s=10.0)
        try:
            again.start(gpu)
            assert control_command(config, info.pipe_dir, "get_server_list") is not None
            assert os.stat(lock_path).st_ino != os.fstat(held.fileno()).st_ino
            assert stat.S_IMODE(os.stat(lock_path).st_mode) == 0o600, "root's from the start"
        finally:
            again.stop_all()
            daemons.stop_all()


def test_the_lock_of_a_live_daemon_stays(direct: tuple[DirectMpsDaemons, MpsConfig]) -> None:
    """While the daemon named in the pid file runs, its lock file is not touched."""
    daemons, _ = direct
    info = daemons.start(node_gpu())
    assert prepare_lock(info.pipe_dir) is False
    assert os.path.exists(os.path.join(info.pipe_dir, LOCK_FILE))


def test_a_first_start_gets_a_root_only_lock_file(tmp_path: Path) -> None:
    """A pipe directory without a lock file (a first start) gets one no pod can open."""
    assert prepare_lock(str(tmp_path)) is True
    assert stat.S_IMODE(os.stat(tmp_path / LOCK_FILE).st_mode) == 0o600


# -- Allocate and a daemon that is down ------------------------------------------------------


def test_allocate_refuses_a_gpu_whose_daemon_died_before_health_saw_it(
    start_agent: Callable[..., Node], short_tmp_dir: str
) -> None:
    """With no liveness thread, a daemon that has just died is still listed
    Healthy; Allocate asks the daemon itself and refuses, naming why and what to do."""
    root = Path(short_tmp_dir)
    config = replace(node_config(root), health=HealthConfig(mps_liveness_enabled=False))
    node = start_agent(config)
    vgpu_ids = [node.agent.describe()["gpus"][0]["vgpu_ids"][0]]
    assert node.standin.allocate(RESOURCE, vgpu_ids).container_responses
    _kill_daemon(node.pipe_dir)  # its control socket stays behind, as the real one's does
    assert os.path.exists(os.path.join(node.pipe_dir, "control"))
    with pytest.raises(grpc.RpcError) as refused:
        node.standin.allocate(RESOURCE, vgpu_ids)
    details = str(refused.value.details())
    assert "MPS daemon is not up" in details
    assert "would run outside MPS" in details
    assert "delete the pod to reschedule it" in details


# -- compute mode Default under enforced confinement ----------------------------------------


@pytest.mark.parametrize(
    ("confinement", "mps_enabled", "mode", "unsafe"),
    [
        ("enforced", True, ComputeMode.DEFAULT, True),
        ("enforced", True, ComputeMode.EXCLUSIVE_PROCESS, False),
        ("cooperative", True, ComputeMode.DEFAULT, False),
        ("enforced", False, ComputeMode.DEFAULT, False),
    ],
    ids=["enforced-default", "enforced-exclusive", "cooperative-default", "mps-off"],
)
def test_compute_mode_default_is_unsafe_only_under_enforced_confinement(
    confinement: str, mps_enabled: bool, mode: ComputeMode, unsafe: bool
) -> None:
    """Only a node that promises confinement is told its Default mode breaks it."""
    config = Config(mps=MpsConfig(confinement=confinement, enabled=mps_enabled))  # type: ignore[arg-type]
    assert (compute_mode_risk(config, mode) is not None) is unsafe


def test_status_flags_compute_mode_default_as_unsafe(
    start_agent: Callable[..., Node], short_tmp_dir: str
) -> None:
    """An agent told to leave the mode unchanged on a GPU in Default shows it, and why it
    is unsafe; in EXCLUSIVE_PROCESS it shows the mode only."""
    root = Path(short_tmp_dir)
    base = node_config(root)
    node = start_agent(replace(base, gpus=replace(base.gpus, compute_mode="unchanged")))
    (gpu,) = node.agent.describe()["gpus"]
    assert gpu["compute_mode"] == "default"
    assert gpu["unsafe"] == [f"compute mode default: {DEFAULT_MODE_RISK}"]


def test_status_of_an_exclusive_gpu_has_nothing_unsafe(start_agent: Callable[..., Node]) -> None:
    """The default config sets EXCLUSIVE_PROCESS: status shows it and no warning."""
    node = start_agent()
    (gpu,) = node.agent.describe()["gpus"]
    assert gpu["compute_mode"] == "exclusive_process"
    assert "unsafe" not in gpu
