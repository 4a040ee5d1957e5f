"""The agent's loop and what it runs: it owns time and events and changes the node.

What lives here:

- ``loop``: the event loop (:class:`~.loop.Agent`): signals, watchers and the control
  socket queue events; one loop turns them into reloads, re-registrations, health changes
  and the stop, and hands the work to the modules below; the exit codes;
- ``events``: the events and the queue they travel through;
- ``parts``: the collaborators the agent is handed (``AgentParts``, the Protocols and
  factories);
- ``bringup``: opening the GPU backend (retried until the driver is there), then each
  served GPU's compute mode, MPS daemon and ceiling, and its health checks; compute modes
  restored at stop;
- ``reload``: planning a reload from the new config and executing the plan;
- ``dispatch``: the control socket and its commands' answers, health changes applied to
  the node;
- ``describe``: the status line and what ``vgpu-agent status`` shows;
- ``kubelet``: the registrar of the current plugin settings across reloads, and the watch
  on the plugin directory;
- ``registration``: when to register with the kubelet (the state machine);
- ``health``: the health watchers;
- ``faults``: application faults under MPS as events of their GPU, with their culprit;
- ``offenders``: the pods named as the culprit of too many faults, and which are held;
- ``isolation``: no Allocate while a daemon is down, and what status calls unsafe.

May import: ``vgpu_agent.model``, ``vgpu_agent.config`` and ``vgpu_agent.host``. It knows
no adapter: no frontend, GPU backend, MPS manager or stand-in (they are passed in as
Protocols by :mod:`vgpu_agent.runtime`).
"""
