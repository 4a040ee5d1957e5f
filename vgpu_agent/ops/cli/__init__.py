"""The `vgpu-agent` command line: parses arguments, calls into the rest, prints.

What lives here: the root group, its error handling, the ``doctor`` and ``demo`` commands
and ``main``, the console script's entry point (``root``); what the commands share: the
root's options, the config they name, the GPUs a command names (``context``); and a module
per command or group of commands: ``run`` (the daemon), ``config``, ``gpus``, ``mps``, and
``agent`` (``status``, ``health`` and ``simulate``, which talk to the running agent). A
command module imports ``context``, never ``root`` nor another command module; only ``root``
imports them all. The composition root and the plugin module are imported inside the
commands that use them: they bring in gRPC and the backends, a third of the CLI's start-up,
which commands that only read the config or talk to the control socket (and every
bad-config error) skip.

May import: every package of the agent below ``ops``, ``ops.doctor`` and ``ops.demo``
(lazily, from the commands that run them).
"""
