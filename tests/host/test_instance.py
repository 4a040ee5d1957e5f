"""The records under which running agents leave their control socket for the CLI: a
stopped agent removes its own, a killed one's is removed by the next agent, and the
directory goes with the last record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vgpu_agent.host.instance import (
    prune_records,
    record_path,
    recorded_socket,
    remove_record,
    write_record,
)


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_foreign(record_dir: Path, config: str, pid: int) -> Path:
    path = Path(record_path(config, str(record_dir)))
    record_dir.mkdir(exist_ok=True)
    path.write_text(json.dumps({"config": config, "control_socket": "/x.sock", "pid": pid}))
    return path


def test_a_stopped_agent_leaves_no_record_and_no_directory(tmp_path: Path) -> None:
    """write_record then remove_record: the record and its directory are gone."""
    record_dir = tmp_path / "by-config"
    config = str(tmp_path / "config.toml")
    write_record(config, str(tmp_path / "control.sock"), str(record_dir))
    assert recorded_socket(config, str(record_dir)) == str(tmp_path / "control.sock")
    remove_record(config, str(record_dir))
    assert not record_dir.exists()


def test_a_killed_agents_record_is_removed_by_the_next_agent(tmp_path: Path) -> None:
    """A record whose agent is gone does not outlive the next agent's start."""
    record_dir = tmp_path / "by-config"
    stale = _write_foreign(record_dir, "/etc/vgpu/killed.toml", _dead_pid())
    write_record(str(tmp_path / "config.toml"), str(tmp_path / "c.sock"), str(record_dir))
    assert not stale.exists()
    assert len(os.listdir(record_dir)) == 1


def test_a_running_agents_record_is_kept(tmp_path: Path) -> None:
    """Pruning keeps the record of an agent that still runs (here: this process)."""
    record_dir = tmp_path / "by-config"
    live = _write_foreign(record_dir, "/etc/vgpu/live.toml", os.getpid())
    prune_records(str(record_dir))
    assert live.exists()
    assert recorded_socket("/etc/vgpu/live.toml", str(record_dir)) == "/x.sock"


def test_pruning_a_missing_directory_does_nothing(tmp_path: Path) -> None:
    """No directory, nothing to do, no error."""
    prune_records(str(tmp_path / "missing"))
    assert not (tmp_path / "missing").exists()
