"""Health as DRA device taints: each cause of an Unhealthy GPU as a taint whose key and value
name it, NoExecute only for a lost GPU, nothing once it heals."""

from __future__ import annotations

import pytest

from tests.builders import make_served
from vgpu_agent.frontends.dra.taints import (
    MAX_TAINTS_PER_DEVICE,
    gpu_taints,
    is_label_value,
)
from vgpu_agent.frontends.dra.types import DeviceTaint
from vgpu_agent.model.devices import HealthReason
from vgpu_agent.mps.ceilings import CEILING_PREFIX

DRIVER = "vgpu.example.com"


@pytest.mark.parametrize(
    ("reasons", "expected"),
    [
        ((), ()),
        (("xid 79",), ((f"{DRIVER}/xid", "79", "NoSchedule"),)),
        (("xid 79", "xid 48"), ((f"{DRIVER}/xid", "48-79", "NoSchedule"),)),
        (("double-bit ECC error",), ((f"{DRIVER}/ecc", "double-bit", "NoSchedule"),)),
        (("GPU lost",), ((f"{DRIVER}/gpu-lost", "true", "NoExecute"),)),
        (
            ("MPS daemon probe failed: no answer in 2 s",),
            ((f"{DRIVER}/mps-daemon", "down", "NoSchedule"),),
        ),
        (
            ("MPS daemon ceiling lost (thread percentage 100, want 25)",),
            ((f"{DRIVER}/mps-ceiling", "lost", "NoSchedule"),),
        ),
        (
            ("MPS daemon ceiling not set: control pipe refused",),
            ((f"{DRIVER}/mps-ceiling", "lost", "NoSchedule"),),
        ),
        (
            ("GPU lost", "xid 79", "MPS daemon probe failed: gone"),
            (
                (f"{DRIVER}/gpu-lost", "true", "NoExecute"),
                (f"{DRIVER}/mps-daemon", "down", "NoSchedule"),
                (f"{DRIVER}/xid", "79", "NoSchedule"),
            ),
        ),
    ],
    ids=[
        "healthy",
        "xid",
        "two-xids",
        "ecc",
        "lost",
        "daemon",
        "ceiling-lost",
        "ceiling-unset",
        "many",
    ],
)
def test_each_cause_is_a_taint_naming_it(
    reasons: tuple[str, ...], expected: tuple[tuple[str, str, str], ...]
) -> None:
    """One taint per kind of cause, ordered by key; XIDs merge into one value."""
    taints = gpu_taints(DRIVER, make_served(0, reasons=reasons))
    assert taints == tuple(DeviceTaint(key, value, effect) for key, value, effect in expected)
    assert all(is_label_value(taint.value) for taint in taints)


def test_many_xids_fit_one_label_value() -> None:
    """However many XIDs, the value stays a label value (the first ones that fit)."""
    reasons = tuple(f"xid {xid}" for xid in range(100, 140))
    (taint,) = gpu_taints(DRIVER, make_served(0, reasons=reasons))
    assert is_label_value(taint.value)
    assert taint.value.startswith("100-101-102")
    assert len(taint.value) <= 63


def test_taints_per_device_are_bounded() -> None:
    """A device never carries more taints than the API allows."""
    reasons = (
        "GPU lost",
        "double-bit ECC error",
        "xid 79",
        "MPS daemon down",
        "MPS daemon ceiling lost",
    )
    assert len(gpu_taints(DRIVER, make_served(0, reasons=reasons))) <= MAX_TAINTS_PER_DEVICE


def test_the_ceiling_prefix_is_the_one_mps_writes() -> None:
    """The frontend tells a lost ceiling from a dead daemon by the text mps/ceilings.py writes."""
    assert HealthReason.mps_down(f"{CEILING_PREFIX} lost (x)").about_ceiling
    assert not HealthReason.mps_down("MPS daemon not answering").about_ceiling


@pytest.mark.parametrize(
    ("value", "valid"),
    [("79", True), ("48-79", True), ("", True), ("-79", False), ("a b", False), ("x" * 64, False)],
)
def test_label_values(value: str, valid: bool) -> None:
    """Taint values are label values: alphanumeric ends, at most 63 characters."""
    assert is_label_value(value) is valid
