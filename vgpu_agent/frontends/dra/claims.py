"""Preparing and unpreparing claims: what NodePrepareResources and NodeUnprepareResources
do, claim by claim, in plain values (the gRPC servicer only converts).

Preparing a claim: read the ResourceClaim from the API server, keep the results of our
driver, map their devices to vGPU ids, ask the node model what those vGPUs grant (the same
checks and the same ceiling as the device plugin's Allocate, with the same messages), write
the claim's CDI spec, and record the claim in the state directory. A claim allocated a
whole GPU's device with consumable capacity is granted what its results consumed instead
(:mod:`.capacity`: compute shares and pinned memory, within the same ceiling). Each claim
gets its own answer; one bad claim never fails another.

Both calls are idempotent, and stay so across an agent restart: a recorded claim is answered
from the record (its spec file written again if it went missing) without asking the API
server, and unpreparing a claim that is not recorded succeeds.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from vgpu_agent.frontends.dra.capacity import capacity_grant, consumed, share_sizes
from vgpu_agent.frontends.dra.cdi import (
    CdiSpecs,
    cdi_device_id,
    claim_spec,
    valid_claim_uid,
    write_atomically,
)
from vgpu_agent.frontends.dra.slices import DeviceNames
from vgpu_agent.frontends.dra.types import (
    AllocatedDevice,
    ClaimNotFoundError,
    ClaimRef,
    DraApiError,
    ResourceApi,
)
from vgpu_agent.model.devices import InvalidRequestError
from vgpu_agent.model.errors import VgpuError
from vgpu_agent.model.node import Allocation, Node

log = logging.getLogger(__name__)

#: The record of prepared claims in the state directory.
RECORD_FILE_NAME = "dra-prepared-claims.json"
_RECORD_VERSION = 1


@dataclass(frozen=True)
class PreparedDevice:
    """One device of a prepared claim as the kubelet is told about it."""

    request_names: tuple[str, ...]
    pool: str
    device: str
    cdi_device_ids: tuple[str, ...]


@dataclass(frozen=True)
class PrepareResult:
    """The answer for one claim: its devices, or why it could not be prepared."""

    devices: tuple[PreparedDevice, ...] = ()
    error: str = ""


def base_request(request: str) -> str:
    """The claim's request a result belongs to: ``<request>/<subrequest>`` names a
    subrequest of a prioritized list, and the kubelet matches containers by the request."""
    return request.split("/", 1)[0]


class PreparedClaims:
    """The claims this node prepared, kept in a JSON file in the state directory (replaced
    atomically on every change), so an agent restart keeps prepare and unprepare idempotent."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, RECORD_FILE_NAME)
        self._claims: dict[str, dict[str, Any]] = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as stream:
                document = json.load(stream)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # The kubelet asks again for every claim it still needs; starting empty only
            # costs API reads, so a broken record must not keep the agent from serving.
            log.warning(
                "reading the prepared DRA claims %s failed (%s); starting with none", self.path, exc
            )
            return {}
        claims = document.get("claims") if isinstance(document, dict) else None
        if not isinstance(claims, dict):
            log.warning("the prepared DRA claims %s hold no claims table; ignoring it", self.path)
            return {}
        return {str(uid): entry for uid, entry in claims.items() if isinstance(entry, dict)}

    def get(self, uid: str) -> Optional[dict[str, Any]]:
        """The record of a prepared claim."""
        return self._claims.get(uid)

    @property
    def uids(self) -> list[str]:
        """The uids of the prepared claims."""
        return sorted(self._claims)

    def put(self, uid: str, entry: dict[str, Any]) -> None:
        """Record a prepared claim (written to disk before it returns; not recorded at all
        when it cannot be written)."""
        previous = self._claims.get(uid)
        self._claims[uid] = entry
        try:
            self._save()
        except VgpuError:
            if previous is None:
                del self._claims[uid]
            else:
                self._claims[uid] = previous
            raise

    def remove(self, uid: str) -> None:
        """Forget a claim (written to disk before it returns)."""
        if self._claims.pop(uid, None) is not None:
            self._save()

    def _save(self) -> None:
        document = {"version": _RECORD_VERSION, "claims": self._claims}
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            write_atomically(self.path, json.dumps(document, indent=1, sort_keys=True), 0o600)
        except OSError as exc:
            raise VgpuError(
                f"recording prepared DRA claims in {self.path}: {exc.strerror or exc} "
                "(check agent.state_dir)"
            ) from exc


def _devices_to_record(devices: Sequence[PreparedDevice]) -> list[dict[str, Any]]:
    return [
        {
            "request_names": list(device.request_names),
            "pool": device.pool,
            "device": device.device,
            "cdi_device_ids": list(device.cdi_device_ids),
        }
        for device in devices
    ]


def _devices_from_record(entries: Any) -> tuple[PreparedDevice, ...]:
    return tuple(
        PreparedDevice(
            request_names=tuple(str(name) for name in entry["request_names"]),
            pool=str(entry["pool"]),
            device=str(entry["device"]),
            cdi_device_ids=tuple(str(cdi_id) for cdi_id in entry["cdi_device_ids"]),
        )
        for entry in entries
    )


class ClaimPreparer:
    """NodePrepareResources / NodeUnprepareResources over the node model, claim by claim."""

    def __init__(
        self,
        node: Node,
        api: ResourceApi,
        specs: CdiSpecs,
        record: PreparedClaims,
        *,
        driver: str,
        pool: str,
        cdi_kind: str,
    ) -> None:
        self._node = node
        self._api = api
        self._specs = specs
        self._record = record
        self._driver = driver
        self._pool = pool
        self._cdi_kind = cdi_kind
        # Record and spec files change under this lock; API reads happen outside it.
        self._lock = threading.Lock()

    @property
    def prepared_uids(self) -> list[str]:
        """The claims prepared now."""
        with self._lock:
            return self._record.uids

    def prepare(self, claims: Sequence[ClaimRef]) -> dict[str, PrepareResult]:
        """Prepare each claim; the answer per claim uid (an error text for a failed one)."""
        results: dict[str, PrepareResult] = {}
        for ref in claims:
            if ref.uid in results:
                continue
            try:
                results[ref.uid] = PrepareResult(devices=self._prepare_one(ref))
            except VgpuError as exc:
                message = f"preparing ResourceClaim {_claim_text(ref)}: {exc}"
                log.warning("%s", message)
                results[ref.uid] = PrepareResult(error=message)
            except Exception as exc:  # one broken claim must not fail the others
                log.exception("preparing ResourceClaim %s failed inside vgpu-agent", ref)
                results[ref.uid] = PrepareResult(
                    error=f"preparing ResourceClaim {_claim_text(ref)}: vgpu-agent failed: "
                    f"{type(exc).__name__}: {exc}"
                )
        return results

    def unprepare(self, claims: Sequence[ClaimRef]) -> dict[str, str]:
        """Unprepare each claim; the error text per claim uid ("" when done)."""
        results: dict[str, str] = {}
        for ref in claims:
            if ref.uid in results:
                continue
            try:
                self._unprepare_one(ref)
                results[ref.uid] = ""
            except VgpuError as exc:
                message = f"unpreparing ResourceClaim {_claim_text(ref)}: {exc}"
                log.warning("%s", message)
                results[ref.uid] = message
            except Exception as exc:  # one broken claim must not fail the others
                log.exception("unpreparing ResourceClaim %s failed inside vgpu-agent", ref)
                results[ref.uid] = (
                    f"unpreparing ResourceClaim {_claim_text(ref)}: vgpu-agent failed: "
                    f"{type(exc).__name__}: {exc}"
                )
        return results

    # -- one claim ---------------------------------------------------------------------------

    def _check_ref(self, ref: ClaimRef) -> None:
        if not ref.uid:
            raise InvalidRequestError(
                "the request names the claim without a uid; the kubelet always sends one "
                "(is the caller a kubelet?)"
            )
        if not valid_claim_uid(ref.uid):
            raise InvalidRequestError(
                f"claim uid {ref.uid[:80]!r} is not a Kubernetes uid (letters, digits and '-')"
            )

    def _prepare_one(self, ref: ClaimRef) -> tuple[PreparedDevice, ...]:
        self._check_ref(ref)
        if not ref.namespace or not ref.name:
            raise InvalidRequestError("the request names the claim without a namespace or name")
        with self._lock:
            recorded = self._answer_recorded(ref.uid)
        if recorded is not None:
            return recorded
        try:
            claim = self._api.get_claim(ref.namespace, ref.name)
        except ClaimNotFoundError as exc:
            raise InvalidRequestError(
                f"the API server has no such claim ({exc}); it may have been deleted"
            ) from exc
        except DraApiError as exc:
            raise VgpuError(f"reading it from the API server failed: {exc}") from exc
        if claim.ref.uid != ref.uid:
            raise InvalidRequestError(
                f"the API server's claim of that name has uid {claim.ref.uid}, not {ref.uid}: "
                "it was deleted and created again; the kubelet will ask for the new one"
            )
        if not claim.allocated:
            raise InvalidRequestError(
                "it is not allocated yet (no status.allocation); the scheduler allocates a "
                "claim before the kubelet prepares it"
            )
        ours = [device for device in claim.devices if device.driver == self._driver]
        if not ours:
            others = sorted({device.driver for device in claim.devices}) or ["none"]
            raise InvalidRequestError(
                f"none of its devices is allocated from driver {self._driver} "
                f"(drivers in its allocation: {', '.join(others)}); the kubelet should not "
                "have asked this plugin"
            )
        foreign_pools = sorted({device.pool for device in ours if device.pool != self._pool})
        if foreign_pools:
            raise InvalidRequestError(
                f"it is allocated from pool {', '.join(foreign_pools)}, but this node's pool is "
                f"{self._pool}; the claim belongs to another node"
            )
        names = DeviceNames.of(self._node.inventory())
        if any(device.device in names.gpu_by_name for device in ours):
            allocation, amount_text = self._allocate_capacity(ours, names)
        else:
            vgpu_ids = []
            for device in ours:
                vgpu_id = names.vgpu_by_name.get(device.device)
                if vgpu_id is None:
                    raise InvalidRequestError(
                        f"device {device.device} is not served by this node (the GPU may have "
                        "been removed or reconfigured; delete the pod to reschedule it)"
                    )
                vgpu_ids.append(vgpu_id)
            allocation = self._node.allocate(vgpu_ids)
            amount_text = f"{len(vgpu_ids)} vGPU(s)"
        cdi_ids = (
            cdi_device_id(self._cdi_kind, ref.uid),
            *(device.name for device in allocation.grant.cdi_devices),
        )
        devices = tuple(
            PreparedDevice(
                request_names=(base_request(device.request),),
                pool=device.pool,
                device=device.device,
                cdi_device_ids=cdi_ids,
            )
            for device in ours
        )
        spec = claim_spec(self._cdi_kind, ref.uid, allocation.grant)
        with self._lock:
            recorded = self._answer_recorded(ref.uid)
            if recorded is not None:  # prepared meanwhile by a concurrent call
                return recorded
            path = self._specs.write(ref.uid, spec)
            try:
                self._record.put(
                    ref.uid,
                    {
                        "namespace": ref.namespace,
                        "name": ref.name,
                        "gpu_uuid": allocation.gpu_uuid,
                        "vgpu_ids": list(allocation.vgpu_ids),
                        "devices": _devices_to_record(devices),
                        "spec": spec,
                    },
                )
            except VgpuError:
                # Unrecorded, the spec would outlive the claim: an unprepare after a restart
                # would not know it. The kubelet asks again.
                self._specs.remove(ref.uid)
                raise
        log.info(
            "prepared ResourceClaim %s: %s on GPU %s, CDI spec %s",
            _claim_text(ref),
            amount_text,
            allocation.gpu_uuid,
            path,
            extra={"fields": {"VGPU_EVENT": "dra-prepare", "GPU_UUID": allocation.gpu_uuid}},
        )
        return devices

    def _allocate_capacity(
        self, ours: Sequence[AllocatedDevice], names: DeviceNames
    ) -> tuple[Allocation, str]:
        """What a claim allocated consumable capacity of one GPU gets for what it consumed."""
        gpu_uuids: dict[str, None] = {}
        for device in ours:
            gpu_uuid = names.gpu_by_name.get(device.device)
            if gpu_uuid is None:
                raise InvalidRequestError(
                    f"device {device.device} is not a device of this node's GPUs (the node's "
                    "slice changed between consumable capacity and shares, or the GPU was "
                    "removed; delete the pod to reschedule it)"
                )
            gpu_uuids[gpu_uuid] = None
        if len(gpu_uuids) > 1:
            raise InvalidRequestError(
                f"the claim's devices span {len(gpu_uuids)} physical GPUs "
                f"({', '.join(gpu_uuids)}); a claim's share must be on one GPU under MPS"
            )
        gpu_uuid = next(iter(gpu_uuids))
        inventory, policy, strategy = self._node.allocation_context()
        served = inventory.get(gpu_uuid)
        if served is None:  # pragma: no cover - names came from the same node a moment ago
            raise InvalidRequestError(f"GPU {gpu_uuid} is not served by this node any more")
        amount = consumed(list(ours), self._driver, share_sizes(served, policy))
        if amount.defaulted:
            log.warning(
                "the allocation of GPU %s carries no consumedCapacity (is DRAConsumableCapacity "
                "off in the scheduler?); holding the claim to one share",
                gpu_uuid,
            )
        granted = capacity_grant(served, amount, policy, strategy)
        text = f"{amount.compute_shares} compute share(s) and {amount.memory_mib} MiB"
        return Allocation(gpu_uuid, (), granted), text

    def _answer_recorded(self, uid: str) -> Optional[tuple[PreparedDevice, ...]]:
        """The recorded answer for a prepared claim, its spec file rewritten if gone."""
        entry = self._record.get(uid)
        if entry is None:
            return None
        try:
            devices = _devices_from_record(entry["devices"])
            spec = entry["spec"]
        except (KeyError, TypeError) as exc:
            log.warning("the record of DRA claim %s is broken (%s); preparing it again", uid, exc)
            self._record.remove(uid)
            return None
        if not self._specs.exists(uid):
            self._specs.write(uid, spec)
        return devices

    def _unprepare_one(self, ref: ClaimRef) -> None:
        self._check_ref(ref)
        with self._lock:
            self._specs.remove(ref.uid)
            known = self._record.get(ref.uid) is not None
            self._record.remove(ref.uid)
        if known:
            log.info(
                "unprepared ResourceClaim %s",
                _claim_text(ref),
                extra={"fields": {"VGPU_EVENT": "dra-unprepare"}},
            )


def _claim_text(ref: ClaimRef) -> str:
    return f"{ref.namespace or '?'}/{ref.name or '?'} (uid {ref.uid[:80] or 'empty'})"
