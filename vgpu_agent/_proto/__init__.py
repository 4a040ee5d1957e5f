"""Generated protobuf and gRPC code for the device plugin API v1beta1.

Do not edit: regenerate with scripts/gen-proto from protos/deviceplugin.proto.
"""
