"""The pure decisions: what a reload changes, as tables of (running, new, GPUs) -> actions."""

from __future__ import annotations

import pytest

from tests.builders import gpu_uuid, make_gpu
from vgpu_agent.config.parse import parse
from vgpu_agent.config.plan import (
    confinement_line,
    gpu_ceiling,
    grant_policy,
    plan_gpus,
)
from vgpu_agent.config.reload import (
    ApplyCeiling,
    KeepRunningConfig,
    ReloadAction,
    Reregister,
    ResizeGpu,
    RestartHealthChecks,
    ServeGpu,
    UseDeviceListStrategy,
    UseGrantPolicy,
    UseLogLevel,
    WarnNotServed,
    WithdrawGpu,
    plan_reload,
)
from vgpu_agent.config.schema import Config
from vgpu_agent.model.gpu import Gpu

RUNNING = parse("[gpus]\nreplicas_per_gpu = 4\n")
TWO_GPUS = [make_gpu(0), make_gpu(1)]
SERVING_BOTH = {gpu_uuid(0): 4, gpu_uuid(1): 4}


def restart_needed(keys: str) -> KeepRunningConfig:
    """The refusal of a reload that changes ``keys``, settings only a restart applies."""
    return KeepRunningConfig(
        f"restart needed: {keys} cannot change while the agent runs; restart it to apply "
        "the new config (systemctl restart vgpu-agent)"
    )


@pytest.mark.parametrize(
    ("new", "served", "expected"),
    [
        (RUNNING, SERVING_BOTH, []),
        (
            parse("[gpus]\nreplicas_per_gpu = 8\n"),
            SERVING_BOTH,
            [
                ResizeGpu(gpu_uuid(0), 8),
                ResizeGpu(gpu_uuid(1), 8),
                # One share is smaller now: the running daemons' ceiling follows.
                ApplyCeiling(TWO_GPUS[0], 8),
                ApplyCeiling(TWO_GPUS[1], 8),
            ],
        ),
        (
            parse("[gpus]\nreplicas_per_gpu = 4\nserve = [0]\n"),
            SERVING_BOTH,
            [WithdrawGpu(gpu_uuid(1))],
        ),
        (RUNNING, {gpu_uuid(0): 4}, [ServeGpu(TWO_GPUS[1], 4)]),
        (
            parse("[gpus]\nreplicas_per_gpu = 4\nserve = [0, 5]\n"),
            SERVING_BOTH,
            [
                WarnNotServed("gpus.serve names 5, but no such GPU is on this node"),
                WithdrawGpu(gpu_uuid(1)),
            ],
        ),
        (
            parse("[gpus]\nreplicas_per_gpu = 4\nserve = [7]\n"),
            SERVING_BOTH,
            [
                KeepRunningConfig(
                    "the new one serves no GPU: gpus.serve names 7, but no such GPU is on this node"
                )
            ],
        ),
        (
            parse('[gpus]\nreplicas_per_gpu = 4\n[agent]\nlog_level = "debug"\n'),
            SERVING_BOTH,
            [UseLogLevel("debug")],
        ),
        (
            parse('[gpus]\nreplicas_per_gpu = 4\n[plugin]\nsocket_name = "other.sock"\n'),
            SERVING_BOTH,
            [Reregister()],
        ),
        (
            parse("[gpus]\nreplicas_per_gpu = 4\n[health]\npoll_interval_s = 1\n"),
            SERVING_BOTH,
            [RestartHealthChecks()],
        ),
        (
            parse('[gpus]\nreplicas_per_gpu = 4\n[agent]\nstate_dir = "/run/other"\n'),
            SERVING_BOTH,
            [restart_needed("agent.state_dir")],
        ),
        (
            parse('[gpus]\nreplicas_per_gpu = 8\n[mps]\npipe_root = "/run/other-mps"\n'),
            SERVING_BOTH,
            [restart_needed("mps.pipe_root")],
        ),
        (
            parse(
                '[gpus]\nreplicas_per_gpu = 4\n[mps]\nlog_root = "/var/log/m"\nenabled = false\n'
            ),
            SERVING_BOTH,
            [restart_needed("mps.enabled, mps.log_root")],
        ),
        (
            parse(
                '[gpus]\nreplicas_per_gpu = 4\nbackend = "simulated"\ncompute_mode = "default"\n'
            ),
            SERVING_BOTH,
            [restart_needed("gpus.backend, gpus.compute_mode")],
        ),
        (
            parse('[gpus]\nreplicas_per_gpu = 4\n[mps]\nmanager = "direct"\nmulti_user = "on"\n'),
            SERVING_BOTH,
            [restart_needed("mps.manager, mps.multi_user")],
        ),
        (
            parse('[gpus]\nreplicas_per_gpu = 4\n[mps]\ncontrol_binary = "/usr/bin/m"\n'),
            SERVING_BOTH,
            [restart_needed("mps.control_binary")],
        ),
    ],
    ids=[
        "same",
        "more-replicas",
        "serve-fewer",
        "gpu-appeared",
        "missing-gpu-warned",
        "serves-nothing-refused",
        "log-level",
        "plugin-changed",
        "health-changed",
        "state-dir-needs-restart",
        "pipe-root-needs-restart",
        "mps-off-needs-restart",
        "backend-needs-restart",
        "mps-manager-needs-restart",
        "control-binary-needs-restart",
    ],
)
def test_plan_reload(new: Config, served: dict[str, int], expected: list[ReloadAction]) -> None:
    """A reload does exactly what the difference between the configs and GPUs asks."""
    assert plan_reload(RUNNING, new, TWO_GPUS, served) == expected


@pytest.mark.parametrize(
    ("mps_text", "changed"),
    [
        ('thread_limit = "none"\n', True),
        ("memory_limit = 4096\n", True),
        ("memory_headroom_mib = 512\n", True),
        ("share_host_shm = true\n", True),
        ("control_timeout_s = 3\n", False),
    ],
    ids=["threads", "memory", "headroom", "host-shm", "not-a-grant-setting"],
)
def test_plan_reload_grant_policy(mps_text: str, changed: bool) -> None:
    """Only settings that change what Allocate grants give a new grant policy."""
    new = parse("[gpus]\nreplicas_per_gpu = 4\n[mps]\n" + mps_text)
    actions = plan_reload(RUNNING, new, TWO_GPUS, SERVING_BOTH)
    assert (UseGrantPolicy(grant_policy(new)) in actions) is changed


def test_plan_reload_orders_new_gpus_before_withdrawals() -> None:
    """GPUs to serve come before the ones to withdraw, and registration and health last."""
    new = parse('[gpus]\nreplicas_per_gpu = 4\nserve = [1]\n[plugin]\nsocket_name = "b.sock"\n')
    actions = plan_reload(RUNNING, new, TWO_GPUS, {gpu_uuid(0): 4})
    assert actions == [ServeGpu(TWO_GPUS[1], 4), WithdrawGpu(gpu_uuid(0)), Reregister()]


def test_grant_policy_off_without_mps() -> None:
    """Without MPS, Allocate grants only the GPU."""
    assert grant_policy(parse("[mps]\nenabled = false\n")) is None


@pytest.mark.parametrize(
    ("mps_text", "expected"),
    [
        (
            "max_vgpus_per_container = 2\n",
            [
                UseGrantPolicy(
                    grant_policy(
                        parse("[gpus]\nreplicas_per_gpu = 4\n[mps]\nmax_vgpus_per_container = 2\n")
                    )
                ),
                ApplyCeiling(TWO_GPUS[0], 4),
                ApplyCeiling(TWO_GPUS[1], 4),
            ],
        ),
        ('confinement = "cooperative"\n', "no ApplyCeiling"),
        ('confinement = "cooperative"\ndaemon_thread_limit = 10\n', "ApplyCeiling"),
    ],
    ids=["more-vgpus-per-container", "cooperative-without-ceiling", "cooperative-own-ceiling"],
)
def test_plan_reload_confinement(mps_text: str, expected: object) -> None:
    """A reload that changes the ceiling re-applies it to the running daemons; one that
    leaves no ceiling sends nothing (running daemons keep theirs until they restart)."""
    new = parse("[gpus]\nreplicas_per_gpu = 4\n[mps]\n" + mps_text)
    actions = plan_reload(RUNNING, new, TWO_GPUS, SERVING_BOTH)
    if isinstance(expected, list):
        assert actions == expected
        return
    applied = [action for action in actions if isinstance(action, ApplyCeiling)]
    assert bool(applied) is (expected == "ApplyCeiling"), actions


def test_plan_reload_device_list_strategy() -> None:
    """A new plugin.device_list_strategy is used for the next Allocate (and, being a plugin
    setting, the plugin registers again)."""
    new = parse('[gpus]\nreplicas_per_gpu = 4\n[plugin]\ndevice_list_strategy = "cdi"\n')
    actions = plan_reload(RUNNING, new, TWO_GPUS, SERVING_BOTH)
    assert actions == [UseDeviceListStrategy("cdi"), Reregister()]


@pytest.mark.parametrize(
    ("config_text", "words"),
    [
        ("", "enforced: each MPS daemon holds every client to at most 1 vGPU's share"),
        ("[mps]\nmax_vgpus_per_container = 3\n", "at most 3 vGPUs' share"),
        ('[mps]\nconfinement = "cooperative"\n', "cooperative: each container's limits"),
        ("[mps]\nenabled = false\n", "none: MPS is off"),
    ],
    ids=["enforced", "enforced-3", "cooperative", "mps-off"],
)
def test_confinement_line(config_text: str, words: str) -> None:
    """status and doctor say in one line who holds a pod to its share."""
    assert words in confinement_line(parse(config_text))


def test_daemon_ceiling_by_mode() -> None:
    """Enforced: max_vgpus_per_container shares; cooperative: mps.daemon_*_limit (none by
    default); MPS off: none."""
    gpu_memory_mib = 80_000
    assert gpu_ceiling(parse(""), gpu_memory_mib, 8).describe() == "12.5% of the SMs, 10000 MiB"
    cooperative = parse('[mps]\nconfinement = "cooperative"\n')
    assert gpu_ceiling(cooperative, gpu_memory_mib, 8).empty
    own = parse('[mps]\nconfinement = "cooperative"\ndaemon_memory_limit = "proportional"\n')
    assert gpu_ceiling(own, gpu_memory_mib, 8).describe() == "10000 MiB"
    assert gpu_ceiling(parse("[mps]\nenabled = false\n"), gpu_memory_mib, 8).empty


# -- which GPUs to serve ---------------------------------------------------------------------


def _gpu(index: int, model: str = "NVIDIA A10G", cc: tuple[int, int] = (8, 6)) -> Gpu:
    return Gpu(index, f"GPU-{index}", model, 24_000, cc)


@pytest.mark.parametrize(
    ("config_text", "gpus", "served", "refused_words"),
    [
        ("", [_gpu(0), _gpu(1)], [("GPU-0", 10), ("GPU-1", 10)], []),
        ("[gpus]\nserve = [1]\n", [_gpu(0), _gpu(1)], [("GPU-1", 10)], []),
        ('[gpus]\nserve = ["GPU-7"]\n', [_gpu(0)], [], ["no such GPU"]),
        ('[gpus.replicas_by_model]\n"A10G" = 7\n', [_gpu(0)], [("GPU-0", 7)], []),
        ("[gpus]\nreplicas_per_gpu = 20\n", [_gpu(0, "Tesla P100", (6, 0))], [], ["Volta"]),
        (
            "[gpus]\nreplicas_per_gpu = 20\nallow_unconfined_sharing = true\n",
            [_gpu(0, "Tesla P100", (6, 0))],
            [],
            ["16 MPS clients"],
        ),
        (
            "[gpus]\nallow_unconfined_sharing = true\n",
            [_gpu(0, "Tesla P100", (6, 0))],
            [("GPU-0", 10)],
            [],
        ),
        ("[mps]\nenabled = false\n", [_gpu(0, "Tesla P100", (6, 0))], [("GPU-0", 10)], []),
    ],
    ids=[
        "all",
        "by-index",
        "missing-uuid",
        "model-override",
        "pre-volta-refused",
        "pre-volta-over-16",
        "pre-volta-allowed",
        "no-mps-no-limit",
    ],
)
def test_plan_gpus(
    config_text: str, gpus: list[Gpu], served: list[tuple[str, int]], refused_words: list[str]
) -> None:
    """GPU selection honours serve, model overrides, the MPS client limit and Volta."""
    plan = plan_gpus(parse(config_text), gpus)
    assert [(gpu.uuid, replicas) for gpu, replicas in plan.served] == served
    assert len(plan.refused) == len(refused_words)
    for message, word in zip(plan.refused, refused_words):
        assert word in message


def test_mig_refused() -> None:
    """A GPU in MIG mode is refused under MPS with the reason."""
    gpu = Gpu(0, "GPU-0", "NVIDIA A100", 40_000, (8, 0), mig_enabled=True)
    plan = plan_gpus(Config(), [gpu])
    assert not plan.served
    assert "MIG" in plan.refused[0]
