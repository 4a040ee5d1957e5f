"""The kubelet device plugin API (v1beta1) frontend.

What lives here: the DevicePlugin gRPC servicer and server on the plugin socket, which
converts between protobuf messages and the node model (``server``), and the client side of
the kubelet's Registration service with the API's constants (``kubelet``). When to
register (the state machine driven by the loop) lives in :mod:`vgpu_agent.agent`.

May import: what :mod:`vgpu_agent.frontends` may import.
"""
