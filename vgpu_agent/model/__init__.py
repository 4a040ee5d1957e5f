"""The node model: pure values and rules, no I/O.

What lives here: the exception hierarchy (``errors``), the GPU description and the GPU
backend Protocol (``gpu``), the device model that turns GPUs into vGPU ids, health and
Allocate grants (``devices``), the served node (``node``), the MPS daemon boundary as a
Protocol (``daemons``), the typed control commands (``commands``) and pods by UID and name
(``pods``). Everything else in
the agent works on these types.

May import: the standard library and other ``vgpu_agent.model`` modules only (no outside
library, no other package of the agent). import-linter holds this (pyproject.toml).
"""
