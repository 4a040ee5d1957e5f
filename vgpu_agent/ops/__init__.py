"""Operator commands: what a person or script runs.

What lives here: the click CLI (``cli``: ``vgpu-agent run``, ``status``, ``gpus``,
``doctor``, ``demo`` and the rest, a module per group of commands; it parses, calls into
the rest and prints), the node checks behind ``vgpu-agent doctor`` (``doctor``: a module
per group of checks, and the runner) and the self-contained demo (``demo``). The only
package that imports click.

May import: every package of the agent.
"""
