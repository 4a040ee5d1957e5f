"""The simulated GPU backend and MPS daemons: GPUs from config, stable UUIDs, compute
modes, loss and recovery, injected events, unwatchable GPUs and failures on demand."""

from __future__ import annotations

import threading
import time
import uuid as uuid_module
from typing import Callable, Optional

import pytest

from vgpu_agent.config.parse import parse
from vgpu_agent.config.schema import SimulatedConfig, SimulatedGpu
from vgpu_agent.model.daemons import MpsDaemons, QuickCheck, check_now
from vgpu_agent.model.errors import GpuError, GpuLostError
from vgpu_agent.model.gpu import ComputeMode, Gpu, GpuBackend, GpuEvent, GpuEventKind, GpuProcess
from vgpu_agent.standins.simulated import (
    SimulatedBackend,
    SimulatedMpsDaemons,
    gpus_from_config,
    simulated_uuid,
)

#: Generous bound for "it happened promptly" (the machine may be busy running other tests).
PROMPTLY_S = 5.0
OTHER_UUID = "GPU-ffffffff-ffff-ffff-ffff-ffffffffffff"


def three_gpus() -> list[Gpu]:
    """Three simulated GPUs of the default model."""
    return gpus_from_config(SimulatedConfig(count=3))


def uuids(backend: SimulatedBackend) -> list[str]:
    """The UUIDs the backend lists, in order."""
    return [gpu.uuid for gpu in backend.list_gpus()]


# -- GPUs from config ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "numa_nodes"),
    [(0, []), (1, [0]), (2, [0, 1]), (3, [0, 0, 1]), (8, [0, 0, 0, 0, 1, 1, 1, 1])],
    ids=["none", "one", "two", "three", "eight"],
)
def test_gpus_from_count(count: int, numa_nodes: list[int]) -> None:
    """``count`` GPUs of the configured model, indexed in order, split over two NUMA nodes."""
    config = SimulatedConfig(
        count=count, model="NVIDIA A10G", memory_mib=22_731, compute_capability=(8, 6)
    )
    gpus = gpus_from_config(config)
    assert [gpu.index for gpu in gpus] == list(range(count))
    assert [gpu.uuid for gpu in gpus] == [simulated_uuid(index) for index in range(count)]
    assert {(gpu.model, gpu.memory_mib, gpu.compute_capability) for gpu in gpus} <= {
        ("NVIDIA A10G", 22_731, (8, 6))
    }
    assert [gpu.numa_node for gpu in gpus] == numa_nodes
    assert len({gpu.pci_bus_id for gpu in gpus}) == count


def test_gpus_from_explicit_list() -> None:
    """Explicit [[simulated.gpus]] entries keep their UUID, model, memory, NUMA and MIG."""
    config = SimulatedConfig(
        gpus=(
            SimulatedGpu(
                uuid="GPU-aaaa",
                model="Tesla V100",
                memory_mib=16_160,
                compute_capability=(7, 0),
                numa_node=1,
            ),
            SimulatedGpu(uuid="GPU-bbbb", mig_enabled=True),
        )
    )
    first, second = gpus_from_config(config)
    assert (first.index, first.uuid, first.model, first.memory_mib) == (
        0,
        "GPU-aaaa",
        "Tesla V100",
        16_160,
    )
    assert (first.compute_capability, first.numa_node, first.mig_enabled) == ((7, 0), 1, False)
    assert (second.index, second.uuid, second.mig_enabled, second.numa_node) == (
        1,
        "GPU-bbbb",
        True,
        None,
    )
    assert first.pci_bus_id != second.pci_bus_id


def test_gpus_from_parsed_config() -> None:
    """A [simulated] table parsed from TOML gives the GPUs it describes."""
    config = parse("version = 1\n[simulated]\ncount = 4\n")
    assert len(gpus_from_config(config.simulated)) == 4


def test_simulated_uuids_are_stable() -> None:
    """The same index always gives the same UUID (docs and scripts may name it)."""
    assert simulated_uuid(0) == "GPU-2b8519d0-6915-53d5-9434-df58b7f0a541"
    assert gpus_from_config(SimulatedConfig(count=5)) == gpus_from_config(SimulatedConfig(count=5))


def test_simulated_uuids_look_real() -> None:
    """Simulated UUIDs are distinct, 'GPU-' plus a real UUID, 40 characters like NVML's."""
    generated = [simulated_uuid(index) for index in range(64)]
    assert len(set(generated)) == 64
    for gpu_uuid in generated:
        assert gpu_uuid.startswith("GPU-")
        assert len(gpu_uuid) == 40
        uuid_module.UUID(gpu_uuid[4:])


def test_backends_satisfy_the_protocols() -> None:
    """The simulated classes can stand wherever the agent takes a backend or MPS daemons."""
    backend: GpuBackend = SimulatedBackend(three_gpus())
    daemons: MpsDaemons = SimulatedMpsDaemons("/run/p", "/var/log/p")
    assert backend.list_gpus()
    assert check_now(daemons, OTHER_UUID) is not None


# -- compute mode, loss, recovery ------------------------------------------------------------


@pytest.mark.parametrize("mode", list(ComputeMode), ids=[mode.value for mode in ComputeMode])
def test_compute_mode_set_and_get(mode: ComputeMode) -> None:
    """A GPU starts in DEFAULT and reports whatever mode was set last, only on that GPU."""
    gpus = three_gpus()
    backend = SimulatedBackend(gpus)
    assert backend.get_compute_mode(gpus[1].uuid) is ComputeMode.DEFAULT
    backend.set_compute_mode(gpus[1].uuid, mode)
    assert backend.get_compute_mode(gpus[1].uuid) is mode
    assert backend.get_compute_mode(gpus[0].uuid) is ComputeMode.DEFAULT


@pytest.mark.parametrize(
    "call",
    [
        lambda backend: backend.get_compute_mode(OTHER_UUID),
        lambda backend: backend.set_compute_mode(OTHER_UUID, ComputeMode.DEFAULT),
        lambda backend: backend.check(OTHER_UUID),
        lambda backend: backend.lose(OTHER_UUID),
        lambda backend: backend.recover(OTHER_UUID),
    ],
    ids=["get-mode", "set-mode", "check", "lose", "recover"],
)
def test_unknown_gpu_is_an_error_naming_the_known_ones(
    call: Callable[[SimulatedBackend], object],
) -> None:
    """Asking about a GPU that does not exist raises GpuError listing the GPUs there are."""
    gpus = three_gpus()
    with pytest.raises(GpuError) as caught:
        call(SimulatedBackend(gpus))
    assert not isinstance(caught.value, GpuLostError)
    assert OTHER_UUID in str(caught.value)
    assert gpus[0].uuid in str(caught.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda backend, gpu_uuid: backend.check(gpu_uuid),
        lambda backend, gpu_uuid: backend.get_compute_mode(gpu_uuid),
        lambda backend, gpu_uuid: backend.set_compute_mode(gpu_uuid, ComputeMode.DEFAULT),
    ],
    ids=["check", "get-mode", "set-mode"],
)
def test_lost_gpu_raises_gpu_lost(call: Callable[[SimulatedBackend, str], object]) -> None:
    """Every query of a lost GPU raises GpuLostError naming the GPU."""
    gpus = three_gpus()
    backend = SimulatedBackend(gpus)
    backend.lose(gpus[1].uuid)
    with pytest.raises(GpuLostError, match=gpus[1].uuid):
        call(backend, gpus[1].uuid)


def test_lose_hides_the_gpu_and_recover_brings_it_back() -> None:
    """A lost GPU disappears from list_gpus; after recover it is listed in place again."""
    gpus = three_gpus()
    backend = SimulatedBackend(gpus)
    backend.set_compute_mode(gpus[1].uuid, ComputeMode.EXCLUSIVE_PROCESS)
    backend.lose(gpus[1].uuid)
    assert uuids(backend) == [gpus[0].uuid, gpus[2].uuid]
    backend.check(gpus[0].uuid)
    backend.recover(gpus[1].uuid)
    assert uuids(backend) == [gpu.uuid for gpu in gpus]
    backend.check(gpus[1].uuid)
    assert backend.get_compute_mode(gpus[1].uuid) is ComputeMode.EXCLUSIVE_PROCESS


def test_recover_of_a_healthy_gpu_changes_nothing() -> None:
    """Recovering a GPU that was never lost is harmless."""
    gpus = three_gpus()
    backend = SimulatedBackend(gpus)
    backend.recover(gpus[0].uuid)
    assert uuids(backend) == [gpu.uuid for gpu in gpus]


# -- events --------------------------------------------------------------------------------


def test_events_come_only_for_watched_gpus() -> None:
    """Injected events reach wait_events for watched GPUs; others' events are dropped."""
    gpus = three_gpus()
    backend = SimulatedBackend(gpus)
    assert backend.watch_events([gpus[0].uuid, gpus[2].uuid]) == []
    backend.inject_xid(gpus[0].uuid, 79)
    backend.inject_xid(gpus[1].uuid, 79)
    backend.inject_double_bit_ecc(gpus[2].uuid)
    backend.lose(gpus[0].uuid)
    events = backend.wait_events(0)
    assert [(event.kind, event.gpu_uuid, event.xid) for event in events] == [
        (GpuEventKind.XID, gpus[0].uuid, 79),
        (GpuEventKind.DOUBLE_BIT_ECC, gpus[2].uuid, None),
        (GpuEventKind.LOST, gpus[0].uuid, None),
    ]
    assert all(event.detail for event in events)
    assert backend.wait_events(0) == []


def test_event_without_a_device_reaches_the_watcher() -> None:
    """An event with no device attached comes out even when no GPU is watched."""
    backend = SimulatedBackend(three_gpus())
    backend.inject_xid(None, 48)
    assert backend.wait_events(0) == [GpuEvent(GpuEventKind.XID, None, 48, "simulated XID 48")]


def test_unwatchable_gpu_is_reported_and_gets_no_events() -> None:
    """watch_events names unwatchable GPUs; their events never come out (they are polled)."""
    gpus = three_gpus()
    backend = SimulatedBackend(gpus)
    backend.set_unwatchable(gpus[1].uuid)
    assert backend.watch_events([gpu.uuid for gpu in gpus]) == [gpus[1].uuid]
    backend.inject_xid(gpus[1].uuid, 79)
    backend.lose(gpus[1].uuid)
    assert backend.wait_events(0) == []
    with pytest.raises(GpuLostError):
        backend.check(gpus[1].uuid)


def test_wait_events_times_out_empty() -> None:
    """With nothing injected, wait_events returns no events after about its timeout."""
    backend = SimulatedBackend(three_gpus())
    started = time.monotonic()
    assert backend.wait_events(0.05) == []
    assert time.monotonic() - started < PROMPTLY_S


def test_wait_events_wakes_on_injection_from_another_thread() -> None:
    """A blocked wait_events returns as soon as another thread injects an event."""
    gpus = three_gpus()
    backend = SimulatedBackend(gpus)
    backend.watch_events([gpus[0].uuid])
    received: list[GpuEvent] = []
    waiter = threading.Thread(target=lambda: received.extend(backend.wait_events(30)))
    started = time.monotonic()
    waiter.start()
    backend.inject_xid(gpus[0].uuid, 79)
    waiter.join(PROMPTLY_S)
    assert not waiter.is_alive()
    assert time.monotonic() - started < PROMPTLY_S
    assert [event.xid for event in received] == [79]


def test_close_wakes_a_waiter() -> None:
    """close() marks the backend closed and releases a blocked wait_events."""
    backend = SimulatedBackend(three_gpus())
    received: list[list[GpuEvent]] = []
    waiter = threading.Thread(target=lambda: received.append(backend.wait_events(30)))
    waiter.start()
    time.sleep(0.05)
    backend.close()
    waiter.join(PROMPTLY_S)
    assert not waiter.is_alive()
    assert received == [[]]
    assert backend.closed


# -- failures on demand ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda backend, gpu_uuid: backend.list_gpus(),
        lambda backend, gpu_uuid: backend.check(gpu_uuid),
        lambda backend, gpu_uuid: backend.get_compute_mode(gpu_uuid),
        lambda backend, gpu_uuid: backend.set_compute_mode(gpu_uuid, ComputeMode.DEFAULT),
        lambda backend, gpu_uuid: backend.watch_events([gpu_uuid]),
        lambda backend, gpu_uuid: backend.wait_events(0),
    ],
    ids=["list", "check", "get-mode", "set-mode", "watch", "wait"],
)
def test_fail_calls(call: Callable[[SimulatedBackend, str], object]) -> None:
    """fail_calls makes each call raise GpuError with the reason; None makes it work again."""
    gpus = three_gpus()
    backend = SimulatedBackend(gpus)
    backend.fail_calls("driver went away")
    with pytest.raises(GpuError, match="driver went away") as caught:
        call(backend, gpus[0].uuid)
    assert not isinstance(caught.value, GpuLostError)
    backend.fail_calls(None)
    call(backend, gpus[0].uuid)


def test_failing_wait_keeps_queued_events() -> None:
    """Events injected while calls fail come out once calls work again."""
    gpus = three_gpus()
    backend = SimulatedBackend(gpus)
    backend.watch_events([gpus[0].uuid])
    backend.fail_calls("busy")
    backend.inject_xid(gpus[0].uuid, 79)
    with pytest.raises(GpuError):
        backend.wait_events(0)
    backend.fail_calls(None)
    assert [event.xid for event in backend.wait_events(0)] == [79]


def test_fail_init() -> None:
    """fail_init makes the constructor raise GpuError, as a broken NVML init would."""
    with pytest.raises(GpuError, match="initialising the simulated GPU backend: no driver"):
        SimulatedBackend(three_gpus(), fail_init="no driver")


# -- simulated MPS daemons ------------------------------------------------------------------


def test_mps_daemon_start_gives_its_directories() -> None:
    """start() reports the GPU's pipe and log directories under the roots."""
    gpu = three_gpus()[0]
    daemons = SimulatedMpsDaemons("/run/p", "/var/log/p", multi_user=False)
    info = daemons.start(gpu)
    assert (info.gpu_uuid, info.pipe_dir, info.log_dir, info.multi_user) == (
        gpu.uuid,
        f"/run/p/{gpu.uuid}",
        f"/var/log/p/{gpu.uuid}",
        False,
    )


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([], "MPS daemon not started"),
        (["start"], None),
        (["start", "stop"], "MPS daemon not started"),
        (["start", "down"], "MPS daemon down (simulated)"),
        (["start", "down-custom"], "MPS daemon hung"),
        (["start", "down", "up"], None),
        (["down", "start"], "MPS daemon down (simulated)"),
        (["start", "up"], None),
    ],
    ids=[
        "never-started",
        "started",
        "stopped",
        "set-down",
        "custom-reason",
        "down-then-up",
        "down-survives-start",
        "up-when-not-down",
    ],
)
def test_mps_daemon_checks(steps: list[str], expected: Optional[str]) -> None:
    """Both checks are None while the daemon runs and is not set down, else say why."""
    gpu = three_gpus()[0]
    daemons = SimulatedMpsDaemons("/run/p", "/var/log/p")
    actions: dict[str, Callable[[], object]] = {
        "start": lambda: daemons.start(gpu),
        "stop": lambda: daemons.stop(gpu.uuid),
        "down": lambda: daemons.set_down(gpu.uuid),
        "down-custom": lambda: daemons.set_down(gpu.uuid, "MPS daemon hung"),
        "up": lambda: daemons.set_down(gpu.uuid, None),
    }
    for step in steps:
        actions[step]()
    assert daemons.quick_check(gpu.uuid) == QuickCheck(expected)
    assert daemons.full_check(gpu.uuid) == expected


def test_mps_daemon_down_is_per_gpu() -> None:
    """Setting one GPU's daemon down leaves the others answering."""
    gpus = three_gpus()
    daemons = SimulatedMpsDaemons("/run/p", "/var/log/p")
    for gpu in gpus:
        daemons.start(gpu)
    daemons.set_down(gpus[1].uuid)
    assert [check_now(daemons, gpu.uuid) for gpu in gpus] == [
        None,
        "MPS daemon down (simulated)",
        None,
    ]


def test_simulated_mps_clients_come_and_go() -> None:
    """Simulated MPS clients are listed per GPU by pid with their memory, until they exit."""
    gpus = gpus_from_config(SimulatedConfig(count=2))
    backend = SimulatedBackend(gpus)
    backend.add_mps_client(gpus[0].uuid, 20, 300)
    backend.add_mps_client(gpus[0].uuid, 10, None)
    backend.add_mps_client(gpus[1].uuid, 30, 50)
    assert backend.mps_client_processes(gpus[0].uuid) == [
        GpuProcess(10, gpus[0].uuid, None),
        GpuProcess(20, gpus[0].uuid, 300),
    ]
    backend.add_mps_client(gpus[0].uuid, 20, 900)
    backend.remove_mps_client(10)
    assert backend.mps_client_processes(gpus[0].uuid) == [GpuProcess(20, gpus[0].uuid, 900)]
    backend.lose(gpus[1].uuid)
    with pytest.raises(GpuLostError):
        backend.mps_client_processes(gpus[1].uuid)
    with pytest.raises(GpuError, match="no simulated GPU"):
        backend.add_mps_client("GPU-nope", 1, 1)
