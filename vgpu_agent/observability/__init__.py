"""What the agent shows about itself beyond the kubelet.

What lives here: who uses each vGPU (``attribution``, joining the kubelet's PodResources
answer with the kubelet's device checkpoint and NVML's MPS processes), the sources it reads
that no pod can write: the device checkpoint (``checkpoint``) and which pod and container a
process is in, from its cgroup (``cgroups``); the kubelet's PodResources client
(``podresources``), Prometheus metrics (``metrics``, the only prometheus_client import),
node-feature-discovery labels (``labels``), the per-pod client policy: which MPS clients a
pod runs beyond its allowance (``excess``, pure) and acting on them (``enforcement``,
through the function the composition root hands in), and the service that refreshes,
publishes and enforces (``service``).

May import: ``vgpu_agent.model``, ``vgpu_agent.config``, ``vgpu_agent.host``, and the
frontends' generated code and gRPC helpers (PodResources is a kubelet gRPC API). Never the
agent's loop.
"""
