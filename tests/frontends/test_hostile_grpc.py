"""Hostile input to the DevicePlugin server over its real unix socket (issue 7, item 8):
hand-written and generated requests to every RPC, bytes that are not a valid message, and
raw garbage written straight to the socket. Each request gets the right status code and a
message a person can read, and the server keeps serving."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_inventory
from vgpu_agent.frontends._proto import deviceplugin_pb2 as pb
from vgpu_agent.frontends.deviceplugin.server import (
    MAX_IDS_PER_REQUEST,
    PluginServer,
    PluginServicer,
    device_plugin_stub,
)
from vgpu_agent.model.devices import HealthReason, Inventory, MpsGrantPolicy
from vgpu_agent.model.node import Node

TIMEOUT_S = 10.0
#: A status message a person reads in `kubectl describe pod` stays short.
MAX_DETAILS_CHARS = 600
#: The HTTP/2 client connection preface (RFC 9113, section 3.4).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

Outcome = tuple[Union[str, grpc.StatusCode], Any]


@dataclass
class Hostile:
    """A plugin server on a real socket, a client, and a count of hostile inputs sent."""

    inventory: Inventory
    server: PluginServer
    channel: Any
    stub: Any
    sent: int = 0

    @property
    def socket_path(self) -> str:
        return self.server.socket_path

    def call(self, rpc: str, request: Any) -> Outcome:
        """("OK", response) or (status code, details) of one unary call."""
        self.sent += 1
        try:
            return "OK", getattr(self.stub, rpc)(request, timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""

    def assert_serves(self) -> None:
        """A normal Allocate still gets a normal answer."""
        vgpu_id = self.inventory.gpus[0].vgpu_ids[0]
        request = pb.AllocateRequest(
            container_requests=[pb.ContainerAllocateRequest(devices_ids=[vgpu_id])]
        )
        response = self.stub.Allocate(request, timeout=TIMEOUT_S)
        assert response.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == (
            self.inventory.gpus[0].gpu.uuid
        )


#: Every hostile input of the module, for the figure in docs/reliability.md.
SENT: list[int] = []


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    """One server for the whole module (hypothesis runs many examples against it)."""
    directory = tempfile.mkdtemp(prefix="vgh", dir="/tmp")
    inventory = make_inventory((4, 4), numa_nodes=(0, 1))
    servicer = PluginServicer(Node(inventory, MpsGrantPolicy()))
    server = PluginServer(os.path.join(directory, "vgpu.sock"), servicer)
    server.start()
    channel = grpc.insecure_channel(f"unix://{server.socket_path}")
    target = Hostile(inventory, server, channel, device_plugin_stub(channel))
    try:
        yield target
    finally:
        SENT.append(target.sent)
        print(f"\nhostile gRPC inputs sent: {target.sent}")
        channel.close()
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def assert_readable(details: str) -> None:
    """A status message a person understands: some words, short, no traceback, no raw
    control characters (ids are shown quoted and escaped)."""
    assert details.strip(), "empty status message"
    assert len(details) <= MAX_DETAILS_CHARS, details
    assert "Traceback" not in details
    assert details.isprintable(), repr(details)


def allocate_request(*containers: list[str]) -> pb.AllocateRequest:
    """An Allocate request with one container request per id list."""
    return pb.AllocateRequest(
        container_requests=[pb.ContainerAllocateRequest(devices_ids=ids) for ids in containers]
    )


def preferred_request(
    *containers: tuple[list[str], list[str], int],
) -> pb.PreferredAllocationRequest:
    """A GetPreferredAllocation request from (available, must include, size) per container."""
    return pb.PreferredAllocationRequest(
        container_requests=[
            pb.ContainerPreferredAllocationRequest(
                available_deviceIDs=available,
                must_include_deviceIDs=must_include,
                allocation_size=size,
            )
            for available, must_include, size in containers
        ]
    )


NODE = make_inventory((4, 4), numa_nodes=(0, 1))
GPU0 = NODE.gpus[0].vgpu_ids
GPU1 = NODE.gpus[1].vgpu_ids
UUID0 = NODE.gpus[0].gpu.uuid
ALL_IDS = GPU0 + GPU1
INVALID = grpc.StatusCode.INVALID_ARGUMENT


# -- hand-written: Allocate -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("containers", "code", "words"),
    [
        ((), INVALID, "no container requests"),
        (([],), INVALID, "names no vGPU ids"),
        ((["GPU-00000009-aaaa-bbbb-cccc-dddddddddddd::0"],), INVALID, "unknown vGPU id"),
        ((["hello"],), INVALID, "not a vGPU id of this plugin"),
        (([""],), INVALID, "not a vGPU id of this plugin"),
        (([GPU0[0], GPU0[0]],), INVALID, "more than once"),
        ((["x" * 64],), INVALID, "device ids are at most 63"),
        ((["G" * 10_000],), INVALID, "device ids are at most 63"),
        (([f"{UUID0}::99"],), INVALID, "unknown vGPU id"),
        (([f"{UUID0}::-1"],), INVALID, "not a vGPU id"),
        (([f"{UUID0}::01"],), INVALID, "not a vGPU id"),
        (([f"{UUID0}::\uff11"],), INVALID, "not a vGPU id"),  # a full-width digit one
        (([f"{UUID0}\x00::0"],), INVALID, "\\x00"),
        ((["\x1b[31mred::0"],), INVALID, "\\x1b"),
        ((["\u202eGPU::0"],), INVALID, "unknown vGPU id"),  # right-to-left override
        ((["GPU-\U0001f600\u200d::0"],), INVALID, "unknown vGPU id"),  # emoji, zero width
        (([GPU0[0], GPU1[0]],), INVALID, "spans 2 physical GPUs"),
        (([GPU0[0]], [GPU1[0], "bogus"]), INVALID, "not a vGPU id"),
        ((["x"] * 100_000,), INVALID, f"at most {MAX_IDS_PER_REQUEST}"),
        ((["x"] * 6_000, ["y"] * 6_000), INVALID, f"at most {MAX_IDS_PER_REQUEST}"),
        (([GPU0[0]], [GPU1[0], GPU1[1]]), "OK", ""),
        # One vGPU for two containers would grant it twice (issue 23).
        (([GPU0[0]], [GPU0[0]]), INVALID, "is asked for by containers 1 and 2"),
    ],
    ids=[
        "no-containers",
        "empty-container",
        "unknown-gpu",
        "not-an-id",
        "empty-id",
        "duplicate",
        "64-chars",
        "10000-chars",
        "replica-out-of-range",
        "negative-replica",
        "leading-zero",
        "full-width-digit",
        "nul-byte",
        "escape-sequence",
        "rtl-override",
        "emoji-zero-width-joiner",
        "spans-gpus",
        "one-bad-container-of-two",
        "100000-ids",
        "12000-ids-over-two-containers",
        "two-containers",
        "same-id-two-containers",
    ],
)
def test_allocate_hostile(
    hostile: Hostile, containers: tuple[list[str], ...], code: object, words: str
) -> None:
    """Allocate refuses each bad request with INVALID_ARGUMENT and a readable reason;
    good ones with several containers get one answer per container."""
    status, result = hostile.call("Allocate", allocate_request(*containers))
    assert status == code, (status, result)
    if code == "OK":
        assert len(result.container_responses) == len(containers)
    else:
        assert_readable(result)
        assert words in result
    hostile.assert_serves()


def test_allocate_100000_real_looking_ids(hostile: Hostile) -> None:
    """100,000 ids of real length exceed the message limit: gRPC refuses the request with
    RESOURCE_EXHAUSTED before our code runs, and the server keeps serving."""
    ids = [f"{UUID0}::{replica}" for replica in range(100_000)]
    status, details = hostile.call("Allocate", allocate_request(ids))
    assert status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in details
    hostile.assert_serves()


def test_allocate_unhealthy_id_names_the_reason() -> None:
    """An id of an unhealthy GPU is refused with the reason, for `kubectl describe pod`."""
    inventory = NODE.with_reason(UUID0, HealthReason.xid_fault(79), True)
    directory = tempfile.mkdtemp(prefix="vgh", dir="/tmp")
    server = PluginServer(os.path.join(directory, "vgpu.sock"), PluginServicer(Node(inventory)))
    server.start()
    try:
        with grpc.insecure_channel(f"unix://{server.socket_path}") as channel:
            stub = device_plugin_stub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Allocate(allocate_request([GPU0[1]]), timeout=TIMEOUT_S)
            assert refused.value.code() == INVALID
            assert "unhealthy (xid 79)" in refused.value.details()
            assert_readable(refused.value.details())
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


# -- hand-written: GetPreferredAllocation, PreStartContainer, options, streams -------------------


@pytest.mark.parametrize(
    ("containers", "code", "words"),
    [
        (((ALL_IDS, [], 0),), INVALID, "at least 1, got 0"),
        (((ALL_IDS, [], -5),), INVALID, "at least 1, got -5"),
        (((ALL_IDS, [], -(2**31)),), INVALID, "at least 1"),
        (((ALL_IDS, [], 2**31 - 1),), INVALID, f"larger than {MAX_IDS_PER_REQUEST}"),
        (((ALL_IDS, [GPU0[0], GPU0[1]], 1),), INVALID, "exceed the allocation size 1"),
        (((GPU1, [GPU0[0]], 1),), INVALID, "is not among the available ids"),
        (((["junk", *GPU0], ["junk"], 1),), INVALID, "not a vGPU id"),
        (((["x" * 64], [], 1),), INVALID, "device ids are at most 63"),
        (((["x"] * 100_000, [], 1),), INVALID, f"at most {MAX_IDS_PER_REQUEST}"),
        (((["x"], ["x"] * 100_000, 1),), INVALID, f"at most {MAX_IDS_PER_REQUEST}"),
        ((), "OK", ""),
        (((ALL_IDS, [], 9),), "OK", ""),  # larger than the node: a hint, best effort
        (((ALL_IDS, [], 3), (GPU1, [], 2)), "OK", ""),
        ((([], [], 1),), "OK", ""),
        (((["GPU-x::0", "junk", "\x00"], [], 2),), "OK", ""),  # unknown ids: nothing to pick
        (((["GPU-x::0"], ["GPU-x::0"], 1),), "OK", ""),
    ],
    ids=[
        "size-0",
        "size-negative",
        "size-int32-min",
        "size-int32-max",
        "must-include-over-size",
        "must-include-not-available",
        "must-include-not-an-id",
        "overlong-id",
        "100000-available",
        "100000-must-include",
        "no-containers",
        "size-larger-than-node",
        "two-containers",
        "nothing-available",
        "junk-available",
        "unknown-must-include",
    ],
)
def test_preferred_allocation_hostile(
    hostile: Hostile,
    containers: tuple[tuple[list[str], list[str], int], ...],
    code: object,
    words: str,
) -> None:
    """GetPreferredAllocation refuses impossible requests with INVALID_ARGUMENT and a
    readable reason; odd but possible ones get a hint within the rules."""
    status, result = hostile.call("GetPreferredAllocation", preferred_request(*containers))
    assert status == code, (status, result)
    if code != "OK":
        assert_readable(result)
        assert words in result
    else:
        assert len(result.container_responses) == len(containers)
        for (available, must_include, size), answer in zip(containers, result.container_responses):
            chosen = list(answer.deviceIDs)
            assert set(must_include) <= set(chosen)
            assert len(chosen) <= size
            assert set(chosen) <= set(available)
    hostile.assert_serves()


@pytest.mark.parametrize(
    "device_ids",
    [[], ["junk", "\x00", "x" * 1000], ["x"] * 50_000, GPU0],
    ids=["empty", "junk", "50000-ids", "real-ids"],
)
def test_pre_start_container_hostile(hostile: Hostile, device_ids: list[str]) -> None:
    """PreStartContainer is never needed (pre_start_required is false): it answers
    anything with an empty response and the server keeps serving."""
    status, result = hostile.call(
        "PreStartContainer", pb.PreStartContainerRequest(devices_ids=device_ids)
    )
    assert status == "OK", result
    hostile.assert_serves()


def test_options_repeatedly(hostile: Hostile) -> None:
    """GetDevicePluginOptions answers the same, call after call."""
    for _ in range(50):
        status, options = hostile.call("GetDevicePluginOptions", pb.Empty())
        assert status == "OK"
        assert options.get_preferred_allocation_available
        assert not options.pre_start_required


def test_too_many_streams_refused_then_freed(hostile: Hostile) -> None:
    """More ListAndWatch streams than allowed get RESOURCE_EXHAUSTED with a reason;
    cancelled streams free their slots, and unary calls are served throughout."""
    streams = []
    try:
        for _ in range(12):
            stream = hostile.stub.ListAndWatch(pb.Empty())
            assert len(next(stream).devices) == 8
            streams.append(stream)
        hostile.assert_serves()
        extra = hostile.stub.ListAndWatch(pb.Empty(), timeout=TIMEOUT_S)
        with pytest.raises(grpc.RpcError) as refused:
            next(extra)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert_readable(refused.value.details())
        hostile.sent += 13
    finally:
        for stream in streams:
            stream.cancel()
    again = hostile.stub.ListAndWatch(pb.Empty(), timeout=TIMEOUT_S)
    try:
        assert len(next(again).devices) == 8
    finally:
        again.cancel()


# -- bytes that are not a valid message ------------------------------------------------------------


def _raw_call(hostile: Hostile, method: str, payload: bytes) -> Outcome:
    """Call ``method`` with ``payload`` as the serialized request, unchecked."""
    call = hostile.channel.unary_unary(
        f"/v1beta1.DevicePlugin/{method}",
        request_serializer=None,
        response_deserializer=None,
    )
    hostile.sent += 1
    try:
        return "OK", call(payload, timeout=TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (payload under 128 bytes)."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


@pytest.mark.parametrize(
    "payload",
    [
        _field(1, _field(1, b"\xff\xfe::0")),  # a device id that is not UTF-8
        _field(1, _field(1, b"\xed\xa0\x80::0")),  # an encoded lone surrogate
        b"\xff" * 64,  # not protobuf at all
        b"\x0a\x7f\x00",  # a length running past the end
        b"\x08" + b"\xff" * 11,  # a varint longer than ten bytes
    ],
    ids=["invalid-utf8-id", "surrogate-id", "all-ff", "truncated-field", "overlong-varint"],
)
@pytest.mark.parametrize("method", ["Allocate", "GetPreferredAllocation", "PreStartContainer"])
def test_unparseable_request_refused(hostile: Hostile, method: str, payload: bytes) -> None:
    """A request whose bytes are not a valid message (ids that are not UTF-8, broken
    framing) is refused as a bad argument, and the server keeps serving."""
    status, details = _raw_call(hostile, method, payload)
    assert status == INVALID, (status, details)
    assert_readable(details)
    hostile.assert_serves()


# -- raw garbage on the socket ------------------------------------------------------------------


def _send_raw(path: str, data: bytes, *, hold: bool = False) -> Optional[socket.socket]:
    """Connect to the unix socket, write ``data``; close unless ``hold``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT_S)
    sock.connect(path)
    with contextlib.suppress(OSError):  # the server may close a garbage connection early
        sock.sendall(data)
    if hold:
        return sock
    sock.close()
    return None


def _settings_frame() -> bytes:
    return b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


GARBAGE: list[tuple[str, Callable[[random.Random], bytes]]] = [
    ("nothing", lambda rng: b""),
    ("one-byte", lambda rng: b"\x00"),
    ("random-1k", lambda rng: rng.randbytes(1024)),
    ("random-1m", lambda rng: rng.randbytes(1024 * 1024)),
    ("http1", lambda rng: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("preface-then-garbage", lambda rng: HTTP2_PREFACE + rng.randbytes(4096)),
    (
        "preface-settings-then-huge-frame",
        lambda rng: HTTP2_PREFACE + _settings_frame() + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01",
    ),
    ("half-preface", lambda rng: HTTP2_PREFACE[:10]),
]


@pytest.mark.parametrize("make", [make for _, make in GARBAGE], ids=[name for name, _ in GARBAGE])
def test_raw_garbage_does_not_take_it_down(
    hostile: Hostile, make: Callable[[random.Random], bytes]
) -> None:
    """Garbage written straight to the socket (and connections left half open) does not
    stop the server: a normal Allocate works while they are open and after."""
    rng = random.Random(7)  # noqa: S311 - not for security
    held = [_send_raw(hostile.socket_path, make(rng), hold=True) for _ in range(5)]
    for _ in range(20):
        _send_raw(hostile.socket_path, make(rng))
    hostile.sent += 25
    try:
        hostile.assert_serves()
    finally:
        for sock in held:
            if sock is not None:
                sock.close()
    hostile.assert_serves()


def test_many_idle_connections(hostile: Hostile) -> None:
    """100 connections that never speak do not starve the real client."""
    held = [_send_raw(hostile.socket_path, b"", hold=True) for _ in range(100)]
    hostile.sent += 100
    try:
        hostile.assert_serves()
    finally:
        for sock in held:
            if sock is not None:
                sock.close()


def test_garbage_from_many_threads_at_once(hostile: Hostile) -> None:
    """Garbage and valid calls from 8 threads at once: every valid call is answered."""
    errors: list[BaseException] = []

    def garbage(seed: int) -> None:
        rng = random.Random(seed)  # noqa: S311 - not for security
        for _ in range(20):
            _send_raw(hostile.socket_path, HTTP2_PREFACE + rng.randbytes(rng.randrange(4096)))

    def valid() -> None:
        try:
            for _ in range(20):
                hostile.assert_serves()
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=garbage, args=(seed,)) for seed in range(4)]
    threads += [threading.Thread(target=valid) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S * 3)
    hostile.sent += 80
    assert not errors, errors[:1]


# -- generated requests (hypothesis) ------------------------------------------------------------


def _mutate(vgpu_id: str, position: int, text: str) -> str:
    position %= len(vgpu_id) + 1
    return vgpu_id[:position] + text + vgpu_id[position:]


odd_text = st.text(
    # Any code point but lone surrogates, which a proto string cannot carry (the client
    # library refuses to send them; the raw-bytes tests above send their encoding).
    alphabet=st.characters(blacklist_categories=("Cs",)),
    max_size=70,
)
device_ids = st.one_of(
    st.sampled_from(ALL_IDS),
    odd_text,
    st.builds(_mutate, st.sampled_from(ALL_IDS), st.integers(0, 70), odd_text),
    st.builds(
        lambda uuid, n: f"{uuid}::{n}", st.sampled_from([UUID0, "GPU-x"]), st.integers(-5, 10**6)
    ),
)
PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _allocate_ok_expected(containers: list[list[str]]) -> bool:
    """What a correct server does (the oracle): grant iff every container names distinct,
    known vGPU ids of one GPU, and no id is named by two containers."""
    known = set(ALL_IDS)
    if not containers:
        return False
    every_id = [vgpu_id for ids in containers for vgpu_id in set(ids)]
    if len(every_id) != len(set(every_id)):
        return False
    for ids in containers:
        if not ids or len(set(ids)) != len(ids) or not set(ids) <= known:
            return False
        if len({vgpu_id.rsplit("::", 1)[0] for vgpu_id in ids}) != 1:
            return False
    return True


# The property searches run without coverage measurement (pytest-cov's no_cover): the
# example tests above hold the coverage of plugin.py, and the tracer doubled these searches.
@pytest.mark.no_cover
@PROPERTY_SETTINGS
@given(st.lists(st.lists(device_ids, max_size=6), max_size=3))
def test_allocate_property(hostile: Hostile, containers: list[list[str]]) -> None:
    """Any Allocate request: granted exactly when valid, else INVALID_ARGUMENT with a
    readable message; never another status."""
    status, result = hostile.call("Allocate", allocate_request(*containers))
    if _allocate_ok_expected(containers):
        assert status == "OK", (status, result)
        assert len(result.container_responses) == len(containers)
    else:
        assert status == INVALID, (status, result)
        assert_readable(result)


@pytest.mark.no_cover
@PROPERTY_SETTINGS
@given(
    st.lists(
        st.tuples(
            st.lists(device_ids, max_size=10),
            st.lists(device_ids, max_size=3),
            st.one_of(st.integers(-3, 12), st.integers(-(2**31), 2**31 - 1)),
        ),
        max_size=3,
    )
)
def test_preferred_allocation_property(
    hostile: Hostile, containers: list[tuple[list[str], list[str], int]]
) -> None:
    """Any GetPreferredAllocation request: a hint within the rules (must-include ids
    kept, at most ``size`` ids, all available) or INVALID_ARGUMENT with a readable message."""
    status, result = hostile.call("GetPreferredAllocation", preferred_request(*containers))
    if status != "OK":
        assert status == INVALID, (status, result)
        assert_readable(result)
        return
    for (available, must_include, size), answer in zip(containers, result.container_responses):
        chosen = list(answer.deviceIDs)
        assert set(must_include) <= set(chosen)
        assert len(chosen) <= max(size, 0)
        assert set(chosen) <= set(available)


def test_still_serving_after_everything(hostile: Hostile) -> None:
    """After every hostile request of this module, the server answers normally."""
    hostile.assert_serves()
    stream = hostile.stub.ListAndWatch(pb.Empty(), timeout=TIMEOUT_S)
    try:
        assert len(next(stream).devices) == 8
    finally:
        stream.cancel()
