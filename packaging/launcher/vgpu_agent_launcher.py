"""Entry point of the packaged vgpu-agent, started by /usr/bin/vgpu-agent.

The interpreter runs isolated (-I -S): the only import locations are the standard
library, this private directory (the agent and its pinned dependencies) and, for the one
package "systemd" (systemd-python), the distribution's own directories when it is
installed there for this interpreter. The agent speaks the sd_notify and journald
protocols itself when systemd-python is absent or built for another interpreter.
"""

import importlib.machinery
import os
import sys

PRIVATE_DIR = os.path.dirname(os.path.abspath(__file__))
_VERSION_DIR = f"python{sys.version_info[0]}.{sys.version_info[1]}"
DISTRO_DIRS = (
    "/usr/lib/python3/dist-packages",  # Debian, Ubuntu
    "/usr/lib64/" + _VERSION_DIR + "/site-packages",  # Amazon Linux, Fedora (arch-specific)
    "/usr/lib/" + _VERSION_DIR + "/site-packages",
)


class DistroSystemdFinder:
    """Finds the top-level "systemd" package, and nothing else, in the distribution's dirs."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "systemd":
            return None
        return importlib.machinery.PathFinder.find_spec(name, list(DISTRO_DIRS))


sys.path.insert(0, PRIVATE_DIR)
sys.meta_path.append(DistroSystemdFinder)
# Usage lines and messages name the command, not this file.
sys.argv[0] = "vgpu-agent"

from vgpu_agent.ops.cli.root import main  # noqa: E402

sys.exit(main())
