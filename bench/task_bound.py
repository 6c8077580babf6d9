"""How far can routing go on an outcome set by the task alone, and what do the prompts add?

    python -m bench.task_bound [--sets routerbench routerdc7] [--embedding minilm] [--model-dir DIR]
                               [--out docs/results/task-bound]

For each set (test split, the benchmark's own metric: AIQ where models cost differently, else
quality), side by side in one run:
- the zero router (each model's train mean) and the per-task prior (each model's train mean
  within the prompt's task; the global mean for a task absent from train);
- the **task ceiling**: the per-task prior computed from the *test* outcomes themselves. No router
  that routes on the task alone can do better on this test split; it is a bound, not a router;
- the **cluster ceilings**: the same within finer regions, each task's test prompts split into 5
  and 20 k-means clusters of their embeddings, each routed by its own outcomes: how far routing by
  where a prompt lies within its task could go with this embedding, fitted on the prompts scored;
- ``knn`` as served (default config; prompts' tasks given, as ``cmr bench llm`` gives them);
- two per-prompt learners over the prompt embedding and the task (one-hot), configuration chosen
  on a validation fifth carved from train, refitted on all of train: a per-model logistic
  regression (linear probe) and kNN over the residuals from the task prior (each neighbour's
  outcome minus its task's mean: what the prompt says beyond its task).

A per-prompt learner above the task ceiling is what a router needs to go beyond task-level
routing; below the per-task prior, the embedding's per-prompt signal is noise at this data size.
``--model-dir`` measures the same with another sentence encoder (a sentence-transformers folder, as
``python -m bench.encoders`` takes; its embeddings go to the shared cache under its folder name).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench import cli


class TaskBoundError(ValueError):
    """A bad option (exit 2, one line)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sets", nargs="+", default=["routerbench", "routerdc7"], help="outcome sets under the data root's routing/")
    p.add_argument("--embedding", default="minilm", choices=("minilm", "minilm+tfidf"))
    p.add_argument("--data-root", type=Path, default=None, help="folder holding routing/ (default: the shared data)")
    p.add_argument("--model-dir", type=Path, default=None, help="a sentence-transformers folder to embed with instead of --embedding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/results/task-bound"))


#: clusters per task of the cluster ceilings: how far routing by where a prompt lies within its task
#: could go, with the outcomes of the very prompts it routes
CLUSTERS = (5, 20)


def task_means(scores: np.ndarray, tasks: Sequence[str], fallback: np.ndarray) -> dict[str, np.ndarray]:
    """Each task's per-model mean known score (a model never known in a task: ``fallback``)."""
    import warnings

    out = {}
    t = np.asarray(tasks)
    for name in dict.fromkeys(tasks):
        with warnings.catch_warnings():  # a model with no known outcome in the task: the fallback
            warnings.simplefilter("ignore", RuntimeWarning)
            m = np.nanmean(scores[t == name], axis=0)
        out[name] = np.where(np.isnan(m), fallback, m)
    return out


def cluster_ceiling(emb: np.ndarray, scores: np.ndarray, tasks: Sequence[str], fallback: np.ndarray, per_task: int, seed: int) -> np.ndarray:
    """Each row's prediction when the rows of every task are split into ``per_task`` k-means
    clusters of their embeddings (fewer where a task has under 20 rows a cluster) and each
    cluster is routed by its own rows' per-model means: fitted on the rows it scores, a bound on
    routing by (task, region of the embedding space), not a router."""
    from sklearn.cluster import KMeans

    out = np.empty_like(scores)
    t = np.asarray(tasks)
    for name in dict.fromkeys(tasks):
        rows = np.flatnonzero(t == name)
        k = max(1, min(per_task, len(rows) // 20))
        lab = KMeans(k, n_init=3, random_state=seed).fit_predict(emb[rows]) if k > 1 else np.zeros(len(rows), int)
        for c in range(k):
            rr = rows[lab == c]
            out[rr] = task_means(scores[rr], [name] * len(rr), fallback)[name]
    return out


def one_hot(tasks: Sequence[str], names: Sequence[str]) -> np.ndarray:
    col = {n: i for i, n in enumerate(names)}
    out = np.zeros((len(tasks), len(names)), np.float32)
    for i, t in enumerate(tasks):
        if t in col:
            out[i, col[t]] = 1.0
    return out


def linear_probe(x: np.ndarray, y: np.ndarray, xq: np.ndarray, weight_decay: float, seed: int, epochs: int = 60) -> np.ndarray:
    """Per-model logistic regression (one linear layer, masked BCE over the known outcomes)."""
    import torch

    torch.manual_seed(seed)
    X, Y = torch.tensor(x), torch.tensor(np.nan_to_num(y))
    M = torch.tensor(~np.isnan(y)).float()
    net = torch.nn.Linear(X.shape[1], Y.shape[1])
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for b in torch.randperm(len(X), generator=g).split(256):
            opt.zero_grad()
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(net(X[b]), Y[b], reduction="none") * M[b]).sum() / M[b].sum().clamp(min=1)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return torch.sigmoid(net(torch.tensor(xq))).numpy().astype(np.float64)


def residual_knn(emb: np.ndarray, resid: np.ndarray, q: np.ndarray, base: np.ndarray, k: int, shrinkage: float) -> np.ndarray:
    """``base`` plus the similarity-weighted mean residual of the ``k`` nearest rows, shrunk by
    ``shrinkage`` pseudo-weight (as a fraction of the neighbourhood's weight)."""
    import faiss

    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(np.ascontiguousarray(emb, dtype=np.float32))
    sims, idx = index.search(np.ascontiguousarray(q, dtype=np.float32), min(k, len(emb)))
    w = np.exp((sims - sims.max(axis=1, keepdims=True)) / 0.05)[..., None]
    r = resid[idx]
    known = ~np.isnan(r)
    num = (w * np.nan_to_num(r)).sum(axis=1)
    den = (w * known).sum(axis=1)
    return base + num / (den + shrinkage * w.sum(axis=1))


def figure(data, pred: np.ndarray) -> float:
    """The benchmark's figure of ``pred`` on ``data.test`` (``cmr bench llm``'s evaluation)."""
    from cmr.bench import llm_protocol

    class Fixed:  # the evaluation takes a policy: one that returns these scores
        name = "fixed"

        def score(self, q, cards, tasks=None):
            return pred

    return float(llm_protocol.evaluate(Fixed(), data)["aiq"])


def measure(name: str, root: Path, embedding: str, seed: int, model_dir: Path | None = None) -> dict[str, Any]:
    from cmr.bench import common, llm_protocol
    from cmr.data.outcomes import load_outcomes
    from cmr.policies import make_policy

    data = load_outcomes(root)
    tr, te = data.train, data.test
    ttr, tte = list(tr.meta.get("task") or [""] * len(tr)), list(te.meta.get("task") or [""] * len(te))
    if model_dir is not None:
        from bench.encoders import PackagedSentenceEncoder
        from cmr import constants
        from cmr.encoders import CachedEncoder, EmbeddingCache

        encoder = CachedEncoder(PackagedSentenceEncoder(str(model_dir), model_dir.name, threads=None), EmbeddingCache(constants.cache_dir() / "embeddings.sqlite"))
    else:
        encoder = common.fitted_encoder(argparse.Namespace(embedding=embedding), tr.texts, data.cards, labelled=False)
    common.embed(encoder, [tr, te])
    s_tr, s_te = tr.scores.astype(np.float64), te.scores.astype(np.float64)
    glob = np.nanmean(s_tr, axis=0)
    res: dict[str, Any] = {"n_train": len(tr), "n_test": len(te), "n_models": len(data.cards),
                           "test_tasks_absent_from_train": int(sum(t not in set(ttr) for t in tte))}
    res["zero router"] = figure(data, np.tile(glob, (len(te), 1)))
    prior = task_means(s_tr, ttr, glob)
    base_te = np.stack([prior.get(t, glob) for t in tte])
    res["per-task prior"] = figure(data, base_te)
    truth = task_means(s_te, tte, glob)
    res["task ceiling (test means)"] = figure(data, np.stack([truth[t] for t in tte]))
    for c in CLUSTERS:
        res[f"cluster ceiling (test means, {c} clusters a task)"] = figure(data, cluster_ceiling(te.emb, s_te, tte, glob, c, seed))
    knn = make_policy("knn", encoder=encoder, config={"seed": seed})
    common.embed_cards(knn, data.cards)
    llm_protocol.train_policy(knn, data, 0.0, None, seed)
    res["knn (served default)"] = float(llm_protocol.evaluate(knn, data)["aiq"])

    # per-prompt learners: configuration chosen on a validation fifth of train, then refitted
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(tr))
    val, fit = perm[: len(tr) // 5], perm[len(tr) // 5 :]
    sub = data.__class__(root=data.root, name=data.name, cards=data.cards, train=tr.subset(fit), test=tr.subset(val), has_cost=data.has_cost)
    names = sorted(set(ttr))
    feats = lambda e, ts: np.concatenate([np.asarray(e, np.float32), one_hot(ts, names)], axis=1)  # noqa: E731
    x_tr, x_te = feats(tr.emb, ttr), feats(te.emb, tte)
    sub_prior = task_means(s_tr[fit], [ttr[i] for i in fit], np.nanmean(s_tr[fit], axis=0))
    choices: dict[str, Any] = {}
    wds = (1e-4, 1e-3, 1e-2, 1e-1)
    v = [figure(sub, linear_probe(x_tr[fit], s_tr[fit], x_tr[val], wd, seed)) for wd in wds]
    choices["linear probe weight_decay"] = wds[int(np.argmax(v))]
    res["linear probe (embedding + task)"] = figure(data, linear_probe(x_tr, s_tr, x_te, choices["linear probe weight_decay"], seed))
    grid = [(k, a) for k in (20, 100) for a in (0.3, 1.0, 3.0, 10.0)]
    base_fit = np.stack([sub_prior.get(ttr[i], glob) for i in fit])
    base_val = np.stack([sub_prior.get(ttr[i], glob) for i in val])
    v = [figure(sub, residual_knn(tr.emb[fit], s_tr[fit] - base_fit, tr.emb[val], base_val, k, a)) for k, a in grid]
    k, a = grid[int(np.argmax(v))]
    choices["residual knn (k, shrinkage)"] = [k, a]
    base_tr = np.stack([prior[t] for t in ttr])
    res["residual knn (task prior + neighbours' residuals)"] = figure(data, residual_knn(tr.emb, s_tr - base_tr, te.emb, base_te, k, a))
    res["chosen on validation"] = choices
    res["metric"] = "AIQ" if data.has_cost else "quality (equal costs)"
    return res


def run(a: argparse.Namespace) -> int:
    from cmr import constants
    from cmr.bench import common

    root = a.data_root or constants.data_root()
    roots = {s: Path(root) / "routing" / s for s in a.sets}
    missing = [s for s, r in roots.items() if not r.is_dir()]
    if missing:
        raise TaskBoundError(f"--sets: no outcome set {', '.join(missing)} under {Path(root) / 'routing'}")
    if a.model_dir is not None and not (a.model_dir / "modules.json").is_file():
        raise TaskBoundError(f"--model-dir {a.model_dir}: not a sentence-transformers folder (no modules.json)")
    rows = {}
    for s, r in roots.items():
        rows[s] = measure(s, r, a.embedding, a.seed, a.model_dir)
        print(s, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[s].items()}, flush=True)
    enc = a.model_dir.name if a.model_dir is not None else a.embedding
    rep = {"command": a.command_line, "embedding": enc, "seed": a.seed, "sets": rows, "info": common.run_info()}
    common.write_json(a.out / "report.json", rep)
    keys = [k for k, v in next(iter(rows.values())).items() if isinstance(v, float)]
    md = ["# Task-level routing and its ceiling", "", f"`{a.command_line}` — {rep['info']['date']}, commit {rep['info']['git_commit']}", "",
          f"Embedding `{enc}`. Test split of each set; AIQ where models cost differently, else quality. The task ceiling uses the test outcomes (a bound, not a router).", "",
          "| router | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for k in keys:
        md.append(f"| {k} | " + " | ".join(f"{rows[s][k]:.4f}" for s in rows) + " |")
    md += ["", "Chosen on validation carved from train: " + "; ".join(f"{s}: {rows[s]['chosen on validation']}" for s in rows),
           "", "Test prompts whose task is absent from train: " + ", ".join(f"{s} {rows[s]['test_tasks_absent_from_train']} of {rows[s]['n_test']}" for s in rows)]
    common.write_text(a.out / "report.md", "\n".join(md) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli("python -m bench.task_bound", __doc__, add_arguments, run, TaskBoundError, "bench_task_bound", argv)


if __name__ == "__main__":
    raise SystemExit(main())
