"""The Kubernetes Dynamic Resource Allocation (DRA) frontend: the agent as a DRA kubelet plugin.

What lives here: the values both halves share (``types``: claims, allocation results, the
node's ResourceSlice, the API server boundary as a Protocol); the kubelet-facing side: the
node's slice built from the node model (``slices``), claims turned into CDI specs (``cdi``),
prepare and unprepare claim by claim with their record in the state directory (``claims``),
the thread that keeps the slice published (``publisher``), the registration and DRAPlugin
gRPC servers (``server``) and all of it assembled for the agent's loop (``plugin``); and the
API-server side (``kubeapi``: publishing the node's ResourceSlices, reading ResourceClaims;
``encoding``: our values as the client library's models and back, without I/O);
and what the newer DRA features change, as pure values: each GPU as one device of
consumable capacity and a claim's consumed amount as its MPS limits (``capacity``), health
as device taints (``taints``) and as the resource health stream the kubelet reads into pod
status (``health``). It sits beside :mod:`vgpu_agent.frontends.deviceplugin` over
the same node model, MPS management and health; a GPU is served by one frontend, never both.

May import: what :mod:`vgpu_agent.frontends` may import, and the Kubernetes API client
library (only the API-server module; its models also ``encoding``).
"""
