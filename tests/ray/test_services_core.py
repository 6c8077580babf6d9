"""The serving layer's parts that need no Ray: decision/feedback store, router core, AppArgs and
config files, the CLI's validation, engines, and the router's vectorised candidate filter."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from cmr.decide import Filters
from cmr.errors import CMRError
from cmr.types import Decision, ModelCard

REPO = Path(__file__).resolve().parents[2]


def _decision(rid: str, model: str = "m1") -> Decision:
    return Decision(model=model, score=0.5, utility=0.5, alternatives=[("m2", 0.4)], checkpoint_version=1, request_id=rid)


def test_store_feedback_log(tmp_path):
    from services.store import DecisionStore, DuplicateFeedbackError, UnknownRequestError

    st = DecisionStore(tmp_path / "d.sqlite")
    emb = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    st.record([_decision("r1"), _decision("r2", "m2")], ["q one", "q two"], emb, [0.1, 0.2])
    assert st.decision("r2").alternatives == [("m2", 0.4)]
    assert st.add_feedback("r2", 1.0) == 1 and st.add_feedback("r1", 0.25) == 2
    with pytest.raises(UnknownRequestError, match="request_id"):
        st.add_feedback("nope", 1.0)
    with pytest.raises(DuplicateFeedbackError, match="request_id"):
        st.add_feedback("r1", 1.0)
    with pytest.raises(ValueError, match="reward"):
        st.add_feedback("r2", 1.5)
    ev = st.events()
    assert [(e.request_id, e.model, e.reward, e.cost, e.offset) for e in ev] == [("r2", "m2", 1.0, pytest.approx(0.2), 1), ("r1", "m1", 0.25, pytest.approx(0.1), 2)]
    np.testing.assert_array_equal(np.asarray(ev[0].embedding, np.float32), emb[1])
    assert [e.offset for e in st.events(after=1)] == [2] and st.last_offset() == 2
    st.close()
    assert DecisionStore(tmp_path / "d.sqlite").last_offset() == 2  # durable


def test_app_args_validation_names_fields(tmp_path):
    from services.config import AppArgs, ConfigError, load_args, read_config

    a = AppArgs()
    assert a.policy == "auto" and a.learner.enabled and AppArgs.from_dict(a.to_dict()) == a
    cases = [({"polcy": "knn"}, "polcy"), ({"policy": "nope"}, "policy"), ({"top_k": 0}, "top_k"),
             ({"pools": [{"name": "p", "models": [{"id": "m", "engine": "tgi"}]}]}, "pools.0.models.0.engine"),
             ({"pools": [{"name": "p"}, {"name": "p"}]}, "pool names")]
    for data, field in cases:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_args(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        read_config(bad)


def test_cluster_serve_yaml_is_a_valid_serve_config():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from services.config import load_args, read_config

    raw = yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.applications[0].import_path == "services.app:build_app"
    assert schema.grpc_options.grpc_servicer_functions == ["services.grpc.cmr_pb2_grpc.add_CMRServicer_to_server"]
    args = load_args(read_config(REPO / "cluster" / "serve.yaml"))
    assert {p.name for p in args.pools} == {"cpu-small", "gpu-vllm", "remote"}
    assert args.pools[0].autoscaling_config["max_replicas"] == 4


def test_cmr_serve_refuses_bad_config_before_starting(tmp_path, capsys):
    from cmr.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("retrieve_k: -3\n")
    assert main(["serve", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "retrieve_k" in err and err.count("\n") == 1


def test_grpc_code_is_reproducible(tmp_path):
    """The committed generated code equals what the pinned generator makes from cmr.proto."""
    from importlib.metadata import version

    from grpc_tools import protoc

    from services.grpc.generate import PINNED

    if {n: version(n) for n in PINNED} != PINNED:
        pytest.skip("generator versions differ from the pins")
    assert protoc.main(["protoc", f"-I{REPO}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(REPO / "services/grpc/cmr.proto")]) == 0
    for name in ("cmr_pb2.py", "cmr_pb2_grpc.py"):
        assert (tmp_path / "services/grpc" / name).read_text() == (REPO / "services/grpc" / name).read_text()


def test_transformers_engine_generates_from_a_local_folder(tmp_path):
    from services.pools.base import GenRequest, make_engine
    from services.pools.tiny import ensure_tiny_models

    folders = ensure_tiny_models(tmp_path / "models")
    assert set(folders) == {"tiny-gpt2-a", "tiny-gpt2-b"} and ensure_tiny_models(tmp_path / "models") == folders  # idempotent
    eng = make_engine("tiny-gpt2-a", {"engine": "transformers", "path": str(folders["tiny-gpt2-a"])})

    async def go(req):
        return [c async for c in eng.generate(req)]

    req = GenRequest(model="tiny-gpt2-a", messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0)
    a, b = asyncio.run(go(req)), asyncio.run(go(req))
    assert a[-1].completion_tokens == 6 and a[-1].finish_reason == "length" and a[-1].prompt_tokens > 0
    text = "".join(c.text for c in a)
    assert text == "".join(c.text for c in b)  # greedy is deterministic
    # a stop string cuts the text before it and ends generation with finish_reason "stop"
    stop = text[2:4]
    assert stop and text.find(stop) >= 0
    c = asyncio.run(go(GenRequest(model="tiny-gpt2-a", messages=req.messages, max_tokens=6, temperature=0, stop=[stop])))
    assert "".join(x.text for x in c) == text[: text.find(stop)] and c[-1].finish_reason == "stop"
    # a prompt longer than the context window keeps its end and still generates
    window = eng.model.config.n_positions
    long = asyncio.run(go(GenRequest(model="tiny-gpt2-a", prompt="word " * (3 * window), max_tokens=6, temperature=0)))
    assert long[-1].completion_tokens == 6 and long[-1].prompt_tokens == window - 6


def test_vectorised_filter_mask_matches_decide_filters():
    """The router's numpy candidate mask agrees with cmr.decide.Filters.mask on random filters."""
    from services.routing import RouteRequest, _build_table

    rng = np.random.default_rng(0)
    cards = [ModelCard(id=f"m{i}", domain=f"d{i % 4}", family=f"f{i % 3}", cost=float(rng.uniform(0, 1)),
                       backend={"engine": "transformers"} if i % 5 == 0 else {}) for i in range(200)]
    table = _build_table(cards, np.zeros((200, 4), np.float32))
    for _ in range(50):
        f = Filters(
            domains=list(rng.choice([f"d{i}" for i in range(5)], 2)) if rng.random() < 0.5 else None,
            families=list(rng.choice([f"f{i}" for i in range(3)], 1)) if rng.random() < 0.5 else None,
            max_cost=float(rng.uniform()) if rng.random() < 0.5 else None,
            allow=[f"m{i}" for i in rng.choice(250, 60)] if rng.random() < 0.5 else None,
            deny=[f"m{i}" for i in rng.choice(200, 10)] if rng.random() < 0.5 else [],
        )
        servable = bool(rng.random() < 0.3)
        want = f.mask(cards) & (np.array([bool(c.backend) for c in cards]) if servable else True)
        np.testing.assert_array_equal(table.mask(RouteRequest(query="q", filters=f, servable_only=servable)), want)


@pytest.fixture(scope="module")
def mini_bench(tmp_path_factory, data_root):
    """A CMRBench-format folder cut from the real data: 2 experiences, 25 train prompts each, and
    the hub restricted to the models those prompts name plus 20 others."""
    from tests.unit.bench_data import write_mini_cmrbench

    out = tmp_path_factory.mktemp("mini_bench")
    n = write_mini_cmrbench(data_root / "cmrbench", out, n_train=25, n_test=5)
    return out, n


def test_router_core_routes_registers_and_swaps(tmp_path, mini_bench, encoder):
    from cmr import checkpoint
    from services.config import AppArgs
    from services.learner import LearnerActor
    from services.routing import RouteRequest, RouterCore, checkpoint_root

    bench, n_cards = mini_bench
    # no card term: the two new cards' texts differ only by their ids, and the check is about the answers
    args = AppArgs(home=str(tmp_path), bench=str(bench), tiny_models=False, profile_size=5, policy="knn", learner={"enabled": False, "poll_s": 0},
                   policy_config={"prior_weight": 0.0})
    core = RouterCore(args, encoder)
    assert core.version == 1 and len(core.models()) == n_cards
    # a model that answered the profile prompts well is routed to for them, at once
    prompts = core.profile_prompts
    assert len(prompts) == 5
    with pytest.raises(CMRError, match=r"profile\.nope"):
        core.register([ModelCard(id="profiled", profile={"nope": 1.0})])
    core.register([ModelCard(id="profiled", description="a card", profile={p["id"]: 1.0 for p in prompts}),
                   ModelCard(id="plain", description="a card")])  # same card text, no answers
    for p in prompts:
        d = core.route([RouteRequest(query=p["prompt"], filters=Filters(allow=["plain", "profiled"]), k=2)])[0]
        assert d.model == "profiled" and d.score - d.alternatives[0][1] > 0.3, (p, d)
    core.retire(["profiled", "plain"])
    q = "Translate this English text to French."
    d = core.route([RouteRequest(query=q, k=3)])[0]
    assert len(d.alternatives) == 2 and d.checkpoint_version == 1 and core.store.decision(d.request_id).model == d.model
    # registration: routable at once
    core.register([ModelCard(id="new/translator", domain="Natural Language Processing Translation", description="English to French translation")])
    assert core.route([RouteRequest(query=q, filters=Filters(allow=["new/translator"]))])[0].model == "new/translator"
    core.retire(["new/translator"])
    assert isinstance(core.route([RouteRequest(query=q, filters=Filters(allow=["new/translator"]))])[0], CMRError)
    # a corrupt newer version is skipped; the learner's next valid one is swapped in
    root = checkpoint_root(args)
    checkpoint.save(root, core.policy, {"note": "to corrupt"})
    (checkpoint.version_dir(root, 2) / "weights.npz").write_bytes(b"broken")
    assert core.check_checkpoint() == 1
    learner = LearnerActor(args.to_dict(), encoder=encoder)
    try:
        assert learner.step() is None  # no feedback yet
        core.store.add_feedback(d.request_id, 0.0)
        v = learner.step()
        assert v == 3 and learner.status()["offset"] == 1
        assert core.check_checkpoint() == 3 and core.version == 3
        assert core.route([RouteRequest(query=q)])[0].checkpoint_version == 3
    finally:
        learner.stop()


def test_router_replicas_on_two_nodes_share_a_postgresql_store(tmp_path, mini_bench, encoder, pg_dsn):
    """Two router cores with their own state folders (two nodes) and one PostgreSQL store: the
    hub is seeded once, a model registered on one is routable on the other within 1 s, a
    decision made on one takes feedback through the other, exactly once, and a checkpoint the
    learner publishes is served by the other within 1 s (its NOTIFY wakes the watcher, whose own
    poll is 30 s here)."""
    import time

    from services.config import AppArgs
    from services.learner import LearnerActor
    from services.routing import RouteRequest, RouterCore
    from services.store import DuplicateFeedbackError

    bench, n_cards = mini_bench
    kw = dict(bench=str(bench), tiny_models=False, profile_size=0, store=pg_dsn, learner={"enabled": False, "poll_s": 0},
              checkpoints=str(tmp_path / "shared-checkpoints"), reload_check_s=30.0)
    a = RouterCore(AppArgs(home=str(tmp_path / "node-a"), **kw), encoder)
    b = RouterCore(AppArgs(home=str(tmp_path / "node-b"), **kw), encoder)
    assert len(a.models()) == len(b.models()) == n_cards and a.hub.version == b.hub.version  # seeded once
    a.register([ModelCard(id="new/translator", domain="Natural Language Processing Translation", description="English to French")])
    t0 = time.monotonic()
    while "new/translator" not in {c.id for c in b.models()}:
        assert time.monotonic() - t0 < 1.0, "not routable on the other replica within 1 s"
        time.sleep(0.01)
        b.sync()  # what each batch does
    d = b.route([RouteRequest(query="Translate this to French.", filters=Filters(allow=["new/translator"]))])[0]
    assert d.model == "new/translator"
    assert a.store.add_feedback(d.request_id, 1.0) == 1
    with pytest.raises(DuplicateFeedbackError):
        b.store.add_feedback(d.request_id, 1.0)
    assert [e.request_id for e in b.store.events()] == [d.request_id]
    b.start_watcher()
    learner = LearnerActor(a.args.to_dict(), encoder=encoder)
    try:
        t0 = time.monotonic()
        v = learner.step()
        while b.version != v:
            assert time.monotonic() - t0 < 1.0, "the published checkpoint not served by the other replica within 1 s"
            time.sleep(0.01)
    finally:
        learner.stop()
        b.close()


def test_retrieve_k_preselects_by_card_similarity(tmp_path, mini_bench, encoder):
    """With ``retrieve_k`` the policy only sees the k live cards nearest the query (FAISS), and
    filters still apply before the pre-selection."""
    from services.config import AppArgs
    from services.routing import RouteRequest, RouterCore

    bench, _ = mini_bench
    args = AppArgs(home=str(tmp_path), bench=str(bench), tiny_models=False, retrieve_k=5, learner={"enabled": False})
    core = RouterCore(args, encoder)
    cards = core.models()
    emb = encoder.encode([c.text() for c in cards])
    queries = ["Translate this English text to French.", "Detect objects in a street photo.", "Transcribe this audio file."]
    q = encoder.encode(queries)
    sims = q @ emb.T
    for i, d in enumerate(core.route([RouteRequest(query=t, k=5) for t in queries])):
        near = {cards[j].id for j in np.argsort(-sims[i])[:5]}
        assert d.model in near and {m for m, _ in d.alternatives} <= near
    dom = cards[0].domain
    in_dom = [j for j, c in enumerate(cards) if c.domain == dom]
    d = core.route([RouteRequest(query=queries[0], filters=Filters(domains=[dom]), k=3)])[0]
    near = {cards[j].id for j in sorted(in_dom, key=lambda j: -sims[0, j])[:5]}
    assert d.model in near


def test_served_router_one_reward_moves_only_nearby_queries(tmp_path, mini_bench, encoder):
    """Issue 18: through the served path (router, feedback log, learner step, checkpoint swap), a
    reward of 1.0 for a served model's answer does not make it win unrelated queries, and every
    score stays in [0, 1]. The served default, ``auto``, has too few rows here to choose: knn routes."""
    from services.config import AppArgs
    from services.routing import RouteRequest, RouterCore

    bench, _ = mini_bench
    args = AppArgs(home=str(tmp_path), bench=str(bench), tiny_models=False, profile_size=0, learner={"enabled": False, "poll_s": 0})
    core = RouterCore(args, encoder)
    assert args.policy == "auto" and core.status()["policy_choice"] == {}
    core.register([ModelCard(id="chatty", family="tiny-gpt2", domain="text-generation", description="A small chat model.")])
    chat = "Write a short friendly reply to my message: hello, how are you today?"
    d = core.route([RouteRequest(query=chat, filters=Filters(allow=["chatty"]))])[0]
    unrelated = ["Detect the objects in this street photo and draw boxes around them.", "Transcribe this audio clip of a meeting.",
                 "Classify the sentiment of this product review as positive or negative.", "Generate an image of a red bicycle.",
                 "Summarise this article about the election in two lines.", "Segment the tumour in this MRI scan.",
                 "Translate this English text to German.", "Estimate the depth of each pixel in this photo."]
    before = core.route([RouteRequest(query=q, record=False) for q in unrelated])
    chatty_before = {q: core.route([RouteRequest(query=q, record=False, filters=Filters(allow=["chatty"]))])[0].score for q in unrelated}
    core.store.add_feedback(d.request_id, 1.0)
    _learn_one_step(args, encoder, core)
    after = core.route([RouteRequest(query=q, record=False) for q in unrelated])
    # no unrelated query goes to chatty that did not before (a hub this small may give it one by its
    # card alone); another change of hands is a near tie between two other models (the new row
    # joins every neighbourhood of so small a memory, nudging every estimate towards its prior)
    for q, b, a in zip(unrelated, before, after):
        assert a.model != "chatty" or b.model == "chatty", (q, a.model, a.score)
        if a.model != b.model:
            kept = core.route([RouteRequest(query=q, record=False, filters=Filters(allow=[b.model]))])[0].score
            assert a.score - kept < 0.005, (q, b.model, kept, a.model, a.score)
    assert all(0.0 <= x.score <= 1.0 for x in after), [(x.model, x.score) for x in after]
    # where it was rewarded, its score rises more than anywhere unrelated
    def chatty(q):
        return core.route([RouteRequest(query=q, record=False, filters=Filters(allow=["chatty"]))])[0].score
    rise = chatty(chat) - d.score
    assert rise > 0.01 and all(chatty(q) - b < rise / 2 for q, b in zip(unrelated, [chatty_before[q] for q in unrelated]))
    core.close()


def _learn_one_step(args, encoder, core) -> None:
    """One learner step over the feedback so far, whose checkpoint the router swaps in."""
    from services.learner import LearnerActor

    learner = LearnerActor(args.to_dict(), encoder=encoder)
    try:
        assert learner.step() is not None
    finally:
        learner.stop()
    assert core.check_checkpoint() == learner.status()["checkpoint_version"]


@pytest.mark.parametrize("candidates", [None, ["carve"]])
def test_served_auto_chooses_at_first_start_and_keeps_its_choice_through_learner_checkpoints(tmp_path, mini_bench, encoder, candidates):
    """``auto``, the served default, with enough rows (``min_rows`` lowered for the mini bench)
    chooses at first start by cross-validation; ``status()`` (``/healthz``) reports what and why,
    and a learner step's checkpoint, swapped in by the router, keeps the choice. Narrowed to
    carve, the served learner's feedback reaches carve through auto's own learner, whose state
    the checkpoint carries."""
    from cmr import checkpoint
    from cmr.policies.auto import CANDIDATES
    from services.config import AppArgs
    from services.routing import RouteRequest, RouterCore, checkpoint_root

    bench, _ = mini_bench
    args = AppArgs(home=str(tmp_path), bench=str(bench), tiny_models=False, profile_size=0, learner={"enabled": False, "poll_s": 0},
                   policy_config={"min_rows": 20, **({"candidates": candidates} if candidates else {})})
    core = RouterCore(args, encoder)
    choice = core.status()["policy_choice"]
    names = set(CANDIDATES) if candidates is None else {"prior", *candidates}
    assert choice["chosen"] in names and set(choice["mean"]) == names and "folds of" in choice["why"], choice
    if candidates:
        assert choice["chosen"] == "carve", choice
        state = checkpoint.load_policy(checkpoint_root(args), encoder=encoder).state_dict()
        steps = state["inner_learner"]["since_consolidation"]
    d = core.route([RouteRequest(query="Transcribe this audio clip of a meeting.")])[0]
    core.store.add_feedback(d.request_id, 1.0)
    _learn_one_step(args, encoder, core)
    assert core.status()["policy_choice"] == choice
    if candidates:  # the reward went through carve's own learner: one more event since its last consolidation
        state = checkpoint.load_policy(checkpoint_root(args), encoder=encoder).state_dict()
        assert state["inner_learner"]["since_consolidation"] == steps + 1
    core.close()
