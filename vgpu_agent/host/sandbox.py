"""What the agent notices about the sandbox systemd built for it (vgpu-agent.service).

``ProtectSystem=strict`` makes the whole file system read-only for the agent, and
``ReadWritePaths=`` bind-mounts the kubelet's plugin directory writable when the service
starts. When that directory is deleted and made again later (a kubelet reinstall, an
operator's cleanup), the kernel drops the bind mount with the old directory, and the new
one lies on the read-only mount: the agent could never bind its socket there again.
Nothing inside the process can fix that; a restart can, because systemd then builds the
sandbox afresh around the new directory. :class:`PluginDirGuard` tells the loop when to
exit for that restart (``Restart=always``), and only then: a directory that was read-only
from the start (a ``plugin_dir`` without a drop-in) would be read-only again after a
restart, so that is logged once instead of restart-looping.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

log = logging.getLogger(__name__)


def on_read_only_mount(path: str) -> bool:
    """Whether ``path`` lies on a mount that is read-only for this process."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class PluginDirGuard:
    """Says when the plugin directory turned read-only under the running agent."""

    def __init__(self, read_only: Callable[[str], bool] = on_read_only_mount) -> None:
        self._read_only = read_only
        self._path: Optional[str] = None
        #: Whether the directory was ever missing or writable for this agent.
        self._was_usable = False
        self._warned = False

    def check(self, plugin_dir: str) -> Optional[str]:
        """Why the agent must restart to serve ``plugin_dir`` again, or None."""
        if plugin_dir != self._path:
            self._path = plugin_dir
            self._was_usable = False
            self._warned = False
        if not os.path.isdir(plugin_dir) or not self._read_only(plugin_dir):
            self._was_usable = True
            return None
        if self._was_usable:
            return (
                f"the kubelet's plugin directory {plugin_dir} is on a read-only mount now: it "
                "was deleted and made anew after the agent started, and the writable mount "
                "its sandbox (vgpu-agent.service, ReadWritePaths=) had went with the old one; "
                "exiting so that systemd restarts the agent in a fresh sandbox"
            )
        if not self._warned:
            self._warned = True
            log.error(
                "the kubelet's plugin directory %s is on a read-only mount for the agent, "
                "which cannot serve its socket there: add it to ReadWritePaths= of "
                "vgpu-agent.service (systemctl edit vgpu-agent.service; see "
                "/usr/share/doc/vgpu-agent/systemd.md)",
                plugin_dir,
            )
        return None
