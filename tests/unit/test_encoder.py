"""The real MiniLM encoder and its persistent cache."""

from __future__ import annotations

import numpy as np

from cmr.encoders.cache import CachedEncoder, EmbeddingCache


class CountingEncoder:
    """Wraps the real encoder to count how many texts reach it."""

    def __init__(self, inner):
        self.inner, self.name, self.dim, self.calls = inner, inner.name, inner.dim, 0

    def encode(self, texts):
        self.calls += len(texts)
        return self.inner.encode(texts)


def test_minilm_embeddings_are_unit_norm_and_semantic(encoder):
    e = encoder.encode(["translate this Spanish sentence into English", "Spanish to English translation model", "detect objects in a photo"])
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_cache_serves_repeats_without_encoding_and_persists(encoder, tmp_path):
    inner = CountingEncoder(encoder.inner)
    enc = CachedEncoder(inner, EmbeddingCache(tmp_path / "c.sqlite"))
    texts = ["alpha query", "beta query", "alpha query"]
    first = enc.encode(texts)
    assert inner.calls == 2  # duplicates encoded once
    np.testing.assert_array_equal(first[0], first[2])
    again = CachedEncoder(inner, EmbeddingCache(tmp_path / "c.sqlite")).encode(["beta query", "gamma query"])
    assert inner.calls == 3  # only "gamma" was new
    np.testing.assert_array_equal(again[0], first[1])
    np.testing.assert_allclose(again[1], encoder.inner.encode(["gamma query"])[0], atol=1e-5)


def test_long_prompts_keep_their_end(encoder):
    """Few-shot prompts share a long prefix; the question at the end must decide the embedding."""
    prefix = "Which planet is largest?\nA) Mars\nB) Jupiter\nAnswer: B\n\n" * 40
    e = encoder.encode([prefix + "Translate 'good morning' into German.", prefix + "What is 17 times 23?",
                        "Translate 'good morning' into German."])
    assert e[0] @ e[1] < 0.99  # exactly 1.0 if the end were cut off
    assert e[0] @ e[2] > e[1] @ e[2]


# -- ONNX Runtime path (the serving default) -------------------------------------------------
_VARIED = ["  leading and trailing spaces \n", "", "ünïcödé 数学 🚀", "x", "route this to a model that writes Python",
           "Which planet is largest?\nA) Mars\nB) Jupiter\nAnswer: B\n\n" * 40 + "What is 17 times 23?"]


def test_onnx_encoder_equals_torch_and_shares_its_name(encoder):
    """Same name means the same cache keys and checkpoints: the embeddings must really be the same."""
    from cmr.encoders.onnx import OnnxMiniLMEncoder

    onnx = OnnxMiniLMEncoder()
    assert onnx.name == encoder.inner.name and onnx.dim == encoder.inner.dim
    ref = encoder.inner.encode(_VARIED)  # the torch encoder itself, not the cache
    np.testing.assert_allclose(onnx.encode(_VARIED), ref, atol=1e-5)  # one padded batch
    single = np.stack([onnx.encode([t])[0] for t in _VARIED])  # one query per call, as served
    np.testing.assert_allclose(single, ref, atol=1e-5)
    assert onnx.encode([]).shape == (0, 384)


def test_onnx_export_happens_once_and_int8_is_a_different_encoder(encoder):
    from cmr.encoders.onnx import OnnxMiniLMEncoder

    first = OnnxMiniLMEncoder()
    stamp = first.path.stat().st_mtime_ns
    assert OnnxMiniLMEncoder().path.stat().st_mtime_ns == stamp  # reused, not exported again
    q = OnnxMiniLMEncoder(quantize="int8")
    assert not [p for p in first.path.parent.iterdir() if p.name.endswith(".tmp")]  # no half-written file left
    assert q.name != first.name  # different embeddings must not share cache keys
    a, b = first.encode(_VARIED[1:]), q.encode(_VARIED[1:])
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cos = (a * b).sum(axis=1)
    assert cos.min() > 0.95 and not np.allclose(a, b, atol=1e-4)  # close (per-channel scales), but not the same vectors


def test_bench_encoder_variants_tiny_report():
    """The serving benchmark's encoder comparison at tiny scale: structure and equivalence, not timings."""
    from bench import serve as bench_serve

    prompts = bench_serve.test_prompts(4)
    ev = bench_serve.encoder_variants(prompts, variants=(("torch", 1, 64), ("onnx", 1, 2)), batch=2)
    assert set(ev["variants"]) == {"torch threads=1 chunk=64", "onnx threads=1 chunk=2"}
    on = ev["variants"]["onnx threads=1 chunk=2"]
    assert on["single"]["n"] == 4 and on["batch2"]["n"] == 2
    assert on["max_abs_diff_vs_torch"] < 1e-5 and on["min_cos_vs_torch"] > 0.9999
    md = bench_serve.render_md({"started_utc": "t", "command": "c", "machine": "m", "loadavg_start": [0, 0, 0], "encoders": ev,
                                "floors": {}})
    assert "| onnx threads=1 chunk=2 |" in md


def test_memory_cached_encoder_is_a_bounded_lru():
    from cmr.encoders import MemoryCachedEncoder

    class Counting:
        name, dim = "counting", 2

        def __init__(self):
            self.seen: list[str] = []

        def encode(self, texts):
            self.seen += list(texts)
            return np.array([[len(t), i] for i, t in enumerate(texts)], dtype=np.float32)

    inner = Counting()
    enc = MemoryCachedEncoder(inner, size=2)
    first = enc.encode(["a", "bb", "a"])
    assert inner.seen == ["a", "bb"]  # a duplicate inside one call is encoded once
    np.testing.assert_array_equal(first[0], first[2])
    np.testing.assert_array_equal(enc.encode(["bb"])[0], first[1])  # from memory
    assert inner.seen == ["a", "bb"]
    enc.encode(["ccc"])  # evicts the least recently used ("a")
    enc.encode(["a"])
    assert inner.seen == ["a", "bb", "ccc", "a"]
    off = MemoryCachedEncoder(inner, size=0)
    off.encode(["a"]), off.encode(["a"])
    assert inner.seen[-2:] == ["a", "a"]  # size 0: no caching


def test_onnx_single_query_session_gives_the_same_embeddings():
    from cmr.encoders.onnx import OnnxMiniLMEncoder

    two = OnnxMiniLMEncoder(threads=1, single_threads=2)
    assert two.single_threads == 2 and two._single is not two.session
    assert OnnxMiniLMEncoder(threads=1, single_threads=1)._single is not None
    batch = two.encode(_VARIED)
    single = np.stack([two.encode([t])[0] for t in _VARIED])  # through the 2-thread session
    np.testing.assert_allclose(single, batch, atol=1e-5)


def test_onnx_query_truncation_view_shares_sessions_and_has_its_own_name():
    from cmr.encoders import make_encoder

    full = make_encoder("onnx", 1)
    short = full.with_max_tokens(16)
    assert short.session is full.session and short.name != full.name and short.name.endswith(":max16")
    assert full.with_max_tokens(256) is full and short.with_max_tokens(256).name == full.name
    assert make_encoder("onnx", 1, max_tokens=16).name == short.name  # same truncation, same cache keys
    long_text = " ".join(f"word{i}" for i in range(200)) + " translate this into French"
    a, b = full.encode([long_text, "hi"]), short.encode([long_text, "hi"])
    np.testing.assert_allclose(a[1], b[1], atol=1e-5)  # short texts: untouched
    assert a[0] @ b[0] < 0.999  # long ones: only their last 16 tokens
    np.testing.assert_allclose(b[0], short.encode([" ".join(long_text.split()[-12:])])[0], atol=0.05)


def test_int8_with_fp32_ffn_is_its_own_encoder_and_closer_to_exact():
    """The mixed-precision variant: its own graph and name (its own cache keys), and on real
    CMRBench prompts nearer the exact embeddings than plain int8."""
    from bench.serve import test_prompts
    from cmr.encoders import make_encoder
    from cmr.encoders.onnx import ffn_output_matmuls

    exact, int8, mixed = make_encoder("onnx", 1), make_encoder("onnx-int8", 1), make_encoder("onnx-int8-fp32ffn", 1)
    assert len({exact.name, int8.name, mixed.name, mixed.with_max_tokens(64).name, int8.with_max_tokens(64).name}) == 5
    assert mixed.path != int8.path and len(ffn_output_matmuls(exact.path)) == 6  # one per layer
    prompts = test_prompts(60)
    ref = exact.encode(prompts)
    err_int8 = 1 - (int8.encode(prompts) * ref).sum(axis=1)
    err_mixed = 1 - (mixed.encode(prompts) * ref).sum(axis=1)
    assert err_mixed.max() < 0.02 and 0 < err_mixed.mean() < err_int8.mean()


def test_bench_exactness_tiny_latency_and_refused_variant(tmp_path, capsys):
    from bench import exactness

    assert exactness.main(["--variants", "onnx:256", "torch:64"]) == 2
    assert "--variants 'torch:64'" in capsys.readouterr().err
    assert exactness.main(["--variants", "onnx-int8:64"]) == 2  # the exact encoder is the reference: required
    lat = exactness.latency([("onnx", 256), ("onnx-int8", 32)], 50, ["what is 2+2?", "translate 'hello' into French"], tmp_path, 20)
    assert list(lat) == ["onnx:256", "onnx-int8:32", "onnx:256 again"]
    assert lat["onnx-int8:32"]["single_cpu"]["n"] == 2
    md = exactness.render_md({"started_utc": "t", "machine": "m", "loadavg_start": [0], "served_default": "onnx-int8:64",
                              "exact": "onnx:256", "quality": {}, "latency": {"50": lat}})
    assert "| `onnx-int8:32` |" in md
