"""An embedding cache keyed by a hash of (encoder name, text), persisted in SQLite."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from cmr import constants
from cmr.encoders.base import Encoder


def text_key(encoder_name: str, text: str) -> bytes:
    return hashlib.blake2b(f"{encoder_name}\x00{text}".encode("utf-8"), digest_size=16).digest()


class EmbeddingCache:
    """Persistent ``key -> vector`` store (SQLite, WAL). Safe to share across threads."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        # a cache: losing the last writes on power loss is harmless, an fsync per routed batch is not
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS emb (k BLOB PRIMARY KEY, v BLOB NOT NULL)")
        self._db.commit()

    def get_many(self, keys: Sequence[bytes], dim: int) -> dict[bytes, np.ndarray]:
        out: dict[bytes, np.ndarray] = {}
        with self._lock:
            for i in range(0, len(keys), 900):  # SQLite's bound-parameter limit
                chunk = list(keys[i : i + 900])
                q = f"SELECT k, v FROM emb WHERE k IN ({','.join('?' * len(chunk))})"
                for k, v in self._db.execute(q, chunk):
                    vec = np.frombuffer(v, dtype=np.float32)
                    if vec.size == dim:
                        out[bytes(k)] = vec
        return out

    def put_many(self, items: Sequence[tuple[bytes, np.ndarray]]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO emb (k, v) VALUES (?, ?)",
                [(k, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for k, v in items],
            )
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CachedEncoder:
    """Wraps an encoder: texts already seen come from the cache, only new ones are encoded."""

    def __init__(self, inner: Encoder, cache: EmbeddingCache):
        self.inner, self.cache = inner, cache
        self.name, self.dim = inner.name, inner.dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        keys = [text_key(self.name, t) for t in texts]
        found = self.cache.get_many(list(dict.fromkeys(keys)), self.dim)
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in found))
        if missing:
            vecs = self.inner.encode(missing)
            new = [(text_key(self.name, t), v) for t, v in zip(missing, vecs)]
            self.cache.put_many(new)
            found.update(new)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, k in enumerate(keys):
            out[i] = found[k]
        return out


class MemoryCachedEncoder:
    """Wraps an encoder with a bounded in-memory LRU of the last ``size`` texts: the router's query
    path. Routed prompts are mostly new and must not grow the persistent cache (or be written to
    disk per batch); repeated ones (retries, templated prompts) are answered from memory."""

    def __init__(self, inner: Encoder, size: int = 4096):
        from collections import OrderedDict

        self.inner, self.size = inner, size
        self.name, self.dim = inner.name, inner.dim
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        with self._lock:
            for i, t in enumerate(texts):
                v = self._lru.get(t)
                if v is None:
                    missing.setdefault(t, []).append(i)
                else:
                    self._lru.move_to_end(t)
                    out[i] = v
        if missing:
            new = list(missing)
            vecs = self.inner.encode(new)
            with self._lock:
                for t, v in zip(new, vecs):
                    out[missing[t]] = v
                    if self.size:
                        self._lru[t] = v
                while len(self._lru) > self.size:
                    self._lru.popitem(last=False)
        return out


ENCODER_BACKENDS = ("torch", "onnx", "onnx-int8", "onnx-int8-fp32ffn")
# onnx backend -> quantisation of its graph (cmr.encoders.onnx.QUANTIZATIONS)
_ONNX_QUANTIZE = {"onnx": None, "onnx-int8": "int8", "onnx-int8-fp32ffn": "int8-fp32ffn"}

_DEFAULT: dict[tuple, CachedEncoder] = {}


def make_encoder(backend: str = "torch", threads: int | None = None, single_threads: int | None = None,
                 max_tokens: int | None = None) -> Encoder:
    """An uncached MiniLM encoder on ``backend``.

    ``torch``: sentence-transformers (training, benchmarks; GPU when available). ``onnx``: ONNX
    Runtime on CPU, the same embeddings (to ~1e-6, same name) and faster per query. ``onnx-int8``:
    per-channel int8 weights, faster still but different embeddings (its own name and cache keys):
    the router's default (``AppArgs.encoder``). ``onnx-int8-fp32ffn``: the same with the FFN
    output projections kept fp32 (closer to exact, slower; its own name). ``threads``: intra-op threads (torch: process-wide); ``single_threads``
    (onnx): threads for a call with a single text. ``max_tokens`` (onnx): truncate texts to this
    many tokens, keeping their end (default 256, as the model was trained; a different value is a
    different encoder name).
    """
    if backend == "torch":
        from cmr.encoders.minilm import MiniLMEncoder

        return MiniLMEncoder(threads=threads)
    if backend in _ONNX_QUANTIZE:
        from cmr.encoders.onnx import OnnxMiniLMEncoder

        return OnnxMiniLMEncoder(threads=threads or 1, quantize=_ONNX_QUANTIZE[backend], single_threads=single_threads,
                                 max_seq_length=max_tokens or 256)
    raise ValueError(f"unknown encoder backend {backend!r}; known: {', '.join(ENCODER_BACKENDS)}")


def default_encoder(cache_path: Path | str | None = None, backend: str = "torch", threads: int | None = None,
                    single_threads: int | None = None) -> CachedEncoder:
    """MiniLM (``make_encoder``) with the persistent cache under ``CMR_CACHE``; one instance per
    (cache path, backend, threads)."""
    path = str(cache_path or constants.cache_dir() / "embeddings.sqlite")
    key = (path, backend, threads, single_threads)
    if key not in _DEFAULT:
        _DEFAULT[key] = CachedEncoder(make_encoder(backend, threads, single_threads), EmbeddingCache(path))
    return _DEFAULT[key]
