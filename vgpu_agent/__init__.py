"""vgpu-agent: share NVIDIA GPUs between Kubernetes pods through CUDA MPS."""

import os

__version__ = "0.1.0"

# gRPC's fork support (pthread_atfork handlers) off, before any module imports grpc. The
# agent starts processes (MPS control commands) while gRPC threads run; on Python 3.9,
# whose subprocess forks (3.10 and later use vfork), older grpcio releases (1.80, the
# last for 3.9) then logged "skipping fork() handlers" at every command and wrote
# epoll errors into the child's output, which read as a dead MPS daemon. The agent never
# uses gRPC in a forked child, so it needs none of it. An operator's setting wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
