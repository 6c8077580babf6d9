"""Would a lexical view raise carve? Validation experiment (train splits only, never test).

python -m bench.carve_fused [--weight W ...] [--svd 256] [--test] [--out DIR]

Prints one line per weight and writes ``DIR/fused-{validation,test}.{json,md}``.

The CMRBench protocol (``cmr_protocol.evaluate``) on the validation split of
``cmr bench cmr --policy carve --validation 0.15 --per-model`` (continual e1..e4), with carve's input features replaced by
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

from cmr import constants
from cmr.bench import common
from cmr.bench.cmr_protocol import evaluate, validation_split
from cmr.data import load_cmrbench
from cmr.encoders import default_encoder
from cmr.policies.registry import make_policy


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

    from bench.cmrbench_limits import _tfidf

    ap = argparse.ArgumentParser()
    ap.add_argument("--weight", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--svd", type=int, default=256)
    ap.add_argument("--test", action="store_true", help="train on the full train splits, report on test")
    ap.add_argument("--out", default="docs/results/limits")
    a = ap.parse_args()
    enc = default_encoder()
    bench = load_cmrbench(constants.data_root() / "cmrbench")
    if not a.test:
        bench = validation_split(bench, 0.15, seed=0, per_model=True)
    fit_texts = [t for e in bench.experiences for t in e.train.texts] + [c.text() for c in bench.cards]
    vec = _tfidf().fit(fit_texts)
    svd = TruncatedSVD(a.svd, random_state=0).fit(vec.transform(fit_texts))
    rows = []
    for w in a.weight:
        fenc = FusedEncoder(enc, vec, svd, w)
        parts = [p for e in bench.experiences for p in (e.train, e.test)]
        for p in parts:
            p.emb = None
        common.embed(fenc, parts)
        t0 = time.perf_counter()
        r = evaluate(bench, make_policy("carve", encoder=fenc, config={}))
        f, fg = r["final"], r["forgetting"]
        print(f"{'TEST' if a.test else 'validation'} weight {w}: FINAL " + " ".join(f"{m.upper()}={f[m + '_acc']:.3f}" for m in "mfd"),
              "forget " + " ".join(f"{m.upper()}={fg[m] * 100:.1f}" for m in "mfd"), f"s={time.perf_counter() - t0:.0f}", flush=True)
        rows.append({"weight": w, **f, "forgetting": fg, "train_eval_s": time.perf_counter() - t0})
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
