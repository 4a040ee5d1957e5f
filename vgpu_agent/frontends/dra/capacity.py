"""Consumable capacity (KEP-5075): each served GPU as one device that many claims share,
each claim consuming an amount of its memory and compute, held to that amount by MPS.
Pure values, no I/O.

The device (:func:`capacity_device`) allows multiple allocations and has two capacities:

- ``memory``: the GPU's memory as the node splits it (one share's pinned memory limit
  times the shares), in bytes as a quantity (``81552Mi``);
- ``computeShares``: the GPU's shares (``gpus.replicas_per_gpu``), each one share's
  thread percentage.

Both carry a request policy whose default and step are one share and whose maximum is the
node's ceiling (``mps.max_vgpus_per_container`` shares under enforced confinement, the
whole GPU otherwise): the scheduler rounds a claim's request up to whole shares and never
places one the daemon's ceiling would refuse. A claim that names no amount consumes one
share of each (a capacity without a policy would default to the whole device).

When a claim is prepared, its allocation result's ``consumedCapacity`` becomes its MPS
limits (:func:`capacity_grant`): the compute shares through the device plugin's own
:func:`~vgpu_agent.model.devices.grant` (thread percentage, GPU, pipe directory), and the
pinned memory limit exactly the memory it consumed. Two claims of different sizes on one
GPU each get their own amount.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Optional

from vgpu_agent.frontends.dra.types import (
    AllocatedDevice,
    AttributeValue,
    CapacityPolicy,
    DeviceTaint,
    SliceDevice,
)
from vgpu_agent.model.devices import (
    ContainerGrant,
    InvalidRequestError,
    MpsGrantPolicy,
    ServedGpu,
    grant,
    memory_limit_mib,
    proportional_memory_mib,
)

#: The capacity names (unqualified: they are the driver's own).
MEMORY = "memory"
COMPUTE_SHARES = "computeShares"
MEBIBYTE = 1024 * 1024
#: The environment variable the memory limit travels in (set by devices.grant).
PINNED_MEMORY_ENV = "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"

_QUANTITY_RE = re.compile(r"([+-]?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([a-zA-Z]*|[eE][+-]?[0-9]+)")
_BINARY_SUFFIXES = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL_SUFFIXES = {
    "n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18,
}  # fmt: skip


def parse_quantity(text: str) -> Fraction:
    """A Kubernetes quantity (``20Gi``, ``1500M``, ``2``, ``250m``, ``1e3``) as an exact
    number; ValueError naming the text when it is not one."""
    match = _QUANTITY_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 20Gi, 1500M, 2)")
    sign, number, suffix = match.groups()
    try:
        value = Fraction(Decimal(number))
    except InvalidOperation as exc:  # pragma: no cover - the pattern admits only numbers
        raise ValueError(f"{text!r} is not a Kubernetes quantity") from exc
    if suffix in _BINARY_SUFFIXES:
        value *= 1024 ** _BINARY_SUFFIXES[suffix]
    elif suffix in _DECIMAL_SUFFIXES:
        value *= Fraction(10) ** _DECIMAL_SUFFIXES[suffix]
    elif suffix[:1] in ("e", "E"):
        value *= Fraction(10) ** int(suffix[1:])
    else:
        raise ValueError(f"{text!r} has an unknown quantity suffix {suffix!r}")
    return -value if sign == "-" else value


def binary_quantity(amount_bytes: int) -> str:
    """Bytes as the API server writes them back (its canonical form): the largest binary
    suffix that divides the amount, so a slice read back compares equal to ours."""
    mantissa, exponent = amount_bytes, 0
    while mantissa and mantissa % 1024 == 0 and exponent < len(_BINARY_SUFFIXES):
        mantissa //= 1024
        exponent += 1
    suffix = next((name for name, power in _BINARY_SUFFIXES.items() if power == exponent), "")
    return f"{mantissa}{suffix}"


def mib_quantity(mib: int) -> str:
    """MiB as a canonical quantity (``10194Mi``, ``20Gi``)."""
    return binary_quantity(mib * MEBIBYTE)


@dataclass(frozen=True)
class ShareSizes:
    """How a served GPU is offered as consumable capacity: one share and the most one
    claim may consume, in shares and in MiB."""

    shares: int
    #: One share's memory (the step of the memory request policy).
    share_memory_mib: int
    #: The most shares one claim may consume (the ceiling).
    max_shares: int
    #: Whether MPS holds a claim to its memory and its threads (a limit policy of "none",
    #: or MPS off, leaves the amount scheduled but not enforced).
    memory_enforced: bool
    threads_enforced: bool

    @property
    def memory_mib(self) -> int:
        """The memory capacity: every share's memory."""
        return self.shares * self.share_memory_mib

    @property
    def max_memory_mib(self) -> int:
        """The most memory one claim may consume (a whole number of shares)."""
        return self.max_shares * self.share_memory_mib


def share_sizes(served: ServedGpu, policy: Optional[MpsGrantPolicy]) -> ShareSizes:
    """One share of ``served`` and the ceiling, from the limits Allocate grants."""
    replicas = served.replicas
    memory_mib, headroom_mib = served.gpu.memory_mib, 0
    enforced = policy is not None and served.pipe_dir is not None
    memory_share: Optional[int] = None
    if policy is not None:
        headroom_mib = policy.memory_headroom_mib
        memory_share = memory_limit_mib(policy.memory_limit, 1, replicas, memory_mib, headroom_mib)
    if memory_share is None:
        # No memory limit: the GPU is still split for the scheduler's accounting.
        memory_share = max(1, proportional_memory_mib(memory_mib, headroom_mib, 1, replicas))
    ceiling = policy.max_vgpus_per_container if policy is not None else None
    return ShareSizes(
        shares=replicas,
        share_memory_mib=memory_share,
        max_shares=min(ceiling, replicas) if ceiling is not None else replicas,
        memory_enforced=enforced and policy is not None and policy.memory_limit != "none",
        threads_enforced=enforced and policy is not None and policy.thread_limit != "none",
    )


def capacity_device(
    name: str,
    served: ServedGpu,
    policy: Optional[MpsGrantPolicy],
    attributes: Mapping[str, AttributeValue],
    taints: tuple[DeviceTaint, ...] = (),
) -> SliceDevice:
    """``served`` as one device many claims share, consuming its memory and compute in
    whole shares up to the ceiling."""
    sizes = share_sizes(served, policy)
    step = mib_quantity(sizes.share_memory_mib)
    return SliceDevice(
        name=name,
        attributes=dict(attributes),
        capacity={MEMORY: mib_quantity(sizes.memory_mib), COMPUTE_SHARES: str(sizes.shares)},
        allow_multiple_allocations=True,
        capacity_policies={
            MEMORY: CapacityPolicy(
                default=step, min=step, max=mib_quantity(sizes.max_memory_mib), step=step
            ),
            COMPUTE_SHARES: CapacityPolicy(
                default="1", min="1", max=str(sizes.max_shares), step="1"
            ),
        },
        taints=taints,
    )


@dataclass(frozen=True)
class Consumed:
    """What one claim consumed of one GPU, as the MPS limits count it."""

    compute_shares: int
    memory_mib: int
    #: True when the allocation carried no consumedCapacity and the request policy's
    #: defaults (one share of each) were taken.
    defaulted: bool = False


def _consumed_value(consumed: Mapping[str, str], driver: str, name: str) -> Optional[Fraction]:
    """The consumed amount of capacity ``name``, written with or without the driver's domain
    (the API allows both); None when absent."""
    total: Optional[Fraction] = None
    for key in (name, f"{driver}/{name}"):
        text = consumed.get(key)
        if text is None:
            continue
        try:
            value = parse_quantity(text)
        except ValueError as exc:
            raise InvalidRequestError(f"consumedCapacity {key}: {exc}") from exc
        total = value if total is None else total + value
    return total


def consumed(results: list[AllocatedDevice], driver: str, sizes: ShareSizes) -> Consumed:
    """What the allocation results of one claim on one GPU consumed, in shares and MiB.

    Several results on the same GPU (several requests of the claim) add up. Amounts are
    rounded down (a claim never gets more than it consumed); less than one share of either
    is refused, more than the ceiling too (the request policy's maximum forbids both, so
    either means the slice changed under the allocation).
    """
    compute = Fraction(0)
    memory_bytes = Fraction(0)
    defaulted = False
    for result in results:
        result_compute = _consumed_value(result.consumed_capacity, driver, COMPUTE_SHARES)
        result_memory = _consumed_value(result.consumed_capacity, driver, MEMORY)
        if result_compute is None and result_memory is None:
            # No consumedCapacity: a scheduler without DRAConsumableCapacity allocated the
            # device whole; hold the claim to the policy's default, one share.
            defaulted = True
        compute += 1 if result_compute is None else result_compute
        share_bytes = sizes.share_memory_mib * MEBIBYTE
        memory_bytes += share_bytes if result_memory is None else result_memory
    compute_shares = math.floor(compute)
    memory_mib = math.floor(memory_bytes / MEBIBYTE)
    if compute_shares < 1 or memory_mib < 1:
        raise InvalidRequestError(
            f"it consumed {_amounts(compute, memory_bytes)} of the GPU, less than one share "
            f"({sizes.share_memory_mib} MiB and 1 compute share); the device's request policy "
            "should not allow that: delete the pod so the claim is allocated again"
        )
    if compute_shares > sizes.max_shares or memory_mib > sizes.max_memory_mib:
        raise InvalidRequestError(
            f"it consumed {_amounts(compute, memory_bytes)} of the GPU, but this node gives a "
            f"claim at most {sizes.max_shares} share(s) ({sizes.max_memory_mib} MiB, "
            f"{sizes.max_shares} compute shares; mps.max_vgpus_per_container): request at "
            "most that, or have the node's operator raise mps.max_vgpus_per_container"
        )
    return Consumed(compute_shares, memory_mib, defaulted)


def _amounts(compute: Fraction, memory_bytes: Fraction) -> str:
    return f"{float(compute):g} compute share(s) and {float(memory_bytes / MEBIBYTE):g} MiB"


def capacity_grant(
    served: ServedGpu,
    amount: Consumed,
    policy: Optional[MpsGrantPolicy],
    device_list_strategy: str = "envvar",
) -> ContainerGrant:
    """What a claim that consumed ``amount`` of ``served`` gives its containers: what the
    device plugin's Allocate grants for that many compute shares (GPU, pipe directory,
    thread percentage), with the pinned memory limit exactly the memory consumed."""
    if not served.healthy:
        raise InvalidRequestError(
            f"GPU {served.gpu.uuid} is unhealthy ({'; '.join(served.reason_texts)}); "
            "delete the pod to reschedule it"
        )
    # The ceiling was checked in shares by consumed(); grant() checks compute shares again.
    granted = grant(served, amount.compute_shares, policy, device_list_strategy)
    if PINNED_MEMORY_ENV not in granted.envs:
        return granted  # no memory limit: the amount is scheduled, not enforced
    envs = dict(granted.envs)
    # The container sees only its GPU, so it is device 0 there.
    envs[PINNED_MEMORY_ENV] = f"0={amount.memory_mib}M"
    return replace(granted, envs=envs)
