"""CUDA MPS: everything that starts, talks to and confines the per-GPU MPS control
daemons.

What lives here: the daemons' pipe and log directories and who may change them
(``directories``), the control program and its command protocol (``control``), a server's
clients and ending one (``clients``), the ceilings that hold each client to its share, set
and read back (``ceilings``), the liveness checks that also put a lost ceiling back
(``liveness``), the daemon managers (run directly, by systemd, or by someone else) and what
the systemd unit runs (``daemons``), the systemd units helper (``units``), the GPU compute
mode (``compute_mode``), the device-list confinement checks (``confinement``) and the
daemons' output read for the client that faulted (``daemon_log``).

May import: ``vgpu_agent.model``, ``vgpu_agent.config`` and ``vgpu_agent.host``. No gRPC,
no pynvml (GPUs come in through the model's backend Protocol).
"""
