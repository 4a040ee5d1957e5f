"""Health as scheduling signals: a sick GPU's devices carry DRA device taints (KEP-5055)
that name the cause, instead of leaving the slice. Pure values, no I/O.

Where the API server keeps device taints (``DRADeviceTaints``, beta and on by default in
Kubernetes 1.36), an Unhealthy GPU stays in the node's slice with one taint per kind of
cause, and the taint goes when the cause clears:

- critical XID(s): key ``<driver>/xid``, value the XIDs (``79``, ``48-79``), NoSchedule;
- double-bit ECC error: ``<driver>/ecc`` = ``double-bit``, NoSchedule;
- GPU lost (fell off the bus): ``<driver>/gpu-lost`` = ``true``, NoExecute;
- MPS daemon down: ``<driver>/mps-daemon`` = ``down``, NoSchedule;
- MPS ceiling lost or not set: ``<driver>/mps-ceiling`` = ``lost``, NoSchedule.

NoSchedule keeps new claims off the device (unless they tolerate the taint) and leaves
running pods alone: an XID or a restarting daemon is survived by many workloads, and the
agent heals those causes itself. Only a lost GPU evicts (NoExecute): nothing on it can run.

Keys are label names in the driver's domain, values label values, so a claim can tolerate
one cause (``key: vgpu.eks.amazonaws.com/xid, operator: Exists``) or all of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from vgpu_agent.frontends.dra.types import TAINT_NO_EXECUTE, TAINT_NO_SCHEDULE, DeviceTaint
from vgpu_agent.model.devices import HealthReason, ReasonKind, ServedGpu

#: The taint keys' names, after ``<driver>/``.
XID_KEY = "xid"
ECC_KEY = "ecc"
LOST_KEY = "gpu-lost"
MPS_DAEMON_KEY = "mps-daemon"
MPS_CEILING_KEY = "mps-ceiling"
#: DeviceTaintsMaxLength: the most taints one device may carry.
MAX_TAINTS_PER_DEVICE = 16
#: A label value: at most 63 characters, alphanumeric at both ends.
_LABEL_VALUE_RE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_MAX_LABEL_VALUE = 63


def is_label_value(value: str) -> bool:
    """Whether ``value`` may be a taint value (a Kubernetes label value)."""
    return len(value) <= _MAX_LABEL_VALUE and _LABEL_VALUE_RE.fullmatch(value) is not None


def _xid_value(xids: Iterable[int]) -> str:
    """The XIDs in one label value, ascending and joined by '-' (what fits of them)."""
    value = ""
    for xid in sorted(set(xids)):
        candidate = f"{value}-{xid}" if value else str(xid)
        if len(candidate) > _MAX_LABEL_VALUE:
            break
        value = candidate
    return value or "unknown"


def reason_taint(driver: str, reason: HealthReason) -> DeviceTaint:
    """The taint one health reason puts on a device (XIDs are merged by :func:`gpu_taints`)."""
    if reason.kind is ReasonKind.LOST:
        return DeviceTaint(f"{driver}/{LOST_KEY}", "true", TAINT_NO_EXECUTE)
    if reason.kind is ReasonKind.MPS:
        if reason.about_ceiling:
            return DeviceTaint(f"{driver}/{MPS_CEILING_KEY}", "lost", TAINT_NO_SCHEDULE)
        return DeviceTaint(f"{driver}/{MPS_DAEMON_KEY}", "down", TAINT_NO_SCHEDULE)
    if reason.xid is not None:
        return DeviceTaint(f"{driver}/{XID_KEY}", _xid_value([reason.xid]), TAINT_NO_SCHEDULE)
    return DeviceTaint(f"{driver}/{ECC_KEY}", "double-bit", TAINT_NO_SCHEDULE)


def gpu_taints(driver: str, served: ServedGpu) -> tuple[DeviceTaint, ...]:
    """The taints of ``served``'s devices: one per cause now (none when it is healthy),
    ordered by key so that an unchanged health publishes an unchanged slice."""
    xids = [reason.xid for reason in served.unhealthy_reasons if reason.xid is not None]
    by_key: dict[str, DeviceTaint] = {}
    for reason in served.unhealthy_reasons:
        taint = reason_taint(driver, reason)
        by_key.setdefault(taint.key, taint)
    if xids:
        xid_key = f"{driver}/{XID_KEY}"
        by_key[xid_key] = DeviceTaint(xid_key, _xid_value(xids), TAINT_NO_SCHEDULE)
    return tuple(by_key[key] for key in sorted(by_key))[:MAX_TAINTS_PER_DEVICE]
