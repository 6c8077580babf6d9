"""Serving benchmark (issue 4): router decision latency in-process, and end-to-end throughput and
latency through Ray Serve on loopback.

``python -m bench.serve [--models 2000 100000] [--concurrency 16 32] [--requests 200] [--out DIR]``

1. *Decision latency* (no HTTP, no Ray): a ``RouterCore`` over a hub of N synthetic model cards,
   driven exactly as the Router deployment drives it (``RouterCore.route``: encode → optional
   FAISS top-``retrieve_k`` → ``policy.score`` → ``cmr.decide.decide``), per single request and
   per batch of 16. Queries are real CMRBench *test* prompts encoded by the real MiniLM, **without**
   the embedding cache (a cache hit would hide the encoder's cost). Card texts come from templates;
   embedding 100k card texts with MiniLM on 2 CPUs takes too long, so ``--distinct`` of them are
   embedded with the real (cached) MiniLM and every other card reuses one of those vectors plus
   small Gaussian noise (renormalised). ``CardBankEncoder`` hands those vectors to the router behind
   the ``Encoder`` interface and sends every other text (the queries) to MiniLM.
2. *End to end* (Ray Serve, HTTP on 127.0.0.1): the embedded app (CMRBench hub, ``knn`` trained on
   ``--train-limit`` requests per experience, tiny local GPT-2 pool, no learner) at each
   concurrency: ``/v1/route``; ``/v1/chat/completions`` with ``model="auto"`` (router, then pool);
   the same naming the model ``auto`` chose for that request (``chat_direct``: generation starts at
   once, its decision is recorded beside it for feedback); and naming it with ``routing.record``
   false (``chat_pool``: straight to the pool, no router: the direct path of the router-overhead
   floor). Every request is a different real CMRBench test prompt, so no embedding cache answers
   for the encoder; the chat cells run in halves A B C C B A so that drift hits them alike.

Writes ``report.json`` and ``report.md`` atomically into ``--out`` (default ``runs/serve-<UTC>``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cmr.encoders.cache import ENCODER_BACKENDS
from cmr.errors import CMRError

# the floors on the 2-core machine
FLOORS = {"decision_p99_ms_2k": 15.0, "decision_p99_ms_100k": 30.0, "router_overhead_frac": 0.20, "routed_rps": 100.0,
          # issue 17, fake instant upstream: server CPU per ``auto`` request, lone and at 16 concurrent;
          # a lone request's p50 added over the upstream's own
          "auto_cpu_ms_lone": 10.0, "auto_cpu_ms_at16": 6.0, "auto_added_p50_ms_lone": 12.0}

_FAMILIES = ("llama", "mistral", "qwen", "gemma", "phi", "falcon", "bloom", "gpt-neo", "t5", "bert", "roberta", "deberta",
             "opt", "pythia", "stablelm", "mpt", "olmo", "yi", "baichuan", "internlm")
_DOMAINS = ("text-generation", "summarization", "translation", "question-answering", "text-classification", "code",
            "math", "token-classification", "sentiment-analysis", "zero-shot-classification", "conversational", "fill-mask")
_SKILLS = ("instruction following", "long documents", "multilingual text", "legal contracts", "medical notes",
           "customer support chats", "source code", "grade-school math word problems", "news articles", "scientific papers",
           "product reviews", "named entities", "short answers to trivia", "dialogue", "tweets and social media posts")
_SIZES = ("125m", "350m", "1b", "3b", "7b", "13b", "34b", "70b")


def synthetic_cards(n: int, seed: int = 0) -> list:
    """``n`` model cards from templates (family, size, domain, a described skill, a cost by size)."""
    from cmr.types import ModelCard

    rng = np.random.default_rng(seed)
    fam = rng.integers(len(_FAMILIES), size=n)
    dom = rng.integers(len(_DOMAINS), size=n)
    sk = rng.integers(len(_SKILLS), size=n)
    sz = rng.integers(len(_SIZES), size=n)
    return [
        ModelCard(id=f"synth/{_FAMILIES[f]}-{_SIZES[s]}-{_DOMAINS[d]}-{i:06d}", family=_FAMILIES[f], domain=_DOMAINS[d],
                  description=f"A {_SIZES[s]} {_FAMILIES[f]} model fine-tuned for {_DOMAINS[d].replace('-', ' ')} on {_SKILLS[k]}.",
                  cost=round(0.0005 * 2.0 ** s, 6))
        for i, (f, d, k, s) in enumerate(zip(fam, dom, sk, sz))
    ]


class CardBankEncoder:
    """``Encoder``: known card texts → their prepared vectors; any other text → the inner encoder.

    The benchmark's stand-in for embedding 100k card texts with MiniLM (too slow on 2 CPUs): the
    vectors are real MiniLM vectors of ``distinct`` card texts, shared by the other cards with noise.
    """

    def __init__(self, inner, bank: dict[str, np.ndarray]):
        self.inner, self.bank = inner, bank
        self.name, self.dim = inner.name, inner.dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        miss = [i for i, t in enumerate(texts) if t not in self.bank]
        for i, t in enumerate(texts):
            if t in self.bank:
                out[i] = self.bank[t]
        if miss:
            out[miss] = self.inner.encode([texts[i] for i in miss])
        return out


def card_bank(cards: Sequence, distinct: int, seed: int = 0) -> tuple[dict[str, np.ndarray], int]:
    """Vectors for every card text: the first ``distinct`` embedded by the real (cached) MiniLM,
    the others a copy of one of those + N(0, 0.03²) noise, unit-normed."""
    from cmr.encoders import default_encoder

    texts = [c.text() for c in cards]
    d = min(distinct, len(texts))
    base = default_encoder().encode(texts[:d])
    rng = np.random.default_rng(seed)
    src = rng.integers(d, size=len(texts) - d)
    rest = base[src] + rng.normal(0, 0.03, size=(len(src), base.shape[1])).astype(np.float32)
    rest /= np.linalg.norm(rest, axis=1, keepdims=True)
    vecs = np.concatenate([base, rest]).astype(np.float32)
    return dict(zip(texts, vecs)), d


def test_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` real CMRBench test-split prompts, spread over the experiences."""
    from cmr.data import load_cmrbench
    from services.config import AppArgs

    bench = load_cmrbench(AppArgs().bench_path())
    texts = [t for e in bench.experiences for t in e.test.texts]
    rng = np.random.default_rng(seed)
    return [texts[i] for i in rng.choice(len(texts), min(n, len(texts)), replace=False)]


def fresh_prompts(seed: int) -> Callable[[], str]:
    """A source of real test prompts, each call a new one: the router keeps routed query embeddings
    only in its in-memory LRU (empty at start), so none is answered from a cache. Past the data
    set's size a unique suffix keeps them distinct (and ~8 tokens longer)."""
    pool, seq, run = test_prompts(10**9, seed=seed), iter(range(10**9)), os.urandom(4).hex()

    def q() -> str:
        k = next(seq)
        return pool[k] if k < len(pool) else f"{pool[k % len(pool)]} (#{run}-{k})"

    return q


def _pcts(ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "max_ms": float(a.max())}


def _encoder_label(backend: str, threads: int, single: int | None) -> str:
    return f"{backend} threads={threads}" + (f" single={single}" if single and single != threads and backend != "torch" else "")


def decision_latency(n_models: int, prompts: Sequence[str], *, policy: str, retrieve_k: int, distinct: int,
                     batch: int = 16, home: Path, encoder: str = "onnx", encoder_threads: int = 1,
                     encoder_single_threads: int | None = None, query_max_tokens: int | None = None,
                     other_encoders: Sequence[tuple] = (), embedding: str = "minilm",
                     policy_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """p50/p99 of ``RouterCore.route`` (encode + retrieve + score + select) per request and per batch,
    with the router's query encoder (``AppArgs.encoder``) after its start-up warm-up; then the same
    for each of ``other_encoders`` (``(backend, threads, single_threads[, query_max_tokens])``) on the same hub, under
    ``variants``. The router's in-memory query LRU is off: every phase re-sends the same prompts.
    ``embedding="minilm+tfidf"``: the router embeds with MiniLM fused with TF-IDF fitted on
    CMRBench's train prompts and the hub's cards (as its first start would), through its checkpoint."""
    from cmr.encoders import make_encoder
    from services.config import AppArgs
    from services.routing import RouteRequest, RouterCore

    t0 = time.perf_counter()
    cards = synthetic_cards(n_models)
    bank, d = card_bank(cards, distinct)
    enc = CardBankEncoder(make_encoder(encoder, encoder_threads, encoder_single_threads), bank)  # queries: real MiniLM, no cache
    if embedding != "minilm":
        from cmr.data import load_cmrbench
        from cmr.encoders.lexical import fit_encoder

        if other_encoders:
            raise BenchServeError("--decision-encoders: compare query encoders with the default --embedding minilm")
        texts = [t for e in load_cmrbench(AppArgs().bench_path()).experiences for t in e.train.texts]
        enc = fit_encoder(embedding, enc, texts + [c.text() for c in cards])  # saved with the first checkpoint, as served
    args = AppArgs(home=str(home), policy=policy, policy_config=policy_config or {}, bench=None, tiny_models=False, retrieve_k=retrieve_k, query_cache_size=0,
                   learner={"enabled": False}, encoder=encoder, encoder_threads=encoder_threads, encoder_single_threads=encoder_single_threads,
                   query_max_tokens=query_max_tokens)
    core = RouterCore(args, encoder=enc)
    core.register(cards)
    from cmr.threads import limit_native_threads

    limit_native_threads(args.native_threads)  # as the Router replica does once its libraries are loaded
    setup_s = time.perf_counter() - t0
    reqs = [RouteRequest(query=p, k=3, record=False) for p in prompts]

    def measure() -> dict[str, Any]:
        warmup_s = core.warm_up()  # what the Router deployment does at replica start
        single, single_cpu = [], []
        for r in reqs:
            c, t = time.process_time(), time.perf_counter()
            out = core.route([r])
            single.append((time.perf_counter() - t) * 1e3)
            single_cpu.append((time.process_time() - c) * 1e3)  # the decision's CPU: robust to the machine's load
            if isinstance(out[0], Exception):
                raise out[0]
        batched = []
        for i in range(0, len(reqs) - batch + 1, batch):
            t = time.perf_counter()
            core.route(reqs[i : i + batch])
            batched.append((time.perf_counter() - t) * 1e3)
        # where the time goes, on the same requests: the encoder alone (wall and CPU time: the CPU
        # time is its cost on one core whatever else runs), and the rest alone (RouterCore.route
        # with the query embedding given: retrieve + score + select)
        enc_ms, enc_cpu, rest_ms = [], [], []
        for r in reqs:
            c, t = time.process_time(), time.perf_counter()
            e = core.query_encoder.encode([r.query])  # the router's query path (its LRU is off here)
            enc_ms.append((time.perf_counter() - t) * 1e3)
            enc_cpu.append((time.process_time() - c) * 1e3)
            t = time.perf_counter()
            core.route([r], emb=e)
            rest_ms.append((time.perf_counter() - t) * 1e3)
        return {"warmup_s": round(warmup_s, 2), "single": _pcts(single), "single_cpu": _pcts(single_cpu), "encode_only": _pcts(enc_ms), "encode_only_cpu": _pcts(enc_cpu),
                "retrieve_score_select_only": _pcts(rest_ms), f"batch{batch}": _pcts(batched) if batched else None,
                f"batch{batch}_per_request_p50_ms": (float(np.median(batched)) / batch) if batched else None}

    res = {"models": n_models, "hub_models": len(core.models()), "distinct_embedded_cards": d, "policy": policy,
           "policy_config": policy_config or {}, "embedding": embedding,
           "retrieve_k": retrieve_k, "encoder": encoder, "encoder_threads": encoder_threads,
           "encoder_single_threads": encoder_single_threads, "query_max_tokens": query_max_tokens, "setup_s": round(setup_s, 1),
           **measure(), "variants": {}}
    for backend, threads, single, *max_tokens in other_encoders:
        # the router's query encoder, swapped under the same hub (its query path wraps the same one);
        # a fourth item: this variant's own query truncation instead of the router's
        enc.inner = make_encoder(backend, threads, single)
        view = enc.inner.with_max_tokens(max_tokens[0]) if max_tokens and max_tokens[0] else core.query_view(enc.inner)
        core.query_encoder.inner = view
        label = _encoder_label(backend, threads, single) + (f" queries {max_tokens[0]} tokens" if max_tokens and max_tokens[0] else "")
        res["variants"][label] = {"encoder": backend, "encoder_threads": threads, "encoder_single_threads": single,
                                  "query_max_tokens": max_tokens[0] if max_tokens and max_tokens[0] else query_max_tokens, **measure()}
    core.close()
    return res


# -- encoder variants --------------------------------------------------------------------------
ENCODER_VARIANTS = (("torch", 1, 64), ("torch", 2, 64), ("onnx", 1, 64), ("onnx", 2, 64), ("onnx", 1, 4), ("onnx-int8", 1, 64))


def encoder_variants(prompts: Sequence[str], variants: Sequence[tuple[str, int, int]] = ENCODER_VARIANTS,
                     batch: int = 16) -> dict[str, Any]:
    """The query encoder alone, per variant ``(backend, threads, chunk)``, on the same prompts.

    Calls are interleaved (prompt by prompt, the variants' order rotating) so that all variants see
    the same machine load: compare them as ratios. ``chunk``: a batch is encoded in length-sorted
    chunks of this size (less padding). Also: each variant's largest deviation from torch's
    embeddings (int8: the cosine to fp32).
    """
    import torch

    from cmr.encoders.minilm import MiniLMEncoder
    from cmr.encoders.onnx import OnnxMiniLMEncoder

    torch_enc = MiniLMEncoder(device="cpu")
    encs = []
    for backend, threads, chunk in variants:
        if backend == "torch":
            encs.append(torch_enc)  # torch's thread count is process-wide: set before each call below
        else:
            encs.append(OnnxMiniLMEncoder(threads=threads, batch_size=chunk, quantize="int8" if backend == "onnx-int8" else None))
    names = [f"{b} threads={t} chunk={c}" for b, t, c in variants]

    def call(j: int, texts: Sequence[str], cpu: list[float]) -> float:
        if variants[j][0] == "torch":
            torch.set_num_threads(variants[j][1])
            torch_enc.batch_size = variants[j][2]
        c0, t0 = time.process_time(), time.perf_counter()
        encs[j].encode(texts)
        cpu.append((time.process_time() - c0) * 1e3)  # CPU time: what a variant costs, whatever the load
        return (time.perf_counter() - t0) * 1e3

    load0 = list(os.getloadavg())
    for j in range(len(encs)):  # first calls (lazy initialisation) are not measured: the router warms up
        call(j, prompts[:1], []), call(j, prompts[:batch], [])
    single: list[list[float]] = [[] for _ in encs]
    single_cpu: list[list[float]] = [[] for _ in encs]
    for i, p in enumerate(prompts):
        for r in range(len(encs)):
            j = (i + r) % len(encs)
            single[j].append(call(j, [p], single_cpu[j]))
    batched: list[list[float]] = [[] for _ in encs]
    batched_cpu: list[list[float]] = [[] for _ in encs]
    for n, i in enumerate(range(0, len(prompts) - batch + 1, batch)):
        for r in range(len(encs)):
            j = (n + r) % len(encs)
            batched[j].append(call(j, prompts[i : i + batch], batched_cpu[j]))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ref = torch_enc.encode(list(prompts))
    out = {"prompts": len(prompts), "loadavg_start": load0, "loadavg_end": list(os.getloadavg()), "variants": {}}
    for j, name in enumerate(names):
        e = ref if variants[j][0] == "torch" else encs[j].encode(list(prompts))
        cos = (e * ref).sum(axis=1)
        out["variants"][name] = {"backend": variants[j][0], "threads": variants[j][1], "chunk": variants[j][2], "single": _pcts(single[j]),
                                 f"batch{batch}": _pcts(batched[j]) if batched[j] else None, "single_cpu": _pcts(single_cpu[j]),
                                 f"batch{batch}_cpu": _pcts(batched_cpu[j]) if batched_cpu[j] else None,
                                 "max_abs_diff_vs_torch": float(np.abs(e - ref).max()), "min_cos_vs_torch": float(cos.min()),
                                 "mean_cos_vs_torch": float(cos.mean())}
    return out


def encoder_routing_quality(policies: Sequence[str] = ("knn", "carve")) -> dict[str, Any]:
    """What the router's encoder settings cost in routing quality on CMRBench (continual protocol,
    final model/family/domain accuracy on the *test* splits). Each variant embeds the *train*
    splits as the router's first start does (``AppArgs.encoder``, full length) and the *test*
    queries as the router sees them (``AppArgs.encoder`` truncated to ``query_max_tokens``):
    exact fp32, int8 alone, truncation alone, and both (the served default); and a checkpoint
    trained with the exact encoder (``cmr train``'s default) served by the int8 router: train
    splits and cards exact, test queries int8. Each encoder and truncation caches under its own
    name."""
    from cmr.bench import common
    from cmr.bench.cmr_protocol import evaluate
    from cmr.data import load_cmrbench
    from cmr.encoders import CachedEncoder, EmbeddingCache
    from cmr.encoders import make_encoder as mk
    from cmr.policies import make_policy
    from services.config import AppArgs

    from cmr import constants

    served = AppArgs()
    cache = EmbeddingCache(constants.cache_dir() / "embeddings.sqlite")
    n = served.query_max_tokens or 256

    def enc(backend: str, max_tokens: int | None = None) -> CachedEncoder:
        return CachedEncoder(mk(backend, 1, None, max_tokens), cache)

    # label -> (encoder of the train splits and cards, encoder of the test queries, query truncation)
    variants = {"exact (onnx fp32, 256 tokens)": ("onnx", "onnx", None), f"onnx fp32, queries {n} tokens": ("onnx", "onnx", n),
                "onnx-int8, 256 tokens": ("onnx-int8", "onnx-int8", None), f"onnx-int8, queries {n} tokens": ("onnx-int8", "onnx-int8", n),
                f"trained exact, served onnx-int8 (queries {n} tokens)": ("onnx", "onnx-int8", n)}
    out: dict[str, Any] = {"served": f"{served.encoder}, queries {n} tokens", "policies": {}}
    for label, (trained, queried, max_tokens) in variants.items():
        bench = load_cmrbench(served.bench_path())
        common.embed(enc(trained), [e.train for e in bench.experiences])
        common.embed(enc(queried, max_tokens), [e.test for e in bench.experiences])
        out["n_test"] = sum(len(e.test) for e in bench.experiences)
        for name in policies:
            out["policies"].setdefault(name, {})[label] = evaluate(bench, make_policy(name, encoder=enc(trained)))["final"]
    return out


# -- end to end ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_by_role(servers: dict[str, str] | None = None) -> dict[str, float]:
    """CPU seconds (user + system) used so far by this benchmark process (the HTTP client) and by
    each process under it (the Ray instance it started), keyed by role (``ray::ServeReplica:cmr:Router``
    → ``Router``, the proxy, raylet, GCS, ...), read from ``/proc``: where each routed request's CPU
    goes, whatever else loads the machine (other users' processes are not descendants: not counted).

    ``servers``: role → a string in the command line of a server this benchmark started that is
    not its descendant (a daemonised PostgreSQL: its data folder); that process and its children
    count under the role."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, str, float]] = {}  # pid -> (ppid, cmdline, cpu seconds)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        procs[int(pid)] = (int(fields[1]), cmd, (int(fields[11]) + int(fields[12])) / tick)  # ppid, utime + stime
    def tree(roots: set[int]) -> set[int]:
        out, grew = set(roots), True
        while grew:
            new = {p for p, (pp, _, _) in procs.items() if pp in out and p not in out}
            out |= new
            grew = bool(new)
        return out

    mine = tree({os.getpid()})
    out: dict[str, float] = {}
    for role, needle in (servers or {}).items():
        for pid in tree({p for p, (_, cmd, _) in procs.items() if needle in cmd}) - mine:
            out[role] = out.get(role, 0.0) + procs[pid][2]
    for pid in mine:
        if pid not in procs:
            continue
        _, cmd, cpu = procs[pid]
        if pid == os.getpid():
            role = "client"
        elif cmd.startswith("ray::"):
            title = cmd[5:].split()[0] if cmd[5:].split() else cmd
            role = title.split(":")[-1].split(".")[0] if title.startswith("ServeReplica") else title.split(".")[0]
        elif "bench.fake_upstream" in cmd:  # the fake remote model: not the app
            role = "upstream"
        elif "litellm" in cmd:  # the second gateway of the comparison (gateway_cpu_per_request)
            role = "litellm"
        elif os.path.basename(cmd.split()[0] if cmd.split() else "") == "haproxy":  # Serve's front door (HAProxyManager's child)
            role = "haproxy"
        elif "raylet" in cmd or "gcs_server" in cmd:
            role = "raylet" if "raylet" in cmd else "gcs"
        else:
            role = "other"
        out[role] = out.get(role, 0.0) + cpu
    return out


def _steal_s() -> float:
    """CPU seconds the hypervisor has taken from this VM so far (``steal`` in ``/proc/stat``, all
    CPUs): a cell that ran while neighbours took the host's cores shows it (0 where not a VM)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK") if fields[0] == "cpu" and len(fields) > 8 else 0.0
    except OSError:
        return 0.0


async def _load(url: str, path: str, bodies: list[dict], concurrency: int, field: str = "model") -> dict[str, Any]:
    """Send ``bodies`` with at most ``concurrency`` in flight; latency per request, overall req/s,
    and the ``field`` (default ``model``) of each answer (``models``, in body order; None for an error).

    The client is aiohttp (Ray Serve's own HTTP dependency): it shares the 2 cores with the server
    under test, and costs about half the CPU per request of httpx, which went to the server."""
    import aiohttp

    lat: list[float] = []
    errors = 0
    samples: list[str] = []  # the first few error bodies: an error count alone says nothing
    models: list[str | None] = [None] * len(bodies)
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(base_url=url, timeout=aiohttp.ClientTimeout(total=120),
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as client:
        async def one(i: int, body: dict) -> None:
            nonlocal errors
            async with sem:
                t = time.perf_counter()
                async with client.post(path, json=body) as r:
                    raw = await r.read()
                dt = (time.perf_counter() - t) * 1e3
                if r.status == 200:
                    lat.append(dt)
                    models[i] = json.loads(raw).get(field)
                else:
                    errors += 1
                    if len(samples) < 3:
                        samples.append(f"{r.status}: {raw[:300].decode(errors='replace')}")

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
        wall = time.perf_counter() - t0
    out = _pcts(lat) if lat else {"n": 0}
    out.update({"errors": errors, "error_samples": samples, "wall_s": round(wall, 2), "rps": len(lat) / wall, "models": models, "lat": lat})
    return out


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell from runs of it at different times (``_load`` results): latencies pooled, req/s
    over their summed wall time, models in order."""
    lat = [x for p in parts for x in p["lat"]]
    wall = sum(p["wall_s"] for p in parts)
    out = _pcts(lat) if lat else {"n": 0}
    out.update({"errors": sum(p["errors"] for p in parts), "error_samples": [x for p in parts for x in p["error_samples"]][:3],
                "wall_s": round(wall, 2), "rps": len(lat) / wall if wall else 0.0, "models": [m for p in parts for m in p["models"]],
                "runs": len(parts), "steal_s": round(sum(p.get("steal_s", 0.0) for p in parts), 2)})
    if wall:  # share of the machine's CPU time (all cores) the hypervisor took while the cell ran
        out["steal_pct"] = round(100 * out["steal_s"] / (wall * (os.cpu_count() or 1)), 1)
    return out


def end_to_end(concurrencies: Sequence[int], n_requests: int, *, home: Path,
               train_limit: int, max_tokens: int, app: dict[str, Any] | None = None, proxy: str | None = None) -> dict[str, Any]:
    """Start the app on loopback, measure route / auto chat / direct chat at each concurrency, stop.

    ``proxy``: the front door (``haproxy``, ``serve``, or ``auto`` = haproxy when its binary exists;
    None: what this process's environment already asks Ray for), set in Ray's environment before
    ``ray.init``; the report's ``app.proxy`` says which one ran."""
    from cmr import constants, raycluster
    from services import proxy as px
    from services.app import deploy, undeploy
    from services.config import AppArgs
    from services.pools.tiny import TINY_SPECS

    direct_model = TINY_SPECS[0][0]
    # loopback benchmark: explicit open mode (no API keys, no per-key rate limit in the way)
    args = AppArgs(home=str(home), policy="knn", train_limit=train_limit, learner={"enabled": False}, auth={"open": True},
                   **(app or {}))
    port = _free_port()
    proxy = px.resolve_proxy(proxy) if proxy else constants.proxy_in_env()
    if proxy == "haproxy" and px.haproxy_problem():
        raise RuntimeError(f"proxy 'haproxy': {px.haproxy_problem()} (or use proxy 'serve')")
    with raycluster.running(env=px.ray_proxy_env(proxy)):
        try:
            t0 = time.perf_counter()
            deploy(args, port=port)
            startup_s = time.perf_counter() - t0
            url = f"http://127.0.0.1:{port}"
            new_prompt = fresh_prompts(seed=1)  # every request a different real test prompt

            def q(i: int) -> str:
                return new_prompt()

            def route_body(i): return {"query": q(i), "record": False}
            def auto_body(i): return {"model": "auto", "messages": [{"role": "user", "content": q(i)}], "max_tokens": max_tokens}
            # direct: each request names the model that chat_auto's request of the same index got, so
            # both cells generate the same work and their difference is the routing step alone (a
            # request naming a model starts generating at once; its decision is recorded beside it)
            chosen: list[str | None] = []

            def direct_body(i): return {"model": (chosen[i] if i < len(chosen) and chosen[i] else direct_model),
                                        "messages": [{"role": "user", "content": q(i)}], "max_tokens": max_tokens}

            # pool: the same named models with ``routing.record`` false, which the ingress sends straight
            # to their pool without asking the router: the path with no router at all
            def pool_body(i): return {**direct_body(i), "routing": {"record": False}}

            kinds = {"route": ("/v1/route", route_body), "chat_auto": ("/v1/chat/completions", auto_body),
                     "chat_direct": ("/v1/chat/completions", direct_body), "chat_pool": ("/v1/chat/completions", pool_body)}
            for path, mk in kinds.values():  # warm-up: replicas, tokenizers, batch loop
                asyncio.run(_load(url, path, [mk(i) for i in range(8)], 8))
            res: dict[str, Any] = {"startup_s": round(startup_s, 1), "direct_model": direct_model, "max_tokens": max_tokens,
                                   "requests_per_cell": n_requests, "app": {"policy": args.policy, "train_limit": train_limit,
                                                                             "retrieve_k": args.retrieve_k, "max_batch_size": args.max_batch_size,
                                                                             "batch_wait_timeout_s": args.batch_wait_timeout_s,
                                                                             "router_replicas": args.router_replicas, "encoder": args.encoder,
                                                                             "encoder_threads": args.encoder_threads, "encoder_single_threads": args.encoder_single_threads, "query_max_tokens": args.query_max_tokens,
                                                                             "proxy": proxy}, "cells": {}}
            # the chat cells run in halves, A B C C B A (auto, direct, pool, pool, direct, auto), pooled
            # per cell: a drift of the shared machine's speed during the run then hits all alike, and
            # their ratios (the router's overhead) do not depend on the order they ran in. Direct and
            # pool repeat the first auto half's model mix.
            half = max(1, n_requests // 2)
            plan = [("route", range(n_requests)), ("chat_auto", range(half)), ("chat_direct", range(half)), ("chat_pool", range(half)),
                    ("chat_pool", range(half)), ("chat_direct", range(half)), ("chat_auto", range(half, 2 * half))]
            for c in concurrencies:
                parts: dict[str, list[dict[str, Any]]] = {}
                cpu: dict[str, dict[str, float]] = {}
                for name, idx in plan:
                    path, mk = kinds[name]
                    cpu0, st0 = _cpu_by_role(), _steal_s()
                    part = asyncio.run(_load(url, path, [mk(i) for i in idx], c))
                    cpu1, part["steal_s"] = _cpu_by_role(), _steal_s() - st0
                    if name == "chat_auto" and not parts.get(name):
                        chosen[:] = part["models"]
                    parts.setdefault(name, []).append(part)
                    acc = cpu.setdefault(name, {})
                    for k in cpu1:
                        acc[k] = acc.get(k, 0.0) + cpu1[k] - cpu0.get(k, 0.0)
                for name in kinds:
                    cell = _merge(parts[name])
                    models = cell.pop("models")
                    if name == "chat_auto":
                        cell["models_chosen"] = {m: models.count(m) for m in sorted(set(filter(None, models)))}
                    if cell.get("n"):  # CPU ms per answered request, per process role, and the ceiling it sets on 2 free cores
                        per = {k: round(v * 1e3 / cell["n"], 2) for k, v in cpu[name].items() if v > 0}
                        cell["cpu_ms_per_request"] = dict(sorted(per.items(), key=lambda kv: -kv[1]))
                        cell["cpu_bound_rps_on_2_cores"] = 2e3 / max(sum(per.values()), 1e-9)
                    res["cells"][f"{name}@{c}"] = cell
                # the floor's measure: auto against the pool straight (no router); also against a named
                # model whose decision is recorded beside its generation (what feedback needs)
                a = res["cells"][f"chat_auto@{c}"]
                for key, other in ((f"router_overhead@{c}", "chat_pool"), (f"router_overhead_vs_named@{c}", "chat_direct")):
                    d = res["cells"][f"{other}@{c}"]
                    if a.get("n") and d.get("n"):
                        res["cells"][key] = {"p50_ms": a["p50_ms"] - d["p50_ms"], "frac_of_direct_p50": (a["p50_ms"] - d["p50_ms"]) / d["p50_ms"],
                                             "direct": other}
            return res
        finally:
            undeploy(args)


# -- server CPU per request against a fake instant upstream ------------------------------------
#: roles of ``_cpu_by_role`` that are not the app: the load generator and the fake remote model
_NOT_APP = ("client", "upstream", "litellm")


#: name -> (AppArgs overrides, Serve LoggingConfig) of the app variants the server-CPU cells can compare
CPU_VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "served": ({}, None),
    "no_access_log": ({}, {"enable_access_log": False}),
    # routing in the Router deployment (the KubeRay sample's choice: routers spread over nodes)
    "router_hop": ({"route_in_ingress": False}, None),
    # the defaults before issue 17: a Serve call to the router and one to the pool per request
    "hops": ({"route_in_ingress": False, "remote_in_ingress": False}, None),
}


def _start_fake_upstream() -> tuple[Any, str]:
    """``bench.fake_upstream`` (a FAKE remote model) as a child process on a free port; its URL."""
    import subprocess
    import sys
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.fake_upstream", str(port)], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/models", timeout=1).read()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("the fake upstream exited at start") from None
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the fake upstream did not answer within 30 s")


def _cpu_cells(url: str, kinds: dict[str, Callable[[], dict]], levels: Sequence[int], n_requests: int,
               idle: dict[str, float], roles: Callable[[str], bool] = lambda r: r not in _NOT_APP) -> dict[str, Any]:
    """At each concurrency, each kind of request in two halves (A B C C B A); per cell the latency
    figures and the CPU per request of the processes whose role ``roles`` accepts, their idle rate
    (``idle``, per second) over the part's wall time subtracted."""
    cells: dict[str, Any] = {}
    half = max(1, n_requests // 2)
    for c in levels:
        parts: dict[str, list[dict[str, Any]]] = {}
        cpu: dict[str, dict[str, float]] = {}
        for name in (*kinds, *reversed(kinds)):
            a0 = _cpu_by_role()
            part = asyncio.run(_load(url, "/v1/chat/completions", [kinds[name]() for _ in range(half)], c))
            a1 = _cpu_by_role()
            parts.setdefault(name, []).append(part)
            acc = cpu.setdefault(name, {})
            for k in a1:
                if roles(k):  # background subtracted: the idle rate over this part's wall time
                    acc[k] = acc.get(k, 0.0) + a1[k] - a0.get(k, 0.0) - idle.get(k, 0.0) * part["wall_s"]
        for name in kinds:
            cell = _merge(parts[name])
            cell.pop("models")
            n = cell.get("n") or 0
            by = {k: round(v * 1e3 / n, 2) for k, v in cpu[name].items() if n and abs(v) * 1e3 / n >= 0.05}
            cell["server_cpu_ms_per_request"] = round(sum(cpu[name].values()) * 1e3 / n, 2) if n else None
            cell["cpu_ms_per_request_by_role"] = dict(sorted(by.items(), key=lambda kv: -kv[1]))
            cells[f"{name}@{c}"] = cell
        print("cpu " + "  ".join(f"{k}@{c} {cells[f'{k}@{c}']['server_cpu_ms_per_request']} ms "
                                 f"(p50 {cells[f'{k}@{c}'].get('p50_ms', float('nan')):.1f})" for k in kinds), flush=True)
    return cells


def _idle_rates(idle_s: float, roles: Callable[[str], bool]) -> dict[str, float]:
    """CPU seconds per second of each accepted role with no traffic (its background)."""
    time.sleep(1.0)
    c0, t0 = _cpu_by_role(), time.perf_counter()
    time.sleep(idle_s)
    c1, wall = _cpu_by_role(), time.perf_counter() - t0
    return {k: max(0.0, c1[k] - c0.get(k, 0.0)) / wall for k in c1 if roles(k)}


def gateway_cpu_per_request(levels: Sequence[int], n_requests: int, *, litellm: str, home: Path, idle_s: float = 8.0) -> dict[str, Any]:
    """The same cells for a second gateway in front of the same FAKE upstream: LiteLLM's proxy
    (``litellm`` is its command, from its own environment), one model group of two deployments
    (simple shuffle, no database), every prompt new. Its CPU is that of its process tree."""
    import subprocess

    upstream, base = _start_fake_upstream()
    port = _free_port()
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "litellm.yaml"
    dep = {"model": "openai/fake", "api_base": base, "api_key": "none"}
    cfg.write_text(json.dumps({"model_list": [{"model_name": "group", "litellm_params": dep}] * 2,
                               "router_settings": {"routing_strategy": "simple-shuffle"},
                               # no keys, as the cmr app of the cells (auth open); LiteLLM refuses that unless told
                               "general_settings": {"dangerously_permit_weak_or_unset_master_key": True}}))  # JSON is YAML
    env = {**os.environ, "LITELLM_LOG": "ERROR"}
    proc = subprocess.Popen([litellm, "--config", str(cfg), "--port", str(port), "--num_workers", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, cwd=home)
    try:
        url = f"http://127.0.0.1:{port}"
        q = fresh_prompts(seed=2)
        body = lambda: {"model": "group", "messages": [{"role": "user", "content": q()}], "max_tokens": 8}  # noqa: E731

        t0 = time.monotonic()
        while True:
            try:
                if asyncio.run(_load(url, "/v1/chat/completions", [body()], 1)).get("n"):
                    break
            except Exception:
                pass
            if proc.poll() is not None or time.monotonic() - t0 > 180:
                raise RuntimeError(f"LiteLLM's proxy ({litellm}) did not answer within 180 s")
            time.sleep(1.0)
        asyncio.run(_load(url, "/v1/chat/completions", [body() for _ in range(32)], 8))  # warm-up
        mine = lambda r: r == "litellm"  # noqa: E731
        idle = _idle_rates(idle_s, mine)
        out: dict[str, Any] = {"gateway": "litellm", "version": _litellm_version(litellm), "loadavg_start": list(os.getloadavg()),
                               "idle_cpu_ms_per_s": {k: round(v * 1e3, 2) for k, v in idle.items()}}
        out["cells"] = _cpu_cells(url, {"group": body}, levels, n_requests, idle, mine)
        out["loadavg_end"] = list(os.getloadavg())
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        upstream.kill()
        upstream.wait()


def _litellm_version(litellm: str) -> str | None:
    import subprocess

    py = Path(litellm).with_name("python")
    r = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('litellm'))"], capture_output=True, text=True)
    return r.stdout.strip() or None


def cpu_per_request(levels: Sequence[int], n_requests: int, *, home: Path, train_limit: int, app: dict[str, Any] | None = None,
                    proxy: str | None = None, idle_s: float = 8.0, logging_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Server CPU per request (every process of the app: proxy, ingress, router, pool, raylet, GCS,
    ...) at each concurrency in ``levels`` (1 = a lone request at a time), for ``auto`` (router, then
    pool), a named model (generation at once, its decision recorded beside it) and the pool direct
    (named, ``routing.record`` false: no router), in front of the FAKE instant OpenAI-compatible
    upstream ``bench.fake_upstream`` serving two remote models. The app's background CPU (measured
    for ``idle_s`` with no traffic) is subtracted per cell; the client's and the fake's are not the
    app's. CPU time, not wall: other users of the machine are not counted. Cells run A B C C B A."""
    from cmr import constants, raycluster
    from services import proxy as px
    from services.app import deploy, undeploy
    from services.config import AppArgs, PoolConfig, ServedModel

    upstream, base = _start_fake_upstream()
    models = [ServedModel(id=f"remote-{x}", engine="openai", base_url=base, path="fake", cost=c, family="remote", domain="text-generation",
                          description=f"A remote chat model ({x}) behind an OpenAI-compatible endpoint.") for x, c in (("a", 0.001), ("b", 0.004))]
    args = AppArgs(home=str(home), policy="knn", train_limit=train_limit, learner={"enabled": False}, auth={"open": True},
                   tiny_models=False, pools=[PoolConfig(name="remote", models=models)], **(app or {}))
    port = _free_port()
    proxy = px.resolve_proxy(proxy) if proxy else constants.proxy_in_env()
    try:
        with raycluster.running(env=px.ray_proxy_env(proxy)):
            try:
                deploy(args, port=port, logging_config=logging_config)
                url = f"http://127.0.0.1:{port}"
                q = fresh_prompts(seed=2)  # every prompt new: no cache answers for the encoder

                def body(model: str, record: bool = True) -> dict:
                    b = {"model": model, "messages": [{"role": "user", "content": q()}], "max_tokens": 8}
                    return b if record else {**b, "routing": {"record": False}}

                kinds = {"auto": lambda: body("auto"), "named": lambda: body(models[0].id), "pool": lambda: body(models[0].id, False)}
                for mk in kinds.values():  # warm-up: replicas, clients, batch loops
                    asyncio.run(_load(url, "/v1/chat/completions", [mk() for _ in range(16)], 8))
                # the upstream alone, from the same client: what the app adds to a lone request's p50
                direct = asyncio.run(_load(base.removesuffix("/v1"), "/v1/chat/completions",
                                           [body("fake") for _ in range(50)], 1))
                idle = _idle_rates(idle_s, lambda r: r not in _NOT_APP)
                out: dict[str, Any] = {"upstream": "fake (bench.fake_upstream), instant", "models": [m.id for m in models],
                                       "proxy": proxy, "loadavg_start": list(os.getloadavg()), "idle_cpu_ms_per_s": {k: round(v * 1e3, 2) for k, v in idle.items() if v > 0},
                                       "upstream_direct_p50_ms": direct.get("p50_ms"), "cells": {}}
                out["cells"] = _cpu_cells(url, kinds, levels, n_requests, idle)
                out["loadavg_end"] = list(os.getloadavg())
                return out
            finally:
                undeploy(args)
    finally:
        upstream.kill()
        upstream.wait()


# -- report ----------------------------------------------------------------------------------
def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def verdicts(report: dict[str, Any]) -> dict[str, Any]:
    """Each floor of the issue: measured value, floor, met (None where that part was not run)."""
    out: dict[str, Any] = {}
    for d in report.get("decision", []):
        key = "decision_p99_ms_2k" if d["models"] <= 10_000 else "decision_p99_ms_100k"
        v = d["single"]["p99_ms"]
        out[f"{key}@{d['models']}"] = {"measured": v, "floor": FLOORS[key], "met": v <= FLOORS[key]}
    cells = (report.get("e2e") or {}).get("cells", {})
    for k, v in cells.items():
        if k.startswith("router_overhead@"):
            out[k] = {"measured": v["frac_of_direct_p50"], "floor": FLOORS["router_overhead_frac"],
                      "met": v["frac_of_direct_p50"] <= FLOORS["router_overhead_frac"]}
        if k.startswith("route@"):
            out[f"routed_rps@{k[6:]}"] = {"measured": v["rps"], "floor": FLOORS["routed_rps"], "met": v["rps"] >= FLOORS["routed_rps"]}
    cpu = (report.get("cpu") or {}).get("cells", {})
    lone, at16 = cpu.get("auto@1"), cpu.get("auto@16")
    if lone and lone.get("server_cpu_ms_per_request") is not None:
        v = lone["server_cpu_ms_per_request"]
        out["auto_cpu_ms_lone"] = {"measured": v, "floor": FLOORS["auto_cpu_ms_lone"], "met": v <= FLOORS["auto_cpu_ms_lone"]}
        up = report["cpu"].get("upstream_direct_p50_ms")
        if up is not None and lone.get("p50_ms") is not None:
            v = lone["p50_ms"] - up
            out["auto_added_p50_ms_lone"] = {"measured": v, "floor": FLOORS["auto_added_p50_ms_lone"], "met": v <= FLOORS["auto_added_p50_ms_lone"]}
    if at16 and at16.get("server_cpu_ms_per_request") is not None:
        v = at16["server_cpu_ms_per_request"]
        out["auto_cpu_ms_at16"] = {"measured": v, "floor": FLOORS["auto_cpu_ms_at16"], "met": v <= FLOORS["auto_cpu_ms_at16"]}
    return out


def _rss(d: dict[str, Any]) -> str:
    r = d.get("retrieve_score_select_only")
    return f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}" if r else "-"


def render_md(report: dict[str, Any]) -> str:
    lines = [f"# Serving benchmark ({report['started_utc']})", "", f"`{report['command']}`", "",
             f"Machine: {report['machine']}; load average (1/5/15 min) at start {report['loadavg_start']}, at end {report.get('loadavg_end')}", "", "## Decision latency (in-process RouterCore.route, ms)", "",
             "| models | policy | retrieve_k | single p50 | single p99 | encode-only p50 / p99 | retrieve+score+select p50 / p99 | batch16 p50 | batch16 p99 | batch16 per req |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for d in report.get("decision", []):
        b = d.get("batch16") or {}
        lines.append(f"| {d['models']:,} | {d['policy']} | {d['retrieve_k']} | {d['single']['p50_ms']:.1f} | {d['single']['p99_ms']:.1f} | "
                     f"{d['encode_only']['p50_ms']:.1f} / {d['encode_only']['p99_ms']:.1f} | {_rss(d)} | {b.get('p50_ms', float('nan')):.1f} | {b.get('p99_ms', float('nan')):.1f} | "
                     f"{(d.get('batch16_per_request_p50_ms') or float('nan')):.2f} |")
    rows = [(d, _encoder_label(d.get("encoder", "?"), d.get("encoder_threads", "?"), d.get("encoder_single_threads")), d) for d in report.get("decision", [])]
    rows += [(d, k, v) for d in report.get("decision", []) for k, v in (d.get("variants") or {}).items()]
    if any(d.get("variants") for d in report.get("decision", [])):
        lines += ["", "### Decision latency by query encoder (same hub, same queries; the first row per hub is the served default)", "",
                  "encode CPU: the encoder's CPU time per query, i.e. its cost on one core whatever else loads the machine."
                  + "".join(sorted({f" Routed queries truncated to {d['query_max_tokens']} tokens (AppArgs.query_max_tokens), every row."
                                    for d in report.get("decision", []) if d.get("query_max_tokens")})), "",
                  "| models | query encoder | single p50 | single p99 | encode wall p50 / p99 | encode CPU p50 / p99 | batch16 per req |",
                  "|---|---|---|---|---|---|---|"]
        for d, name, v in rows:
            c = v.get("encode_only_cpu") or {"p50_ms": float("nan"), "p99_ms": float("nan")}
            lines.append(f"| {d['models']:,} | {name} | {v['single']['p50_ms']:.1f} | {v['single']['p99_ms']:.1f} | "
                         f"{v['encode_only']['p50_ms']:.1f} / {v['encode_only']['p99_ms']:.1f} | {c['p50_ms']:.1f} / {c['p99_ms']:.1f} | "
                         f"{(v.get('batch16_per_request_p50_ms') or float('nan')):.2f} |")
    ev = report.get("encoders")
    if ev:
        lines += ["", f"## Query encoder variants (encoder alone, same {ev['prompts']} prompts, calls interleaved; ms)", "",
                  f"load average at start {ev['loadavg_start']}, at end {ev['loadavg_end']}", "",
                  "CPU = process CPU time per call (all threads): the cost of a variant whatever else runs; wall = what a caller waits.", "",
                  "| variant | single wall p50 / p99 | single CPU p50 / p99 | batch16 wall p50 / p99 | batch16 CPU p50 | max abs diff vs torch | min / mean cos vs torch |",
                  "|---|---|---|---|---|---|---|"]
        nan = {"p50_ms": float("nan"), "p99_ms": float("nan")}
        for k, v in ev["variants"].items():
            b, bc, sc = v.get("batch16") or nan, v.get("batch16_cpu") or nan, v.get("single_cpu") or nan
            lines.append(f"| {k} | {v['single']['p50_ms']:.1f} / {v['single']['p99_ms']:.1f} | {sc['p50_ms']:.1f} / {sc['p99_ms']:.1f} | "
                         f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f} | {bc['p50_ms']:.1f} | {v['max_abs_diff_vs_torch']:.1e} | "
                         f"{v['min_cos_vs_torch']:.4f} / {v['mean_cos_vs_torch']:.4f} |")
    iq = report.get("encoder_quality")
    if iq:
        lines += ["", f"## Routing quality by encoder setting (CMRBench test, {iq['n_test']} queries; train splits embedded by the same encoder, full length; served default: {iq['served']})", "",
                  "| policy | encoder / query truncation | final model acc | family acc | domain acc |", "|---|---|---|---|---|"]
        for name, by in iq["policies"].items():
            for variant, f in by.items():
                lines.append(f"| {name} | {variant} | {f['m_acc']:.4f} | {f['f_acc']:.4f} | {f['d_acc']:.4f} |")
    e2e = report.get("e2e")
    if e2e:
        lines += ["", "## End to end through Ray Serve on 127.0.0.1", "", f"app: {json.dumps(e2e.get('app', {}))}", "",
                  "steal: share of the 2 CPUs' time the hypervisor gave to other guests while the cell ran.", "",
                  "| cell | req/s | p50 ms | p99 ms | errors | steal |", "|---|---|---|---|---|---|"]
        for k, v in e2e["cells"].items():
            if "rps" in v:
                lines.append(f"| {k} | {v['rps']:.1f} | {v.get('p50_ms', float('nan')):.1f} | {v.get('p99_ms', float('nan')):.1f} | {v['errors']} | "
                             f"{v.get('steal_pct', float('nan')):.1f}% |")
        lines += ["", "CPU ms per answered request by process (from /proc; robust to other load), and the req/s that "
                  "this CPU cost allows on 2 otherwise idle cores:", ""]
        for k, v in e2e["cells"].items():
            if v.get("cpu_ms_per_request"):
                parts = ", ".join(f"{r} {ms:.1f}" for r, ms in list(v["cpu_ms_per_request"].items())[:6])
                lines.append(f"- {k}: {sum(v['cpu_ms_per_request'].values()):.1f} ms ({parts}) → ≤ {v['cpu_bound_rps_on_2_cores']:.0f} req/s")
        for k, v in e2e["cells"].items():
            if k.startswith("router_overhead"):
                lines.append(f"\n{k}: chat_auto p50 − {v.get('direct', 'chat_direct')} p50 = {v['p50_ms']:.1f} ms = "
                             f"{100 * v['frac_of_direct_p50']:.0f}% of the latter")
    cpu = report.get("cpu")
    if cpu:
        lines += ["", "## Server CPU per request, fake instant OpenAI-compatible upstream (issue 17)", "",
                  f"Every process of the app (front door {cpu['proxy']}, ingress, router, pool, raylet, GCS, ...), CPU time "
                  f"from /proc, its idle background ({sum(cpu['idle_cpu_ms_per_s'].values()):.0f} ms/s, measured with no traffic) "
                  f"subtracted; the client and the fake are not counted. Load average at start {cpu['loadavg_start']}, at end "
                  f"{cpu.get('loadavg_end')}. Upstream alone: p50 {cpu['upstream_direct_p50_ms']:.1f} ms. "
                  "auto: router, then pool; named: generation at once, decision recorded beside it; pool: named, "
                  "routing.record false (no router).", "",
                  "| concurrency | auto CPU ms/req | named | pool direct | auto p50 / p99 ms | named p50 | pool p50 | auto req/s |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in sorted({int(k.split("@")[1]) for k in cpu["cells"]}):
            a, nm, pl = (cpu["cells"].get(f"{k}@{c}", {}) for k in ("auto", "named", "pool"))
            f = lambda x, k="server_cpu_ms_per_request": f"{x[k]:.1f}" if x.get(k) is not None else "-"  # noqa: E731
            lines.append(f"| {c} | {f(a)} | {f(nm)} | {f(pl)} | {f(a, 'p50_ms')} / {f(a, 'p99_ms')} | {f(nm, 'p50_ms')} | {f(pl, 'p50_ms')} | {a.get('rps', 0):.0f} |")
        lines += ["", "By process (ms per request, idle subtracted):", ""]
        for k, v in cpu["cells"].items():
            lines.append(f"- {k}: " + ", ".join(f"{r} {ms:.2f}" for r, ms in v["cpu_ms_per_request_by_role"].items()))
    cv = report.get("cpu_variants") or {}
    if len(cv) > 1:
        levels = sorted({int(k.split("@")[1]) for v in cv.values() for k in v["cells"]})
        lines += ["", "### App variants, one after the other in this run (server CPU ms per request; p50 ms)", "",
                  "| variant | " + " | ".join(f"{k}@{c}" for c in levels for k in ("auto", "named", "pool")) + " | idle ms/s | load avg |",
                  "|---|" + "---|" * (3 * len(levels) + 2)]
        for name, v in cv.items():
            cells = [v["cells"].get(f"{k}@{c}", {}) for c in levels for k in ("auto", "named", "pool")]
            lines.append(f"| {name} | " + " | ".join(f"{x.get('server_cpu_ms_per_request', float('nan')):.1f} ({x.get('p50_ms', float('nan')):.0f})" for x in cells)
                         + f" | {sum(v['idle_cpu_ms_per_s'].values()):.0f} | {v['loadavg_start'][0]:.1f} |")
    gw = report.get("cpu_gateway")
    if gw:
        levels = sorted({int(k.split("@")[1]) for k in gw["cells"]})
        served = (report.get("cpu") or {}).get("cells", {})
        lines += ["", f"### A second gateway in the same run: LiteLLM {gw.get('version') or ''} proxy, same fake upstream", "",
                  "Its own process tree's CPU per request (idle subtracted), one model group of two deployments, simple shuffle, "
                  "no database; beside it the first cmr variant's cells. CPU ms per request (p50 ms):", "",
                  "| concurrency | LiteLLM | cmr `auto` | cmr named | cmr pool direct | ratio cmr `auto` / LiteLLM |", "|---|---|---|---|---|---|"]
        for c in levels:
            g = gw["cells"].get(f"group@{c}", {})
            a, nm, pl = (served.get(f"{k}@{c}", {}) for k in ("auto", "named", "pool"))
            f = lambda x: f"{x['server_cpu_ms_per_request']:.1f} ({x.get('p50_ms', float('nan')):.0f})" if x.get("server_cpu_ms_per_request") is not None else "-"  # noqa: E731
            ratio = a["server_cpu_ms_per_request"] / g["server_cpu_ms_per_request"] if a.get("server_cpu_ms_per_request") and g.get("server_cpu_ms_per_request") else float("nan")
            lines.append(f"| {c} | {f(g)} | {f(a)} | {f(nm)} | {f(pl)} | {ratio:.2f} |")
    lines += ["", "## Floors", "", "| floor | measured | limit | met |", "|---|---|---|---|"]
    for k, v in report["floors"].items():
        lines.append(f"| {k} | {v['measured']:.3g} | {v['floor']:g} | {'yes' if v['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    _write_atomic(out / "report.md", render_md(report))


class BenchServeError(CMRError):
    """A bad option: one line, exit 2 (``cmr``'s CLI prints CMRError subclasses that way)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m bench.serve`` and ``cmr bench serve``."""
    p.add_argument("--models", type=int, nargs="+", default=[2000, 100_000], help="hub sizes for the decision latency")
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 32])
    p.add_argument("--requests", type=int, default=200, help="requests per end-to-end cell")
    p.add_argument("--decision-requests", type=int, default=600, help="single requests per hub size (batches: the same prompts)")
    p.add_argument("--distinct", type=int, default=1000, help="card texts really embedded per hub (the rest reuse their vectors)")
    p.add_argument("--policy", default="zeroshot", help="policy for the synthetic hubs (no outcomes exist for synthetic models)")
    p.add_argument("--policy-config", type=json.loads, default=None, metavar="JSON",
                   help="decision latency: the policy's options as a JSON object (AppArgs.policy_config)")
    p.add_argument("--retrieve-k", type=int, default=256, help="FAISS pre-selection above this many models (0 = never)")
    p.add_argument("--train-limit", type=int, default=40, help="end-to-end app: knn trained on this many requests per experience")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--encoder", default=None, choices=ENCODER_BACKENDS, help="the router's query encoder (default: AppArgs.encoder)")
    p.add_argument("--encoder-threads", type=int, default=None, help="its intra-op threads (default: AppArgs.encoder_threads)")
    p.add_argument("--encoder-single-threads", type=int, default=None, help="its threads for a lone query (default: AppArgs.encoder_single_threads)")
    p.add_argument("--query-max-tokens", type=int, default=None, help="routed-query truncation (default: AppArgs.query_max_tokens; 256 = none)")
    p.add_argument("--max-batch-size", type=int, default=None, help="end-to-end app: AppArgs.max_batch_size (default: its default)")
    p.add_argument("--batch-wait-s", type=float, default=None, help="end-to-end app: AppArgs.batch_wait_timeout_s")
    p.add_argument("--router-replicas", type=int, default=None, help="end-to-end app: AppArgs.router_replicas")
    p.add_argument("--decision-encoders", nargs="*", default=["onnx-int8:1:2", "onnx:1:1", "torch:1"],
                   help="BACKEND:THREADS[:SINGLE_THREADS] query encoders also measured on each hub (beside --encoder)")
    p.add_argument("--encoder-prompts", type=int, default=160, help="prompts for the encoder-variant comparison (0 = skip it)")
    p.add_argument("--embedding", choices=("minilm", "minilm+tfidf"), default="minilm",
                   help="decision latency: what the router embeds with (AppArgs.embedding; minilm+tfidf: give --decision-encoders nothing)")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--quality", action="store_true", help="also measure the routing quality of the encoder settings (CMRBench; ~10 min)")
    p.add_argument("--proxy", choices=("haproxy", "serve"), default=None,
                   help="end-to-end app's front door: haproxy (Ray Serve's HAProxy, direct ingress) or serve (Serve's Python "
                        "proxy); default haproxy when its binary exists")
    p.add_argument("--cpu-levels", type=int, nargs="*", default=[1, 16, 32],
                   help="concurrencies of the server-CPU cells against the fake upstream (none = skip them)")
    p.add_argument("--cpu-requests", type=int, default=160, help="requests per server-CPU cell")
    p.add_argument("--cpu-variants", nargs="*", choices=tuple(CPU_VARIANTS), default=None,
                   help="app variants measured one after the other by the server-CPU cells (default: served, the app as served)")
    p.add_argument("--compare-litellm", default=None, metavar="COMMAND",
                   help="also run the server-CPU cells against LiteLLM's proxy (its `litellm` command, installed in an environment of its own)")
    p.add_argument("--cpu-only", action="store_true", help="only the server-CPU cells (no encoder, decision or e2e sections)")
    p.add_argument("--out", type=Path, default=None)


def run(a: argparse.Namespace) -> int:
    """Run the benchmark ``a`` asks for; print and write the report."""
    import sys
    from services.config import AppArgs

    served = AppArgs()  # unset encoder flags: what the app serves with by default
    a.encoder = a.encoder or served.encoder
    a.encoder_threads = a.encoder_threads or served.encoder_threads
    if a.encoder_single_threads is None:
        a.encoder_single_threads = served.encoder_single_threads
    if a.query_max_tokens is None:
        a.query_max_tokens = served.query_max_tokens
    from services import proxy as px

    proxy = a.proxy or px.resolve_proxy("auto")
    if proxy == "haproxy" and px.haproxy_problem():
        raise BenchServeError(f"--proxy haproxy: {px.haproxy_problem()} (or --proxy serve)")
    if a.compare_litellm:
        import shutil

        if not shutil.which(a.compare_litellm) or Path(a.compare_litellm).name != "litellm":
            raise BenchServeError(f"--compare-litellm: {a.compare_litellm!r} is not a `litellm` command here "
                                  "(install it in an environment of its own: pip install 'litellm[proxy]')")
        if not a.cpu_levels:
            raise BenchServeError("--compare-litellm: needs --cpu-levels")
    started = datetime.now(timezone.utc)
    out = a.out or Path("runs") / f"serve-{started.strftime('%Y%m%dT%H%M%SZ')}"
    import platform

    report: dict[str, Any] = {"started_utc": started.isoformat(timespec="seconds"),
                              "command": getattr(a, "command_line", None) or "cmr " + " ".join(sys.argv[1:]),
                              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
                              "loadavg_start": list(os.getloadavg()), "decision": []}
    try:
        others = []
        for x in a.decision_encoders:
            b, t, *single = x.split(":")
            if b not in ENCODER_BACKENDS or int(t) < 1 or len(single) > 1 or (single and int(single[0]) < 1):
                raise ValueError
            others.append((b, int(t), int(single[0]) if single else None))
    except ValueError:
        raise BenchServeError("--decision-encoders: each must be BACKEND:THREADS[:SINGLE_THREADS], e.g. onnx-int8:1:2") from None
    if a.cpu_only:
        a.encoder_prompts, a.quality, a.models, a.skip_e2e = 0, False, [], True
    prompts = test_prompts(max(a.decision_requests, 256))
    if a.encoder_prompts:
        report["encoders"] = encoder_variants(prompts[: a.encoder_prompts])
        for k, v in report["encoders"]["variants"].items():
            print(f"encoder {k:<28} single p50 {v['single']['p50_ms']:.1f} p99 {v['single']['p99_ms']:.1f} ms"
                  f"  batch16 p50 {(v['batch16'] or {}).get('p50_ms', float('nan')):.1f} ms  max|diff| {v['max_abs_diff_vs_torch']:.1e}", flush=True)
    if a.quality:
        report["encoder_quality"] = encoder_routing_quality()
        print(json.dumps(report["encoder_quality"]), flush=True)
    with tempfile.TemporaryDirectory(prefix="cmr-bench-serve-") as tmp:
        for n in a.models:
            rk = a.retrieve_k if n > a.retrieve_k * 8 else 0  # small hubs: the policy scores every model
            d = decision_latency(n, prompts[: a.decision_requests], policy=a.policy, retrieve_k=rk, distinct=a.distinct,
                                 home=Path(tmp) / f"dec{n}", encoder=a.encoder, encoder_threads=a.encoder_threads,
                                 encoder_single_threads=a.encoder_single_threads, query_max_tokens=a.query_max_tokens,
                                 other_encoders=others, embedding=a.embedding, policy_config=a.policy_config)
            report["decision"].append(d)
            print(f"decision {n:>7,} models  rk={rk:<4} single p50 {d['single']['p50_ms']:.1f} p99 {d['single']['p99_ms']:.1f} ms"
                  f"  (encode p50 {d['encode_only']['p50_ms']:.1f})  batch16 p50 {(d['batch16'] or {}).get('p50_ms', float('nan')):.1f} ms"
                  f"  setup {d['setup_s']} s", flush=True)
            for k, v in d["variants"].items():
                print(f"    {k:<22} single p50 {v['single']['p50_ms']:.1f} p99 {v['single']['p99_ms']:.1f} ms"
                      f"  (encode CPU p99 {v['encode_only_cpu']['p99_ms']:.1f})", flush=True)
        if not a.skip_e2e:
            app = {"encoder": a.encoder, "encoder_threads": a.encoder_threads, "encoder_single_threads": a.encoder_single_threads,
                   "query_max_tokens": a.query_max_tokens}
            app.update({k: v for k, v in (("max_batch_size", a.max_batch_size), ("batch_wait_timeout_s", a.batch_wait_s),
                                          ("router_replicas", a.router_replicas)) if v is not None})
            report["e2e"] = end_to_end(a.concurrency, a.requests, home=Path(tmp) / "e2e",
                                       train_limit=a.train_limit, max_tokens=a.max_tokens, app=app, proxy=proxy)
        if a.cpu_levels:
            app = {k: v for k, v in (("encoder", a.encoder), ("encoder_threads", a.encoder_threads), ("max_batch_size", a.max_batch_size),
                                     ("batch_wait_timeout_s", a.batch_wait_s), ("router_replicas", a.router_replicas)) if v is not None}
            for i, name in enumerate(a.cpu_variants or ["served"]):
                extra, logging_config = CPU_VARIANTS[name]
                print(f"cpu variant {name}", flush=True)
                res = cpu_per_request(a.cpu_levels, a.cpu_requests, home=Path(tmp) / f"cpu-{name}", train_limit=a.train_limit,
                                      app={**app, **extra}, proxy=proxy, logging_config=logging_config)
                res["variant"] = name
                if i == 0:
                    report["cpu"] = res  # the floors' measure: the first variant
                report.setdefault("cpu_variants", {})[name] = res
            if a.compare_litellm:
                print("cpu gateway litellm", flush=True)
                report["cpu_gateway"] = gateway_cpu_per_request(a.cpu_levels, a.cpu_requests, litellm=a.compare_litellm,
                                                                home=Path(tmp) / "litellm")
    report["loadavg_end"] = list(os.getloadavg())  # the CPU is shared: how busy it was
    report["floors"] = verdicts(report)
    report["wall_s"] = round((datetime.now(timezone.utc) - started).total_seconds(), 1)
    write_report(report, out)
    print(render_md(report))
    print(f"wrote {out}/report.json, report.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    from bench import cli

    return cli("python -m bench.serve", __doc__, add_arguments, run, BenchServeError, "bench_serve", argv)


if __name__ == "__main__":
    raise SystemExit(main())
