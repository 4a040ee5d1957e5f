"""Generated protobuf and gRPC code for the device plugin API v1beta1 and the kubelet's
PodResources API v1.

Do not edit: regenerate with scripts/gen-proto from protos/*.proto.
"""
