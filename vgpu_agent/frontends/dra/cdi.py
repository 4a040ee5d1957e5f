"""Per-claim CDI spec files: what a prepared claim gives its containers.

A prepared claim becomes one CDI spec file in the CDI directory holding one device named
after the claim's uid; the container runtime applies its edits to every container that
uses the claim. The edits are exactly what the device plugin's Allocate grants a container
(:class:`~vgpu_agent.model.devices.ContainerGrant`: the GPU's environment, the MPS pipe
directory mounted read-only, the per-claim MPS limits); they are built by the same model
function, so both frontends give a pod the same thing.

Files are written atomically (a dot-file in the same directory, fsync, rename), so a
runtime that reads the directory never sees half a spec.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from typing import Any

from vgpu_agent.model.devices import ContainerGrant
from vgpu_agent.model.errors import AgentError

#: The CDI specification version of the files: env and mounts need nothing newer, and
#: containerd 1.7 and CRI-O read it.
CDI_VERSION = "0.5.0"
#: Mount options of a read-only bind mount as CDI passes them to the OCI spec.
_READ_ONLY_BIND = ("ro", "nosuid", "nodev", "rbind")
_READ_WRITE_BIND = ("nosuid", "nodev", "rbind")
#: A claim uid the kubelet sends is a UUID; anything that could leave the CDI directory or
#: is not a CDI device name is refused before it reaches a path.
_CLAIM_UID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,127}")


def valid_claim_uid(uid: str) -> bool:
    """Whether ``uid`` can name a claim's spec file and CDI device (letters, digits, '-')."""
    return _CLAIM_UID_RE.fullmatch(uid) is not None


def spec_file_name(driver: str, claim_uid: str) -> str:
    """The spec file of a claim: ``<driver>-claim-<uid>.json``."""
    return f"{driver}-claim-{claim_uid}.json"


def cdi_device_id(kind: str, claim_uid: str) -> str:
    """The fully qualified CDI device id of a claim: ``<kind>=<uid>``."""
    return f"{kind}={claim_uid}"


def claim_spec(kind: str, claim_uid: str, granted: ContainerGrant) -> dict[str, Any]:
    """The CDI spec document for a claim granted ``granted``."""
    edits: dict[str, Any] = {
        "env": [f"{name}={value}" for name, value in sorted(granted.envs.items())],
    }
    if granted.mounts:
        edits["mounts"] = [
            {
                "hostPath": mount.host_path,
                "containerPath": mount.container_path,
                "options": list(_READ_ONLY_BIND if mount.read_only else _READ_WRITE_BIND),
            }
            for mount in granted.mounts
        ]
    return {
        "cdiVersion": CDI_VERSION,
        "kind": kind,
        "devices": [{"name": claim_uid, "containerEdits": edits}],
    }


class CdiSpecs:
    """The claim spec files in one CDI directory."""

    def __init__(self, cdi_dir: str, driver: str) -> None:
        self.cdi_dir = cdi_dir
        self._driver = driver

    def path(self, claim_uid: str) -> str:
        """Where a claim's spec file lives."""
        return os.path.join(self.cdi_dir, spec_file_name(self._driver, claim_uid))

    def exists(self, claim_uid: str) -> bool:
        """Whether the claim's spec file is there."""
        return os.path.isfile(self.path(claim_uid))

    def write(self, claim_uid: str, spec: dict[str, Any]) -> str:
        """Write the claim's spec atomically; returns its path. AgentError naming the file
        and the cause when it cannot be written."""
        path = self.path(claim_uid)
        try:
            os.makedirs(self.cdi_dir, mode=0o755, exist_ok=True)
            write_atomically(path, json.dumps(spec, indent=2, sort_keys=True) + "\n", 0o644)
        except OSError as exc:
            raise AgentError(
                f"writing the CDI spec {path}: {exc.strerror or exc} (check that dra.cdi_dir "
                "exists and is writable by the agent)"
            ) from exc
        return path

    def remove(self, claim_uid: str) -> None:
        """Remove the claim's spec file; nothing to do when it is already gone."""
        path = self.path(claim_uid)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise AgentError(f"removing the CDI spec {path}: {exc.strerror or exc}") from exc


def write_atomically(path: str, text: str, mode: int) -> None:
    """Replace ``path`` by ``text``: a hidden temporary file beside it (readers of the
    directory skip dot-files and names without the right suffix), fsync, rename."""
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
