"""The configuration: the versioned TOML schema as frozen dataclasses, reading and
validating a file into it, writing it back, and the decisions taken from the config alone.

What lives here: the schema (``schema``: the dataclasses, their ``Literal`` choices and
defaults, the limits values are held to), reading text and files into it with every error
naming its key path (``parse``, with the typed value readers it validates with in
``values``), rendering a config back as TOML (``render``), and the pure decisions made from
a config (``plan``: which GPUs to serve with how many vGPUs, what Allocate grants, the MPS
ceilings, memory-slice advice) and the reload table with the plan of a reload (``reload``:
which keys only a restart applies, what a new config changes, as typed actions).

May import: ``vgpu_agent.model``, ``vgpu_agent.host`` (log levels, the unix socket path
limit) and tomllib/tomli. Nothing above it.
"""
