"""The `vgpu-agent` command line.

What lives here: for this one commit, every command in ``agent`` (the former
``ops/cli.py``, moved whole so that ``git log --follow`` keeps its history); the next
commit gives the root group and each group of commands its own module.

May import: every package of the agent below ``ops``, ``ops.doctor`` and ``ops.demo``
(lazily, inside the commands that run them).
"""
