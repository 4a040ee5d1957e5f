"""Everything doctor reads from the node, behind :class:`DoctorProbes`.

Tests point the probes at temp directories, the simulated backend and fake MPS probes;
:func:`system_probes` builds the probes of the real node, which reach the composition root
lazily (it pulls in gRPC).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Optional

from vgpu_agent.config.schema import Config
from vgpu_agent.host import control
from vgpu_agent.model.commands import ControlCommand
from vgpu_agent.model.daemons import MpsInspector
from vgpu_agent.model.devices import Ceiling
from vgpu_agent.model.errors import VgpuError
from vgpu_agent.model.gpu import GpuBackend
from vgpu_agent.mps import confinement
from vgpu_agent.mps.control import checked_program

CONTAINERD_CONFIG = "/etc/containerd/config.toml"
#: Where nvidia-ctk and the GPU operator put containerd drop-ins (99-nvidia.toml).
CONTAINERD_DROPIN_DIRS = ("/etc/containerd/conf.d",)
#: How long a socket check waits for a listener to accept.
SOCKET_CONNECT_TIMEOUT_S = 1.0


def _mps_ceiling_gaps(config: Config, gpu_uuid: str, ceiling: Ceiling) -> list[str]:
    return _inspector(config).ceiling_gaps(gpu_uuid, ceiling)


@dataclass(frozen=True)
class DoctorProbes:
    """Everything doctor reads from the node, so tests can point it elsewhere.

    Paths in the config (plugin directory, state directory, pipe root) are used as they
    are; the probes cover what the config does not name.
    """

    #: Open the GPU backend the config names; raises VgpuError when it cannot.
    open_backend: Callable[[Config], GpuBackend]
    #: The full path of an executable (a name on PATH or an absolute path), else None.
    which: Callable[[str], Optional[str]]
    #: None if the MPS daemon of (config, GPU UUID) answers; else why not.
    mps_probe: Callable[[Config, str], Optional[str]]
    #: Whether the driver's MPS offers multi-user mode; raises VgpuError when it cannot tell.
    mps_multi_user_supported: Callable[[Config], bool]
    #: Whether the running daemon of (config, GPU UUID) was started in multi-user mode.
    mps_daemon_multi_user: Callable[[Config, str], Optional[bool]]
    #: How the MPS daemons live inside the agent (e.g. "simulated"; no MPS program is then
    #: needed on the host), or None for real daemons.
    mps_in_agent: Callable[[Config], Optional[str]]
    #: Send a command to the agent's control socket (path, command) and return its answer.
    agent_request: Callable[[str, ControlCommand], dict[str, Any]]
    containerd_config: str = CONTAINERD_CONFIG
    containerd_dropin_dirs: tuple[str, ...] = CONTAINERD_DROPIN_DIRS
    socket_timeout_s: float = SOCKET_CONNECT_TIMEOUT_S
    #: Why the agent would refuse to run the control program as root (another user could
    #: change it), or None (the default: not checked).
    untrusted_program: Callable[[str], Optional[str]] = lambda _control_binary: None
    #: The NVIDIA container toolkit's config and the CDI spec directories.
    toolkit_config: str = confinement.TOOLKIT_CONFIG
    cdi_spec_dirs: tuple[str, ...] = confinement.CDI_SPEC_DIRS
    #: What of a ceiling the daemon of (config, GPU UUID) no longer holds (MpsError: no
    #: answer).
    mps_ceiling_gaps: Callable[[Config, str, Ceiling], list[str]] = _mps_ceiling_gaps
    #: Whether doctor runs as root (what it may read depends on it).
    is_root: Callable[[], bool] = lambda: os.geteuid() == 0


# -- the probes of the real node ---------------------------------------------------------------


def _open_backend(config: Config) -> GpuBackend:
    from vgpu_agent.runtime.compose import (
        inspected_backend_for,  # the composition root pulls in gRPC
    )

    return inspected_backend_for(config)


def _inspector(config: Config) -> MpsInspector:
    from vgpu_agent.runtime.compose import mps_inspector_for  # the composition root pulls in gRPC

    return mps_inspector_for(config)


def _untrusted_program(control_binary: str) -> Optional[str]:
    try:
        checked_program(control_binary)
    except VgpuError as exc:
        return str(exc)
    return None


def system_probes() -> DoctorProbes:
    """The probes of the node doctor runs on."""
    return DoctorProbes(
        open_backend=_open_backend,
        which=shutil.which,
        mps_probe=lambda config, gpu_uuid: _inspector(config).probe(gpu_uuid),
        mps_multi_user_supported=lambda config: _inspector(config).multi_user_supported(),
        mps_daemon_multi_user=lambda config, gpu_uuid: _inspector(config).daemon_multi_user(
            gpu_uuid
        ),
        mps_in_agent=lambda config: _inspector(config).in_agent,
        agent_request=control.request,
        untrusted_program=_untrusted_program,
    )
