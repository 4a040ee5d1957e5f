"""Setting the served GPUs' compute mode, and setting back what was changed.

``vgpu-compute-mode.service`` runs :func:`apply_compute_mode` at boot with a record file in
its runtime directory, and :func:`restore_compute_modes` when it stops (package removal,
shutdown, ``systemctl stop``): each GPU whose mode the unit changed gets its previous mode
back, so no GPU stays in EXCLUSIVE_PROCESS after the package is gone. A GPU the unit did
not change is left alone, and nothing here ever resets a GPU.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from vgpu_agent.model.errors import GpuError, VgpuError
from vgpu_agent.model.gpu import ComputeMode, Gpu, GpuBackend


def _read_record(path: str) -> dict[str, ComputeMode]:
    try:
        with open(path, encoding="utf-8") as record_file:
            raw = json.load(record_file)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise VgpuError(f"reading the compute-mode record {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise VgpuError(f"the compute-mode record {path} is not a JSON object")
    try:
        return {str(gpu_uuid): ComputeMode(mode) for gpu_uuid, mode in raw.items()}
    except ValueError as exc:
        raise VgpuError(f"the compute-mode record {path}: {exc}") from exc


def _write_record(path: str, record: dict[str, ComputeMode]) -> None:
    partial = f"{path}.partial"
    try:
        with open(partial, "w", encoding="utf-8") as record_file:
            json.dump({gpu_uuid: mode.value for gpu_uuid, mode in record.items()}, record_file)
        os.replace(partial, path)
    except OSError as exc:
        raise VgpuError(f"writing the compute-mode record {path}: {exc.strerror}") from exc


def apply_compute_mode(
    backend: GpuBackend, gpus: Iterable[Gpu], mode: ComputeMode, record_path: str = ""
) -> list[str]:
    """Set ``mode`` on each GPU; with ``record_path``, remember the previous mode of each
    GPU changed (an earlier record's entry wins: that is the mode before any change).
    Returns one line per GPU."""
    record = _read_record(record_path) if record_path else {}
    lines = []
    for gpu in gpus:
        before = backend.get_compute_mode(gpu.uuid)
        if before is not mode:
            if record_path:
                record.setdefault(gpu.uuid, before)
                _write_record(record_path, record)
            backend.set_compute_mode(gpu.uuid, mode)
        after = backend.get_compute_mode(gpu.uuid)
        if after is not mode:
            raise GpuError(f"GPU {gpu.uuid}: compute mode reads back as {after.value}")
        lines.append(f"GPU {gpu.index} {gpu.uuid}: {before.value} -> {after.value}")
    return lines


def restore_compute_modes(backend: GpuBackend, record_path: str) -> tuple[list[str], list[str]]:
    """Set each recorded GPU back to its recorded mode, then delete the record.

    Returns (lines, problems): a GPU that is gone or refuses is a problem, and stays in
    the record so that a later run can try again."""
    record = _read_record(record_path)
    if not record:
        return ["no compute mode to restore (this node's modes were not changed)"], []
    by_uuid = {gpu.uuid: gpu for gpu in backend.list_gpus()}
    lines: list[str] = []
    problems: list[str] = []
    left: dict[str, ComputeMode] = {}
    for gpu_uuid, previous in record.items():
        gpu = by_uuid.get(gpu_uuid)
        if gpu is None:
            problems.append(f"GPU {gpu_uuid} is not on this node any more: not restored")
            continue
        try:
            now = backend.get_compute_mode(gpu_uuid)
            backend.set_compute_mode(gpu_uuid, previous)
        except GpuError as exc:
            problems.append(f"GPU {gpu.index} {gpu_uuid}: restoring {previous.value}: {exc}")
            left[gpu_uuid] = previous
            continue
        lines.append(
            f"GPU {gpu.index} {gpu_uuid}: compute mode set back to {previous.value} "
            f"(was {now.value})"
        )
    if left:
        _write_record(record_path, left)
    else:
        try:
            os.unlink(record_path)
        except OSError as exc:
            problems.append(f"removing the compute-mode record {record_path}: {exc.strerror}")
    return lines, problems
