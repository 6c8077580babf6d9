"""The guarantee (issue 15): on any data set in the outcome format, a learned policy's
quality–cost curve is not below the zero router's and its best quality not below the best single
model's, beyond noise. Checked through the real ``cmr bench llm`` on synthetic sets made to break
it: many models with binary outcomes that no prompt feature predicts, near-duplicate prompts,
few neighbours, skewed costs, no cost at all.

The zero router and best single model are measured on the test split, the policy learns from the
train split: the tolerance is the noise between the two (two standard errors of a model's test
quality: the test's best single model and hull are the luckiest of many noisy points). Every
(prompt, model) outcome is known: where one is missing, a router must send that prompt elsewhere
while the best single model is scored only where it answered."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmr.cli import main

WORDS = "apple river engine violin theorem harbor pixel glacier lantern circuit meadow saddle quartz orbit falcon ledger".split()


def write_set(root, *, n_models: int, n: int, near_duplicates: bool, costs: str | None, n_tasks: int = 1, seed: int = 0):
    """A synthetic outcome-matrix folder: ``n`` train and ``n`` test prompts, binary outcomes
    drawn per model from its own rate (no prompt predicts them; one model clearly best, so the
    best single model on test is the one a prior finds on train), a model's cost ``skewed`` (the
    best model 300x the cheapest) or absent, and ``n_tasks`` task names drawn at random (they
    predict nothing either)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rates = np.append(np.linspace(0.3, 0.6, n_models - 1), 0.75)
    price = np.geomspace(1e-5, 3e-3, n_models) if costs == "skewed" else None
    models = [{"model": f"syn-{j:02d}"} | ({"cost": float(price[j])} if price is not None else {}) for j in range(n_models)]
    prompts = []
    for i in range(2 * n):
        text = f"Please answer question number {i}." if near_duplicates else " ".join(rng.choice(WORDS, 6)) + f" ({i})"
        prompts.append({"id": f"p{i}", "prompt": text, "task": f"t{rng.integers(n_tasks)}" if n_tasks > 1 else "t", "split": "train" if i % 2 else "test"})
    lines = ["prompt_id,model,score,cost"]
    for p in prompts:
        for j, m in enumerate(models):
            lines.append(f"{p['id']},{m['model']},{float(rng.random() < rates[j])},")
    (root / "models.jsonl").write_text("".join(json.dumps(m) + "\n" for m in models))
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (root / "outcomes.csv").write_text("\n".join(lines) + "\n")
    return root


SETS = {
    "many-binary-skewed-costs": dict(n_models=29, n=300, near_duplicates=False, costs="skewed"),
    "near-duplicates": dict(n_models=12, n=300, near_duplicates=True, costs="skewed"),
    "no-cost": dict(n_models=20, n=300, near_duplicates=False, costs=None),
    "tasks-that-say-nothing": dict(n_models=29, n=300, near_duplicates=False, costs="skewed", n_tasks=8),
}
POLICIES = {"knn": [], "knn-few-neighbours": ["--set", "k=3"], "cluster": [], "auto": []}


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("name", list(SETS))
def test_not_below_the_zero_router_or_the_best_single_model(tmp_path, capsys, name, policy):
    data = write_set(tmp_path / name, **SETS[name])
    out = tmp_path / "out"
    argv = ["bench", "llm", "--policy", policy.split("-")[0], "--data", str(data), "--out", str(out), "--lambdas", "40", *POLICIES[policy]]
    assert main(argv) == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    q = rep["best_single"]["quality"]
    noise = 2 * float(np.sqrt(q * (1 - q) / rep["n_test"]))
    assert rep["max_quality"] >= q - noise, rep["max_quality"]
    assert rep["aiq"] >= rep["zero_router_aiq"] - noise, (rep["aiq"], rep["zero_router_aiq"])
