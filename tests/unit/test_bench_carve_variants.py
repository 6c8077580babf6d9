"""bench.carve_variants' tables: each split's rows, and each variant's mean over the validation splits."""

from __future__ import annotations

import json

from bench.carve_variants import parse, render


def _row(spec, split, m, f, d):
    return {"name": spec.partition(":")[0], "spec": spec, "split": split, "m_acc": m, "f_acc": f, "d_acc": d,
            "forgetting": {"m": 0.01, "f": 0.02, "d": 0.03}, "s": 10.0, "commit": "abc1234"}


def test_render_means_each_variant_over_the_validation_splits_it_ran_on(tmp_path):
    rows = {"validation": [_row("a:x=1", "validation", 0.2, 0.3, 0.7), _row("b:x=2", "validation", 0.1, 0.2, 0.6)],
            "validation1": [_row("a:x=1", "validation1", 0.4, 0.5, 0.8)],
            "test": [_row("a:x=1", "test", 0.9, 0.9, 0.9)]}
    for split, rs in rows.items():
        (tmp_path / f"variants-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    md = render(tmp_path)
    means = md.split("## mean over validation splits")[1]
    # a: the mean of its two validation rows (test is never averaged in); b: its one row; best first
    assert "| `a:x=1` | validation, validation1 | 0.300 | 0.400 | 0.750 | 0.483 |" in means
    assert "| `b:x=2` | validation | 0.100 | 0.200 | 0.600 | 0.300 |" in means
    assert means.index("`a:x=1`") < means.index("`b:x=2`")
    assert "| a | `a:x=1` | 0.900 | 0.900 | 0.900 | 1.0 / 2.0 / 3.0 |" in md
    # one split only: no means table
    for f in tmp_path.glob("variants-validation1.jsonl"):
        f.unlink()
    assert "mean over validation splits" not in render(tmp_path)
    assert parse("n:domain_vote=0.3,svd=384") == ("n", {"domain_vote": "0.3", "svd": "384"})
