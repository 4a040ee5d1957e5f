"""vgpu-agent: share NVIDIA GPUs between Kubernetes pods through CUDA MPS.

The packages, from the top (entry points) to the bottom (the pure model); a package imports
only packages below it, and each ``__init__`` says what lives there:

- ``ops``: operator commands (the CLI, doctor, the demo);
- ``runtime``: the composition root that builds the agent from a config;
- ``standins``: the simulated GPUs and MPS daemons, the kubelet and PodResources stand-ins;
- ``agent``: the event loop and what it runs (bring-up, reload, status, health, registration);
- ``observability``: attribution, the PodResources client, metrics, NFD labels;
- ``frontends``: the kubelet APIs the GPUs are offered through (the device plugin);
- ``mps``: the MPS control daemons, their ceilings, compute mode, confinement;
- ``gpus``: the NVML backend;
- ``config``: the schema, reading and validating it, reload rules, decisions from config;
- ``host``: systemd, logging, inotify, sockets, the instance lock, the control socket;
- ``model``: GPUs, vGPUs, health, the node, typed commands and errors (no I/O).

docs/architecture.md draws the map and walks requests through it.
"""

import os

__version__ = "0.1.0"

# gRPC's fork support (pthread_atfork handlers) off, before any module imports grpc. The
# agent starts processes (MPS control commands) while gRPC threads run; on Python 3.9,
# whose subprocess forks (3.10 and later use vfork), older grpcio releases (1.80, the
# last for 3.9) then logged "skipping fork() handlers" at every command and wrote
# epoll errors into the child's output, which read as a dead MPS daemon. The agent never
# uses gRPC in a forked child, so it needs none of it. An operator's setting wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
