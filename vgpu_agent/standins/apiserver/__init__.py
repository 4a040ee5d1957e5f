"""A stand-in Kubernetes API server for the DRA frontend's tests and the demo: real HTTP on
loopback serving ``resource.k8s.io/v1`` ResourceSlices and ResourceClaims and ``v1`` Nodes.
What lives here: the server, its strict decoder's schema, its validation and its Node
authorizer (``server``: :class:`ApiServerStandIn`, what tests import). May import what
:mod:`vgpu_agent.standins` may; only the DRA frontend's values
(:mod:`vgpu_agent.frontends.dra.types`, ``capacity``) in practice, never the Kubernetes API
client the stand-in is there to check.
"""
