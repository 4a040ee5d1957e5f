"""`python -m vgpu_agent` runs the command line."""

from vgpu_agent.cli import main

main()
