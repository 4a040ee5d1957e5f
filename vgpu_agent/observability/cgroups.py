"""Which pod and container a process is in, from its cgroup.

The container runtime places a container's processes in a cgroup whose path names the
pod's UID and the container's runtime id (the systemd and the cgroupfs cgroup drivers are
both read); a pod cannot change it. It is read from ``/proc/<pid>/cgroup``
(:func:`read_process_cgroup`) or, for processes ``/proc`` hides from the agent, from the
cgroup tree (:func:`pod_cgroups_by_pid`). :func:`parse_cgroup` is pure.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

# systemd cgroup driver: kubepods[-<qos>]-pod<UID with '_' for '-'>.slice, possibly with a
# prefix from a nested kubelet (kubelet-kubepods-...).
_SYSTEMD_POD_RE = re.compile(
    r"(?:[a-z0-9]+-)*kubepods(?:-(?P<qos>burstable|besteffort))?-pod(?P<uid>[0-9a-fA-F_]{36})\.slice"
)
# cgroupfs driver: .../kubepods/[<qos>/]pod<UID>
_CGROUPFS_POD_RE = re.compile(r"pod(?P<uid>[0-9a-fA-F-]{36})")
_CGROUPFS_QOS = frozenset({"burstable", "besteffort"})
# systemd scopes of container runtimes: cri-containerd-<id>.scope, crio-<id>.scope,
# docker-<id>.scope (cri-dockerd).
_SCOPE_RE = re.compile(r"(?:cri-containerd|crio|docker)-(?P<id>[0-9a-fA-F]{12,})\.scope")
_CONTAINER_ID_RE = re.compile(r"[0-9a-fA-F]{12,}")


@dataclass(frozen=True)
class PodCgroup:
    """Where a process sits: its pod's UID, its container's runtime id, its QoS class."""

    pod_uid: str
    #: None for a process in the pod's cgroup but in no container's (CRI-O's conmon).
    container_id: Optional[str]
    qos: str


def _pod_from_path(path: str) -> Optional[PodCgroup]:
    segments = [segment for segment in path.split("/") if segment]
    for position, segment in enumerate(segments):
        systemd = _SYSTEMD_POD_RE.fullmatch(segment)
        if systemd is not None:
            uid = systemd.group("uid").replace("_", "-").lower()
            qos = systemd.group("qos") or "guaranteed"
            return PodCgroup(uid, _container_id(segments[position + 1 :]), qos)
        cgroupfs = _CGROUPFS_POD_RE.fullmatch(segment)
        if cgroupfs is not None and "kubepods" in segments[:position]:
            parent = segments[position - 1]
            qos = parent if parent in _CGROUPFS_QOS else "guaranteed"
            uid = cgroupfs.group("uid").lower()
            return PodCgroup(uid, _container_id(segments[position + 1 :]), qos)
    return None


def _container_id(rest: Sequence[str]) -> Optional[str]:
    if not rest:
        return None
    first = rest[0]
    scope = _SCOPE_RE.fullmatch(first)
    if scope is not None:
        return scope.group("id").lower()
    if _CONTAINER_ID_RE.fullmatch(first):
        return first.lower()
    return None


def parse_cgroup(text: str) -> Optional[PodCgroup]:
    """The pod of a process from its ``/proc/<pid>/cgroup`` text; None when in no pod.

    cgroup v2 gives one line ``0::<path>``; on cgroup v1 every hierarchy's line names the
    same pod, and the first that does is used.
    """
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        _controllers, separator, path = rest.partition(":")
        if not hierarchy or not separator:
            continue
        found = _pod_from_path(path.strip())
        if found is not None:
            return found
    return None


#: How deep below the cgroup root container cgroups are looked for (kubepods nests 4-6 deep).
MAX_CGROUP_DEPTH = 10


def pod_cgroups_by_pid(cgroup_root: str = "/sys/fs/cgroup") -> dict[int, PodCgroup]:
    """Every pid in a container cgroup of a pod, from the cgroup v2 tree's ``cgroup.procs``.

    The answer for processes ``/proc`` hides: under systemd's ``ProtectProc=invisible`` the
    agent (root without capabilities) cannot see other users' ``/proc/<pid>``, while the
    cgroup tree stays readable. Pids are in the reader's PID namespace, as NVML's are.
    """
    found: dict[int, PodCgroup] = {}
    root_depth = cgroup_root.rstrip("/").count("/")
    for directory, subdirectories, _files in os.walk(cgroup_root):
        relative = directory[len(cgroup_root) :]
        depth = directory.rstrip("/").count("/") - root_depth
        pod = _pod_from_path(relative) if "pod" in relative else None
        if pod is not None and pod.container_id is not None:
            # A container's cgroup: its processes (and any sub-cgroup's) are its own.
            subdirectories.clear()
            for pid in _cgroup_pids(directory):
                found[pid] = pod
            continue
        if depth >= MAX_CGROUP_DEPTH:
            subdirectories.clear()
    return found


def _cgroup_pids(directory: str) -> list[int]:
    pids: list[int] = []
    for current, _subdirectories, files in os.walk(directory):
        if "cgroup.procs" not in files:
            continue
        try:
            with open(os.path.join(current, "cgroup.procs"), encoding="ascii") as procs:
                pids.extend(int(line) for line in procs if line.strip().isdigit())
        except (OSError, ValueError):
            continue
    return pids


def read_process_cgroup(pid: int, proc_root: str = "/proc") -> Optional[PodCgroup]:
    """The pod of process ``pid``; None when it is in no pod or has exited."""
    try:
        with open(os.path.join(proc_root, str(pid), "cgroup"), encoding="utf-8") as cgroup:
            return parse_cgroup(cgroup.read())
    except (OSError, UnicodeDecodeError):
        return None
