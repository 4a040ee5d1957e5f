"""Facts about unix sockets and the probes every part uses on them (no outside library).

A socket file can be missing, something else, stale (left by a process that died: nothing
accepts on it) or listening; :func:`socket_state` tells which, and :func:`socket_identity`
tells a socket made again at the same path from the old one.
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Literal, Optional

#: sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_UNIX_SOCKET_PATH_BYTES = 107
#: How long a probe waits for a listener to accept, by default.
PROBE_TIMEOUT_S = 0.5

SocketState = Literal["missing", "not a socket", "stale", "listening"]
#: (inode, change time in ns) of a socket file.
SocketIdentity = tuple[int, int]


def socket_state(path: str, timeout_s: float = PROBE_TIMEOUT_S) -> SocketState:
    """ "missing", "not a socket", "listening" or "stale" (a socket nothing accepts on)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "missing"
    if not stat.S_ISSOCK(mode):
        return "not a socket"
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(timeout_s)
    try:
        client.connect(path)
    except OSError:
        return "stale"
    finally:
        client.close()
    return "listening"


def socket_answers(path: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether some process accepts connections on the unix socket at ``path``."""
    return socket_state(path, timeout_s) == "listening"


def socket_identity(path: str) -> Optional[SocketIdentity]:
    """(inode, ctime in ns) of the unix socket at ``path``, or None when there is none.

    The inode alone is not enough: a filesystem such as ext4 hands a freed inode number to
    the next file made, so a socket deleted and made again usually has the same inode. Its
    change time tells the two apart.
    """
    try:
        info = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISSOCK(info.st_mode):
        return None
    return info.st_ino, info.st_ctime_ns
