"""Generated protobuf and gRPC code for the device plugin API v1beta1, the kubelet's
PodResources API v1, the plugin registration API, the DRA plugin API v1 and v1beta1 and
the DRA resource health API v1alpha1.

Do not edit: regenerate with scripts/gen-proto from protos/*.proto.
"""
