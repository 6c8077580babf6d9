"""The contract every registered routing policy keeps, checked through the public interface only.

Parametrised over ``policy_names()``: a policy added to the registry is checked here too.
Data: small real slices (CMRBench one-hot labels over a growing hub; RouterBench outcome
matrix with NaN-free scores and per-call costs), embedded with the real MiniLM encoder.
"""

from __future__ import annotations

import copy
import json
import pickle
import typing
from dataclasses import fields

import numpy as np
import pytest

from cmr.continual.learner import Learner
from cmr.decide import choose
from cmr.errors import ConfigError
from cmr.policies import make_policy, policy_class, policy_names
from cmr.types import FeedbackEvent, ModelCard

NEW_CARD = ModelCard(id="contract/brand-new-summariser", domain="Summarization", description="Summarises long news articles into three sentences.")
GHOST_CARD = ModelCard(id="contract/never-added-model", description="A model the policy was never told about.")


def _plain(obj) -> bool:
    """``state_dict`` values must be numpy arrays or JSON-able values (checkpoints store them)."""
    if obj is None or isinstance(obj, (str, bool, int, float, np.ndarray, np.generic)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_plain(x) for x in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    return False


def _fit_cmr(policy, bench):
    """The continual protocol on the small slice: one fit per experience, hub growing."""
    learner = Learner(policy)
    for exp in bench.experiences:
        learner.fit(exp.train, bench.cards_upto(exp.k))
    test = bench.experiences[-1].test
    if policy.needs_truth:
        policy.reveal(test)
    return test, bench.cards_upto(bench.experiences[-1].k)


def _fit_outcomes(policy, data):
    Learner(policy).fit(data.train, data.cards)
    if policy.needs_truth:
        policy.reveal(data.test)
    return data.test, data.cards


def _is_stochastic(policy, q, cards) -> bool:
    """Two calls from the same state differ: the policy samples (its RNG state is in state_dict)."""
    state = copy.deepcopy(policy.state_dict())
    a, b = policy.score(q, cards), policy.score(q, cards)
    policy.load_state_dict(state)
    return not np.array_equal(a, b)


@pytest.fixture(scope="module")
def _fitted_states():
    """(data kind, policy name) -> pickled state_dict of a fitted policy: most checks start from
    a restored copy instead of fitting again (some policies train for seconds)."""
    return {}


@pytest.fixture(params=["cmr", "outcomes"])
def fitted(request, encoder, cmr_small, outcomes_small, _fitted_states):
    """A factory: policy name -> (policy, test Examples, candidate cards), fitted on one data kind.

    ``fresh=True`` always fits a new instance (the state round-trip test needs a genuinely
    fitted one); otherwise a policy fitted earlier in this module is restored from its state.
    """

    def build(name, fresh=False):
        if request.param == "cmr":
            last = cmr_small.experiences[-1]
            test, cards = last.test, cmr_small.cards_upto(last.k)
        else:
            test, cards = outcomes_small.test, outcomes_small.cards
        key = (request.param, name)
        if not fresh and key in _fitted_states:
            policy = make_policy(name, encoder=encoder)
            policy.load_state_dict(pickle.loads(_fitted_states[key]))
            return policy, test, cards
        policy = make_policy(name, encoder=encoder)
        if request.param == "cmr":
            _fit_cmr(policy, cmr_small)
        else:
            _fit_outcomes(policy, outcomes_small)
        if not fresh:
            _fitted_states[key] = pickle.dumps(policy.state_dict())
        return policy, test, cards

    return build


@pytest.mark.parametrize("name", policy_names())
def test_docstring_and_config_round_trip(name, encoder):
    policy = make_policy(name, encoder=encoder)
    doc = (type(policy).__doc__ or "").strip()
    assert doc and doc.splitlines()[0].strip(), f"{name}: needs a one-line docstring summary"
    cfg = json.loads(json.dumps(policy.config.to_dict()))  # what checkpoints and config files hold
    assert type(policy.config).from_dict(cfg) == policy.config
    assert make_policy(name, encoder=encoder, config=cfg).config == policy.config
    with pytest.raises(ConfigError, match="field 'no_such_option_xyz': unknown option"):
        type(policy.config).from_dict({**cfg, "no_such_option_xyz": 1})


def _kind(hint) -> str:
    """The base type of a config field's hint (Annotated, Optional and Literal unwrapped)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return "literal"
    if typing.get_origin(hint) in (typing.Annotated, typing.Union, type(int | None)):
        return _kind(args[0])
    return hint.__name__


@pytest.mark.parametrize("name", policy_names())
def test_every_config_field_is_typed(name):
    """Every field of every policy's config refuses a value of the wrong type, naming the field:
    one mechanism (typed pydantic dataclasses), no policy left out."""
    cls = policy_class(name).Config
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in fields(cls):
        kind = _kind(hints[f.name])
        bad = {"float": ["fast", float("nan"), float("inf")], "int": ["3", 2.5, True], "bool": ["yes", 1],
               "literal": ["no-such-choice"], "str": [3], "list": ["knn", [3], ["no-such-choice"]]}[kind]
        for v in bad:
            # a list's bad item is named by its index: field 'name.0'
            with pytest.raises(ConfigError, match=rf"field '{f.name}(\.\d+)?'"):
                cls.from_dict({f.name: v})
    with pytest.raises(ConfigError, match="must be an object"):
        cls.from_dict(["seed", 1])


@pytest.mark.parametrize(
    "name, bad",
    [("carve", {"lr": 0}), ("carve", {"temperature": -1}), ("carve", {"replay": 1.5}), ("carve", {"batch_size": 0}), ("carve", {"head": "bogus"}),
     ("knn", {"k": 0}), ("knn", {"weighting": "cosine"}), ("cluster", {"n_clusters": 0}), ("cluster", {"smoothing": -1.0}),
     ("oracle", {"unknown_score": 0.5}), ("linucb", {"alpha": -1}), ("thompson", {"projection": "svd"}), ("thompson", {"pca_rows": 1}),
     ("uniroute", {"assign": "fuzzy"}), ("uniroute-map", {"n_clusters": 0}), ("uniroute-map", {"assign": "hard"}), ("random", {"seed": -1})],
)
def test_config_out_of_range_names_the_field(name, bad):
    (field,) = bad
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        make_policy(name, config=bad)
    # a config object built elsewhere is checked again when the policy takes it
    cfg = policy_class(name).Config()
    setattr(cfg, field, bad[field])
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        make_policy(name, config=cfg)


@pytest.mark.parametrize("name", policy_names())
def test_score_shape_finite_and_decidable(name, fitted):
    policy, test, cards = fitted(name)
    s = policy.score(test.emb, cards)
    assert isinstance(s, np.ndarray) and s.dtype.kind == "f"
    assert s.shape == (len(test), len(cards))
    assert np.isfinite(s).all()
    costs = np.array([c.cost for c in cards])
    idx = choose(s, costs, 0.5)
    assert idx.shape == (len(test),) and ((idx >= 0) & (idx < len(cards))).all()
    one = policy.score(test.emb[0], cards)  # a single query vector is one row
    assert one.shape == (1, len(cards)) and np.isfinite(one).all()


@pytest.mark.parametrize("name", policy_names())
def test_scores_follow_candidate_permutation_and_batching(name, fitted):
    policy, test, cards = fitted(name)
    q = test.emb[:12]
    if _is_stochastic(policy, q, cards):
        pytest.skip(f"{name} samples its scores: checked by the state round-trip instead")
    base = policy.score(q, cards)
    perm = np.random.default_rng(1).permutation(len(cards))
    permuted = policy.score(q, [cards[i] for i in perm])
    np.testing.assert_allclose(permuted, base[:, perm], rtol=1e-5, atol=1e-6)
    # a query's scores do not depend on the other queries of its batch
    np.testing.assert_allclose(policy.score(q[:3], cards), base[:3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", policy_names())
def test_unseen_candidates_get_finite_scores(name, fitted):
    policy, test, cards = fitted(name)
    policy.add_models([NEW_CARD])
    s = policy.score(test.emb[:8], [*cards[:5], NEW_CARD, GHOST_CARD])
    assert s.shape == (8, 7) and np.isfinite(s).all()
    only_new = policy.score(test.emb[:8], [GHOST_CARD])
    assert only_new.shape == (8, 1) and np.isfinite(only_new).all()


@pytest.mark.parametrize("name", policy_names())
def test_state_dict_round_trip_gives_identical_scores(name, fitted, encoder):
    policy, test, cards = fitted(name, fresh=True)
    policy.add_models([NEW_CARD])
    cands = [*cards, NEW_CARD]
    state = policy.state_dict()
    assert _plain(state), f"{name}: state_dict must hold numpy arrays and JSON-able values only"
    state = pickle.loads(pickle.dumps(state))  # what a checkpoint does; also breaks any aliasing
    expected = policy.score(test.emb, cands)
    fresh = make_policy(name, encoder=encoder)
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(fresh.score(test.emb, cands), expected)
    # and the restored policy carries on exactly as the original (stochastic streams continue)
    np.testing.assert_array_equal(fresh.score(test.emb[:5], cands), policy.score(test.emb[:5], cands))


@pytest.mark.parametrize("name", policy_names())
def test_update_with_partial_feedback_keeps_working(name, fitted):
    policy, test, cards = fitted(name)
    s = policy.score(test.emb[:6], cards)
    chosen = choose(s, np.array([c.cost for c in cards]), 0.0)
    events = [
        FeedbackEvent(request_id=f"r{i}", model=cards[j].id, reward=float(i % 2), query=test.texts[i], embedding=test.emb[i].tolist(), cost=cards[j].cost)
        for i, j in enumerate(chosen)
    ]
    # feedback about a model that is not a candidate yet must not break anything either
    events.append(FeedbackEvent(request_id="r-new", model=NEW_CARD.id, reward=1.0, query=test.texts[0], embedding=test.emb[0].tolist()))
    learner = Learner(policy)
    learner.consume(events)
    learner.consume([])
    after = policy.score(test.emb, [*cards, NEW_CARD])
    assert after.shape == (len(test), len(cards) + 1) and np.isfinite(after).all()


@pytest.mark.parametrize("name", policy_names())
def test_fit_continues_after_restore(name, encoder, cmr_small):
    """A restored policy (and its learner) can keep learning: the continual loop checkpoints
    between experiences."""
    first, second = cmr_small.experiences[0], cmr_small.experiences[1]
    policy = make_policy(name, encoder=encoder)
    learner = Learner(policy)
    learner.fit(first.train, cmr_small.cards_upto(first.k))
    state = pickle.loads(pickle.dumps(learner.checkpoint({}).state))
    fresh = make_policy(name, encoder=encoder)
    fresh.load_state_dict(state)
    again = Learner(fresh)
    again.load_state_dict(state["learner"])
    for lr in (learner, again):
        lr.fit(second.train, cmr_small.cards_upto(second.k))
        if lr.policy.needs_truth:
            lr.policy.reveal(second.test)
    cards = cmr_small.cards_upto(second.k)
    a, b = policy.score(second.test.emb, cards), fresh.score(second.test.emb, cards)
    assert np.isfinite(a).all()
    if not _is_stochastic(policy, second.test.emb, cards):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("argv, field", [(["bench", "cmr", "--set", "lr=fast"], "lr"), (["bench", "cmr", "--set", "temperature=-1"], "temperature"),
                                         (["train", "--set", "epochs=2.5"], "epochs")])
def test_cli_refuses_a_bad_policy_option(argv, field, tmp_path, capsys):
    """A bad ``--set`` is one line naming the field, exit 2, before any data is read or written."""
    from cmr.cli import main

    code = main([*argv, "--policy", "carve", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"field '{field}'" in err[0]
    assert not (tmp_path / "out").exists()
