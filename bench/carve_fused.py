"""Would a lexical view raise carve? Validation experiment (train splits only, never test).

python -m bench.carve_fused [--weight W ...] [--svd 256] [--test] [--out DIR]

Prints one line per weight and writes ``DIR/fused-{validation,test}.{json,md}``.

The CMRBench protocol (``cmr_protocol.evaluate``) on the validation split of
``cmr bench cmr --policy carve --validation 0.15 --per-model`` (continual e1..e4), with carve's input features replaced by
``normalize([MiniLM(x) ; W · normalize(SVD(TF-IDF(x)))])``: the served ``minilm+tfidf`` encoder
(``cmr.encoders.lexical``) with weight W, fitted on the hub's card texts and the non-held-out train
prompts only. ``--weight 0`` is MiniLM alone through the same code path. The weight it chose
(0.75) is ``LEXICAL_WEIGHT``; ``cmr bench cmr --embedding minilm+tfidf`` runs that setting.
``--test`` (once, for the weight chosen on validation): fit on the whole train splits, report on
the test splits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cmr import constants
from cmr.bench import common
from cmr.bench.cmr_protocol import evaluate, validation_split
from cmr.data import load_cmrbench
from cmr.encoders import default_encoder
from cmr.encoders.lexical import FusedEncoder, LexicalEncoder
from cmr.policies.registry import make_policy


def main() -> int:
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
    lexical = LexicalEncoder.fit(fit_texts, dim=a.svd)
    rows = []
    for w in a.weight:
        fenc = FusedEncoder(enc, lexical, w)
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
