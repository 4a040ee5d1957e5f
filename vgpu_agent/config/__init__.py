"""The configuration: the versioned TOML schema as frozen dataclasses, reading and
validating a file into it, and the decisions taken from the config alone.

What lives here: the schema (``schema``), reading text into it with every error naming its
key path (``parse``), which keys a reload may change and how (``reload``), and the pure
decisions made from a config (``plan``: which GPUs to serve with how many vGPUs, what
Allocate grants, the MPS ceilings, what a reload changes).

May import: ``vgpu_agent.model``, ``vgpu_agent.host`` (log levels, the unix socket path
limit) and tomllib/tomli. Nothing above it.
"""
