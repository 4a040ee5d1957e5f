"""Stand-ins for what the agent talks to, for the demo, ``run --simulate`` and the
tests: real servers and in-memory hardware behind the same interfaces as the real thing.

What lives here: the simulated GPU backend and MPS daemons (``simulated``), a kubelet
stand-in that serves Registration and dials the plugin back like the kubelet's device
manager (``kubelet``), a PodResources stand-in (``podresources``), a Kubernetes API server
stand-in serving ResourceSlices and ResourceClaims for the DRA frontend (the ``apiserver``
subpackage: ``server``, ``http``, ``schema``, ``validation``, ``authorization``, ``errors``), the
same API in memory (``resourceapi``) and the kubelet's DRA side: its plugin watcher and its
NodePrepareResources / NodeUnprepareResources calls (``dra_kubelet``).

May import: ``vgpu_agent.frontends``, ``vgpu_agent.mps``, ``vgpu_agent.gpus``,
``vgpu_agent.observability`` and what they import. Only the composition root and the
operator commands import it.
"""
