"""The exact encoder and the faster ones side by side (issue 17): routing quality and decision latency.

``python -m bench.exactness [--variants ...] [--models 2000 100000] [--out docs/results/encoder-exactness]``
(= ``cmr bench exactness``)

Each variant is a query encoder as the router runs it: ``BACKEND:QUERY_TOKENS`` (``onnx:256`` is
exact: fp32, the model's 256 tokens). For each:

- *quality*, through the benchmarks' own code: ``knn`` on CMRBench test (continual protocol,
  final model / domain accuracy; ``cmr bench cmr``'s ``evaluate``) and on RouterBench test (AIQ;
  ``cmr bench llm``'s ``train_policy`` / ``evaluate``). As the router does: the train splits and the
  cards are embedded by the variant's encoder at full length, the test queries by the same encoder
  cut to the variant's query tokens. Every (encoder, truncation) caches under its own name.
- *decision latency*, through ``bench.serve.decision_latency`` (the real ``RouterCore.route`` over a
  synthetic hub): wall p50 / p99 of a lone decision and its CPU time (robust to the load of a
  shared machine: compare variants by it and by ratios within one run). All variants run on the
  same hub one after the other; the first is measured again at the end, as a drift check.

Writes ``report.json`` and ``report.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from cmr.encoders.cache import ENCODER_BACKENDS
from cmr.errors import CMRError

#: the issue's quality floor: within this many accuracy points (×100) of exact
QUALITY_POINTS = 0.5
EXACT = "onnx:256"
DEFAULT_VARIANTS = (EXACT, "onnx:64", "onnx-int8:256", "onnx-int8:64", "onnx-int8:96", "onnx-int8:128",
                    "onnx-int8-fp32ffn:256", "onnx-int8-fp32ffn:64", "onnx-int8-fp32ffn:96")


class BenchExactnessError(CMRError):
    """A bad option of ``bench.exactness`` (names it)."""


def parse_variant(s: str) -> tuple[str, int]:
    """``BACKEND:QUERY_TOKENS`` -> ``(backend, tokens)``; refused with the option named."""
    b, _, n = s.partition(":")
    if b not in ENCODER_BACKENDS or b == "torch" or not n.isdigit() or not 8 <= int(n) <= 256:
        raise BenchExactnessError(f"--variants {s!r}: must be BACKEND:QUERY_TOKENS with BACKEND one of "
                                  f"{', '.join(x for x in ENCODER_BACKENDS if x != 'torch')} and 8 <= QUERY_TOKENS <= 256")
    return b, int(n)


def quality(backend: str, tokens: int, policies: Sequence[str], cache, embedding: str = "minilm",
            seeds: Sequence[int] = (0,)) -> dict[str, Any]:
    """``knn`` (and ``policies``) on CMRBench test (final M / F / D) and ``knn`` on RouterBench test
    (AIQ), each embedded with ``embedding`` as the router does (its lexical part, if any, fitted
    on that set's train prompts and cards; the query view shares it). CMRBench figures are means
    over training ``seeds`` (the protocol's and the policy's seed), each seed's kept beside them."""
    from cmr import constants
    from cmr.bench import cmr_protocol, common, llm_protocol
    from cmr.data import load_cmrbench, load_outcomes
    from cmr.encoders import CachedEncoder, make_encoder
    from cmr.encoders.lexical import embedding_of, fit_encoder
    from cmr.policies import make_policy

    dense = CachedEncoder(make_encoder(backend, 1, None), cache)
    dense_query = CachedEncoder(make_encoder(backend, 1, None, tokens), cache)

    def encoders(texts, labelled=True):
        full = fit_encoder(embedding, dense, texts, labelled=labelled)
        return full, (full.with_dense(dense_query) if full is not dense else dense_query)

    bench = load_cmrbench(constants.data_root() / "cmrbench")
    full, query = encoders([t for e in bench.experiences for t in e.train.texts] + [c.text() for c in bench.cards])
    out: dict[str, Any] = {"encoder": full.name, "query_encoder": query.name, "embedding": embedding_of(full)}
    common.embed(full, [e.train for e in bench.experiences])
    common.embed(query, [e.test for e in bench.experiences])
    for name in policies:
        per = []
        for seed in seeds:
            f = cmr_protocol.evaluate(bench, make_policy(name, encoder=full, config={"seed": seed}), seed=seed)["final"]
            per.append({"seed": seed, "m_acc": float(f["m_acc"]), "f_acc": float(f["f_acc"]), "d_acc": float(f["d_acc"])})
        out[f"cmrbench_{name}"] = {k: statistics.fmean(r[k] for r in per) for k in ("m_acc", "f_acc", "d_acc")} | {"per_seed": per}
    data = load_outcomes(constants.data_root() / "routing" / "routerbench")
    full, query = encoders(list(data.train.texts) + [c.text() for c in data.cards], labelled=False)
    out["routerbench_embedding"] = embedding_of(full)
    common.embed(full, [data.train])
    common.embed(query, [data.test])
    policy = make_policy("knn", encoder=full)
    llm_protocol.train_policy(policy, data, 0.0, None, 0)
    out["routerbench_knn_aiq"] = float(llm_protocol.evaluate(policy, data)["aiq"])
    return out


def latency(variants: Sequence[tuple[str, int]], n_models: int, prompts: Sequence[str], home: Path, distinct: int) -> dict[str, dict]:
    """Lone-decision wall and CPU per variant on one hub of ``n_models`` (``bench.serve.decision_latency``);
    the first variant again at the end (key suffixed ``again``)."""
    from bench.serve import decision_latency

    (b0, n0), rest = variants[0], list(variants[1:]) + [variants[0]]
    d = decision_latency(n_models, prompts, policy="zeroshot", retrieve_k=256 if n_models > 2048 else 0, distinct=distinct, home=home,
                         encoder=b0, encoder_threads=1, encoder_single_threads=1, query_max_tokens=n0,
                         other_encoders=[(b, 1, 1, n) for b, n in rest])
    keep = ("single", "single_cpu", "encode_only_cpu")
    out = {f"{b0}:{n0}": {k: d[k] for k in keep}}
    for (b, n), v in zip(rest, d["variants"].values()):
        key = f"{b}:{n}"
        out[key + " again" if key in out else key] = {k: v[k] for k in keep}
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m bench.exactness`` and ``cmr bench exactness``."""
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                   help=f"BACKEND:QUERY_TOKENS query encoders (default: {' '.join(DEFAULT_VARIANTS)}); {EXACT} is exact")
    p.add_argument("--policies", nargs="+", default=["knn"], help="CMRBench policies (RouterBench: knn)")
    p.add_argument("--models", type=int, nargs="*", default=[2000, 100_000], help="hub sizes for the decision latency (none: skip)")
    p.add_argument("--decision-requests", type=int, default=400, help="lone decisions per variant and hub")
    p.add_argument("--distinct", type=int, default=1000, help="card texts really embedded per hub (bench.serve)")
    from cmr.encoders.lexical import EMBEDDINGS

    p.add_argument("--embedding", choices=EMBEDDINGS, default="auto",
                   help="what texts are embedded with for the quality columns (default auto, as the router serves)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="training seeds of the CMRBench policies (figures: mean, and mean ± sd with 2 or more; splits fixed)")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--out", default=None, help="output folder (default: runs/exactness-<UTC>)")


def run(a: argparse.Namespace) -> int:
    from bench.serve import _write_atomic, test_prompts
    from cmr import constants
    from cmr.encoders import EmbeddingCache
    from services.config import AppArgs

    variants = [parse_variant(v) for v in a.variants]
    if EXACT not in a.variants:
        raise BenchExactnessError(f"--variants: must include the exact encoder {EXACT}")
    served = AppArgs()
    started = datetime.now(timezone.utc)
    out = Path(a.out or f"runs/exactness-{started:%Y%m%dT%H%M%SZ}")
    rep: dict[str, Any] = {"started_utc": started.isoformat(timespec="seconds"), "command": getattr(a, "command_line", None) or "cmr " + " ".join(sys.argv[1:]),
                           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
                           "served_default": f"{served.encoder}:{served.query_max_tokens or 256}", "exact": EXACT,
                           "loadavg_start": list(os.getloadavg()), "seeds": a.seeds, "quality": {}, "latency": {}}
    if not a.skip_quality:
        cache = EmbeddingCache(constants.cache_dir() / "embeddings.sqlite")
        for v, (b, n) in zip(a.variants, variants):
            t = time.perf_counter()
            rep["quality"][v] = quality(b, n, a.policies, cache, a.embedding, a.seeds)
            print(f"quality {v:<24} {json.dumps(rep['quality'][v])}  ({time.perf_counter() - t:.0f} s)", flush=True)
    prompts = test_prompts(a.decision_requests)
    with tempfile.TemporaryDirectory(prefix="cmr-bench-exactness-") as tmp:
        for n in a.models:
            rep["latency"][str(n)] = latency(variants, n, prompts, Path(tmp) / f"h{n}", a.distinct)
            for v, r in rep["latency"][str(n)].items():
                print(f"latency {n:>7,} {v:<28} p50 {r['single']['p50_ms']:.1f} p99 {r['single']['p99_ms']:.1f} ms  "
                      f"CPU p50 {r['single_cpu']['p50_ms']:.1f} p99 {r['single_cpu']['p99_ms']:.1f} ms", flush=True)
    rep["loadavg_end"] = list(os.getloadavg())
    rep["wall_s"] = round((datetime.now(timezone.utc) - started).total_seconds(), 1)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "report.json", json.dumps(rep, indent=1))
    md = render_md(rep, a.policies)
    _write_atomic(out / "report.md", md)
    print(md)
    print(f"wrote {out}/report.json, report.md")
    return 0


def _sd(r: dict[str, Any]) -> str:
    """`` ± sd`` of D over the seeds a figure is the mean of (nothing for one seed)."""
    d = [x["d_acc"] for x in r.get("per_seed", ())]
    return f" ± {statistics.stdev(d):.3f}" if len(d) > 1 else ""


def render_md(rep: dict[str, Any], policies: Sequence[str] = ("knn",)) -> str:
    """One row per variant: quality (points vs exact) and decision latency per hub."""
    q, lat = rep.get("quality", {}), rep.get("latency", {})
    ex = q.get(rep["exact"], {})
    hubs = list(lat)
    head = ["variant (backend:query tokens)"]
    for name in policies:
        head += [f"CMRBench {name} M / D (Δ D pts)"]
    head += ["RouterBench knn AIQ (Δ pts)"] + [f"{int(h):,} models: p50 / p99 ms, CPU p50 / p99 ms" for h in hubs]
    lines = ["# Exact and fast query encoders side by side (issue 17)", "",
             f"{rep['started_utc']}, {rep['machine']}, load {rep['loadavg_start'][0]:.1f} → {rep.get('loadavg_end', [0])[0]:.1f}; "
             f"`{rep.get('command')}`. Served default: `{rep['served_default']}`; exact: `{rep['exact']}`; embedding "
             f"(CMRBench / RouterBench): `{ex.get('embedding', 'minilm')}` / `{ex.get('routerbench_embedding', 'minilm')}`. Quality floor: "
             f"within {QUALITY_POINTS} points of exact; CMRBench: mean (± sd of D) over training seeds {rep.get('seeds', [0])}; decision floor: p99 ≤ 10 ms at 2,000 models (a shared 2-core machine: "
             "the CPU column is the decision's own cost, whatever else loads the cores).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys([*q, *(k for h in hubs for k in lat[h])]))
    for v in keys:
        row = [f"`{v}`"]
        for name in policies:
            r, e = q.get(v, {}).get(f"cmrbench_{name}"), ex.get(f"cmrbench_{name}")
            row.append(f"{r['m_acc']:.3f} / {r['d_acc']:.3f}{_sd(r)} ({100 * (r['d_acc'] - e['d_acc']):+.2f})" if r and e else "")
        r, e = q.get(v, {}).get("routerbench_knn_aiq"), ex.get("routerbench_knn_aiq")
        row.append(f"{r:.3f} ({100 * (r - e):+.2f})" if r is not None and e is not None else "")
        for h in hubs:
            x = lat[h].get(v)
            row.append(f"{x['single']['p50_ms']:.1f} / {x['single']['p99_ms']:.1f}, {x['single_cpu']['p50_ms']:.1f} / "
                       f"{x['single_cpu']['p99_ms']:.1f}" if x else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bench import cli

    return cli("python -m bench.exactness", __doc__, add_arguments, run, BenchExactnessError, "bench_exactness", argv)


if __name__ == "__main__":
    raise SystemExit(main())
