"""Quick continual evaluation of the carve policy (own script until the harness lands).

python bench/carve_eval.py [--val] [--set k=v ...]
--val: carve 15% of each train split out as validation and report on it (for decisions);
without it, train on the full train splits and report on the test splits.
"""
import argparse, json, sys, time
import numpy as np
from cmr.data import load_cmrbench
from cmr.encoders import default_encoder
from cmr.policies.registry import make_policy
from cmr.continual.learner import Learner
from cmr import constants
from cmr.decide import choose


def validation_mask(tr, rng, frac=0.15):
    """Hold out one row of each model that has >= 2 rows, up to ``frac`` of the split (so, as on
    test, every held-out target still has training rows). Consumes one ``rng.permutation``."""
    perm = rng.permutation(len(tr))
    seen, val = set(), []
    counts = np.bincount(tr.labels, minlength=len(tr.model_ids))
    for i in perm:
        lab = tr.labels[i]
        if counts[lab] >= 2 and lab not in seen and len(val) < int(frac * len(tr)):
            seen.add(lab)
            val.append(i)
    mask = np.zeros(len(tr), bool)
    mask[val] = True
    return mask


def parse_set(items):
    out = {}
    for it in items:
        k, v = it.split("=", 1)
        try:
            v = json.loads(v)
        except ValueError:
            pass
        out[k] = v
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--val", action="store_true")
    ap.add_argument("--policy", default="carve")
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--exps", type=int, default=4)
    a = ap.parse_args()
    enc = default_encoder()
    bench = load_cmrbench(constants.data_root() / "cmrbench")
    rng = np.random.default_rng(0)
    exps = []
    for exp in bench.experiences[: a.exps]:
        tr, te = exp.train, exp.test
        if a.val:
            mask = validation_mask(tr, rng)
            te, tr = tr.subset(mask), tr.subset(~mask)
        tr.emb, te.emb = enc.encode(tr.texts), enc.encode(te.texts)
        exps.append((exp.k, tr, te))
    pol = make_policy(a.policy, encoder=enc, config=parse_set(a.set))
    fam = {c.id: c.family for c in bench.cards}
    dom = {c.id: c.domain for c in bench.cards}
    K = len(exps)
    acc = {m: np.full((K, K), np.nan) for m in "MFD"}
    t_train = 0.0
    learner = Learner(pol)
    for i, (k, tr, _) in enumerate(exps):
        live = bench.cards_upto(k)
        t0 = time.perf_counter()
        pol.add_models(bench.cards_of(k))
        learner.fit(tr, live)
        t_train += time.perf_counter() - t0
        costs = np.zeros(len(live))
        for j in range(i + 1):
            te = exps[j][2]
            s = pol.score(te.emb, live)
            pred = [live[c].id for c in choose(s, costs)]
            tgt = [te.model_ids[l] for l in te.labels]
            acc["M"][i, j] = np.mean([p == t for p, t in zip(pred, tgt)])
            acc["F"][i, j] = np.mean([p == t or (fam[p] is not None and fam[p] == fam[t]) for p, t in zip(pred, tgt)])
            acc["D"][i, j] = np.mean([dom[p] == dom[t] for p, t in zip(pred, tgt)])
        print(f"after e{k}: " + " ".join(f"{m}={np.nanmean(acc[m][i, :i+1]):.3f}" for m in "MFD"), f"D row={np.round(acc['D'][i,:i+1],3).tolist()}", f"t={t_train:.0f}s", flush=True)
    fg = {m: float(np.mean([np.nanmax(acc[m][:, j]) - acc[m][K - 1, j] for j in range(K - 1)])) for m in "MFD"}
    print("FINAL", " ".join(f"{m}={np.nanmean(acc[m][K-1]):.3f}" for m in "MFD"), "forget", " ".join(f"{m}={fg[m]*100:.1f}" for m in "MFD"), f"train_s={t_train:.0f}", a.set)


if __name__ == "__main__":
    main()
