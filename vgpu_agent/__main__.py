"""`python -m vgpu_agent` runs the command line."""

from vgpu_agent.ops.cli.agent import main

main()
