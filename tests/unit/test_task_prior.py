"""A query's task as a feature (issue 15): knn may shrink each model's estimate towards the
model's prior within the query's task instead of its global prior, as its leave-one-out decides.

The prompts' embeddings here carry no signal (random unit vectors), so only the task can tell
the models apart; the cards are embedded by the real MiniLM."""

from __future__ import annotations

import numpy as np
import pytest

from cmr.data.examples import Examples
from cmr.policies import make_policy
from cmr.types import ModelCard

N_MODELS = 4
CARDS = [ModelCard(id=f"m{j}", cost=1.0) for j in range(N_MODELS)]


def make_set(n: int, rates: np.ndarray, seed: int) -> Examples:
    """``n`` prompts over ``len(rates)`` tasks (rows of ``rates``: each model's success rate in
    that task), binary outcomes, random unit embeddings."""
    rng = np.random.default_rng(seed)
    task = rng.integers(len(rates), size=n)
    scores = (rng.random((n, N_MODELS)) < rates[task]).astype(np.float32)
    emb = rng.normal(size=(n, 384)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return Examples(texts=[f"q{i}" for i in range(n)], model_ids=[c.id for c in CARDS], scores=scores,
                    meta={"task": [f"t{t}" for t in task]}, emb=emb)


#: each model best on one task: the global prior is nearly flat, the task prior is not
TASKS_MATTER = np.array([[0.9, 0.3, 0.3, 0.3], [0.3, 0.9, 0.3, 0.3], [0.3, 0.3, 0.9, 0.3], [0.3, 0.3, 0.3, 0.9]])


def fitted(encoder, train: Examples, **config):
    pol = make_policy("knn", encoder, config)
    pol.add_models(CARDS)
    pol.fit(train, CARDS)
    return pol


def routed(pol, test: Examples, tasks) -> float:
    pick = pol.score(test.emb, CARDS, tasks).argmax(axis=1)
    return float(test.scores[np.arange(len(test)), pick].mean())


@pytest.fixture(scope="module")
def matter():
    return make_set(800, TASKS_MATTER, seed=1), make_set(400, TASKS_MATTER, seed=2)


def test_task_aware_beats_task_blind_where_tasks_matter(encoder, matter):
    train, test = matter
    aware = fitted(encoder, train)
    blind = fitted(encoder, train, task_prior=False)
    assert aware.describe()["task_prior"] is True
    assert routed(aware, test, test.meta["task"]) > routed(blind, test, test.meta["task"]) + 0.2


def test_no_task_unseen_task_and_no_tasks_in_training_are_task_blind(encoder, matter):
    train, test = matter
    aware = fitted(encoder, train)
    plain = aware.score(test.emb, CARDS)
    assert np.array_equal(plain, fitted(encoder, train, task_prior=False).score(test.emb, CARDS, test.meta["task"]))
    assert np.array_equal(aware.score(test.emb, CARDS, [""] * len(test)), plain)
    assert np.array_equal(aware.score(test.emb, CARDS, ["never-seen"] * len(test)), plain)
    # a data set without tasks: exactly the task-blind policy, tasks at scoring or not
    bare = Examples(texts=train.texts, model_ids=train.model_ids, scores=train.scores, emb=train.emb)
    untasked = fitted(encoder, bare)
    blind = fitted(encoder, bare, task_prior=False)
    settings = ("shrinkage", "prior_weight", "task_prior")
    assert [untasked.describe()[k] for k in settings] == [blind.describe()[k] for k in settings]
    assert np.array_equal(untasked.score(test.emb, CARDS, test.meta["task"]), blind.score(test.emb, CARDS))


def test_mixed_queries_use_the_task_prior_only_where_known(encoder, matter):
    train, test = matter
    aware = fitted(encoder, train)
    tasks = [t if i % 2 else "unseen" for i, t in enumerate(test.meta["task"])]
    got = aware.score(test.emb, CARDS, tasks)
    assert np.array_equal(got[1::2], aware.score(test.emb, CARDS, test.meta["task"])[1::2])
    assert np.array_equal(got[0::2], aware.score(test.emb, CARDS)[0::2])
    with pytest.raises(ValueError, match="'task'"):
        aware.score(test.emb, CARDS, tasks[:-1])


def test_tasks_that_say_nothing_keep_the_global_prior(encoder):
    flat = np.tile([0.6, 0.5, 0.5, 0.4], (6, 1))
    pol = fitted(encoder, make_set(800, flat, seed=3))
    assert pol.describe()["task_prior"] is False


def test_state_round_trip_keeps_tasks(encoder, matter):
    train, test = matter
    aware = fitted(encoder, train)
    again = make_policy("knn", encoder)
    again.load_state_dict(aware.state_dict())
    assert again._mem.tasks == aware._mem.tasks == train.meta["task"]
    assert again.describe() == aware.describe()
    assert np.array_equal(again.score(test.emb, CARDS, test.meta["task"]), aware.score(test.emb, CARDS, test.meta["task"]))


def test_task_prior_leave_one_out_and_single_task():
    from cmr.policies.memory import OutcomeMemory

    mem = OutcomeMemory()
    a = [1, 1, 1, 0, 1, 1, 0, 0, 0, 1, 0, 0, 1]
    scores = np.array([[v, 1 - v] for v in a[:-1]] + [[1, np.nan]], dtype=np.float32)
    mem.add(np.eye(13, dtype=np.float32), ["a", "b"], scores, ["x"] * 6 + ["y"] * 6 + [""])
    tp = mem.task_prior()
    cols = mem.columns(["a", "b", "new"])
    got = tp.of(mem, ["x", "y", "z"], cols)
    glob = mem.model_prior()
    assert got[2, 0] == pytest.approx(glob[0][0])  # a task never stored: the global prior
    # a model never met: the average model's prior on the task's scale
    assert got[0, 2] == pytest.approx(np.clip(glob[1] + tp.delta[tp.index["x"]], *tp.bounds))
    assert got[0, 0] > got[1, 0] and got[1, 1] > got[0, 1]
    loo = tp.of(mem, ["x"], cols, drop=np.array([[1.0, 0.0, np.nan]]))
    assert loo[0, 0] < got[0, 0]  # its own success left out
    one = OutcomeMemory()
    one.add(np.eye(2, dtype=np.float32), ["a"], np.array([[1], [0]], dtype=np.float32), ["x", "x"])
    assert one.task_prior().of(one, ["x"], one.columns(["a"]))[0, 0] == pytest.approx(one.model_prior()[0][0])


def test_feedback_that_names_tasks_teaches_the_task_prior(encoder):
    """The served learning path: partial feedback whose decisions named a task (``FeedbackEvent.task``,
    from ``routing.task``) is learnt with it, and a query naming that task then ranks by it."""
    from cmr.types import FeedbackEvent

    train = make_set(1200, TASKS_MATTER, seed=5)
    rng = np.random.default_rng(6)
    events = []
    for i in range(len(train)):  # one chosen model per prompt, as feedback would have it
        j = int(rng.integers(N_MODELS))
        events.append(FeedbackEvent(request_id=f"r{i}", model=CARDS[j].id, reward=float(train.scores[i, j]),
                                    embedding=train.emb[i].tolist(), task=train.meta["task"][i]))
    pol = make_policy("knn", encoder, {"task_prior": True, "shrinkage": 1.0, "prior_weight": 0.0})
    pol.add_models(CARDS)
    pol.update(events)
    assert sorted(set(pol._mem.tasks)) == ["t0", "t1", "t2", "t3"]
    q = make_set(400, TASKS_MATTER, seed=7)
    best = pol.score(q.emb, CARDS, tasks=q.meta["task"]).argmax(axis=1)
    assert (best == np.array([int(t[1:]) for t in q.meta["task"]])).mean() > 0.8
    blind = pol.score(q.emb, CARDS).argmax(axis=1)
    assert (blind == np.array([int(t[1:]) for t in q.meta["task"]])).mean() < 0.5


def make_clustered(n: int, rates: np.ndarray, seed: int, spread: float = 2.0) -> Examples:
    """As :func:`make_set`, but each task's prompts lie around a centre of their own, so a
    prompt's neighbours tell which task it is like (the outcomes stay coin flips at the task's
    rates: a neighbour's own outcome says little, its task's many rows say much)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(len(rates), 384))
    data = make_set(n, rates, seed)
    task = np.array([int(t[1:]) for t in data.meta["task"]])
    emb = centres[task] + spread * rng.normal(size=(n, 384)) * np.sqrt(len(rates))
    data.emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    return data


def test_a_query_naming_no_task_takes_its_neighbours_task_priors(encoder):
    """Served requests rarely name a task: knn then shrinks towards the task priors of the
    query's neighbours, chosen by its leave-one-out where that beats the task-blind settings;
    a query naming a task never stored is scored the same way."""
    rates = np.array([[0.7, 0.5, 0.5, 0.5], [0.5, 0.7, 0.5, 0.5], [0.5, 0.5, 0.7, 0.5], [0.5, 0.5, 0.5, 0.7]])
    train, test = make_clustered(400, rates, seed=11), make_clustered(800, rates, seed=12)
    aware = fitted(encoder, train)
    blind = fitted(encoder, train, task_prior=False)
    assert aware.describe()["neighbour_tasks"] is True
    unnamed = routed(aware, test, None)
    assert unnamed > routed(blind, test, None) + 0.03
    assert unnamed > routed(aware, test, test.meta["task"]) - 0.02  # nearly what naming the task gives
    assert np.array_equal(aware.score(test.emb, CARDS, ["never-seen"] * len(test)), aware.score(test.emb, CARDS))


def test_the_neighbours_task_prior_is_their_tasks_priors_weighted_as_the_neighbours():
    """With the neighbours' own outcomes shrunk away, an unnamed query's scores are exactly the
    task priors of its k neighbours, weighted as knn weighs those neighbours."""
    train = make_clustered(300, TASKS_MATTER, seed=13)
    pol = make_policy("knn", None, {"task_prior": True, "shrinkage": 1e12, "prior_weight": 0.0, "k": 7, "weighting": "similarity"})
    pol.add_models(CARDS)
    pol.fit(train, CARDS)
    q = make_clustered(20, TASKS_MATTER, seed=14).emb
    mem = pol._mem
    tp = mem.task_prior()
    cols = mem.columns([c.id for c in CARDS])
    sims = q @ mem.emb.T
    want = np.zeros((len(q), N_MODELS))
    for i in range(len(q)):
        nb = np.argsort(-sims[i])[:7]
        w = np.maximum(sims[i, nb], 0.0)
        want[i] = sum(wj * tp.of(mem, [mem.tasks[j]], cols)[0] for j, wj in zip(nb, w)) / w.sum()
    assert np.allclose(pol.score(q, CARDS), want, atol=1e-5)
    # a named task: that task's prior alone
    assert np.allclose(pol.score(q, CARDS, ["t2"] * len(q)), tp.of(mem, ["t2"], cols)[0], atol=1e-5)


def test_a_model_known_only_from_rows_naming_no_task_ranks_on_each_tasks_scale():
    """A model that joined by profile answers (rows naming no task) has no outcome in any task:
    its prior there is its global one moved by the task's offset, so on a task where every
    known model does worse than overall it does not outrank them on its overall mean alone."""
    from cmr.policies.memory import OutcomeMemory

    mem = OutcomeMemory()
    rng = np.random.default_rng(0)
    n = 400
    old = np.concatenate([rng.random(n) < 0.9, rng.random(n) < 0.4]).astype(np.float32)  # easy, hard
    mem.add(rng.normal(size=(2 * n, 8)).astype(np.float32), ["old"], old[:, None], ["easy"] * n + ["hard"] * n)
    new = (rng.random(200) < 0.6).astype(np.float32)  # overall a little below old, task unknown
    mem.add(rng.normal(size=(200, 8)).astype(np.float32), ["new"], new[:, None], [""] * 200)
    tp = mem.task_prior()
    got = tp.of(mem, ["easy", "hard"], mem.columns(["old", "new"]))
    assert got[1, 1] < got[1, 0] < 0.5  # on the hard task: new below old
    assert got[0, 1] > 0.75  # on the easy one: high, as every model there


def test_profile_prompts_tasks_teach_a_joining_models_task_priors(encoder):
    """A model that joins by answering the profile prompts learns per-task priors from them
    when the profile prompts carry their tasks (``set_profile_prompts(..., tasks)``), and the
    tasks survive a state round trip."""
    import dataclasses

    train = make_set(800, TASKS_MATTER, seed=21)
    prof = make_set(200, TASKS_MATTER, seed=22)
    ids = [f"p{i}" for i in range(len(prof))]
    pol = make_policy("knn", encoder, {"task_prior": True, "shrinkage": 1.0, "prior_weight": 0.0})
    pol.set_profile_prompts(ids, prof.emb, prof.meta["task"])
    pol.add_models(CARDS)
    pol.fit(train, CARDS)
    # a newcomer best on t2, known only by its profile answers
    rate = np.array([0.3, 0.3, 1.0, 0.3])[[int(t[1:]) for t in prof.meta["task"]]]
    answers = (np.random.default_rng(23).random(len(prof)) < rate).astype(float)
    new = dataclasses.replace(ModelCard(id="new", cost=1.0), profile={p: float(a) for p, a in zip(ids, answers)})
    pol.add_models([new])
    tp = pol._mem.task_prior()
    got = tp.of(pol._mem, ["t2", "t0"], pol._mem.columns(["new", "m2"]))
    assert got[0, 0] > got[0, 1] and got[1, 0] < 0.5  # best on t2 by its own answers there, poor on t0
    q = make_set(200, TASKS_MATTER, seed=24)
    again = make_policy("knn", encoder)
    again.load_state_dict(pol.state_dict())
    assert again._profile_tasks == pol._profile_tasks == prof.meta["task"]
    cards = [*CARDS, new]
    assert np.array_equal(again.score(q.emb, cards, q.meta["task"]), pol.score(q.emb, cards, q.meta["task"]))
    with pytest.raises(ValueError, match="'task'"):
        pol.set_profile_prompts(ids, prof.emb, prof.meta["task"][:-1])
