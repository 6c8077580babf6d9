"""Would a lexical view raise carve? Validation experiment (train splits only, never test).

python bench/carve_fused_eval.py [--weight W ...] [--svd 256] [--test] [--out DIR]

Prints one line per weight and writes ``DIR/fused-{validation,test}.{json,md}``.

The same validation protocol as ``bench/carve_eval.py --val`` (15% of each train split held
out, continual e1..e4), with carve's input features replaced by
``normalize([MiniLM(x) ; W · normalize(SVD(TF-IDF(x)))])``: TF-IDF (word 1–2-grams + char 3–5-grams)
and its SVD are fitted on the hub's card texts and the non-held-out train prompts only.
``--weight 0`` is MiniLM alone through the same code path. The router interface passes query
embeddings, so the serving path would need this as an encoder; this script only measures the gain.
``--test`` (once, for the weight chosen on validation): fit on the whole train splits, report on
the test splits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cmr import constants  # noqa: E402
from cmr.data import load_cmrbench  # noqa: E402
from cmr.decide import choose  # noqa: E402
from cmr.encoders import default_encoder  # noqa: E402
from cmr.policies.registry import make_policy  # noqa: E402
from cmr.continual.learner import Learner  # noqa: E402
from carve_eval import validation_mask  # noqa: E402


class FusedEncoder:
    """MiniLM ⊕ weighted lexical SVD features (unit norm); same ``encode``/``dim``/``name`` as an encoder."""

    def __init__(self, base, vec, svd, weight: float):
        self.base, self.vec, self.svd, self.w = base, vec, svd, weight
        self.dim = base.dim + svd.n_components
        self.name = f"{base.name}+tfidf-svd{svd.n_components}x{weight}"

    def encode(self, texts):
        from sklearn.preprocessing import normalize

        a = self.base.encode(list(texts))
        b = normalize(self.svd.transform(self.vec.transform(list(texts))))
        return normalize(np.hstack([a, self.w * b])).astype(np.float32)


def main() -> int:
    from sklearn.decomposition import TruncatedSVD

    from cmrbench_limits import _tfidf

    ap = argparse.ArgumentParser()
    ap.add_argument("--weight", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--svd", type=int, default=256)
    ap.add_argument("--test", action="store_true", help="train on the full train splits, report on test")
    ap.add_argument("--out", default="docs/results/limits")
    a = ap.parse_args()
    enc = default_encoder()
    bench = load_cmrbench(constants.data_root() / "cmrbench")
    rng = np.random.default_rng(0)
    exps = []
    for exp in bench.experiences:  # the validation split of bench/carve_eval.py --val, row for row
        tr = exp.train
        mask = validation_mask(tr, rng)
        exps.append((exp.k, tr, exp.test) if a.test else (exp.k, tr.subset(~mask), tr.subset(mask)))
    fit_texts = [t for _, tr, _ in exps for t in tr.texts] + [c.text() for c in bench.cards]
    vec = _tfidf().fit(fit_texts)
    svd = TruncatedSVD(a.svd, random_state=0).fit(vec.transform(fit_texts))
    fam = {c.id: c.family for c in bench.cards}
    dom = {c.id: c.domain for c in bench.cards}
    from cmr.bench import common

    rows = []
    for w in a.weight:
        fenc = FusedEncoder(enc, vec, svd, w)
        for _, tr, va in exps:
            tr.emb, va.emb = fenc.encode(tr.texts), fenc.encode(va.texts)
        pol = make_policy("carve", encoder=fenc, config={})
        learner = Learner(pol)
        K = len(exps)
        acc = {m: np.full((K, K), np.nan) for m in "MFD"}
        t0 = time.perf_counter()
        for i, (k, tr, _) in enumerate(exps):
            live = bench.cards_upto(k)
            pol.add_models(bench.cards_of(k))
            learner.fit(tr, live)
            for j in range(i + 1):
                va = exps[j][2]
                pick = [live[c].id for c in choose(pol.score(va.emb, live), np.zeros(len(live)))]
                tgt = [va.model_ids[lab] for lab in va.labels]
                acc["M"][i, j] = np.mean([p == t for p, t in zip(pick, tgt)])
                acc["F"][i, j] = np.mean([p == t or (fam[p] is not None and fam[p] == fam[t]) for p, t in zip(pick, tgt)])
                acc["D"][i, j] = np.mean([dom[p] == dom[t] for p, t in zip(pick, tgt)])
        fg = {m: float(np.mean([np.nanmax(acc[m][:, j]) - acc[m][K - 1, j] for j in range(K - 1)])) for m in "MFD"}
        print(f"{'TEST' if a.test else 'validation'} weight {w}: FINAL " + " ".join(f"{m}={np.nanmean(acc[m][K - 1]):.3f}" for m in "MFD"),
              "forget " + " ".join(f"{m}={fg[m] * 100:.1f}" for m in "MFD"), f"s={time.perf_counter() - t0:.0f}", flush=True)
        rows.append({"weight": w, **{f"{m.lower()}_acc": float(np.nanmean(acc[m][K - 1])) for m in "MFD"},
                     "forgetting": {m.lower(): fg[m] for m in "MFD"}, "train_eval_s": time.perf_counter() - t0})
    split = "test" if a.test else "validation"
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    rep = {"command": "python " + " ".join(sys.argv), "split": split, "svd": a.svd, "rows": rows, "info": common.run_info(), "load_after": load}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / f"fused-{split}.json", rep)
    md = [f"# carve on MiniLM ⊕ lexical features ({split})", "", f"`{rep['command']}` — {rep['info']['date']}, commit {rep['info']['git_commit']}, load average {load}.",
          "Features: normalize([MiniLM ; W · normalize(SVD-%d(TF-IDF word 1–2 + char 3–5))]); TF-IDF/SVD fitted on cards + the training prompts. W = 0 is MiniLM alone." % a.svd,
          "", "| W | M-Acc | F-Acc | D-Acc | forgetting M / F / D (points) |", "|---|---|---|---|---|"]
    md += [f"| {r['weight']} | {r['m_acc']:.3f} | {r['f_acc']:.3f} | {r['d_acc']:.3f} | {r['forgetting']['m'] * 100:.1f} / {r['forgetting']['f'] * 100:.1f} / {r['forgetting']['d'] * 100:.1f} |" for r in rows]
    common.write_text(out / f"fused-{split}.md", "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
