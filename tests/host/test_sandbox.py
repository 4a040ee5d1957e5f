"""The agent leaves its sandbox for a fresh one (exit 75, systemd restarts it) when the
kubelet's plugin directory turns read-only under it, and only then."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

from tests.harness import WAIT_S, AgentRun
from vgpu_agent.agent.loop import EXIT_RESTART
from vgpu_agent.host.sandbox import PluginDirGuard, on_read_only_mount


class ReadOnlyPaths:
    """A stand-in for the mount table: the paths in ``paths`` are on read-only mounts."""

    def __init__(self) -> None:
        self.paths: set[str] = set()

    def __call__(self, path: str) -> bool:
        return path in self.paths


def test_guard_asks_for_a_restart_when_a_writable_directory_turns_read_only(
    tmp_path: Path,
) -> None:
    """Writable, then deleted and made again read-only: restart, naming the directory."""
    read_only = ReadOnlyPaths()
    guard = PluginDirGuard(read_only)
    plugin_dir = str(tmp_path / "device-plugins")
    os.mkdir(plugin_dir)
    assert guard.check(plugin_dir) is None
    os.rmdir(plugin_dir)
    assert guard.check(plugin_dir) is None  # gone: wait for it
    os.mkdir(plugin_dir)
    read_only.paths.add(plugin_dir)
    reason = guard.check(plugin_dir)
    assert reason is not None
    assert plugin_dir in reason
    assert "restarts the agent in a fresh sandbox" in reason


def test_guard_asks_for_a_restart_when_a_missing_directory_appears_read_only(
    tmp_path: Path,
) -> None:
    """Missing at start (the sandbox skipped it), then made read-only: restart."""
    read_only = ReadOnlyPaths()
    guard = PluginDirGuard(read_only)
    plugin_dir = str(tmp_path / "device-plugins")
    assert guard.check(plugin_dir) is None
    os.mkdir(plugin_dir)
    read_only.paths.add(plugin_dir)
    assert guard.check(plugin_dir) is not None


def test_guard_does_not_restart_loop_on_a_directory_read_only_from_the_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Read-only from the first look: one error naming the fix, no restart (it would not help)."""
    read_only = ReadOnlyPaths()
    guard = PluginDirGuard(read_only)
    plugin_dir = str(tmp_path)
    read_only.paths.add(plugin_dir)
    assert guard.check(plugin_dir) is None
    assert guard.check(plugin_dir) is None
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1
    assert "ReadWritePaths=" in errors[0]
    assert plugin_dir in errors[0]


def test_guard_starts_over_for_a_new_plugin_dir(tmp_path: Path) -> None:
    """A reload to another directory is judged from its own first look."""
    read_only = ReadOnlyPaths()
    guard = PluginDirGuard(read_only)
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    os.mkdir(first)
    os.mkdir(second)
    assert guard.check(first) is None
    read_only.paths.add(second)
    assert guard.check(second) is None  # read-only from its first look: no restart


def test_a_writable_temp_directory_is_not_on_a_read_only_mount(tmp_path: Path) -> None:
    """statvfs says a fresh temp directory is writable; a missing path is not read-only."""
    assert not on_read_only_mount(str(tmp_path))
    assert not on_read_only_mount(str(tmp_path / "missing"))


def test_agent_exits_75_when_its_plugin_dir_turns_read_only(
    run_agent: Callable[..., AgentRun],
) -> None:
    """The running agent registers, its directory is made anew read-only: it exits 75."""
    read_only = ReadOnlyPaths()
    run = run_agent(plugin_dir_guard=PluginDirGuard(read_only))
    plugin_dir = run.agent.config.plugin.plugin_dir
    run.standin.wait_for_registration(1, WAIT_S)
    run.standin.stop()
    shutil.rmtree(plugin_dir)
    os.mkdir(plugin_dir)
    read_only.paths.add(plugin_dir)
    run.thread.join(timeout=WAIT_S)
    assert run.exit_code == [EXIT_RESTART]
