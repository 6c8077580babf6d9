"""Continual routing over an evolving hub (CMRBench protocol): accuracy matrices and forgetting.

For each experience k in order: ``policy.add_models(cards entering at k)``, then learn from the
train split of k through the served learner's code (:class:`cmr.continual.learner.Learner`) —
``Learner.fit`` (``--feedback full``) or, with ``--feedback partial``, by routing the train
requests in batches and telling the learner only whether each choice was right
(``Learner.consume``) — then route the test requests of experiences 1..k among the cards with
``experience <= k`` (``cmr.decide.choose`` at λ = 0) and score M-Acc (chosen model is the
target), F-Acc (same family) and D-Acc (same domain), as ``metrics.routing_hits`` defines them.
``--validation`` scores held-out parts of the train splits instead (``validation_split``), for
choices that must not see test; ``evaluate``'s ``on_experience`` callback is how ``cmr tune``
reports each experience.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from dataclasses import replace
from typing import Any, Callable

from cmr.bench import common

METRICS = (("m", "M-Acc"), ("f", "F-Acc"), ("d", "D-Acc"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cmr bench cmr``."""
    common.add_common_arguments(parser)
    common.add_embedding_argument(parser)
    parser.add_argument(
        "--feedback",
        choices=("full", "partial"),
        default="full",
        help="full: fit on the labelled train split; partial: route it in batches, learn from the chosen model's reward only",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="requests per feedback batch (--feedback partial)")
    parser.add_argument("--eval-batch", type=int, default=1024, help="test requests scored per policy call")
    parser.add_argument("--validation", type=float, default=None, metavar="FRACTION",
                        help="score a seeded FRACTION of each train split held out (training on the rest) instead of the test splits: for choices")
    parser.add_argument("--per-model", action="store_true", help="--validation holds out one row per model with >= 2 rows (up to FRACTION)")


def _route(policy, q, cards, costs, eval_batch: int):
    """Chosen candidate per query (λ = 0), scoring ``eval_batch`` queries per policy call."""
    import numpy as np

    from cmr.decide import choose

    out = []
    for i in range(0, len(q), eval_batch):
        s = common.check_scores(policy.score(q[i : i + eval_batch], cards), len(q[i : i + eval_batch]), len(cards), policy.name)
        out.append(choose(s, costs, 0.0))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _stream_partial(learner, train, cards, costs, k: int, batch: int, seed: int) -> dict[str, float]:
    """Route the train requests in seeded random order, ``batch`` at a time; after each batch the
    learner hears only the chosen model's reward (1 if it was the target, else 0)."""
    import numpy as np

    from cmr.types import FeedbackEvent

    policy = learner.policy
    order = np.random.default_rng(seed + 1000 * k).permutation(len(train))
    ids = [c.id for c in cards]
    hits = 0
    for start in common.progress(range(0, len(order), batch), desc=f"e{k} feedback", unit="batch"):
        b = train.subset(order[start : start + batch])
        common.reveal_if_needed(policy, b)
        ch = _route(policy, b.emb, cards, costs, len(b))
        target = [b.model_ids[j] for j in b.labels]
        events = []
        for i, j in enumerate(ch):  # one event per request of this batch (≤ batch size)
            r = 1.0 if ids[j] == target[i] else 0.0
            hits += int(r)
            events.append(
                FeedbackEvent(
                    request_id=f"e{k}-train-{order[start + i]}",
                    model=ids[j],
                    reward=r,
                    query=b.texts[i],
                    embedding=b.emb[i].tolist(),
                    cost=float(costs[j]),
                )
            )
        learner.consume(events)
    return {"online_reward": hits / max(1, len(order))}


def validation_split(bench, fraction: float, seed: int = 0, per_model: bool = False):
    """A copy of ``bench`` whose experiences are (train minus validation, validation), so choices
    are made without the test splits. One seeded permutation per train split (in order) picks the
    validation rows: its first ``fraction`` (``per_model=False``) or, along it, one row of each model
    with at least two rows, up to ``fraction`` of the split (every held-out target then keeps a
    training row, as on test)."""
    import numpy as np

    from cmr.data.cmrbench import Experience

    if not 0.0 < fraction < 1.0:
        raise common.BenchConfigError(f"validation fraction {fraction}: must be in (0, 1)")
    rng = np.random.default_rng(seed)
    exps = []
    for e in bench.experiences:
        n, perm = len(e.train), rng.permutation(len(e.train))
        if per_model:
            counts, seen, val = np.bincount(e.train.labels, minlength=len(e.train.model_ids)), set(), []
            for i in perm:
                lab = e.train.labels[i]
                if counts[lab] >= 2 and lab not in seen and len(val) < int(fraction * n):
                    seen.add(lab)
                    val.append(i)
        else:
            val = perm[: max(1, int(round(fraction * n)))]
        mask = np.zeros(n, dtype=bool)
        mask[val] = True
        if mask.all():
            raise common.BenchConfigError(f"validation fraction {fraction}: leaves no training rows in experience {e.k} ({n} rows)")
        exps.append(Experience(e.k, e.train.subset(~mask), e.train.subset(mask)))
    return replace(bench, experiences=exps)


def evaluate(bench, policy, feedback: str = "full", batch_size: int = 64, eval_batch: int = 1024, seed: int = 0,
             on_experience: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the continual protocol on an embedded ``CMRBench`` (its ``test`` parts are scored: pass
    :func:`validation_split`'s copy to score validation parts); returns the report's metrics part.

    Every card is embedded up front (:func:`common.embed_cards`, reported as ``encode_s``), so
    ``train_s`` is the learning alone. ``on_experience(summary)`` is called after each experience
    with ``experience``, ``final`` and ``forgetting`` over the test sets seen so far, and cumulative
    ``train_s`` (Tune reports it; an exception it raises stops the run)."""
    import numpy as np

    from cmr.bench import metrics
    from cmr.continual.learner import Learner
    from cmr.encoders.tuned import is_tuned

    encode_s = common.embed_cards(policy, bench.cards)
    learner = Learner(policy)
    exps = bench.experiences
    K = len(exps)
    mats = {m: np.full((K, K), np.nan) for m, _ in METRICS}
    timings: list[dict[str, float]] = []
    online: list[dict[str, float]] = []
    n_models: list[int] = []
    tuned_emb: dict[int, tuple[str, Any]] = {}
    for ki, exp in enumerate(common.progress(exps, desc="experiences", unit="exp")):
        live = bench.cards_upto(exp.k)
        costs = np.array([c.cost for c in live], dtype=np.float64)
        n_models.append(len(live))
        t0 = time.perf_counter()
        policy.add_models(bench.cards_of(exp.k))
        if feedback == "full":
            learner.fit(exp.train, live)
        else:
            online.append({"experience": exp.k, **_stream_partial(learner, exp.train, live, costs, exp.k, batch_size, seed)})
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        enc = getattr(policy, "encoder", None)
        for ji in range(ki + 1):
            test = exps[ji].test
            common.reveal_if_needed(policy, test)
            q = test.emb
            if is_tuned(enc):
                # a policy that tunes its encoder (carve's encoder_epochs) is scored as it would route:
                # the requests through its current encoder (never written back into the benchmark)
                if tuned_emb.get(ji, (None,))[0] != enc.name:
                    tuned_emb[ji] = (enc.name, enc.encode(test.texts))
                q = tuned_emb[ji][1]
            for m, v in metrics.accuracies(_route(policy, q, live, costs, eval_batch), live, test).items():
                mats[m][ki, ji] = v
        timings.append({"experience": exp.k, "train_s": t_train, "eval_s": time.perf_counter() - t0})
        if on_experience is not None:
            on_experience({"experience": exp.k, **metrics.continual_summary({m: a[: ki + 1, : ki + 1] for m, a in mats.items()}),
                           "train_s": sum(t["train_s"] for t in timings)})
    out: dict[str, Any] = {
        **metrics.continual_summary(mats),
        "matrix": {m: metrics.matrix_to_json(mats[m]) for m, _ in METRICS},
        "experiences": [e.k for e in exps],
        "n_models": n_models,
        "n_test": [len(e.test) for e in exps],
        "n_train": [len(e.train) for e in exps],
        "timings": {"encode_s": encode_s, "per_experience": timings, "train_total_s": sum(t["train_s"] for t in timings), "eval_total_s": sum(t["eval_s"] for t in timings)},
    }
    if online:
        out["online"] = online
    return out


def _markdown(rep: dict[str, Any]) -> str:
    exps = rep["experiences"]
    lines = [
        f"# cmr bench cmr — {rep['policy']} on {rep['dataset']}",
        "",
        f"feedback: {rep['feedback']}, scored on {'test' if rep['split'] == 'test' else 'validation'}, seed {rep['seed']}, {rep['date']}, {rep['machine']['cpus']} CPU(s), commit {rep['git_commit'] or '—'}",
        "",
        "| policy | M-Acc | F-Acc | D-Acc | forgetting M | forgetting F | forgetting D | train s | card encoding s |",
        "|---|---|---|---|---|---|---|---|---|",
        "| {} | {} | {} | {} | {} | {} | {} | {:.1f} | {:.1f} |".format(
            rep["policy"],
            *(common.fmt(rep["final"][f"{m}_acc"]) for m, _ in METRICS),
            *(common.fmt(rep["forgetting"][m]) for m, _ in METRICS),
            rep["timings"]["train_total_s"],
            rep["timings"]["encode_s"],
        ),
        "",
    ]
    for m, name in METRICS:
        lines += [f"## {name} matrix (row: after experience, column: test set)", ""]
        lines.append("| after \\ test | " + " | ".join(f"e{e}" for e in exps) + " |")
        lines.append("|---" * (len(exps) + 1) + "|")
        for e, row in zip(exps, rep["matrix"][m]):
            lines.append(f"| e{e} | " + " | ".join(common.fmt(x) for x in row) + " |")
        lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``cmr bench cmr``: load, embed, run the protocol, write report.json / report.md / matrix.png."""
    import numpy as np

    from cmr.bench import plots
    from cmr.data.cmrbench import load_cmrbench

    if args.batch_size < 1 or args.eval_batch < 1:
        raise common.BenchConfigError("--batch-size/--eval-batch: must be >= 1")
    root = common.resolve_cmrbench_dir(args.data)
    bench = load_cmrbench(root)
    cls, config = common.policy_spec(args)  # fail fast on a bad policy name or option
    if args.validation is not None:
        bench = validation_split(bench, args.validation, args.seed, args.per_model)
    # labels unused: the lexical part (if any) is fitted on every train split's prompts and the hub's
    # cards, as the router's first start, which trains on all experiences, does
    from cmr.encoders.lexical import embedding_of

    encoder = common.fitted_encoder(args, [t for e in bench.experiences for t in e.train.texts], bench.cards)
    common.embed(encoder, [p for e in bench.experiences for p in (e.train, e.test)])
    policy = cls(encoder=encoder, config=config)
    tag = "-".join(t for t in ("" if args.feedback == "full" else "partial", "" if args.validation is None else "validation",
                               "" if args.embedding == "minilm" else args.embedding.replace("+", "-")) if t)
    out = common.out_dir(args.out, "cmr", root.name, args.policy, tag)

    t0 = time.perf_counter()
    res = evaluate(bench, policy, args.feedback, args.batch_size, args.eval_batch, args.seed)
    rep: dict[str, Any] = {
        "protocol": "cmr",
        "policy": args.policy,
        "data": str(root),
        "dataset": root.name,
        "feedback": args.feedback,
        "split": "test" if args.validation is None else {"validation": args.validation, "per_model": args.per_model},
        "seed": args.seed,
        "config": policy.config.to_dict(),
        "embedding": args.embedding,
        "embedding_used": embedding_of(encoder),  # what `auto` resolved to
        "encoder": encoder.name,
        "choice": policy.describe(),
        **res,
        "wall_s": time.perf_counter() - t0,
        **common.run_info(),
    }
    common.write_json(out / "report.json", rep)
    common.write_text(out / "report.md", _markdown(rep))
    fig = plots.accuracy_heatmaps(
        {name: np.array(rep["matrix"][m], dtype=np.float64) for m, name in METRICS},
        [f"e{e}" for e in rep["experiences"]],
        f"{args.policy} on {root.name} ({args.feedback} feedback)",
    )
    common.write_figure(out / "matrix.png", fig)
    f = rep["final"]
    print(
        f"{args.policy} on {root.name} ({args.feedback} feedback): "
        f"M-Acc {f['m_acc']:.3f}  F-Acc {f['f_acc']:.3f}  D-Acc {f['d_acc']:.3f}  "
        f"forgetting M {rep['forgetting']['m']:.3f}  train {rep['timings']['train_total_s']:.1f}s  "
        f"card encoding {rep['timings']['encode_s']:.1f}s"
    )
    if rep["choice"]:
        print(common.choice_line(rep["choice"]))
    print(f"report: {Path(out) / 'report.json'}", file=sys.stdout)
    return 0
