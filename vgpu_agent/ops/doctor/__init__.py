"""The node checks behind `vgpu-agent doctor`, one module per group of checks.

What lives here: the runner that orders the checks and sums them up (``runner``: ``run_doctor``
and its exit code), the lines a check reports and how they print (``report``), everything the
checks read from the node (``probes``: ``DoctorProbes``, ``system_probes``), and the checks:
the config (``config``), the driver, the GPUs and their compute modes (``gpus``), the MPS
binaries, daemons and multi-user mode (``mps``), confinement and the device list
(``confinement``), the kubelet, the plugin socket and other device plugins (``kubelet``), the
DRA sockets, CDI directory and credentials in DRA mode (``dra``),
containerd's runtimes (``containerd``) and the running agent (``agent``). A check module
imports ``report``, ``probes`` and the check modules whose findings it reads (``gpus``,
``containerd``); only ``runner`` imports every check, and nothing here imports ``runner``.
No click: the CLI prints what ``run_doctor`` reports.

May import: every package of the agent below ``ops`` (the real node's probes reach the
composition root lazily, as it pulls in gRPC).
"""
