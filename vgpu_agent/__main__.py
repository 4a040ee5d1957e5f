"""`python -m vgpu_agent` runs the command line."""

from vgpu_agent.ops.cli import main

main()
