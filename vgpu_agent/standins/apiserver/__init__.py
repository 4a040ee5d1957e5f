"""A stand-in Kubernetes API server for the DRA frontend's tests and the demo: real HTTP on
loopback serving ``resource.k8s.io/v1`` ResourceSlices and ResourceClaims and ``v1`` Nodes.
What lives here: the server and its store (``server``: :class:`ApiServerStandIn`, what tests
import), the HTTP handler (``http``), the strict decoder's schema of ``resource.k8s.io/v1``
(``schema``), validation of request bodies, field selectors, slices and allocation results
(``validation``), the identities and the Node authorizer's rules (``authorization``) and the
``Status`` error answers (``errors``). May import what :mod:`vgpu_agent.standins` may; only
the DRA frontend's values (:mod:`vgpu_agent.frontends.dra.types`, ``capacity``) in practice,
never the Kubernetes API client the stand-in is there to check.
"""
