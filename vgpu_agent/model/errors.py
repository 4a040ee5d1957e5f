"""The agent's exceptions.

Every error that reaches a person is one of these, with a message that names the
action, the object and what to do. Errors from outside libraries (pynvml, grpc,
the OS) are translated into these where they enter the program::

    VgpuError
    ├── ConfigError         bad config file or value (exit code 78)
    ├── GpuError            NVML or the simulated backend failed
    │   └── GpuLostError    a GPU fell off the bus or disappeared
    ├── MpsError            an MPS control daemon could not be started, stopped or asked
    ├── RegistrationError   the kubelet refused or did not answer our registration
    ├── AttributionError    the kubelet's PodResources API or checkpoint could not be read
    └── AgentError          anything else the daemon itself detects (socket in use, ...)
        └── AgentNotRunningError   no agent listens on the control socket
"""

from __future__ import annotations


class VgpuError(Exception):
    """Base class of every error the agent reports to a person."""


class ConfigError(VgpuError):
    """The configuration is invalid; the message names the file, key path and value."""


class GpuError(VgpuError):
    """Asking the GPU backend (NVML or simulated) failed."""


class GpuLostError(GpuError):
    """A GPU is no longer reachable (fallen off the bus, removed, lost)."""


class MpsError(VgpuError):
    """An MPS control daemon could not be started, stopped or queried."""


class RegistrationError(VgpuError):
    """Registering with the kubelet failed."""


class AttributionError(VgpuError):
    """Finding which pods hold which vGPUs failed (PodResources API, kubelet checkpoint)."""


class AgentError(VgpuError):
    """The agent cannot do its job for a reason of its own (socket in use, ...)."""


class AgentNotRunningError(AgentError):
    """No agent listens on the control socket (none runs with that state directory)."""
