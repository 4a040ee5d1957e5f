"""Wake the agent's loop when the kubelet's plugin directory changes (Linux inotify).

The kubelet announces a restart only through files: it deletes every socket in the plugin
directory and creates a new ``kubelet.sock``. Watching the directory lets the loop sleep
instead of polling it ten times a second; where inotify is not available the loop polls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import sys
import threading
from typing import Callable, Optional

log = logging.getLogger(__name__)

# From <sys/inotify.h>.
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_IGNORED = 0x00008000
IN_CLOEXEC = 0o2000000
IN_NONBLOCK = 0o4000
WATCH_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF
#: Bytes read from the inotify descriptor at once: many events fit.
READ_BYTES = 64 * 1024


def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        libc.inotify_init1  # noqa: B018 - fails here where the C library has no inotify
        libc.inotify_add_watch  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


class DirectoryWatch:
    """Calls ``on_change`` (from a background thread) when an entry of ``path`` is created,
    deleted or renamed, or the directory itself goes away; :attr:`active` turns False then."""

    def __init__(self, path: str, on_change: Callable[[], None]) -> None:
        self.path = path
        self._on_change = on_change
        self._fd: Optional[int] = None
        self._stop_r: Optional[int] = None
        self._stop_w: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self._active = False

    @property
    def active(self) -> bool:
        """Whether the directory is being watched now."""
        return self._active

    def start(self) -> bool:
        """Start watching; False (and the caller polls) when inotify or the directory is
        not there."""
        libc = _libc()
        if libc is None:
            return False
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            log.debug("inotify_init1 failed: %s", os.strerror(ctypes.get_errno()))
            return False
        if libc.inotify_add_watch(fd, os.fsencode(self.path), WATCH_MASK) < 0:
            os.close(fd)
            return False
        self._fd = fd
        self._stop_r, self._stop_w = os.pipe()
        self._active = True
        self._thread = threading.Thread(target=self._run, name="vgpu-dirwatch", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        """Stop watching and release the descriptors."""
        if self._stop_w is not None:
            os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        for fd in (self._fd, self._stop_r, self._stop_w):
            if fd is not None:
                os.close(fd)
        self._fd = self._stop_r = self._stop_w = None
        self._active = False

    def _run(self) -> None:
        assert self._fd is not None  # noqa: S101 - set by start()
        assert self._stop_r is not None  # noqa: S101 - set by start()
        while True:
            readable, _, _ = select.select([self._fd, self._stop_r], [], [])
            if self._stop_r in readable:
                return
            try:
                data = os.read(self._fd, READ_BYTES)
            except BlockingIOError:
                continue
            gone = _directory_gone(data)
            if gone:
                self._active = False
            self._on_change()
            if gone:
                return


def _directory_gone(data: bytes) -> bool:
    """Whether a batch of inotify events says the watched directory itself went away."""
    offset = 0
    while offset + 16 <= len(data):
        mask = int.from_bytes(data[offset + 4 : offset + 8], sys.byteorder)
        name_length = int.from_bytes(data[offset + 12 : offset + 16], sys.byteorder)
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
            return True
        offset += 16 + name_length
    return False
