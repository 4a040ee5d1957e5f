"""The node checks behind `vgpu-agent doctor`.

What lives here: for this one commit, every check in ``containerd`` (the former
``ops/doctor.py``, moved whole so that ``git log --follow`` keeps its history); the next
commit gives each group of checks its own module.

May import: every package of the agent below ``ops``.
"""
