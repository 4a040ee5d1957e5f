"""GPU backends: the implementations of :class:`vgpu_agent.model.gpu.GpuBackend` that
talk to real hardware.

What lives here: the NVML backend (``nvml``), the only module of the agent that imports
pynvml; it translates NVML's errors into ours where they enter. The simulated backend is a
stand-in and lives in :mod:`vgpu_agent.standins`.

May import: ``vgpu_agent.model``, ``vgpu_agent.config``, ``vgpu_agent.host`` and pynvml.
"""
