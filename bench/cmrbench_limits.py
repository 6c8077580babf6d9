"""What limits CMRBench routing quality: label consistency, data, encoder (issue 3's floors).

    python -m bench.cmrbench_limits [--data DIR] [--out docs/results/limits] [--parts a,b,c,d]

Four experiments, written to ``OUT/report.json`` and ``OUT/report.md`` (temp file + rename):

a. **Label consistency.** Exact (normalised) text duplicates and near-duplicates in MiniLM space
   (cosine ≥ 0.99 / 0.95 / 0.90) within train, between test and train, and within test: how often
   do they name a different target model / domain? Test rows that are near-identical (cosine ≥ t,
   linked into groups) yet carry different labels bound the accuracy of any router that answers
   near-identical queries alike: per group at most its most frequent label can be right. Plus
   how many hub models have a near-identical card to a test target's ("twins": nothing in the
   card tells them apart).
b. **Learning curve.** ``carve`` (joint training, the upper reference, and the default continual
   method) on 10 / 25 / 50 / 100 % of each train split (seeded subsamples), reported on the test
   splits through the same protocol as ``cmr bench cmr``. A steep rise at 100 % means data-limited.
c. **Encoder capacity, within the train splits only.** 5-fold cross-validation over the union
   of the four train splits of probes on three views of the query: frozen MiniLM, TF-IDF (word
   1–2-grams + char 3–5-grams, fitted on the fold's training part) and both. Domain: multinomial
   logistic regression (L2 from a small grid, chosen on the folds). Model: nearest centroid of
   (card text + the fold's training prompts of the model), and the same restricted to the
   predicted domain. Model accuracy counts held-out rows whose model still has a training row
   in the fold (as on test, where every target has training rows).
d. **Where carve's domain errors go** on the test splits (after e4, joint reference): the most
   confused domain pairs, and the share of errors that stay within the same modality
   ("Natural Language Processing …", "Computer Vision …").

Nothing here selects a configuration on test: (b) and (d) only report; (c) never reads test.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from cmr import constants
from cmr.bench import common
from cmr.continual.learner import Learner
from cmr.data import Examples, load_cmrbench
from cmr.data.cmrbench import CMRBench, Experience
from cmr.encoders import default_encoder

THRESHOLDS = (0.99, 0.95, 0.90)
# CMRBench domain labels that name the same Hugging Face pipeline task twice (APIBench and
# HuggingBench file some tasks under different modalities, or with and without a suffix)
DOMAIN_ALIASES = (
    ("Audio Classification", "Audio Audio Classification"),
    ("Multimodal Document Question Answer", "Multimodal Document Question Answering"),
    ("Computer Vision Text-to-Image", "Multimodal Text-to-Image"),
    ("Computer Vision Text-to-Video", "Multimodal Text-to-Video"),
    ("Computer Vision Image-to-Text", "Multimodal Image-to-Text"),
    ("Computer Vision Zero-Shot Image Classification", "Multimodal Zero-Shot Image Classification"),
    ("Natural Language Processing Feature Extraction", "Multimodal Feature Extraction"),
    ("Reinforcement Learning", "Reinforcement Learning Reinforcement Learning"),
)


def _norm_text(t: str) -> str:
    return re.sub(r"\s+", " ", t.strip().lower())


def _labels(ex: Examples):
    """Target model, domain and family per row (numpy object arrays)."""
    model = np.array([ex.model_ids[i] for i in ex.labels], dtype=object)
    dom = np.array(ex.meta.get("domain", [None] * len(ex)), dtype=object)
    fam = np.array(ex.meta.get("family", [None] * len(ex)), dtype=object)
    return model, dom, fam


def _groups(sim: np.ndarray, t: float) -> np.ndarray:
    """Connected components of the graph ``sim >= t`` (square, symmetric): a group id per row."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    a = sim >= t
    np.fill_diagonal(a, False)
    return connected_components(csr_matrix(a), directed=False)[1]


def _ceiling(groups: np.ndarray, labels: np.ndarray) -> float:
    """Best accuracy of one answer per group: each group's most frequent label."""
    best = 0
    for g in np.unique(groups):
        best += Counter(labels[groups == g].tolist()).most_common(1)[0][1]
    return best / len(labels)


def _pair_stats(sim: np.ndarray, la, lb, same_set: bool) -> list[dict]:
    """For every threshold: the pairs (a, b) with cosine ≥ t and how often their labels agree."""
    out = []
    iu = np.triu_indices(sim.shape[0], 1) if same_set else None
    for t in THRESHOLDS:
        if same_set:
            m = sim[iu] >= t
            ia, ib = iu[0][m], iu[1][m]
        else:
            ia, ib = np.nonzero(sim >= t)
        row = {"threshold": t, "pairs": int(len(ia))}
        for name, (xa, xb) in zip(("model", "domain", "family"), zip(la, lb)):
            row[f"same_{name}"] = float(np.mean(xa[ia] == xb[ib])) if len(ia) else None
        out.append(row)
    return out


def _nn_stats(sim: np.ndarray, la, lb) -> list[dict]:
    """Each row of ``sim``'s nearest column, bucketed by its cosine: does it carry the same labels?"""
    nn = sim.argmax(1)
    top = sim[np.arange(len(sim)), nn]
    out = []
    for lo, hi in ((0.99, 1.01), (0.95, 0.99), (0.90, 0.95), (0.80, 0.90), (-1.0, 0.80), (-1.0, 1.01)):
        m = (top >= lo) & (top < hi)
        row = {"cos_from": lo, "cos_to": min(hi, 1.0), "rows": int(m.sum()), "share": float(m.mean())}
        for name, (xa, xb) in zip(("model", "domain", "family"), zip(la, lb)):
            row[f"same_{name}"] = float(np.mean(xa[m] == xb[nn[m]])) if m.any() else None
        out.append(row)
    return out


# ----------------------------------------------------------------------------------- part a
def part_a(bench: CMRBench, enc) -> dict:
    train = Examples.concat([e.train for e in bench.experiences])
    test = Examples.concat([e.test for e in bench.experiences])
    ltr, lte = _labels(train), _labels(test)
    res: dict = {"n_train": len(train), "n_test": len(test)}

    # exact duplicates after lower-casing and collapsing white space
    def dups(texts_a, la, texts_b=None, lb=None):
        pos: dict[str, list[int]] = {}
        for i, t in enumerate(texts_a):
            pos.setdefault(_norm_text(t), []).append(i)
        pairs = []
        if texts_b is None:
            for v in pos.values():
                pairs += [(i, j) for x, i in enumerate(v) for j in v[x + 1 :]]
            lb = la
        else:
            for j, t in enumerate(texts_b):
                pairs += [(i, j) for i in pos.get(_norm_text(t), [])]
        r = {"pairs": len(pairs)}
        for name, xa, xb in zip(("model", "domain"), la[:2], lb[:2]):
            r[f"differ_{name}"] = int(sum(xa[i] != xb[j] for i, j in pairs))
        return r

    res["exact_duplicates"] = {
        "within_train": dups(train.texts, ltr),
        "test_vs_train": dups(train.texts, ltr, test.texts, lte),
        "within_test": dups(test.texts, lte),
    }
    s_tt = train.emb @ train.emb.T
    s_et = test.emb @ train.emb.T
    s_ee = test.emb @ test.emb.T
    res["near_pairs"] = {
        "within_train": _pair_stats(s_tt, ltr, ltr, True),
        "test_vs_train": _pair_stats(s_et, lte, ltr, False),
        "within_test": _pair_stats(s_ee, lte, lte, True),
    }
    np.fill_diagonal(s_tt, -np.inf)
    res["nearest_train_of_test"] = _nn_stats(s_et, lte, ltr)
    res["nearest_other_train_of_train"] = _nn_stats(s_tt, ltr, ltr)
    # ceilings: near-identical test queries answered alike
    ceil = []
    for t in THRESHOLDS:
        g = _groups(s_ee, t)
        sizes = np.bincount(g)
        ceil.append({"threshold": t, "groups": int(len(sizes)), "rows_in_multi_groups": int(sizes[g].__ge__(2).sum()),
                     "largest_group": int(sizes.max()), "m_ceiling": _ceiling(g, lte[0]), "d_ceiling": _ceiling(g, lte[1])})
    res["test_group_ceiling"] = ceil
    # twins: hub models whose card text embeds (almost) like the target's card
    cards = bench.cards
    doc = enc.encode([c.text() for c in cards])
    row = {c.id: i for i, c in enumerate(cards)}
    cdom = np.array([c.domain for c in cards], dtype=object)
    tgt = np.array([row[m] for m in lte[0]])
    cs = doc[tgt] @ doc.T
    cs[np.arange(len(tgt)), tgt] = -np.inf
    twins = {}
    for t in (0.99, 0.95, 0.90):
        n = (cs >= t).sum(1)
        twins[str(t)] = {"share_with_twin": float((n > 0).mean()), "mean_twins": float(n.mean()),
                         "uniform_pick_m": float(np.mean(1.0 / (1 + n)))}
    same_dom = np.array([(cdom == d).sum() - 1 for d in cdom[tgt]])
    res["card_twins_of_test_targets"] = twins
    res["same_domain_models_per_test_target"] = {"median": float(np.median(same_dom)), "mean": float(same_dom.mean())}
    per_model = Counter(lte[0].tolist())
    res["train_rows_per_target_model"] = dict(sorted(Counter(Counter(ltr[0].tolist()).values()).items()))
    res["n_domains"] = int(len(set(cdom.tolist())))
    res["n_test_targets"] = len(per_model)
    return res


# ----------------------------------------------------------------------------------- part b
def subsample(bench: CMRBench, frac: float, seed: int) -> CMRBench:
    """``bench`` with a seeded ``frac`` of each experience's train rows (at least one), test and cards whole."""
    rng = np.random.default_rng(seed)
    exps = []
    for e in bench.experiences:
        n = max(1, int(round(frac * len(e.train))))
        idx = np.sort(rng.permutation(len(e.train))[:n])
        exps.append(Experience(e.k, e.train.subset(idx), e.test))
    return CMRBench(bench.root, bench.cards, exps)


def _run_protocol(bench, enc, config: dict) -> dict:
    from cmr.bench.cmr_protocol import evaluate
    from cmr.policies import make_policy

    pol = make_policy("carve", encoder=enc, config=config)
    t0 = time.perf_counter()
    out = evaluate(bench, pol)
    return {**out["final"], "forgetting": out["forgetting"], "train_s": out["timings"]["train_total_s"],
            "wall_s": time.perf_counter() - t0}


def part_b(bench: CMRBench, enc, fractions, seeds) -> dict:
    rows = []
    for variant, cfg in (("joint", {"joint": True}), ("continual (default)", {})):
        for frac in fractions:
            for seed in (seeds if frac < 1.0 else [seeds[0]]):
                sub = subsample(bench, frac, seed) if frac < 1.0 else bench
                r = _run_protocol(sub, enc, cfg)
                r.update(variant=variant, fraction=frac, seed=seed, n_train=sum(len(e.train) for e in sub.experiences))
                print(f"  learning curve {variant} {frac:.2f} seed {seed}: M {r['m_acc']:.3f} D {r['d_acc']:.3f}", flush=True)
                rows.append(r)
    summary = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for frac in fractions:
            sel = [r for r in rows if r["variant"] == variant and r["fraction"] == frac]
            summary.append({"variant": variant, "fraction": frac, "n_train": int(np.mean([r["n_train"] for r in sel])),
                            **{m: float(np.mean([r[m] for r in sel])) for m in ("m_acc", "f_acc", "d_acc")}, "runs": len(sel)})
    # log-linear fit of accuracy vs data size (points per doubling) on the joint curve
    fit = {}
    for m in ("m_acc", "d_acc"):
        pts = [(np.log2(s["n_train"]), s[m]) for s in summary if s["variant"] == "joint"]
        x, y = np.array(pts).T
        slope, icpt = np.polyfit(x, y, 1)
        last2 = [s[m] for s in summary if s["variant"] == "joint"][-2:]
        fit[m] = {"points_per_doubling_fit": float(slope * 100), "points_last_doubling": float((last2[1] - last2[0]) * 100)}
    return {"runs": rows, "summary": summary, "per_doubling": fit}


# ----------------------------------------------------------------------------------- part c
def _tfidf():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import FeatureUnion

    return FeatureUnion([
        ("word", TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=50_000)),
        ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), min_df=3, sublinear_tf=True, max_features=30_000)),
    ])


def _rownorm(x):
    from sklearn.preprocessing import normalize

    return normalize(x)


def _softmax_probe(xtr, ytr, xho, n_classes: int, l2: float, steps: int = 200) -> np.ndarray:
    """Multinomial logistic regression (full-batch Adam on ``mean CE + l2·|W|²``) on dense or
    scipy-sparse features; the predicted class of each held-out row. Gradients by hand with
    scipy/numpy: sklearn's solvers and torch's sparse backward took minutes per fit here."""
    n = xtr.shape[0]
    W = np.zeros((xtr.shape[1], n_classes), np.float32)
    c = np.zeros(n_classes, np.float32)
    Y = np.zeros((n, n_classes), np.float32)
    Y[np.arange(n), ytr] = 1.0
    xt = xtr.T.tocsr() if hasattr(xtr, "tocsr") else np.ascontiguousarray(xtr.T)
    mW, vW, mc, vc = np.zeros_like(W), np.zeros_like(W), np.zeros_like(c), np.zeros_like(c)
    lr, b1, b2 = 0.05, 0.9, 0.999
    for t in range(1, steps + 1):
        z = np.asarray(xtr @ W) + c
        z -= z.max(1, keepdims=True)
        P = np.exp(z)
        P /= P.sum(1, keepdims=True)
        G = (P - Y) / n
        gW = np.asarray(xt @ G) + 2 * l2 * W
        gc = G.sum(0)
        for prm, g, m, v in ((W, gW, mW, vW), (c, gc, mc, vc)):
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            prm -= lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + 1e-8)
    return (np.asarray(xho @ W) + c).argmax(1)


def part_c(bench: CMRBench, enc, folds: int, seed: int) -> dict:
    import scipy.sparse as sp
    from sklearn.model_selection import KFold

    train = Examples.concat([e.train for e in bench.experiences])
    model, dom, _ = _labels(train)
    cards = bench.cards
    cid = {c.id: i for i, c in enumerate(cards)}
    cdom = np.array([c.domain for c in cards], dtype=object)
    ctext = [c.text() for c in cards]
    cemb = enc.encode(ctext)
    y_model = np.array([cid[m] for m in model])
    doms = sorted(set(cdom.tolist()) | set(dom.tolist()), key=str)
    drow = {d: i for i, d in enumerate(doms)}
    y_dom = np.array([drow[d] for d in dom])
    card_dom = np.array([drow[d] for d in cdom])
    texts = np.array(train.texts, dtype=object)
    C_GRID = (1e-5, 1e-4)  # L2 strengths of the domain probe
    views = ("minilm", "tfidf", "minilm+tfidf")
    acc = {v: {"domain_lr": {c: [] for c in C_GRID}, "model_centroid": [], "model_centroid_in_domain": [],
               "domain_centroid": []} for v in views}
    kf = KFold(n_splits=folds, shuffle=True, random_state=seed)
    for f, (fi, hi) in enumerate(kf.split(texts)):
        t0 = time.time()
        vec = _tfidf().fit(list(texts[fi]) + ctext)
        tf_tr, tf_ho, tf_c = (_rownorm(vec.transform(x)) for x in (list(texts[fi]), list(texts[hi]), ctext))
        feats = {
            "minilm": (train.emb[fi], train.emb[hi], cemb),
            "tfidf": (tf_tr, tf_ho, tf_c),
        }
        # both views, each unit-norm, so a cosine over the concatenation is the mean of the two
        feats["minilm+tfidf"] = tuple(_rownorm(sp.hstack([sp.csr_matrix(a), b]).tocsr()) for a, b in zip(feats["minilm"], feats["tfidf"]))
        seen = np.isin(y_model[hi], y_model[fi])
        for v in views:
            xtr, xho, xc = feats[v]
            # model centroids: card + the fold's training prompts of each model
            cent = sp.csr_matrix(xc) if not sp.issparse(xc) else xc
            add = sp.csr_matrix((np.ones(len(fi)), (y_model[fi], np.arange(len(fi)))), shape=(len(cards), len(fi)))
            cent = _rownorm(cent + add @ (sp.csr_matrix(xtr) if not sp.issparse(xtr) else xtr))
            s = xho @ cent.T
            s = s.toarray() if sp.issparse(s) else np.asarray(s)
            pick = s.argmax(1)
            acc[v]["model_centroid"].append(float(np.mean(pick[seen] == y_model[hi][seen])))
            acc[v]["domain_centroid"].append(float(np.mean(card_dom[pick] == y_dom[hi])))
            best_d = None
            for C in C_GRID:
                pd = _softmax_probe(xtr, y_dom[fi], xho, len(doms), C)
                acc[v]["domain_lr"][C].append(float(np.mean(pd == y_dom[hi])))
                if C == C_GRID[0]:
                    best_d = pd
            # hierarchical: best model centroid within the probe's predicted domain (weakest L2)
            masked = np.where(card_dom[None, :] == best_d[:, None], s, -np.inf)
            pm = masked.argmax(1)
            acc[v]["model_centroid_in_domain"].append(float(np.mean(pm[seen] == y_model[hi][seen])))
        print(f"  probe fold {f + 1}/{folds} ({time.time() - t0:.0f}s): " + ", ".join(
            f"{v} D(lr) {acc[v]['domain_lr'][C_GRID[0]][-1]:.3f} M {acc[v]['model_centroid'][-1]:.3f}" for v in views), flush=True)
    out = {"folds": folds, "rows": len(train), "views": {}}
    for v in views:
        lr_means = {str(C): float(np.mean(a)) for C, a in acc[v]["domain_lr"].items()}
        bestC = max(lr_means, key=lr_means.get)
        out["views"][v] = {
            "domain_lr_by_C": lr_means, "domain_lr_best_l2": float(bestC), "domain_lr": lr_means[bestC],
            "domain_lr_std": float(np.std(acc[v]["domain_lr"][float(bestC)])),
            "domain_of_model_centroid": float(np.mean(acc[v]["domain_centroid"])),
            "model_centroid": float(np.mean(acc[v]["model_centroid"])),
            "model_centroid_std": float(np.std(acc[v]["model_centroid"])),
            "model_centroid_in_lr_domain": float(np.mean(acc[v]["model_centroid_in_domain"])),
        }
    return out


# ----------------------------------------------------------------------------------- part d
def part_d(bench: CMRBench, enc) -> dict:
    from cmr.decide import choose
    from cmr.policies import make_policy

    pol = make_policy("carve", encoder=enc, config={"joint": True})
    learner = Learner(pol)
    for e in bench.experiences:
        pol.add_models(bench.cards_of(e.k))
        learner.fit(e.train, bench.cards_upto(e.k))
    live = bench.cards_upto(bench.experiences[-1].k)
    cdom = np.array([c.domain for c in live], dtype=object)
    test = Examples.concat([e.test for e in bench.experiences])
    pick = choose(pol.score(test.emb, live), np.zeros(len(live)), 0.0)
    from cmr.bench.metrics import routing_hits

    _, tdom, _ = _labels(test)
    pd = cdom[pick]
    wrong = ~routing_hits(pick, live, test)["d"]
    modality = lambda d: str(d).split(" ")[0] if d else ""  # noqa: E731
    same_mod = np.array([modality(a) == modality(b) for a, b in zip(pd, tdom)])
    conf = Counter(zip(tdom[wrong].tolist(), pd[wrong].tolist())).most_common(12)
    per_dom = Counter(tdom.tolist())
    err_dom = Counter(tdom[wrong].tolist())
    worst = sorted(((d, err_dom[d] / n, n) for d, n in per_dom.items() if n >= 30), key=lambda x: -x[1])[:8]
    alias = {d: a[0] for a in DOMAIN_ALIASES for d in a}
    canon = lambda x: np.array([alias.get(d, d) for d in x], dtype=object)  # noqa: E731
    wrong_alias = wrong & (canon(pd) != canon(tdom))
    return {
        "pooled_test_rows": int(len(test)), "d_acc_pooled": float(1 - wrong.mean()),
        "d_acc_pooled_aliases_merged": float(1 - wrong_alias.mean()),
        "aliases": [list(a) for a in DOMAIN_ALIASES],
        "test_rows_in_aliased_domains": float(np.isin(tdom, list(alias)).mean()),
        "errors_same_modality": float(same_mod[wrong].mean()),
        "top_confusions": [{"true": a, "predicted": b, "count": n} for (a, b), n in conf],
        "worst_domains": [{"domain": d, "error_rate": float(r), "test_rows": n} for d, r, n in worst],
    }


# ----------------------------------------------------------------------------------- report
def _md(rep: dict) -> str:
    f = common.fmt
    L = ["# CMRBench: what limits routing quality", "",
         f"`{rep['command']}` — {rep['info']['date']}, commit {rep['info']['git_commit']}, "
         f"{rep['info']['machine']['cpus']} CPUs, load average before/after {rep['load_before']} / {rep['load_after']}.",
         "Encoder: all-MiniLM-L6-v2 (frozen, prompts left-truncated at 256 tokens). Nothing here selects on test.", ""]
    for k, r in sorted(rep.get("runs", {}).items()):
        L.append(f"- part {k}: `{r['command']}`, {r['date']}, commit {str(r['git_commit'])[:10]}, load average {r['load_before']} → {r['load_after']}")
    L.append("")
    a = rep.get("a")
    if a:
        L += ["## (a) Label consistency", "",
              f"{a['n_train']} train rows, {a['n_test']} test rows, {a['n_test_targets']} distinct test targets, {a['n_domains']} domains.",
              f"Exact (normalised) duplicates: within train {a['exact_duplicates']['within_train']}, test vs train "
              f"{a['exact_duplicates']['test_vs_train']}, within test {a['exact_duplicates']['within_test']}.", "",
              "Each test query's nearest train query (MiniLM cosine), by cosine bucket:", "",
              "| cosine | test rows | share | same model | same domain | same family |", "|---|---|---|---|---|---|"]
        for r in a["nearest_train_of_test"]:
            L.append(f"| [{r['cos_from']:.2f}, {r['cos_to']:.2f}) | {r['rows']} | {f(r['share'])} | {f(r['same_model'])} | {f(r['same_domain'])} | {f(r['same_family'])} |")
        L += ["", "All pairs above a cosine threshold, share with the same label:", "",
              "| pairs | cosine ≥ | pairs | same model | same domain |", "|---|---|---|---|---|"]
        for name, rows in a["near_pairs"].items():
            for r in rows:
                L.append(f"| {name} | {r['threshold']} | {r['pairs']} | {f(r['same_model'])} | {f(r['same_domain'])} |")
        L += ["", "Ceiling of any router that answers near-identical test queries alike (test rows linked at cosine ≥ t; "
              "one answer per group, its most frequent label):", "",
              "| cosine ≥ | groups | rows in groups of ≥ 2 | largest group | M ceiling | D ceiling |", "|---|---|---|---|---|---|"]
        for r in a["test_group_ceiling"]:
            L.append(f"| {r['threshold']} | {r['groups']} | {r['rows_in_multi_groups']} | {r['largest_group']} | {f(r['m_ceiling'])} | {f(r['d_ceiling'])} |")
        L += ["", "Hub models whose card text embeds within cosine t of a test target's card (\"twins\"):", "",
              "| cosine ≥ | test rows whose target has a twin | mean twins | M of a uniform pick among target + twins |", "|---|---|---|---|"]
        for t, r in a["card_twins_of_test_targets"].items():
            L.append(f"| {t} | {f(r['share_with_twin'])} | {f(r['mean_twins'], 2)} | {f(r['uniform_pick_m'])} |")
        L += ["", f"Other models of a test target's domain: median {a['same_domain_models_per_test_target']['median']:.0f}. "
              f"Train rows per model (rows: models): {a['train_rows_per_target_model']}.", ""]
    b = rep.get("b")
    if b:
        L += ["## (b) Learning curve (test splits, `cmr bench cmr` protocol)", "",
              "| variant | train fraction | train rows | runs | M-Acc | F-Acc | D-Acc |", "|---|---|---|---|---|---|---|"]
        for s in b["summary"]:
            L.append(f"| {s['variant']} | {s['fraction']:.2f} | {s['n_train']} | {s['runs']} | {f(s['m_acc'])} | {f(s['f_acc'])} | {f(s['d_acc'])} |")
        pdb = b["per_doubling"]
        L += ["", f"Joint training, points gained per doubling of the train data: M {pdb['m_acc']['points_per_doubling_fit']:.1f} "
              f"(log-linear fit; last doubling {pdb['m_acc']['points_last_doubling']:.1f}), D {pdb['d_acc']['points_per_doubling_fit']:.1f} "
              f"(last doubling {pdb['d_acc']['points_last_doubling']:.1f}).", ""]
    c = rep.get("c")
    if c:
        L += [f"## (c) Probes, {c['folds']}-fold cross-validation within the train splits ({c['rows']} rows)", "",
              "| view | domain: logistic regression (best L2) | domain of nearest model centroid | model: nearest centroid (card + prompts) | model: centroid within the LR's domain |",
              "|---|---|---|---|---|"]
        for v, r in c["views"].items():
            L.append(f"| {v} | {f(r['domain_lr'])} ± {f(r['domain_lr_std'])} (L2 {r['domain_lr_best_l2']:g}) | {f(r['domain_of_model_centroid'])} | "
                     f"{f(r['model_centroid'])} ± {f(r['model_centroid_std'])} | {f(r['model_centroid_in_lr_domain'])} |")
        L.append("")
    d = rep.get("d")
    if d:
        L += ["## (d) Where the domain errors go (carve, joint reference, all four test sets pooled)", "",
              f"Pooled D-Acc {f(d['d_acc_pooled'])}; errors that stay within the same modality: {f(d['errors_same_modality'])}. "
              f"{len(d['aliases'])} pairs of domain labels name the same Hugging Face task ({f(d['test_rows_in_aliased_domains'])} of test rows "
              f"carry one: " + "; ".join(" = ".join(a) for a in d["aliases"]) + f"); counting them as one domain, D-Acc is {f(d['d_acc_pooled_aliases_merged'])}.", "",
              "| true domain | predicted domain | errors |", "|---|---|---|"]
        L += [f"| {r['true']} | {r['predicted']} | {r['count']} |" for r in d["top_confusions"]]
        L += ["", "| domain (≥ 30 test rows) | error rate | test rows |", "|---|---|---|"]
        L += [f"| {r['domain']} | {f(r['error_rate'])} | {r['test_rows']} |" for r in d["worst_domains"]]
        L.append("")
    if rep.get("timings"):
        L += ["Seconds per part: " + ", ".join(f"{k} {v:.0f}" for k, v in rep["timings"].items()), ""]
    return "\n".join(L)


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(constants.data_root() / "cmrbench"))
    ap.add_argument("--out", default="docs/results/limits")
    ap.add_argument("--parts", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    ap.add_argument("--fractions", default="0.1,0.25,0.5,1.0")
    ap.add_argument("--seeds", default="0,1", help="subsample seeds of the learning curve (fractions < 1)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    out = Path(args.out)
    rep: dict = {"command": "python " + " ".join(sys.argv), "info": common.run_info(), "load_before": _load(), "timings": {}}
    if parts != set("abcd") and (out / "report.json").is_file():
        # a partial run updates its parts of an existing report and keeps the others (each part
        # records its own command, commit, date and load average under "runs")
        import json

        old = json.loads((out / "report.json").read_text())
        rep.update({k: old[k] for k in "abcd" if k in old and k not in parts})
        rep["runs"] = {k: v for k, v in old.get("runs", {}).items() if k not in parts}
        rep["timings"].update({k: v for k, v in old.get("timings", {}).items() if k not in parts})
    bench = load_cmrbench(args.data)
    enc = default_encoder()
    t0 = time.time()
    common.embed(enc, [p for e in bench.experiences for p in (e.train, e.test)])
    rep["timings"]["embed"] = time.time() - t0
    for name, fn in (("a", lambda: part_a(bench, enc)),
                     ("b", lambda: part_b(bench, enc, [float(x) for x in args.fractions.split(",")], [int(s) for s in args.seeds.split(",")])),
                     ("c", lambda: part_c(bench, enc, args.folds, args.seed)),
                     ("d", lambda: part_d(bench, enc))):
        if name in parts:
            t0 = time.time()
            print(f"part {name} ...", flush=True)
            rep[name] = fn()
            rep["timings"][name] = time.time() - t0
    rep["load_after"] = _load()
    for k in parts & set("abcd"):
        rep.setdefault("runs", {})[k] = {"command": rep["command"], "date": rep["info"]["date"], "git_commit": rep["info"]["git_commit"],
                                         "load_before": rep["load_before"], "load_after": rep["load_after"]}
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "report.json", rep)
    md = _md(rep)
    common.write_text(out / "report.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
