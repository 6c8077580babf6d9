"""One place that caps the thread pools of the numeric libraries inside a process.

Why: Serve replicas run with ``num_cpus=0`` by default, so Ray sets no ``OMP_NUM_THREADS`` and
OpenBLAS (numpy, FAISS), OpenMP (FAISS) and torch each start one thread per core. On a small host
their worker threads spin while waiting for work: a router replica scoring one small batch at a
time burned 3-4x the CPU of the same work on one thread (knn score + select per lone request:
~19 ms CPU with 2 BLAS threads, ~5 ms with 1; services/README.md), CPU that the encoder, the
ingress and the model pools needed. Replicas call this once their libraries are loaded.
"""

from __future__ import annotations

import sys
from typing import Any


def limit_native_threads(n: int) -> dict[str, Any]:
    """Cap BLAS and OpenMP pools (every loaded copy: numpy's OpenBLAS, FAISS's OpenBLAS and libgomp,
    via threadpoolctl) and torch's intra-op pool (when torch is loaded) at ``n`` threads in this
    process. Returns what was set, for the replica's log."""
    from threadpoolctl import threadpool_info, threadpool_limits

    if n < 1:
        raise ValueError(f"threads must be >= 1 (got {n})")
    threadpool_limits(limits=n)
    out: dict[str, Any] = {"pools": sorted({f"{i['internal_api']}={i['num_threads']}" for i in threadpool_info()})}
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
        out["torch"] = n
    faiss = sys.modules.get("faiss")
    if faiss is not None and hasattr(faiss, "omp_set_num_threads"):
        faiss.omp_set_num_threads(n)
        out["faiss"] = n
    return out
