"""The serving benchmark's decision-latency part at tiny scale (no Serve start): real MiniLM,
real FAISS/RouterCore, a real policy; checks the report's structure, not timings."""

from __future__ import annotations

import json

import numpy as np

from bench import serve as bench_serve


def test_synthetic_cards_are_distinct_and_valid():
    cards = bench_serve.synthetic_cards(50)
    assert len({c.id for c in cards}) == 50
    assert len({c.text() for c in cards}) == 50
    assert all(c.cost > 0 and c.domain and c.family for c in cards)


def test_decision_latency_tiny_report(tmp_path):
    prompts = bench_serve.test_prompts(20)
    assert len(prompts) == 20 and all(isinstance(p, str) and p for p in prompts)
    # 200 models, retrieve_k 64 < 200: the FAISS pre-selection path runs too
    d = bench_serve.decision_latency(200, prompts[:5], policy="zeroshot", retrieve_k=64, distinct=20, batch=4,
                                     home=tmp_path / "home", encoder_single_threads=2, other_encoders=[("onnx", 1, 1)])
    assert set(d["variants"]) == {"onnx threads=1"} and d["variants"]["onnx threads=1"]["single"]["n"] == 5
    assert d["models"] == 200 and d["hub_models"] == 200 and d["distinct_embedded_cards"] == 20
    assert d["single"]["n"] == 5 and d["batch4"]["n"] == 1 and d["encode_only"]["n"] == 5
    assert d["retrieve_score_select_only"]["n"] == 5
    for part in ("single", "batch4", "encode_only", "retrieve_score_select_only"):
        assert 0 < d[part]["p50_ms"] <= d[part]["p99_ms"] <= d[part]["max_ms"]
    report = {"started_utc": "t", "command": "c", "machine": "m", "loadavg_start": [0, 0, 0], "decision": [d]}
    report["floors"] = bench_serve.verdicts(report)
    f = report["floors"]["decision_p99_ms_2k@200"]
    assert f["floor"] == 15.0 and f["met"] == (f["measured"] <= 15.0)
    bench_serve.write_report(report, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["decision"][0]["models"] == 200
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| 200 | zeroshot | 64 |" in md and "decision_p99_ms_2k@200" in md


def test_card_bank_reuses_real_vectors_with_noise():
    cards = bench_serve.synthetic_cards(30)
    bank, d = bench_serve.card_bank(cards, 10)
    assert d == 10 and len(bank) == 30
    v = np.stack([bank[c.text()] for c in cards])
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # every extra card is close to one of the really embedded ones, but not identical
    sims = v[10:] @ v[:10].T
    assert (sims.max(axis=1) > 0.5).all() and (sims.max(axis=1) < 0.9999).all()


def test_merge_pools_the_halves_of_a_cell():
    from bench.serve import _merge

    a = {"lat": [10.0, 20.0], "wall_s": 1.0, "errors": 0, "error_samples": [], "models": ["x", "y"]}
    b = {"lat": [30.0], "wall_s": 2.0, "errors": 1, "error_samples": ["500: boom"], "models": ["x", None]}
    m = _merge([a, b])
    assert m["n"] == 3 and m["p50_ms"] == 20.0 and m["errors"] == 1 and m["runs"] == 2
    assert m["rps"] == 1.0 and m["models"] == ["x", "y", "x", None] and m["error_samples"] == ["500: boom"]


def test_cmr_bench_serve_refuses_a_bad_option_in_one_line(capsys, tmp_path):
    from cmr.cli import main

    assert main(["bench", "serve", "--decision-encoders", "onnx:0", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--decision-encoders" in err[0]
    assert not (tmp_path / "r").exists()  # refused before any work or output


def test_compare_litellm_refuses_what_is_not_a_litellm_command(capsys, tmp_path):
    from cmr.cli import main

    assert main(["bench", "serve", "--cpu-only", "--compare-litellm", "/bin/true", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compare-litellm" in err[0]
    assert not (tmp_path / "r").exists()


def test_fake_upstream_answers_the_openai_engine():
    """The FAKE upstream of the server-CPU cells speaks what the real ``openai`` engine sends:
    streamed and whole (``complete``, for non-streaming requests) chat and completions with usage,
    and ``/v1/models`` (its health check); both calls give the same text, finish and counts."""
    import asyncio

    from services.pools.base import GenRequest, OpenAIConfig
    from services.pools.openai_remote import OpenAIEngine
    from bench.fake_upstream import TEXT

    proc, base = bench_serve._start_fake_upstream()
    try:
        eng = OpenAIEngine("remote-a", OpenAIConfig(base_url=base, path="fake"))

        async def run(reqs: list) -> list:  # one loop: the client's connections belong to it
            await eng.check_health()
            return [([c async for c in eng.generate(r)], await eng.complete(r)) for r in reqs]

        for streamed, whole in asyncio.run(run([GenRequest(model="remote-a", messages=[{"role": "user", "content": "hi"}], max_tokens=8),
                                                GenRequest(model="remote-a", prompt="hi", max_tokens=8)])):
            for chunks in (streamed, whole):
                assert "".join(c.text for c in chunks) == TEXT
                assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens > 0
            assert (whole[-1].prompt_tokens, whole[-1].completion_tokens) == (streamed[-1].prompt_tokens, streamed[-1].completion_tokens)
    finally:
        proc.kill()
        proc.wait()


def test_cpu_cells_render_and_judge_the_floors():
    cell = lambda cpu, p50: {"n": 10, "p50_ms": p50, "p99_ms": p50 * 2, "rps": 50.0, "server_cpu_ms_per_request": cpu,  # noqa: E731
                             "cpu_ms_per_request_by_role": {"Ingress": cpu / 2, "Router": cpu / 2}}
    cpu = {"proxy": "haproxy", "idle_cpu_ms_per_s": {"raylet": 40.0}, "loadavg_start": [1.0, 1.0, 1.0], "loadavg_end": [1.0, 1.0, 1.0],
           "upstream_direct_p50_ms": 0.5, "cells": {"auto@1": cell(9.0, 20.0), "named@1": cell(8.0, 9.0), "pool@1": cell(6.0, 8.0),
                                                    "auto@16": cell(7.0, 90.0)}}
    report = {"started_utc": "t", "command": "c", "machine": "m", "loadavg_start": [1, 1, 1], "cpu": cpu,
              "cpu_variants": {"served": cpu, "lean": cpu},
              "cpu_gateway": {"gateway": "litellm", "version": "1.0", "cells": {"group@1": cell(6.0, 10.0)}}}
    report["floors"] = f = bench_serve.verdicts(report)
    assert f["auto_cpu_ms_lone"]["met"] and not f["auto_cpu_ms_at16"]["met"]
    assert f["auto_added_p50_ms_lone"]["measured"] == 19.5 and not f["auto_added_p50_ms_lone"]["met"]
    md = bench_serve.render_md(report)
    assert "| 1 | 9.0 | 8.0 | 6.0 |" in md and "| lean | 9.0 (20)" in md and "auto@16: Ingress 3.50, Router 3.50" in md
    assert "| 1 | 6.0 (10) | 9.0 (20) | 8.0 (9) | 6.0 (8) | 1.50 |" in md  # LiteLLM beside cmr, and their ratio
