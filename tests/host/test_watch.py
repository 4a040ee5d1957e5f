"""The plugin-directory watch that lets the agent's loop sleep instead of polling."""

from __future__ import annotations

import os
import shutil
import socket
import threading

from vgpu_agent.host.watch import DirectoryWatch


def _watch(path: str) -> tuple[DirectoryWatch, threading.Event]:
    changed = threading.Event()
    watch = DirectoryWatch(path, changed.set)
    assert watch.start()
    return watch, changed


def test_socket_created_and_deleted_wake(short_tmp_dir: str) -> None:
    """Binding a socket in the directory, and deleting it, each call on_change."""
    watch, changed = _watch(short_tmp_dir)
    try:
        path = os.path.join(short_tmp_dir, "kubelet.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        assert changed.wait(5)
        changed.clear()
        server.close()
        os.unlink(path)
        assert changed.wait(5)
        assert watch.active
    finally:
        watch.stop()


def test_directory_removed_ends_watch(short_tmp_dir: str) -> None:
    """Removing the watched directory wakes the caller and turns the watch inactive."""
    directory = os.path.join(short_tmp_dir, "dp")
    os.mkdir(directory)
    watch, changed = _watch(directory)
    try:
        shutil.rmtree(directory)
        assert changed.wait(5)
        for _ in range(100):
            if not watch.active:
                break
            changed.wait(0.05)
        assert not watch.active
    finally:
        watch.stop()


def test_missing_directory_cannot_be_watched(short_tmp_dir: str) -> None:
    """A directory that does not exist is refused; the caller polls instead."""
    watch = DirectoryWatch(os.path.join(short_tmp_dir, "absent"), lambda: None)
    assert not watch.start()
    watch.stop()


def test_stop_releases_descriptors(short_tmp_dir: str) -> None:
    """Starting and stopping many watches leaks no file descriptors."""
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        watch, _ = _watch(short_tmp_dir)
        watch.stop()
    assert len(os.listdir("/proc/self/fd")) <= before + 1
