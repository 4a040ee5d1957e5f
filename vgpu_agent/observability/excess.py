"""Which MPS clients a pod runs beyond what it may (pure).

MPS (driver 580) holds each client process, not the pod, to the ceiling: measured on an
H100 (issue 20), a pod holding 1 vGPU of 8 that started 4 CUDA processes with the same
environment got 3.99 shares. So under enforced confinement a pod may run
``isolation.clients_per_vgpu`` MPS clients on a GPU per vGPU it holds there
(:func:`vgpu_agent.config.isolation.client_allowance`), and :func:`excess_clients` finds
the ones beyond that, from the attribution: the newest first, by process start time.

The unit is a pod on a GPU. The cgroup names a process's pod and its container's runtime
id, but no source maps runtime ids to container names, so when several containers of one
pod hold vGPUs of the same GPU their processes cannot be told apart (the attribution's
``memory_shared_with``): together they may run what their vGPUs together allow.

A pod the fault policy holds (``held``: pod UID -> why) may run no client at all. A client
no pod accounts for (no pod UID, or a pod holding no vGPU of that GPU, which is also what a
stale PodResources answer looks like) is only ever reported, never ended.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Callable, Optional

from vgpu_agent.observability.attribution import Attribution

#: The reasons a client is acted on (a bounded set: they are a metric label).
EXCESS = "excess"
HELD = "held"
UNATTRIBUTED = "unattributed"

#: pid -> when the process started (seconds since boot), None when unknown.
StartTime = Callable[[int], Optional[float]]


@dataclass(frozen=True)
class ClientGroup:
    """One pod's MPS clients on one GPU, and how many it may run there."""

    gpu_uuid: str
    pod_uid: str
    namespace: str
    pod: str
    #: The pod's containers holding vGPUs of the GPU (several when their processes
    #: cannot be told apart).
    containers: tuple[str, ...]
    vgpus: int
    pids: tuple[int, ...]
    allowed: int
    #: Why the pod may run no client at all (held by the fault policy), else None.
    held: Optional[str] = None

    @property
    def pod_name(self) -> str:
        """``namespace/pod``, else the pod UID (PodResources did not answer)."""
        return f"{self.namespace}/{self.pod}" if self.pod else self.pod_uid


@dataclass(frozen=True)
class ExcessClient:
    """An MPS client to act on: beyond its pod's allowance, of a held pod, or of no pod."""

    gpu_uuid: str
    pid: int
    #: EXCESS, HELD or UNATTRIBUTED.
    reason: str
    #: Why, in words, for the journal and status.
    why: str
    pod_uid: str = ""
    #: ``namespace/pod`` (else the pod UID); empty for a client of no pod.
    pod: str = ""
    #: The container, or the pod's containers on the GPU joined with ",".
    container: str = ""
    #: When the process started (seconds since boot), None when unknown.
    started_s: Optional[float] = None

    @property
    def endable(self) -> bool:
        """Whether the policy may end it: never a client no pod accounts for."""
        return self.reason != UNATTRIBUTED


def client_groups(
    attribution: Attribution, clients_per_vgpu: int, held: Mapping[str, str]
) -> list[ClientGroup]:
    """The attributed pods' clients on each GPU with their allowance: ``clients_per_vgpu``
    per vGPU held there, none for a pod in ``held``. Pods with no pod UID have no clients
    attributed to them and are left out."""
    groups: list[ClientGroup] = []
    for usage in attribution.pods:
        if not usage.pod_uid or not usage.pids:
            continue
        vgpus = sum(
            len(container.vgpu_ids)
            for container in attribution.containers_on(usage.gpu_uuid)
            if container.pod_uid == usage.pod_uid
        )
        why_held = held.get(usage.pod_uid)
        groups.append(
            ClientGroup(
                gpu_uuid=usage.gpu_uuid,
                pod_uid=usage.pod_uid,
                namespace=usage.namespace,
                pod=usage.pod,
                containers=usage.containers,
                vgpus=vgpus,
                pids=usage.pids,
                allowed=0 if why_held is not None else clients_per_vgpu * vgpus,
                held=why_held,
            )
        )
    return groups


def _order(pids: Collection[int], started: StartTime) -> list[tuple[Optional[float], int]]:
    """Oldest first; an unknown start counts as the newest, ties go by pid."""
    timed = [(started(pid), pid) for pid in pids]
    return sorted(timed, key=lambda item: (item[0] is None, item[0] or 0.0, item[1]))


def _group_excess(
    group: ClientGroup, clients_per_vgpu: int, started: StartTime, skip: Collection[tuple[str, int]]
) -> list[ExcessClient]:
    counted = [pid for pid in group.pids if (group.gpu_uuid, pid) not in skip]
    if len(counted) <= group.allowed:
        return []
    ordered = _order(counted, started)
    if group.held is not None:
        reason, why = HELD, f"pod held at 0 MPS clients: {group.held}"
    else:
        reason = EXCESS
        why = (
            f"{len(counted)} MPS clients on {group.vgpus} vGPU(s) of this GPU, "
            f"{group.allowed} allowed (isolation.clients_per_vgpu = {clients_per_vgpu})"
        )
    return [
        ExcessClient(
            gpu_uuid=group.gpu_uuid,
            pid=pid,
            reason=reason,
            why=why,
            pod_uid=group.pod_uid,
            pod=group.pod_name,
            container=",".join(group.containers),
            started_s=started_s,
        )
        for started_s, pid in reversed(ordered[group.allowed :])
    ]


def excess_clients(
    attribution: Attribution,
    *,
    clients_per_vgpu: int,
    held: Mapping[str, str],
    started: StartTime,
    skip: Collection[tuple[str, int]] = (),
) -> list[ExcessClient]:
    """The clients to act on: each pod's beyond its allowance on a GPU, newest first (the
    oldest ``allowed`` run on); every client of a ``held`` pod; and every client no pod
    accounts for (only to report). ``skip`` lists (GPU UUID, pid) of clients already ended
    that the attribution may still list: they neither count nor come back."""
    found: list[ExcessClient] = []
    for group in client_groups(attribution, clients_per_vgpu, held):
        found.extend(_group_excess(group, clients_per_vgpu, started, skip))
    for stray in attribution.strays:
        if (stray.gpu_uuid, stray.pid) in skip:
            continue
        found.append(
            ExcessClient(
                gpu_uuid=stray.gpu_uuid,
                pid=stray.pid,
                reason=UNATTRIBUTED,
                why=f"no pod holding vGPUs of this GPU accounts for it: {stray.why}",
                started_s=started(stray.pid),
            )
        )
    return found
