"""``python -m bench.embedding_threshold``: MiniLM alone against the fused embedding by training
size, on tiny sets of both formats; refused options."""

from __future__ import annotations

import json

from bench import embedding_threshold
from tests.unit.bench_data import write_cmrbench, write_outcomes


def test_measures_both_embeddings_per_cut_and_says_where_the_rule_fuses(tmp_path):
    write_cmrbench(tmp_path / "data" / "cmrbench")
    write_outcomes(tmp_path / "data" / "routing" / "tiny")
    argv = ["--data-root", str(tmp_path / "data"), "--sets", "cmrbench", "tiny", "--sizes", "4", "0", "--seeds", "0", "1",
            "--out", str(tmp_path / "r")]
    assert embedding_threshold.main(argv) == 0
    rows = json.loads((tmp_path / "r" / "report.json").read_text())["rows"]
    # a cut varies by seed; the whole split runs once
    assert [(r["set"], r["size"], r["seed"]) for r in rows] == [("cmrbench", 4, 0), ("cmrbench", 4, 1), ("cmrbench", 0, 0),
                                                               ("tiny", 4, 0), ("tiny", 4, 1), ("tiny", 0, 0)]
    assert [r["n_prompts"] for r in rows] == [4, 4, 7, 4, 4, 8]
    for r in rows:
        assert r["minilm"]["embedding_used"] == "minilm" and 0.0 <= r["minilm"]["value"] <= 1.0
        fused = r["minilm+tfidf"]
        # a dozen short texts: the lexical part fits on a few shared words, or is refused as auto would stay dense
        assert fused["value"] is None and "too few terms" in fused["error"] or fused["embedding_used"] == "minilm+tfidf"
    assert {r["figure"] for r in rows} == {"D", "AIQ"}
    md = (tmp_path / "r" / "report.md").read_text()
    # texts fitted on = prompts + cards (4 cards here): far below the threshold; outcome rows never fuse
    assert "| tiny | knn, AIQ | 8 | 12 |" in md and md.count("| no |") == 2 and md.count("| no (outcome rows) |") == 2


def test_a_set_that_is_not_there_exits_2_in_one_line(tmp_path, capsys):
    assert embedding_threshold.main(["--data-root", str(tmp_path), "--sets", "nope", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sets" in err[0] and "nope" in err[0]
    assert not (tmp_path / "r").exists()
