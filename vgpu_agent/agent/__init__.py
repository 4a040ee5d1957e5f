"""The agent's loop and what it runs: it owns time and events and changes the node.

What lives here: the event loop (``loop``: signals, watchers and the control socket queue
events; one loop turns them into reloads, re-registrations, health changes and the stop),
the collaborators it is handed (``parts``), bringing GPUs and their MPS daemons up
(``bringup``), executing a reload plan (``reload``), describing the node for ``status``
(``describe``), the health watchers (``health``) and when to register with the kubelet
(``registration``).

May import: ``vgpu_agent.model``, ``vgpu_agent.config`` and ``vgpu_agent.host``. It knows
no adapter: no frontend, GPU backend, MPS manager or stand-in (they are passed in as
Protocols by :mod:`vgpu_agent.runtime`).
"""
