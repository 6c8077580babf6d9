"""Carve variants on the fused embedding, chosen on validation (train splits only, never test).

python -m bench.carve_variants VARIANT [VARIANT ...] [--test] [--out DIR]

A VARIANT is ``name:key=value,...``: ``svd=N`` and ``w=W`` set the lexical part (SVD dimension,
fusion weight; defaults ``LEXICAL_DIM`` / ``LEXICAL_WEIGHT``), ``knn=A`` mixes knn's z-scored
scores into carve's (weight A, 0 = carve alone), every other key is a carve option (``--set``).
Each variant runs the CMRBench continual protocol (``cmr_protocol.evaluate``) on the validation
split of ``cmr bench cmr --validation 0.15 --per-model`` (``--split-seed``, 0), or with ``--test`` (once, for
the variants chosen on validation) on the test splits; one JSON line per variant is appended to
``DIR/variants-{validation,validation1,test}.jsonl`` as it finishes, and ``DIR/variants.md``
tabulates every line written so far.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cmr import constants
from cmr.bench import common
from cmr.bench.cmr_protocol import evaluate, validation_split
from cmr.data import load_cmrbench
from cmr.encoders import default_encoder
from cmr.encoders.lexical import LEXICAL_DIM, LEXICAL_WEIGHT, FusedEncoder, LexicalEncoder
from cmr.policies.registry import make_policy


def parse(spec: str) -> tuple[str, dict[str, str]]:
    name, _, rest = spec.partition(":")
    kv = dict(p.split("=", 1) for p in rest.split(",") if p)
    return name, kv


class _Mix:
    """Carve's scores plus ``alpha`` × knn's, each z-scored per query (validation experiment only)."""

    name = "carve+knn"

    def __init__(self, carve, knn, alpha: float):
        self.carve, self.knn, self.alpha = carve, knn, alpha
        self.encoder, self.config = carve.encoder, carve.config

    @staticmethod
    def _z(s):
        s = np.log(np.clip(s, 1e-12, None))
        return (s - s.mean(1, keepdims=True)) / (s.std(1, keepdims=True) + 1e-9)

    def score(self, q, cards):
        return self._z(self.carve.score(q, cards)) + self.alpha * self._z(self.knn.score(q, cards))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--test", action="store_true")
    ap.add_argument("--split-seed", type=int, default=0, help="seed of the validation split (a second split checks a choice)")
    ap.add_argument("--out", default="docs/results/carve-variants")
    a = ap.parse_args()
    dense = default_encoder()
    bench = load_cmrbench(constants.data_root() / "cmrbench")
    if not a.test:
        bench = validation_split(bench, 0.15, seed=a.split_seed, per_model=True)
    fit_texts = [t for e in bench.experiences for t in e.train.texts] + [c.text() for c in bench.cards]
    lex: dict[int, LexicalEncoder] = {}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    split = "test" if a.test else f"validation{a.split_seed or ''}"
    for spec in a.variants:
        name, kv = parse(spec)
        dim, w, alpha = int(kv.pop("svd", LEXICAL_DIM)), float(kv.pop("w", LEXICAL_WEIGHT)), float(kv.pop("knn", 0))
        if dim not in lex:
            lex[dim] = LexicalEncoder.fit(fit_texts, dim=dim)
        enc = FusedEncoder(dense, lex[dim], w) if w > 0 else dense
        parts = [p for e in bench.experiences for p in (e.train, e.test)]
        for p in parts:
            p.emb = None
        common.embed(enc, parts)
        t0 = time.perf_counter()
        cfg = {k: (v if not v.replace(".", "", 1).isdigit() else float(v) if "." in v else int(v)) for k, v in kv.items()}
        cfg = {k: (v == "true" if v in ("true", "false") else v) for k, v in cfg.items()}
        policy = make_policy("carve", encoder=enc, config=cfg)
        if alpha > 0:
            r = _evaluate_mix(bench, policy, enc, alpha)
        else:
            r = evaluate(bench, policy)
        f, fg = r["final"], r["forgetting"]
        row = {"name": name, "spec": spec, "split": split, "svd": dim, "w": w, "knn": alpha, "set": cfg, **f, "forgetting": fg,
               "d_matrix": r["matrix"]["d"], "s": time.perf_counter() - t0, "commit": common.run_info()["git_commit"]}
        print(f"{split} {spec}: M={f['m_acc']:.3f} F={f['f_acc']:.3f} D={f['d_acc']:.3f} forget "
              + "/".join(f"{fg[m] * 100:.1f}" for m in "mfd") + f" s={row['s']:.0f}", flush=True)
        with open(out / f"variants-{split}.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        common.write_text(out / "variants.md", render(out))
    return 0


def render(out: Path) -> str:
    """Markdown tables of every ``variants-*.jsonl`` in ``out``."""
    md = ["# carve variants on the fused embedding (CMRBench, continual e1..e4)", "",
          "`python -m bench.carve_variants` rows; validation = 15% of each train split held out (one row per model with",
          "≥ 2 rows), split seed 0, 1, 2, ... (`--split-seed`); test = the test splits (only for variants chosen on validation).", ""]
    for f in sorted(out.glob("variants-*.jsonl")):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        md += [f"## {f.stem.removeprefix('variants-')}", "", "| variant | spec | M-Acc | F-Acc | D-Acc | forgetting M / F / D (points) | s | commit |",
               "|---|---|---|---|---|---|---|---|"]
        md += [f"| {r['name']} | `{r['spec']}` | {r['m_acc']:.3f} | {r['f_acc']:.3f} | {r['d_acc']:.3f} | "
               + " / ".join(f"{r['forgetting'][m] * 100:.1f}" for m in "mfd") + f" | {r['s']:.0f} | {(r.get('commit') or '')[:7]} |" for r in rows]
        md.append("")
    md += _means(out)
    return "\n".join(md)


def _means(out: Path) -> list[str]:
    """Each variant's mean M/F/D over the validation splits it ran on (a choice reads this table)."""
    runs: dict[str, list[dict]] = {}
    for f in sorted(out.glob("variants-validation*.jsonl")):
        for x in f.read_text().splitlines():
            if x.strip():
                r = json.loads(x)
                runs.setdefault(r["spec"], []).append(r)
    if not any(len(v) > 1 for v in runs.values()):
        return []
    md = ["## mean over validation splits", "", "| spec | splits | M-Acc | F-Acc | D-Acc | mean of M/F/D |", "|---|---|---|---|---|---|"]
    for spec, rows in sorted(runs.items(), key=lambda kv: -float(np.mean([np.mean([r[f"{m}_acc"] for m in "mfd"]) for r in kv[1]]))):
        mean = {m: float(np.mean([r[f"{m}_acc"] for r in rows])) for m in "mfd"}
        md.append(f"| `{spec}` | {', '.join(sorted(r['split'] for r in rows))} | " + " | ".join(f"{mean[m]:.3f}" for m in "mfd")
                  + f" | {np.mean(list(mean.values())):.3f} |")
    return md + [""]


def _evaluate_mix(bench, carve, enc, alpha):
    """The protocol with carve and knn trained side by side (each through its own Learner) and
    their scores mixed: an experiment only, so the protocol's Learner is swapped for the run."""
    import cmr.continual.learner as learner_mod

    knn = make_policy("knn", encoder=enc, config={})
    mix = _Mix(carve, knn, alpha)
    real = learner_mod.Learner

    class _Both:
        name, encoder, config = "carve+knn", None, carve.config  # encoder None: cards embedded below

        def add_models(self, cards):
            carve.add_models(cards)
            knn.add_models(cards)

        score = staticmethod(mix.score)

    class _Pair:
        def __init__(self, _):
            self.a, self.b = real(carve), real(knn)

        def fit(self, data, cards):
            self.a.fit(data, cards)
            self.b.fit(data, cards)

    common.embed_cards(carve, bench.cards)
    learner_mod.Learner = _Pair
    try:
        return evaluate(bench, _Both())
    finally:
        learner_mod.Learner = real


if __name__ == "__main__":
    raise SystemExit(main())
