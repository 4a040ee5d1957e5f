"""On a real NVIDIA GPU: a client holding 1 vGPU of N gets no more SMs and no more memory
than its ceiling, whatever it does with its limit variables (issue 11 item 6).

The ceiling is the daemon's defaults as the agent sets them in its default configuration
(enforced confinement, one vGPU per container at most); the client runs the way a
container runtime starts it from Allocate (pod-like namespaces, uid 1000, the grant's
mounts), then either keeps the grant's variables, unsets them, or raises them to the whole
GPU. Run with scripts/test-gpu; bench/gpu_mps.py --study hostile prints the same figures
as a table beside a daemon without a ceiling."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import pytest

from vgpu_agent.config.plan import daemon_ceiling
from vgpu_agent.model.daemons import check_now
from vgpu_agent.mps.ceilings import ceiling_gaps

from .conftest import Node

pytestmark = pytest.mark.gpu
NodeFactory = Callable[..., Node]
#: vGPUs per GPU here: the ceiling is one eighth of the SMs and of the memory.
REPLICAS = 8
#: How much more matrix throughput than the compliant client counts as noise.
THROUGHPUT_NOISE = 1.15


def _with_ceiling(make_node: NodeFactory) -> tuple[Node, int]:
    """A node as the agent runs it by default (enforced confinement, at most 1 vGPU per
    container), its GPU 0 daemon holding the ceiling; returns it and the memory slice."""
    node = make_node(replicas=REPLICAS, max_vgpus_per_container=1)
    print(
        "daemon ceiling:",
        node.control(0, "get_default_active_thread_percentage"),
        "% threads,",
        node.control(0, "get_default_device_pinned_mem_limit 0"),
    )
    return node, node.gpus[0].memory_mib // REPLICAS


def _run(node: Node, label: str, envs: dict[str, str]) -> dict[str, Any]:
    """One client alone on the GPU with the grant's mounts and exactly ``envs``."""
    grant = node.allocate(0, 1)
    shaped = type(grant)()
    shaped.CopyFrom(grant)
    shaped.envs.clear()
    shaped.envs.update(envs)
    report = node.start_client(shaped, 1000, label, ["--probe-s", "2", "--max-alloc"]).result()
    print(
        f"{label}: {report['multi_processor_count']} SMs reported, {report['tflops']} TFLOP/s, "
        f"at most {report['max_alloc_mib']} MiB allocated, env "
        f"{ {k: v for k, v in envs.items() if 'LIMIT' in k or 'PERCENTAGE' in k} }"
    )
    return report


LIMIT_VARIABLES = ("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT")


@pytest.mark.parametrize("tamper", ["unset", "raised-to-whole-gpu"])
def test_a_client_cannot_leave_its_ceiling(make_node: NodeFactory, tamper: str) -> None:
    """A client that unsets its limit variables, or raises them to 100 % and the whole
    memory, gets no more SMs, throughput or memory than a compliant client of one vGPU."""
    node, slice_mib = _with_ceiling(make_node)
    granted = dict(node.allocate(0, 1).envs)
    compliant = _run(node, "compliant", granted)
    if tamper == "unset":
        envs = {key: value for key, value in granted.items() if key not in LIMIT_VARIABLES}
    else:
        envs = {
            **granted,
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100",
            "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={node.gpus[0].memory_mib}M",
        }
    hostile = _run(node, tamper, envs)
    assert hostile["multi_processor_count"] <= compliant["multi_processor_count"]
    assert hostile["tflops"] <= compliant["tflops"] * THROUGHPUT_NOISE
    # Its own CUDA context counts against the limit, so it allocates a little less.
    assert compliant["max_alloc_mib"] <= slice_mib
    assert hostile["max_alloc_mib"] <= slice_mib
    assert hostile["max_alloc_mib"] > slice_mib // 2


def test_a_client_can_still_lower_its_own_limits(make_node: NodeFactory) -> None:
    """Below the ceiling a client's variables still apply: half a share and 4 GiB hold it."""
    node, slice_mib = _with_ceiling(make_node)
    granted = dict(node.allocate(0, 1).envs)
    compliant = _run(node, "compliant", granted)
    lowered = _run(
        node,
        "lowered",
        {
            **granted,
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": f"{100 / REPLICAS / 2:g}",
            "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=4096M",
        },
    )
    assert lowered["max_alloc_mib"] <= 4096 < slice_mib
    assert lowered["tflops"] < compliant["tflops"] * 0.75


def test_the_ceiling_reads_back_as_it_was_set(make_node: NodeFactory) -> None:
    """The daemon's answers to the get commands match the ceiling the agent set, so the
    liveness probe's full check keeps the GPU healthy instead of seeing the ceiling lost."""
    node, _ = _with_ceiling(make_node)
    pipe_dir = node.state.inventory().gpus[0].pipe_dir
    assert pipe_dir is not None
    ceiling = daemon_ceiling(node.config.mps, node.gpus[0].memory_mib, REPLICAS)
    assert ceiling.thread_percentage is not None
    assert ceiling.memory_mib is not None
    assert ceiling_gaps(node.config.mps, pipe_dir, ceiling) == []
    # A whole check includes the full one: it reads the ceiling back.
    assert check_now(node.daemons, node.gpus[0].uuid) is None


def test_a_ceiling_set_while_a_server_runs_holds_its_new_clients(make_node: NodeFactory) -> None:
    """A ceiling the agent sets on a daemon whose MPS server already runs (a daemon that came
    back bare and served a client before the probe put the ceiling back, or a reload) holds
    that server's new clients too, not only servers started later."""
    node = make_node(replicas=REPLICAS, max_vgpus_per_container=1, confinement="cooperative")
    slice_mib = node.gpus[0].memory_mib // REPLICAS
    granted = dict(node.allocate(0, 1).envs)
    bare = {key: value for key, value in granted.items() if key not in LIMIT_VARIABLES}
    holder = node.allocate(0, 1)
    holder.envs.clear()
    holder.envs.update(bare)
    node.start_client(holder, 1000, "holder", ["--hold-s", "60"])
    node.wait_for_clients(0, 1)
    assert node.control(0, "get_server_list").split(), "no MPS server runs"
    enforced = replace(node.config.mps, confinement="enforced")
    sent = node.daemons.apply_defaults(
        node.gpus[0], daemon_ceiling(enforced, node.gpus[0].memory_mib, REPLICAS)
    )
    print("sent:", sent)
    late = _run(node, "unset, running server", bare)
    compliant = _run(node, "compliant, running server", granted)
    assert late["multi_processor_count"] <= compliant["multi_processor_count"]
    assert late["tflops"] <= compliant["tflops"] * THROUGHPUT_NOISE
    assert late["max_alloc_mib"] <= slice_mib
