"""vgpu-agent: share NVIDIA GPUs between Kubernetes pods through CUDA MPS."""

__version__ = "0.1.0"
