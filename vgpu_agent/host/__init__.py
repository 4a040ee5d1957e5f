"""Host integration: what the agent needs from the machine it runs on, one module per
outside thing.

What lives here: sd_notify and journald (``systemd``), logging set-up with structured
journal fields (``log``), watching a directory with inotify (``watch``), what the agent
notices of its systemd sandbox (``sandbox``), unix socket probes (``sockets``), the
one-agent-per-state-directory lock (``instance``) and the agent's control socket
(``control``).

May import: ``vgpu_agent.model`` and the standard library (systemd-python where the system
has it). It knows nothing of config, GPUs, MPS or the kubelet.
"""
