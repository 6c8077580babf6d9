"""``embedding="minilm+tfidf"``: the fitted lexical part travels in the checkpoint, and the router,
the learner and a benchmark that load it embed with the same vectors (real MiniLM, real TF-IDF)."""

from __future__ import annotations

import numpy as np
import pytest

from cmr import checkpoint
from cmr.encoders.lexical import FusedEncoder, LexicalEncoder, fit_encoder, restore_encoder
from cmr.errors import ConfigError
from cmr.policies import make_policy

TEXTS = [f"translate {a} text with a {b} model from the {c} library" for a in ("english", "german", "french", "spanish")
         for b in ("small", "large", "distilled") for c in ("transformers", "fairseq", "timm", "diffusers")]


def test_lexical_encoder_roundtrips_through_its_state():
    lex = LexicalEncoder.fit(TEXTS, dim=8)
    again = LexicalEncoder.from_state(lex.state_dict())
    probe = ["translate german text with fairseq", "an unseen sentence about image segmentation"]
    assert again.name == lex.name and lex.dim == 8
    np.testing.assert_array_equal(lex.encode(probe), again.encode(probe))
    assert np.allclose(np.linalg.norm(lex.encode(TEXTS), axis=1), 1, atol=1e-5)
    # another fit (other texts) is another encoder, by name
    assert LexicalEncoder.fit(TEXTS[:30], dim=8).name != lex.name


def test_a_long_text_is_read_to_its_last_characters_only():
    """A megabyte prompt costs the lexical part what its last ``LEXICAL_CHARS`` characters cost:
    the same vector as that end alone (the question is at the end, as the dense part keeps it)."""
    from cmr.encoders.lexical import LEXICAL_CHARS

    lex = LexicalEncoder.fit(TEXTS, dim=8)
    end = "translate german text with fairseq " * (LEXICAL_CHARS // 35 + 1)
    huge = "an unrelated preamble about image segmentation with timm " * 20_000 + end
    np.testing.assert_array_equal(lex.encode([huge]), lex.encode([end[-LEXICAL_CHARS:]]))
    assert not np.allclose(lex.encode([huge]), lex.encode([huge[: LEXICAL_CHARS]]))


def test_too_few_texts_is_a_clear_error_and_a_part_without_terms_adds_nothing():
    """Fitted on texts that share no term often enough, the fusion is refused naming the field
    (a clear error at first start, not sklearn's); where only one part (words or character
    n-grams) finds terms, the other adds nothing and the encoder still round-trips."""
    with pytest.raises(ConfigError, match="field 'embedding'"):
        LexicalEncoder.fit(["hello world", "a b"])
    with pytest.raises(ConfigError, match="field 'embedding'"):
        fit_encoder("minilm+tfidf", None, ["one text"])
    lex = LexicalEncoder.fit(["abcdx", "abcdy", "abcdz"])  # no word in two texts; character n-grams in all three
    assert lex.state_dict()["word_terms"] == [] and lex.state_dict()["char_terms"]
    again = LexicalEncoder.from_state(lex.state_dict())
    probe = ["abcd", "zzz"]
    np.testing.assert_array_equal(lex.encode(probe), again.encode(probe))
    assert np.isclose(np.linalg.norm(lex.encode(probe)[0]), 1) and not lex.encode(probe)[1].any()


def test_fused_vectors_are_unit_and_keep_the_dense_part(encoder):
    fused = fit_encoder("minilm+tfidf", encoder, TEXTS)
    assert isinstance(fused, FusedEncoder) and fused.dim == encoder.dim + fused.lexical.dim
    v = fused.encode(TEXTS[:5])
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(v[:, : encoder.dim] * np.sqrt(1 + fused.weight**2), encoder.encode(TEXTS[:5]), atol=1e-5)
    assert fit_encoder("minilm", encoder, TEXTS) is encoder
    with pytest.raises(ValueError, match="unknown embedding 'bogus'"):
        fit_encoder("bogus", encoder, TEXTS)


def test_checkpoint_restores_the_fitted_encoder(tmp_path, encoder, outcomes_small):
    fused = fit_encoder("minilm+tfidf", encoder, outcomes_small.train.texts)
    policy = make_policy("knn", encoder=fused, config={"k": 10})
    policy.add_models(outcomes_small.cards)
    train = outcomes_small.train.subset(np.arange(len(outcomes_small.train)))
    train.emb = fused.encode(train.texts)
    policy.fit(train, outcomes_small.cards)
    ck = checkpoint.save(tmp_path, policy)
    assert checkpoint.stored_config(ck.path)["embedding"] == "minilm+tfidf"
    # loaded with the plain dense encoder (what a router or learner starts with): the fused one comes back
    loaded = checkpoint.load_policy(tmp_path, encoder=encoder)
    assert loaded.encoder.name == fused.name
    q = outcomes_small.test.texts[:7]
    np.testing.assert_array_equal(loaded.encoder.encode(q), fused.encode(q))
    np.testing.assert_allclose(loaded.score(loaded.encoder.encode(q), outcomes_small.cards), policy.score(fused.encode(q), outcomes_small.cards))
    # the same fitted part is reused, not rebuilt; a MiniLM-only checkpoint gives the dense encoder back
    assert restore_encoder(checkpoint.read_state(ck.path)["encoder"], loaded.encoder) is loaded.encoder
    checkpoint.save(tmp_path / "plain", make_policy("knn", encoder=encoder))
    plain = checkpoint.load_policy(tmp_path / "plain", encoder=loaded.encoder)
    assert plain.encoder is encoder and checkpoint.stored_config(checkpoint.resolve(tmp_path / "plain"))["embedding"] == "minilm"


@pytest.fixture(scope="module")
def mini_bench(tmp_path_factory, data_root):
    from tests.unit.bench_data import write_mini_cmrbench

    out = tmp_path_factory.mktemp("mini_bench_lex")
    write_mini_cmrbench(data_root / "cmrbench", out, n_train=40, n_test=10)
    return out


def test_router_and_learner_serve_the_checkpoint_encoder(tmp_path, mini_bench, encoder):
    from cmr.continual.learner import Learner
    from services.config import AppArgs, load_args
    from cmr.published import publish
    from services.routing import RouteRequest, RouterCore, check_checkpoint_config, checkpoint_root

    with pytest.raises(ConfigError, match="field 'embedding'"):
        load_args({"embedding": "tfidf"})
    args = AppArgs(home=str(tmp_path), bench=str(mini_bench), tiny_models=False, profile_size=4, embedding="minilm+tfidf",
                   policy="carve", learner={"enabled": False})
    core = RouterCore(args, encoder)  # first start: fits the lexical part, trains, writes v1
    assert isinstance(core.encoder, FusedEncoder) and core.index.dim == core.encoder.dim
    root = checkpoint_root(args)
    assert checkpoint.stored_config(checkpoint.resolve(root))["embedding"] == "minilm+tfidf"
    queries = ["Classify the objects in a street photo.", "Translate this paragraph from German to English."]
    decided = core.route([RouteRequest(query=q, record=False) for q in queries])
    # what a benchmark or `cmr calibrate` gets from the checkpoint: the same vectors, the same choice
    bench_policy = checkpoint.load_policy(root, encoder=encoder)
    np.testing.assert_allclose(core.query_encoder.encode(queries), bench_policy.encoder.encode(queries), atol=1e-6)
    scores = bench_policy.score(bench_policy.encoder.encode(queries), core.models())
    assert [d.model for d in decided] == [core.models()[j].id for j in scores.argmax(axis=1)]
    # the learner resumes with the dense encoder and writes a checkpoint with the same fitted part: served
    learner = Learner.resume(checkpoint.latest(root), encoder=encoder, store=root)
    assert learner.policy.encoder.name == core.encoder.name
    ck2 = learner.checkpoint({"offset": 0})
    publish(core.published, root, ck2)  # what the learner actor's checkpoint hook does
    v2 = ck2.version
    assert core.check_checkpoint() == v2
    # a checkpoint embedding differently (MiniLM alone) is not swapped in: the router keeps serving v2
    other = checkpoint.save(root, make_policy("carve", encoder=encoder, config=checkpoint.stored_config(checkpoint.resolve(root))["config"]))
    publish(core.published, root, other)
    assert core.check_checkpoint() == v2
    core.close()
    # an explicit embedding that differs from the newest checkpoint's (now MiniLM alone) is refused
    with pytest.raises(ConfigError, match=r"field 'embedding': 'minilm\+tfidf' differs from checkpoint v3"):
        check_checkpoint_config(args)
    check_checkpoint_config(args.model_copy(update={"embedding": "minilm"}))
    check_checkpoint_config(args.model_copy(update={"embedding": "auto"}))  # auto: whatever the checkpoint embeds with


def test_auto_fuses_where_the_texts_are_enough_and_stays_dense_otherwise(tmp_path, mini_bench, encoder):
    """``embedding: auto`` (the router's and ``cmr train``'s default) fuses labelled rows when fitted
    on ``AUTO_MIN_TEXTS`` texts holding terms enough; on fewer, on texts without shared terms, or on
    outcome rows, it is the dense encoder alone, where an explicit ``minilm+tfidf`` is refused. A first start that
    trains on no prompts stays dense whatever the hub holds."""
    from cmr.encoders.lexical import AUTO_MIN_TEXTS, embedding_of
    from services.config import AppArgs
    from services.routing import RouterCore, checkpoint_root

    assert AppArgs().embedding == "auto"
    many = [f"{t} ({i})" for i, t in enumerate(TEXTS * (AUTO_MIN_TEXTS // len(TEXTS) + 1))][:AUTO_MIN_TEXTS]
    fused = fit_encoder("auto", encoder, many)
    assert isinstance(fused, FusedEncoder) and embedding_of(fused) == "minilm+tfidf"
    assert fit_encoder("auto", encoder, many[:-1]) is encoder and embedding_of(encoder) == "minilm"
    # outcome rows (a quality per model) stay dense however many texts; an explicit choice still fuses
    assert fit_encoder("auto", encoder, many, labelled=False) is encoder
    assert isinstance(fit_encoder("minilm+tfidf", encoder, many, labelled=False), FusedEncoder)
    no_terms = [chr(0x4E00 + i) for i in range(AUTO_MIN_TEXTS)]  # one distinct character each: no shared term
    assert fit_encoder("auto", encoder, no_terms) is encoder
    with pytest.raises(ConfigError, match="field 'embedding'"):
        fit_encoder("minilm+tfidf", encoder, no_terms)
    # a router's first start with the default: the mini bench's prompts and its cards are too few here
    args = AppArgs(home=str(tmp_path / "a"), bench=str(mini_bench), tiny_models=False, profile_size=0, policy="knn", learner={"enabled": False})
    core = RouterCore(args, encoder)
    assert core.encoder is not None and not isinstance(core.encoder, FusedEncoder)
    assert checkpoint.stored_config(checkpoint.resolve(checkpoint_root(args)))["embedding"] == "minilm"
    core.close()
