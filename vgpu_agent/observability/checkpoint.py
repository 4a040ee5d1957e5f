"""The kubelet's device checkpoint (``kubelet_internal_checkpoint``), read, never written.

The kubelet records there which container of which pod UID holds which device ids. That is
what links the PodResources API (namespace, pod and container names, no pod UID) to the pod
UIDs that processes' cgroups name. :func:`parse_checkpoint` is pure; :func:`read_checkpoint`
and :class:`CachedCheckpoint` read the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

from vgpu_agent.model.errors import AttributionError

#: The kubelet's device checkpoint, in the device plugin directory.
CHECKPOINT_NAME = "kubelet_internal_checkpoint"
#: Checkpoints are small; a bigger file is not the kubelet's.
MAX_CHECKPOINT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class CheckpointEntry:
    """One allocation the kubelet recorded: a pod UID's container and its device ids."""

    pod_uid: str
    container: str
    resource_name: str
    device_ids: tuple[str, ...]


def parse_checkpoint(text: str, source: str = CHECKPOINT_NAME) -> list[CheckpointEntry]:
    """The allocations in the kubelet's device checkpoint JSON.

    ``DeviceIDs`` is a map from NUMA node to ids (kubelet 1.20 and newer) or a plain list
    (older kubelets); both are read.
    """
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise AttributionError(f"reading the kubelet checkpoint {source}: not JSON: {exc}") from exc
    except RecursionError:
        # json nests by recursion; a document this deep is no checkpoint the kubelet wrote.
        raise AttributionError(
            f"reading the kubelet checkpoint {source}: arrays or objects nested too deeply; "
            "not the kubelet's device checkpoint (check what writes that file)"
        ) from None
    data = document.get("Data") if isinstance(document, dict) else None
    if not isinstance(data, dict):
        raise AttributionError(
            f"reading the kubelet checkpoint {source}: no 'Data' object; is it the kubelet's "
            "device manager checkpoint?"
        )
    raw_entries = data.get("PodDeviceEntries")
    if raw_entries is None:  # a kubelet without allocations writes null
        raw_entries = []
    if not isinstance(raw_entries, list):
        raise AttributionError(
            f"reading the kubelet checkpoint {source}: 'PodDeviceEntries' is not a list"
        )
    entries: list[CheckpointEntry] = []
    for raw in raw_entries:
        if not isinstance(raw, dict):
            continue
        pod_uid, container = raw.get("PodUID"), raw.get("ContainerName")
        resource = raw.get("ResourceName")
        if not isinstance(pod_uid, str) or not isinstance(container, str):
            continue
        entries.append(
            CheckpointEntry(
                pod_uid=pod_uid.lower(),
                container=container,
                resource_name=resource if isinstance(resource, str) else "",
                device_ids=_checkpoint_ids(raw.get("DeviceIDs")),
            )
        )
    return entries


def _checkpoint_ids(raw: object) -> tuple[str, ...]:
    if isinstance(raw, dict):
        lists: Iterable[object] = raw.values()
    elif isinstance(raw, list):
        lists = [raw]
    else:
        return ()
    ids: list[str] = []
    for group in lists:
        if isinstance(group, list):
            ids.extend(item for item in group if isinstance(item, str) and item not in ids)
    return tuple(ids)


def read_checkpoint(path: str) -> list[CheckpointEntry]:
    """Read the kubelet's device checkpoint at ``path`` (never written here)."""
    try:
        with open(path, "rb") as checkpoint:
            data = checkpoint.read(MAX_CHECKPOINT_BYTES + 1)
    except FileNotFoundError:
        raise AttributionError(
            f"kubelet checkpoint {path} not found; processes cannot be matched to containers "
            "(is plugin.plugin_dir the kubelet's device plugin directory?)"
        ) from None
    except NotADirectoryError:
        raise AttributionError(
            f"reading the kubelet checkpoint {path}: {os.path.dirname(path)} is not a "
            "directory; set plugin.plugin_dir to the kubelet's device plugin directory"
        ) from None
    except PermissionError as exc:
        raise AttributionError(
            f"reading the kubelet checkpoint {path}: {exc.strerror or exc}; run the agent as root"
        ) from exc
    except OSError as exc:
        raise AttributionError(
            f"reading the kubelet checkpoint {path}: {exc.strerror or exc}; is it the "
            "kubelet's checkpoint file?"
        ) from exc
    if len(data) > MAX_CHECKPOINT_BYTES:
        raise AttributionError(
            f"reading the kubelet checkpoint {path}: larger than {MAX_CHECKPOINT_BYTES} bytes; "
            "not the kubelet's checkpoint"
        )
    return parse_checkpoint(data.decode("utf-8", "replace"), path)


class CachedCheckpoint:
    """:func:`read_checkpoint` that parses the file again only when it changed (inode,
    size or modification time), for a refresher that reads it every few seconds."""

    def __init__(self) -> None:
        self._key: Optional[tuple[str, int, int, int]] = None
        self._entries: list[CheckpointEntry] = []

    def __call__(self, path: str) -> list[CheckpointEntry]:
        """The allocations in the checkpoint at ``path``; AttributionError as
        :func:`read_checkpoint`."""
        try:
            info = os.stat(path)
        except OSError:
            self._key = None
            return read_checkpoint(path)  # raises the error that names the problem
        key = (path, info.st_ino, info.st_size, info.st_mtime_ns)
        if key != self._key:
            self._entries = read_checkpoint(path)
            self._key = key
        return list(self._entries)
