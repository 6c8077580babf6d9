"""gRPC API: ``cmr.proto``, its generated code (``python -m services.grpc.generate``), and the
servicer registration that Ray Serve's gRPC proxy imports."""

from __future__ import annotations


def servicer_functions() -> list[str]:
    """Import paths for ``gRPCOptions.grpc_servicer_functions``."""
    return ["services.grpc.cmr_pb2_grpc.add_CMRServicer_to_server"]
