"""`cmr bench cmr` and `cmr bench llm` end to end on tiny folders (real MiniLM, real files)."""

from __future__ import annotations

import json

import pytest

from cmr.cli import main

from .bench_data import write_cmrbench, write_outcomes


def _bench(tmp_path, capsys, *argv):
    out = tmp_path / ("out-" + "-".join(a.strip("-").replace("/", "_") for a in argv[:4]))
    code = main(["bench", *argv, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rep = json.loads((out / "report.json").read_text())
    return rep, out, captured.out


@pytest.fixture()
def cmr_dir(tmp_path):
    return write_cmrbench(tmp_path / "cb")


@pytest.fixture()
def oc_dir(tmp_path):
    return write_outcomes(tmp_path / "oc")


def test_cmr_random_report_shape(tmp_path, capsys, cmr_dir):
    rep, out, stdout = _bench(tmp_path, capsys, "cmr", "--policy", "random", "--data", str(cmr_dir), "--seed", "3")
    for key in ("policy", "data", "final", "forgetting", "matrix", "timings", "config", "seed", "date", "machine", "git_commit"):
        assert key in rep
    assert set(rep["final"]) == {"m_acc", "f_acc", "d_acc"}
    assert set(rep["forgetting"]) == set(rep["matrix"]) == {"m", "f", "d"}
    for m in ("m", "f", "d"):
        mat = rep["matrix"][m]
        assert len(mat) == 2 and mat[0][1] is None and all(0.0 <= x <= 1.0 for x in (mat[0][0], mat[1][0], mat[1][1]))
    # a family/domain hit includes every exact hit
    assert rep["final"]["f_acc"] >= rep["final"]["m_acc"] and rep["final"]["d_acc"] >= rep["final"]["m_acc"]
    assert rep["n_models"] == [2, 4] and rep["config"]["seed"] == 3
    assert len(rep["timings"]["per_experience"]) == 2 and rep["timings"]["encode_s"] >= 0.0
    assert (out / "report.md").read_text().startswith("# cmr bench cmr") and "card encoding s" in (out / "report.md").read_text()
    assert (out / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "M-Acc" in stdout and "card encoding" in stdout


def test_cmr_oracle_is_perfect_and_forgets_nothing(tmp_path, capsys, cmr_dir):
    rep, _, _ = _bench(tmp_path, capsys, "cmr", "--policy", "oracle", "--data", str(cmr_dir))
    assert rep["final"] == {"m_acc": 1.0, "f_acc": 1.0, "d_acc": 1.0}
    assert rep["forgetting"] == {"m": 0.0, "f": 0.0, "d": 0.0}
    assert rep["matrix"]["m"] == [[1.0, None], [1.0, 1.0]]


def test_cmr_zeroshot_partial_feedback_and_data_root_resolution(tmp_path, capsys, cmr_dir):
    # --data may name the folder that holds cmrbench/ (like the shared data root)
    root = cmr_dir.parent
    (root / "cmrbench").symlink_to(cmr_dir, target_is_directory=True)
    rep, _, _ = _bench(tmp_path, capsys, "cmr", "--policy", "zeroshot", "--data", str(root), "--feedback", "partial", "--batch-size", "2")
    assert rep["feedback"] == "partial" and rep["dataset"] == "cmrbench"
    assert [o["experience"] for o in rep["online"]] == [1, 2]
    assert all(0.0 <= o["online_reward"] <= 1.0 for o in rep["online"])
    # the card texts of this tiny hub are far apart: zero-shot routing must beat chance (1/4)
    assert rep["final"]["d_acc"] > 0.5


def test_cmr_oracle_partial_feedback_is_always_rewarded(tmp_path, capsys, cmr_dir):
    rep, _, _ = _bench(tmp_path, capsys, "cmr", "--policy", "oracle", "--data", str(cmr_dir), "--feedback", "partial")
    assert [o["online_reward"] for o in rep["online"]] == [1.0, 1.0]


def test_llm_oracle_reaches_the_oracle_figures(tmp_path, capsys, oc_dir):
    rep, out, stdout = _bench(tmp_path, capsys, "llm", "--policy", "oracle", "--data", str(oc_dir), "--lambdas", "40")
    for key in ("policy", "data", "aiq", "zero_router_aiq", "oracle_aiq", "best_single", "max_quality", "qnc", "curve"):
        assert key in rep
    assert len(rep["curve"]) == 40 and set(rep["curve"][0]) == {"lambda", "cost", "quality"}
    # hand-computed: best single = big-expensive (always right, 0.02); oracle = cheapest right
    # model per test prompt: mid-chat, mid-coder, cheap-small, mid-chat
    assert rep["best_single"] == {"model": "big-expensive", "quality": 1.0, "cost": pytest.approx(0.02)}
    assert rep["oracle"]["quality"] == 1.0
    assert rep["oracle"]["cost"] == pytest.approx((0.005 + 0.004 + 0.001 + 0.005) / 4)
    assert rep["max_quality"] == 1.0 and rep["quality_at_lambda0"] == 1.0
    assert rep["aiq"] == pytest.approx(rep["oracle_sweep_aiq"])
    assert rep["qnc"] == pytest.approx(0.00375 / 0.02)
    # the oracle point sits above the single-model hull: its AIQ is the best possible
    assert rep["oracle_aiq"] == 1.0 and rep["zero_router_aiq"] < 1.0
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "AIQ" in stdout and "card encoding" in stdout and set(rep["timings"]) == {"encode_s", "train_s", "eval_s"}


def test_llm_random_and_unseen_models(tmp_path, capsys, oc_dir):
    rep, _, _ = _bench(tmp_path, capsys, "llm", "--policy", "random", "--data", str(oc_dir))
    assert 0.0 <= rep["aiq"] <= 1.0 and not rep["equal_cost"]
    assert rep["curve"][-1]["cost"] <= rep["curve"][0]["cost"]  # large λ routes cheaper
    rep, _, _ = _bench(tmp_path, capsys, "llm", "--policy", "zeroshot", "--data", str(oc_dir), "--unseen", "0.25", "--profile-size", "2")
    assert len(rep["unseen_models"]) == 1 and len(rep["seen_models"]) == 3
    assert rep["n_profile_prompts"] == 2 and rep["n_train_fit"] == 6
    assert rep["n_models"] == 4  # evaluated on the full pool


def test_llm_embedding_option(tmp_path, capsys, oc_dir):
    rep, _, _ = _bench(tmp_path, capsys, "llm", "--policy", "knn", "--data", str(oc_dir), "--embedding", "minilm+tfidf")
    assert rep["embedding"] == "minilm+tfidf" and "+tfidf-svd" in rep["encoder"] and 0.0 <= rep["aiq"] <= 1.0
    with pytest.raises(SystemExit) as e:  # argparse: one usage line, exit 2
        main(["bench", "llm", "--policy", "knn", "--data", str(oc_dir), "--embedding", "bm25"])
    assert e.value.code == 2 and "--embedding" in capsys.readouterr().err


def test_llm_equal_cost_curve_is_one_point(tmp_path, capsys):
    root = write_outcomes(tmp_path / "nocost", with_cost=False)
    rep, out, stdout = _bench(tmp_path, capsys, "llm", "--policy", "oracle", "--data", str(root))
    assert rep["equal_cost"] and len(rep["curve"]) == 1 and rep["qnc"] is None
    assert rep["aiq"] == rep["curve"][0]["quality"] == 1.0
    assert rep["zero_router_aiq"] == rep["best_single"]["quality"] == 1.0
    assert "AIQ = quality" in stdout and "routed quality" in (out / "report.md").read_text()


def test_policy_options_from_set_and_config(tmp_path, capsys, oc_dir):
    cfg = tmp_path / "oracle.json"
    cfg.write_text(json.dumps({"unknown_score": -2.0}))
    rep, _, _ = _bench(tmp_path, capsys, "llm", "--policy", "oracle", "--data", str(oc_dir), "--config", str(cfg), "--set", "seed=7")
    assert rep["config"] == {"seed": 7, "unknown_score": -2.0}
    code = main(["bench", "llm", "--policy", "oracle", "--data", str(oc_dir), "--set", "no_such_option=1", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--set" in err[0] and "no_such_option" in err[0]
    code = main(["bench", "llm", "--policy", "no-such-policy", "--data", str(oc_dir), "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no-such-policy" in err[0]


def test_tables_group_reports_and_put_oracle_last(tmp_path, capsys):
    from cmr.bench import tables

    base = {"protocol": "llm", "dataset": "rb", "unseen": 0.0, "equal_cost": False, "qnc": None, "zero_router_aiq": 0.8,
            "oracle_aiq": 0.97, "max_quality": 0.9, "quality_at_lambda0": 0.9, "timings": {"train_s": 1.0}}
    for name, aiq in (("oracle", 0.97), ("knn", 0.85), ("random", 0.6)):
        d = tmp_path / name
        d.mkdir()
        (d / "report.json").write_text(json.dumps({**base, "policy": name, "aiq": aiq}))
    assert tables.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "### cmr bench llm — rb, all models seen" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| policy")]
    assert [r.split("|")[1].strip() for r in rows] == ["random", "knn", "oracle"]
    assert "| knn | 0.850 |" in text


def test_cmr_validation_split_scores_held_out_train_rows(tmp_path, capsys, cmr_dir):
    from cmr.bench.cmr_protocol import evaluate, validation_split
    from cmr.data.cmrbench import load_cmrbench
    from cmr.policies import make_policy

    rep, out, _ = _bench(tmp_path, capsys, "cmr", "--policy", "oracle", "--data", str(cmr_dir), "--validation", "0.5")
    assert rep["split"] == {"validation": 0.5, "per_model": False} and rep["final"]["m_acc"] == 1.0
    bench = load_cmrbench(cmr_dir)
    for per_model in (False, True):
        val = validation_split(bench, 0.5, seed=1, per_model=per_model)
        for e, v in zip(bench.experiences, val.experiences):
            # held-out rows come from train, disjointly; the test split is gone
            assert sorted(v.train.texts + v.test.texts) == sorted(e.train.texts) and (per_model or len(v.test)) and not set(v.test.texts) & set(v.train.texts)
            if per_model:  # every held-out target keeps a training row
                assert {v.test.model_ids[i] for i in v.test.labels} <= {v.train.model_ids[i] for i in v.train.labels}
    with pytest.raises(Exception, match="validation fraction 1.0"):
        validation_split(bench, 1.0)
    from cmr.bench import common
    from cmr.encoders import default_encoder

    val, enc, seen = validation_split(bench, 0.5, seed=1), default_encoder(), []
    common.embed(enc, [p for e in val.experiences for p in (e.train, e.test)])
    res = evaluate(val, make_policy("oracle", encoder=enc), on_experience=seen.append)
    assert [s["experience"] for s in seen] == res["experiences"] and seen[-1]["final"] == res["final"]
    assert seen[0]["forgetting"] == {"m": 0.0, "f": 0.0, "d": 0.0} and seen[-1]["train_s"] == pytest.approx(res["timings"]["train_total_s"])


def test_cards_are_encoded_up_front_not_on_the_training_clock(tmp_path, monkeypatch, cmr_dir):
    """On a cold embedding cache every card text the policy embeds (carve: two per card) is encoded
    by ``embed_cards`` before the first experience; training then encodes none (cache hits)."""
    from cmr.bench import common
    from cmr.bench.cmr_protocol import evaluate
    from cmr.data.cmrbench import load_cmrbench
    from cmr.encoders import CachedEncoder, EmbeddingCache, make_encoder
    from cmr.policies import make_policy

    minilm, phase, encoded = make_encoder(), ["queries"], []

    class Recording:  # the real MiniLM, recording what the cache missed and in which phase
        name, dim = minilm.name, minilm.dim

        def encode(self, texts):
            encoded.extend((phase[0], t) for t in texts)
            return minilm.encode(texts)

    enc = CachedEncoder(Recording(), EmbeddingCache(tmp_path / "cold.sqlite"))
    bench = load_cmrbench(cmr_dir)
    common.embed(enc, [p for e in bench.experiences for p in (e.train, e.test)])
    up_front = common.embed_cards

    def marked(policy, cards):
        phase[0] = "cards"
        try:
            return up_front(policy, cards)
        finally:
            phase[0] = "training"

    monkeypatch.setattr(common, "embed_cards", marked)
    res = evaluate(bench, make_policy("carve", encoder=enc))
    card_texts = {t for p, t in encoded if p == "cards"}
    assert {c.text() for c in bench.cards} <= card_texts  # (carve adds api_call text where a card has one)
    assert [t for p, t in encoded if p == "training"] == []
    t = res["timings"]
    assert t["encode_s"] > 0.0 and t["train_total_s"] > 0.0
    assert t["train_total_s"] == pytest.approx(sum(e["train_s"] for e in t["per_experience"]))
