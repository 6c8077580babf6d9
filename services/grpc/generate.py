"""Regenerate ``cmr_pb2.py`` / ``cmr_pb2_grpc.py`` from ``cmr.proto``: ``python -m services.grpc.generate``.

The generator versions are pinned (the generated code checks the runtime's protobuf/grpcio
versions): regenerate with exactly these, or update the pins here and in the dependencies.
"""

from __future__ import annotations

import sys
from pathlib import Path

PINNED = {"grpcio-tools": "1.85.1", "protobuf": "7.36.2"}
ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    from importlib.metadata import version

    from grpc_tools import protoc

    got = {name: version(name) for name in PINNED}
    if got != PINNED:
        print(f"generate: pinned {PINNED}, installed {got}", file=sys.stderr)
        return 2
    # proto path = repo root, so the generated imports read `from services.grpc import cmr_pb2`
    rc = protoc.main(["protoc", f"-I{ROOT}", f"--python_out={ROOT}", f"--grpc_python_out={ROOT}", str(ROOT / "services/grpc/cmr.proto")])
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
