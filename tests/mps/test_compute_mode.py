"""Compute mode set at boot and set back when vgpu-compute-mode.service stops: against the
stateful simulated backend, and through the CLI as real processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.builders import make_gpu
from tests.cli_process import Result, run_cli_exec
from vgpu_agent.model.errors import GpuError, VgpuError
from vgpu_agent.model.gpu import ComputeMode, Gpu
from vgpu_agent.mps.compute_mode import apply_compute_mode, restore_compute_modes
from vgpu_agent.standins.simulated import SimulatedBackend

EXCLUSIVE = ComputeMode.EXCLUSIVE_PROCESS
DEFAULT = ComputeMode.DEFAULT


def test_apply_records_only_the_gpus_it_changed(tmp_path: Path) -> None:
    """A GPU already in the wanted mode is not recorded, so a restore leaves it alone."""
    gpus = [make_gpu(0), make_gpu(1)]
    backend = SimulatedBackend(gpus)
    backend.set_compute_mode(gpus[1].uuid, EXCLUSIVE)  # an administrator's choice
    record = tmp_path / "changed.json"
    lines = apply_compute_mode(backend, gpus, EXCLUSIVE, str(record))
    assert lines == [
        f"GPU 0 {gpus[0].uuid}: default -> exclusive_process",
        f"GPU 1 {gpus[1].uuid}: exclusive_process -> exclusive_process",
    ]
    assert json.loads(record.read_text()) == {gpus[0].uuid: "default"}


def test_restore_sets_back_what_apply_changed_and_nothing_else(tmp_path: Path) -> None:
    """After apply and restore each GPU is in the mode it had before apply."""
    gpus = [make_gpu(0), make_gpu(1)]
    backend = SimulatedBackend(gpus)
    backend.set_compute_mode(gpus[1].uuid, EXCLUSIVE)
    record = tmp_path / "changed.json"
    apply_compute_mode(backend, gpus, EXCLUSIVE, str(record))
    lines, problems = restore_compute_modes(backend, str(record))
    assert problems == []
    assert lines == [
        f"GPU 0 {gpus[0].uuid}: compute mode set back to default (was exclusive_process)"
    ]
    assert backend.get_compute_mode(gpus[0].uuid) is DEFAULT
    assert backend.get_compute_mode(gpus[1].uuid) is EXCLUSIVE
    assert not record.exists()


def test_a_second_apply_keeps_the_first_previous_mode(tmp_path: Path) -> None:
    """Apply twice (a restore failed in between): the mode before any change is kept."""
    gpu = make_gpu(0)
    backend = SimulatedBackend([gpu])
    record = tmp_path / "changed.json"
    apply_compute_mode(backend, [gpu], EXCLUSIVE, str(record))
    apply_compute_mode(backend, [gpu], DEFAULT, str(record))
    assert json.loads(record.read_text()) == {gpu.uuid: "default"}


def test_restore_without_a_record_changes_nothing(tmp_path: Path) -> None:
    """No record (compute_mode unchanged, or nothing changed): nothing is touched."""
    gpu = make_gpu(0)
    backend = SimulatedBackend([gpu])
    backend.set_compute_mode(gpu.uuid, EXCLUSIVE)
    lines, problems = restore_compute_modes(backend, str(tmp_path / "none.json"))
    assert (problems, backend.get_compute_mode(gpu.uuid)) == ([], EXCLUSIVE)
    assert "no compute mode to restore" in lines[0]


class RefusingBackend(SimulatedBackend):
    """A simulated backend whose driver refuses compute-mode changes of some GPUs."""

    def __init__(self, gpus: list[Gpu], refused: set[str]) -> None:
        super().__init__(gpus)
        self.refused = refused

    def set_compute_mode(self, gpu_uuid: str, mode: ComputeMode) -> None:
        """Refuses for the GPUs in ``refused``, else sets the mode."""
        if gpu_uuid in self.refused:
            raise GpuError(f"setting the compute mode of {gpu_uuid}: insufficient permissions")
        super().set_compute_mode(gpu_uuid, mode)


def test_restore_drops_a_gone_gpu_and_keeps_a_refused_one(tmp_path: Path) -> None:
    """A GPU that is gone is named and dropped; one that refuses is named and kept in
    the record for another try."""
    gpus = [make_gpu(0), make_gpu(1), make_gpu(2)]
    record = tmp_path / "changed.json"
    apply_compute_mode(SimulatedBackend(gpus), gpus, EXCLUSIVE, str(record))
    backend = RefusingBackend(gpus[:2], refused={gpus[1].uuid})
    lines, problems = restore_compute_modes(backend, str(record))
    assert lines == [f"GPU 0 {gpus[0].uuid}: compute mode set back to default (was default)"]
    assert problems == [
        f"GPU 1 {gpus[1].uuid}: restoring default: setting the compute mode of "
        f"{gpus[1].uuid}: insufficient permissions",
        f"GPU {gpus[2].uuid} is not on this node any more: not restored",
    ]
    assert json.loads(record.read_text()) == {gpus[1].uuid: "default"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("not json", "reading the compute-mode record"),
        ("[]", "not a JSON object"),
        ('{"GPU-1": "turbo"}', "'turbo' is not a valid ComputeMode"),
    ],
    ids=["garbage", "list", "bad-mode"],
)
def test_a_damaged_record_is_named(tmp_path: Path, text: str, problem: str) -> None:
    """A record that is not ours is refused with its path, never guessed at."""
    record = tmp_path / "changed.json"
    record.write_text(text)
    with pytest.raises(VgpuError, match=problem):
        restore_compute_modes(SimulatedBackend([make_gpu(0)]), str(record))


CONFIG = """version = 1
[gpus]
backend = "simulated"
compute_mode = "exclusive_process"
[simulated]
count = 2
"""


def _cli(config: Path, *args: str) -> Result:
    return run_cli_exec("--config", str(config), *args)


def test_cli_apply_records_and_restore_sets_back(tmp_path: Path) -> None:
    """The unit's two commands as processes: apply --record writes the record, restore
    names each GPU it set back, removes the record, and a second restore does nothing."""
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    record = tmp_path / "changed.json"
    applied = _cli(config, "gpus", "apply-compute-mode", "--record", str(record))
    assert applied.code == 0, applied.stderr
    assert applied.stdout.count("default -> exclusive_process") == 2
    assert sorted(json.loads(record.read_text()).values()) == ["default", "default"]
    restored = _cli(config, "gpus", "restore-compute-mode", str(record))
    assert restored.code == 0, restored.stderr
    assert restored.stdout.count("compute mode set back to default") == 2
    assert not record.exists()
    again = _cli(config, "gpus", "restore-compute-mode", str(record))
    assert (again.code, again.stdout.strip()) == (
        0,
        "no compute mode to restore (this node's modes were not changed)",
    )


def test_cli_restore_of_a_damaged_record_is_one_line(tmp_path: Path) -> None:
    """A damaged record: one error line, exit 1, no traceback."""
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    record = tmp_path / "changed.json"
    record.write_text("{")
    result = _cli(config, "gpus", "restore-compute-mode", str(record))
    assert result.code == 1
    assert result.stderr.startswith("vgpu-agent: error: reading the compute-mode record")
    assert len(result.stderr.strip().splitlines()) == 1
