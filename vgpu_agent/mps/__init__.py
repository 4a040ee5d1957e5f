"""CUDA MPS: everything that starts, talks to and confines the per-GPU MPS control
daemons.

What lives here: the control daemon's command protocol, the daemon managers (run directly,
by systemd, or by someone else) and their liveness checks, the ceilings that hold each
client to its share, the systemd units helper (``units``), the GPU compute mode
(``compute_mode``) and the device-list confinement checks (``confinement``).

May import: ``vgpu_agent.model``, ``vgpu_agent.config`` and ``vgpu_agent.host``. No gRPC,
no pynvml (GPUs come in through the model's backend Protocol).
"""
