"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``).

:mod:`service.grpc.server` serves it beside the HTTP API, in the same process and event
loop (``grpc.aio``), on ``Settings.grpc_port`` (0: off). ``open_inference_grpc.proto`` is
the protocol; the ``open_inference_grpc_pb2*`` modules are generated from it by
grpcio-tools (the command is in the ``.proto``).

Nothing here is imported unless the gRPC port is on: the generated messages register
``inference.*`` in protobuf's process-wide descriptor pool, where a client library's own
copy of the same protocol (tritonclient.grpc, kserve) would clash with them in one process.
"""
