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
