"""A FAISS inner-product index of model embeddings, with add/remove by model id.

Used to retrieve the top-k candidate models for a query among thousands before a policy scores
them. Flat (exhaustive) search, so add/remove by id stay exact and need no training. A lone query
is memory-bound: it streams every stored vector once (100k models x 384 dims = 154 MB in fp32,
~12.6 ms on the 2-core machine; a second thread does not help). The default stores the vectors
in fp16 (half the bytes: ~7.6 ms, top-256 recall 0.9998 against fp32 on 100k random unit vectors,
services/README.md); the policy then scores the retrieved candidates with the exact embeddings.
"""

from __future__ import annotations

import threading
from typing import Literal, Sequence

import numpy as np


class ModelIndex:
    """Flat inner-product search behind ``IndexIDMap2``, keyed by model id. ``precision``: how the
    vectors are stored, ``fp16`` (``IndexScalarQuantizer`` QT_fp16, no training) or ``fp32``
    (``IndexFlatIP``, exact)."""

    def __init__(self, dim: int, precision: Literal["fp16", "fp32"] = "fp16"):
        import faiss  # deferred: keep import of cmr cheap

        self.dim, self.precision = dim, precision
        self._faiss = faiss
        self._lock = threading.RLock()
        if precision == "fp32":
            base = faiss.IndexFlatIP(dim)
        elif precision == "fp16":
            base = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        else:
            raise ValueError(f"precision must be 'fp16' or 'fp32' (got {precision!r})")
        self._index = faiss.IndexIDMap2(base)
        self._id_of: dict[str, int] = {}
        self._name_of: dict[int, str] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._id_of)

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._id_of

    @property
    def ids(self) -> list[str]:
        return list(self._id_of)

    def add(self, model_ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add (or replace) models' vectors."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(model_ids), self.dim):
            raise ValueError(f"expected vectors of shape ({len(model_ids)}, {self.dim}), got {vectors.shape}")
        with self._lock:
            self.remove([m for m in model_ids if m in self._id_of])
            ids = np.arange(self._next, self._next + len(model_ids), dtype=np.int64)
            self._next += len(model_ids)
            for m, i in zip(model_ids, ids):
                self._id_of[m] = int(i)
                self._name_of[int(i)] = m
            self._index.add_with_ids(vectors, ids)

    def remove(self, model_ids: Sequence[str]) -> None:
        with self._lock:
            ids = [self._id_of.pop(m) for m in model_ids if m in self._id_of]
            for i in ids:
                del self._name_of[i]
            if ids:
                self._index.remove_ids(np.asarray(ids, dtype=np.int64))

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """Top-``k`` model ids per query and their inner products (``[n_q, k']``, k' = min(k, size))."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        with self._lock:
            k = min(k, len(self._id_of))
            if k == 0:
                return [[] for _ in range(len(queries))], np.zeros((len(queries), 0), dtype=np.float32)
            sims, ids = self._index.search(queries, k)
            names = [[self._name_of[int(i)] for i in row if i >= 0] for row in ids]
        return names, sims

    def vectors(self, model_ids: Sequence[str]) -> np.ndarray:
        with self._lock:
            return np.stack([self._index.reconstruct(self._id_of[m]) for m in model_ids]) if model_ids else np.zeros((0, self.dim), np.float32)
