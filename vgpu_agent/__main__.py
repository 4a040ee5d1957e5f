"""`python -m vgpu_agent` runs the command line."""

from vgpu_agent.ops.cli.root import main

main()
