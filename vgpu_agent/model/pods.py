"""Pods as the agent names them: by UID (what a tenant is) and by ``namespace/pod`` (what a
person reads).

The attribution (:mod:`vgpu_agent.observability.attribution`) finds them; the fault log and
the offender policy (:mod:`vgpu_agent.agent.faults`, :mod:`vgpu_agent.agent.offenders`) name
and hold them. A crash-looping container keeps its pod's UID; a new pod is a new tenant.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PodRef:
    """One pod: its UID (empty when unknown: the kubelet checkpoint could not be read) and
    ``namespace/pod`` (empty when unknown: the PodResources API did not answer)."""

    uid: str
    name: str = ""

    @property
    def shown(self) -> str:
        """How the pod is shown: ``namespace/pod``, else its UID."""
        return self.name or self.uid or "?"


@dataclass(frozen=True)
class PodsPresent:
    """The UIDs of the pods holding vGPUs on this node, as of ``age_s`` seconds ago (the
    age of the attribution they come from)."""

    age_s: float
    pod_uids: frozenset[str]
