"""Registration with the kubelet, and what the agent loop needs to notice a kubelet restart.

The kubelet serves ``Registration`` on ``<plugin dir>/kubelet.sock``. When it restarts it
deletes every file in the plugin directory (our socket included) and listens on a new
``kubelet.sock``; :func:`vgpu_agent.host.sockets.socket_identity` lets the loop see that
replacement.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, cast

import grpc

from vgpu_agent.frontends._proto import deviceplugin_pb2 as pb
from vgpu_agent.frontends._proto import deviceplugin_pb2_grpc as pb_grpc
from vgpu_agent.frontends.serving import CHANNEL_OPTIONS, unix_target
from vgpu_agent.host.sockets import socket_identity
from vgpu_agent.model.errors import RegistrationError

#: The device plugin API version we speak.
API_VERSION = "v1beta1"
#: Where the kubelet looks for device plugins, and the socket it listens on there.
DEFAULT_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
KUBELET_SOCKET_NAME = "kubelet.sock"
#: The kubelet's own file in the plugin directory; it survives kubelet restarts.
KUBELET_CHECKPOINT_NAME = "kubelet_internal_checkpoint"

#: While a Register call is in flight, ``abandon`` is asked this often whether to give up.
ABANDON_CHECK_S = 0.1

# The generated gRPC module has no type stubs.
_registration_stub = cast(Callable[[Any], Any], pb_grpc.RegistrationStub)


def plugin_options() -> pb.DevicePluginOptions:
    """What the plugin supports: no PreStartContainer, GetPreferredAllocation available
    (sent in Register and answered to GetDevicePluginOptions)."""
    return pb.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)


def register(
    plugin_dir: str,
    kubelet_socket_name: str,
    endpoint_socket_name: str,
    resource_name: str,
    timeout_s: float,
    *,
    abandon: Optional[Callable[[], bool]] = None,
) -> None:
    """Register our plugin socket ``endpoint_socket_name`` (a file in ``plugin_dir``) for
    ``resource_name`` with the kubelet. Our server must already be serving: the kubelet
    dials it back before it answers. Raises RegistrationError saying what failed.

    ``abandon`` is asked every ABANDON_CHECK_S while the call is in flight; when it says
    True (the kubelet restarted again, our socket was deleted) the call is cancelled and
    RegistrationError raised at once, instead of waiting out ``timeout_s``."""
    kubelet_path = os.path.join(plugin_dir, kubelet_socket_name)
    action = f"registering {resource_name} with the kubelet at {kubelet_path}"
    if socket_identity(kubelet_path) is None:
        raise RegistrationError(
            f"{action}: no socket there (is the kubelet running, and is the plugin directory "
            f"{plugin_dir} the one it uses?)"
        )
    request = pb.RegisterRequest(
        version=API_VERSION,
        endpoint=endpoint_socket_name,
        resource_name=resource_name,
        options=plugin_options(),
    )
    with grpc.insecure_channel(unix_target(kubelet_path), options=CHANNEL_OPTIONS) as channel:
        call = _registration_stub(channel).Register.future(request, timeout=timeout_s)
        while True:
            try:
                call.result(timeout=ABANDON_CHECK_S)
            except grpc.FutureTimeoutError:
                if abandon is not None and abandon():
                    call.cancel()
                    raise RegistrationError(
                        f"{action}: abandoned, the kubelet socket or ours changed meanwhile"
                    ) from None
                continue
            except grpc.RpcError as exc:
                raise RegistrationError(_describe_failure(action, exc, timeout_s)) from exc
            return


def _describe_failure(action: str, exc: Any, timeout_s: float) -> str:
    code = exc.code()
    details = exc.details() or "no details"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (
            f"{action}: timed out after {timeout_s:g} s (the kubelet did not answer; it dials "
            "our socket back during registration, so check that the plugin socket is served)"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"{action}: nobody answers on the socket ({details}); the kubelet is not "
            "running or is restarting"
        )
    return f"{action}: the kubelet refused: {details}"
