"""The composition root: the one place that builds the agent from a config.

What lives here: ``compose`` picks the GPU backend (NVML or simulated), the MPS daemon
manager, the kubelet frontend and the observability parts, wires them into the agent's
loop and returns it ready to run.

May import: every package below it (agent, frontends, mps, gpus, observability,
stand-ins, config, host, model). Nothing imports it but the operator commands.
"""
