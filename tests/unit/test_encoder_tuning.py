"""Fine-tuning MiniLM on (request, target card) pairs: the encoder, its checkpoint state and ONNX
export, and carve tuning it inside the learner (replay and prototypes encoded again)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cmr.bench.cmr_protocol import evaluate
from cmr.continual.learner import Learner
from cmr.encoders.lexical import FusedEncoder, LexicalEncoder
from cmr.encoders.tuned import TunedMiniLMEncoder, weights_digest
from cmr.policies.registry import make_policy


def _pairs(bench):
    cards = {c.id: c for c in bench.cards}
    carve = make_policy("carve", encoder=None, config={})
    tr = bench.experiences[0].train
    return list(tr.texts[:32]), [carve._card_doc(cards[tr.model_ids[j]]) for j in tr.labels[:32]]


def _top1(enc, queries, docs):
    uniq = sorted(set(docs))
    s = enc.encode(queries) @ enc.encode(uniq).T
    return float(np.mean([uniq[i] == d for i, d in zip(s.argmax(1), docs)]))


@pytest.fixture(scope="module")
def tuned(cmr_small):
    q, d = _pairs(cmr_small)
    enc = TunedMiniLMEncoder()
    before, name = _top1(enc, q, d), enc.name
    out = enc.tune(q, d, epochs=3, lr=5e-5, batch_size=16)
    return enc, before, name, out, q, d


def test_tuning_pulls_requests_towards_their_models_cards_and_renames_the_encoder(tuned):
    enc, before, name, out, q, d = tuned
    assert np.isfinite(out["loss"]) and out["pairs"] == len(q)
    # the training pairs are matched better than by the packaged weights
    assert _top1(enc, q, d) > before
    assert enc.name != name and enc.name.endswith(enc.digest) and enc.digest == weights_digest(enc.tuned_state()["weights"])
    assert name == TunedMiniLMEncoder().name  # untuned: the packaged weights' digest


def test_tuned_state_round_trips_and_a_wrong_digest_is_refused(tuned):
    enc, *_ , q, d = tuned
    state = enc.tuned_state()
    back = TunedMiniLMEncoder.from_state(state)
    assert back.name == enc.name
    np.testing.assert_allclose(back.encode(q[:5]), enc.encode(q[:5]), atol=1e-6)
    with pytest.raises(ValueError, match="encoder.dense.digest"):
        TunedMiniLMEncoder.from_state({**state, "digest": "0" * 16})


def test_onnx_runs_the_tuned_weights_as_torch_does(tuned, tmp_path):
    pytest.importorskip("onnxruntime")
    from cmr.encoders.onnx import OnnxMiniLMEncoder

    enc, *_, q, d = tuned
    onnx = OnnxMiniLMEncoder(cache_dir=tmp_path, tuned=enc.tuned_state())
    assert enc.digest in onnx.name
    np.testing.assert_allclose(onnx.encode(q[:8]), enc.encode(q[:8]), atol=1e-4)
    assert onnx.with_tuned(enc.tuned_state()).name == onnx.name
    # the router's path: a checkpoint's tuned weights restored over its cached int8 encoder
    from cmr.encoders.cache import CachedEncoder, EmbeddingCache
    from cmr.encoders.lexical import restore_encoder

    router = CachedEncoder(OnnxMiniLMEncoder(cache_dir=tmp_path, quantize="int8"), EmbeddingCache(tmp_path / "e.sqlite"))
    back = restore_encoder({"embedding": "minilm", "dense": enc.tuned_state()}, router)
    assert isinstance(back, CachedEncoder) and back.cache is router.cache
    assert enc.digest in back.name and back.name.endswith("int8pc") and back.inner.quantize == "int8"
    cos = (back.encode(q[:8]) * enc.encode(q[:8])).sum(1)
    assert cos.min() > 0.95  # int8 weights: close to the exact tuned vectors, as for the packaged ones


def test_carve_tunes_its_encoder_in_the_learner_and_the_checkpoint_carries_it(cmr_small, encoder, tmp_path):
    from cmr import checkpoint

    texts = [t for e in cmr_small.experiences for t in e.train.texts] + [c.text() for c in cmr_small.cards]
    fused = FusedEncoder(encoder, LexicalEncoder.fit(texts, dim=32))
    e1, e2 = cmr_small.experiences
    policy = make_policy("carve", encoder=fused, config={"encoder_epochs": 1, "epochs": 1})
    learner = Learner(policy, fingerprint={"encoder": fused.name})
    base_name = fused.name
    policy.add_models(cmr_small.cards_of(1))
    learner.fit(replace(e1.train, emb=fused.encode(e1.train.texts)), cmr_small.cards_upto(1))
    enc1 = policy.encoder
    untuned = TunedMiniLMEncoder().digest
    assert enc1.dense.digest != untuned and enc1.dense.digest in enc1.name and enc1.name != base_name and enc1.lexical is fused.lexical
    name1 = enc1.name
    # every vector the head holds comes from the tuned encoder: replay rows and prototypes
    kept = learner.replay.experiences.items()
    assert len(kept) and np.allclose(kept.emb, enc1.encode(kept.text), atol=1e-5)
    row = policy._row[kept.model[0]]
    mine = [t for r, t, _ in policy._absorbed if r == row]
    want = policy.config.proto_card_weight * enc1.encode([policy._doc_text[kept.model[0]]])[0] + enc1.encode(mine).sum(0)
    np.testing.assert_allclose(policy._proto[row], want, atol=1e-4)

    policy.add_models(cmr_small.cards_of(2))
    learner.fit(replace(e2.train, emb=fused.encode(e2.train.texts)), cmr_small.cards_upto(2))
    assert policy.encoder.name != name1 and policy.encoder.dense.digest in policy.encoder.name
    assert learner.checkpoint({"encoder": base_name}).fingerprint["encoder"] == policy.encoder.name  # names what it embeds with
    assert np.allclose(learner.replay.experiences.items().emb[:3], policy.encoder.encode(learner.replay.experiences.items().text[:3]), atol=1e-5)

    ck = checkpoint.save(tmp_path / "ck", policy)
    back = checkpoint.load_policy(ck.path, encoder=encoder)  # the packaged encoder: the checkpoint brings the weights
    assert back.encoder.name == policy.encoder.name
    q = policy.encoder.encode(e2.test.texts[:10])
    cards = cmr_small.cards_upto(2)
    np.testing.assert_allclose(back.score(back.encoder.encode(e2.test.texts[:10]), cards), policy.score(q, cards), atol=1e-4)


def test_the_protocol_routes_through_the_encoder_the_policy_tuned(cmr_small, encoder):
    from cmr.bench import metrics
    from cmr.decide import choose

    bench = replace(cmr_small, experiences=cmr_small.experiences[:1])  # one experience: tuning is the slow part
    policy = make_policy("carve", encoder=encoder, config={"encoder_epochs": 1, "epochs": 1})
    r = evaluate(bench, policy)
    live = bench.cards_upto(1)
    costs = np.array([c.cost for c in live])
    test = cmr_small.experiences[0].test
    # the last row of the matrix is what the final router scores on requests it encodes itself
    ch = choose(policy.score(policy.encoder.encode(test.texts), live), costs, 0.0)
    assert r["matrix"]["m"][-1][0] == pytest.approx(metrics.accuracies(ch, live, test)["m"])
    assert test.emb is not None and ":tuned-" in policy.encoder.name


def test_auto_choosing_carve_serves_the_encoder_carve_tuned_and_restores_it(cmr_small, encoder, tmp_path):
    from cmr import checkpoint

    e1 = cmr_small.experiences[0]
    auto = make_policy("auto", encoder=encoder, config={"min_rows": 20, "folds": 2, "candidates": ["carve"], "encoder_epochs": 1,
                                                        "margin": 0.0})
    auto.add_models(cmr_small.cards_of(1))
    Learner(auto).fit(e1.train, cmr_small.cards_upto(1))
    assert auto.describe()["chosen"] == "carve" and auto.describe()["config"]["encoder_epochs"] == 1
    # the folds chose on frozen features; the chosen carve tuned, and queries are embedded with its encoder
    assert ":tuned-" in auto.encoder.name and auto.encoder is auto._inner.encoder
    ck = checkpoint.save(tmp_path / "ck", auto)
    back = checkpoint.load_policy(ck.path, encoder=encoder)
    assert back.encoder.name == auto.encoder.name
    cards = cmr_small.cards_upto(1)
    q = auto.encoder.encode(e1.test.texts[:8])
    np.testing.assert_allclose(back.score(back.encoder.encode(e1.test.texts[:8]), cards), auto.score(q, cards), atol=1e-4)
