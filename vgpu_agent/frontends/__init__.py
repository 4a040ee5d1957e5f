"""Kubelet frontends: the ways the agent offers its GPUs to the kubelet, one
subpackage per API, each over the same node model, MPS management and health.

What lives here: the device plugin API (``deviceplugin``), Dynamic Resource Allocation
(``dra``), what their gRPC sides share (``serving``: unix socket targets and options, the
tolerant request deserializer, clearing and binding a server socket) and the generated
protobuf and gRPC code of every kubelet API the agent speaks (``_proto``, made by
scripts/gen-proto, never edited by hand). The two frontend subpackages do not import each
other; what both need is in ``serving``.

May import: ``vgpu_agent.model``, ``vgpu_agent.config``, ``vgpu_agent.host``, grpc and
protobuf. Only the frontends, the PodResources client and the stand-ins import grpc.
"""
