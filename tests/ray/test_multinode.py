"""cmr on a multi-node Ray cluster (``ray.cluster_utils.Cluster``: several raylets on this host,
each node its own ``CMR_HOME``): PostgreSQL as the store, checkpoints at one shared location,
router replicas pinned to two nodes, the learner to a third, the ingress on the head. Under a
bounded load of routes and feedback a router node is lost, then the learner's node (a spare node
joins in between, as KubeRay would replace a pod). Asserted and printed: every acknowledged
feedback event stored once and learnt once (``services.learner.audit``), decisions of every router
replica in the one store, the error rate during each loss and the time to recover.

The module stops the session's single-node Ray for its own cluster and starts it again after.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

pytestmark = pytest.mark.ray

#: load: workers, each route -> feedback -> pause; bounded so that 2 cores keep up
WORKERS, PAUSE_S = 2, 0.05


def _nodes_with(resource: str) -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"]}


def _wait(cond, what: str, timeout: float, every: float = 0.25):
    t0 = time.monotonic()
    while True:
        try:
            got = cond()
        except Exception:  # noqa: BLE001 - not up yet
            got = None
        if got:
            return got
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Load:
    """Route, then give feedback on the decision, in ``WORKERS`` threads; every call logged."""

    def __init__(self, url: str):
        self.url, self.log, self.acked = url, [], []  # log: (t, kind, ok, request_id)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w,), daemon=True) for w in range(WORKERS)]

    def _run(self, w: int) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=15) as c:
            i = 0
            while not self._stop.is_set():
                i += 1
                rid = None
                try:
                    r = c.post("/v1/route", json={"query": f"Translate sentence {w}-{i} into German."})
                    ok = r.status_code == 200
                    rid = r.json()["request_id"] if ok else None
                except Exception:  # noqa: BLE001 - a dropped connection is an error like a 5xx
                    ok = False
                self.log.append((time.monotonic(), "route", ok, rid))
                if rid is not None:
                    try:
                        f = c.post("/v1/feedback", json={"request_id": rid, "reward": 0.25 + (i % 3) / 4})
                        fok = f.status_code == 200
                    except Exception:  # noqa: BLE001
                        fok = False
                    self.log.append((time.monotonic(), "feedback", fok, rid))
                    if fok:
                        self.acked.append(rid)
                time.sleep(PAUSE_S)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def loss(self, t_kill: float, settle_s: float = 3.0, timeout: float = 90.0) -> dict:
        """Wait until ``settle_s`` of error-free calls after the loss at ``t_kill``; the figures."""
        def settled():
            after = [e for e in self.log if e[0] > t_kill]
            bad = [e[0] for e in after if not e[2]]
            last_bad = max(bad, default=t_kill)
            return after and time.monotonic() - last_bad >= settle_s and any(e[0] > last_bad and e[2] for e in after)
        _wait(settled, "calls to succeed again after the loss", timeout)
        after = [e for e in self.log if e[0] > t_kill]
        bad = [e[0] for e in after if not e[2]]
        recovered = max(bad, default=t_kill)
        window = [e for e in after if e[0] <= recovered] if bad else []
        first5 = [e for e in after if e[0] <= t_kill + 5]
        return {"recover_s": round(recovered - t_kill, 2), "errors": len(bad), "calls_until_recovered": len(window),
                "error_rate_until_recovered": round(len(bad) / len(window), 3) if window else 0.0,
                "error_rate_first_5s": round(sum(1 for e in first5 if not e[2]) / max(1, len(first5)), 3), "calls_first_5s": len(first5)}


@pytest.fixture(scope="module")
def cluster(pg_server, tmp_path_factory):
    import shutil
    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    from cmr import constants, raycluster
    from tests import pg

    was_up = ray.is_initialized()
    if was_up:
        ray.shutdown()
    tmp = tmp_path_factory.mktemp("multinode")
    # Ray's own folder apart from /tmp/ray (short: socket paths): a plain ray.init() elsewhere on
    # this host looks for /tmp/ray/ray_current_cluster and must not join this cluster
    ray_tmp = tempfile.mkdtemp(prefix="cmrr-", dir="/tmp")
    constants.export_for_ray_workers()  # the embedding cache and offline settings, inherited by every raylet
    node = lambda name, **res: {"num_cpus": 1, "object_store_memory": 80 << 20, "resources": res, "temp_dir": ray_tmp,  # noqa: E731
                                "env_vars": {"CMR_HOME": str(tmp / name)}}  # no state folder shared between nodes
    c = None
    try:
        with pytest.MonkeyPatch.context() as mp:
            c = Cluster(initialize_head=True, head_node_args={**node("head", head=1), "include_dashboard": False})
            nodes = {"router_a": c.add_node(**node("router_a", router=1)), "router_b": c.add_node(**node("router_b", router=1)),
                     "learner": c.add_node(**node("learner", learner=1))}
            mp.setenv("CMR_HOME", str(tmp / "driver"))
            ray.init(address=c.address, log_to_driver=False)
            yield c, nodes, node, pg.new_database(pg_server, "multinode"), tmp
    finally:
        from ray import serve

        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            if c is not None:
                c.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)
            if was_up:
                raycluster.start()


def test_node_losses_under_load_lose_no_feedback(cluster):
    import psycopg
    import ray

    from cmr.encoders import default_encoder
    from services.app import deploy
    from services.config import AppArgs
    from services.learner import audit, learner_handle
    from services.routing import bootstrap
    from tests.ray.serve_process import free_port

    c, nodes, node, dsn, tmp = cluster
    t_start = time.monotonic()
    args = AppArgs(store=dsn, checkpoints=str(tmp / "shared-checkpoints"), train_limit=20, tiny_models=False, profile_size=0,
                   auth={"open": True}, router_replicas=2, route_in_ingress=False, router_actor_options={"num_cpus": 0, "resources": {"router": 1}},
                   ingress_actor_options={"num_cpus": 0, "resources": {"head": 1}},
                   learner={"poll_s": 0.5, "checkpoint_every_s": 1.0, "actor_options": {"resources": {"learner": 1}}})
    bootstrap(args, default_encoder(backend=args.encoder))  # once, before the replicas start: hub seeded, v1 published
    port = free_port()
    deploy(args, port=port, proxy_location="HeadOnly")
    url = f"http://127.0.0.1:{port}"
    # each router replica takes the one "router" unit of its node: one replica on each router node
    assert ray.available_resources().get("router", 0) == 0 and len(_nodes_with("router")) == 2
    load = Load(url)
    load.start()
    learner_node = _wait(lambda: ray.get(learner_handle(args).status.remote(), timeout=10)["node"], "the learner", 120)
    assert {learner_node} == _nodes_with("learner")
    _wait(lambda: len({rid[4:12] for rid in list(load.acked)}) >= 2, "decisions from both router replicas", 60)
    t_ready = time.monotonic()

    # 1. a node holding a router replica is lost; a spare node (router + learner room) joins
    c.remove_node(nodes["router_a"], allow_graceful=False)
    t_kill1 = time.monotonic()
    c.add_node(**node("spare", router=1, learner=1))
    router_loss = load.loss(t_kill1)
    # Serve replaces the lost replica on the spare node, and the replacement decides too
    _wait(lambda: ray.available_resources().get("router", 0) == 0, "a replacement router replica", 120)
    _wait(lambda: len({rid[4:12] for rid in list(load.acked)}) >= 3, "decisions from the replacement replica", 60)
    router_loss["replaced_s"] = round(time.monotonic() - t_kill1, 2)
    # 2. the learner's node is lost: Ray restarts the learner on the spare node; feedback goes on
    first = ray.get(learner_handle(args).status.remote(), timeout=30)["instance"]
    c.remove_node(nodes["learner"], allow_graceful=False)
    t_kill2 = time.monotonic()
    learner_loss = load.loss(t_kill2)
    load.stop()

    def caught_up():
        s = ray.get(learner_handle(args).status.remote(), timeout=10)
        return s if s["instance"] != first and s["waiting"] == 0 else None
    status = _wait(caught_up, "the restarted learner to learn every stored event", 120, 0.5)
    learner_loss["learner_back_s"] = round(time.monotonic() - t_kill2, 2)
    a = audit(args)
    with psycopg.connect(dsn) as conn:
        stored = dict(conn.execute("SELECT request_id, count(*) FROM feedback GROUP BY request_id").fetchall())
        routers = {r[0] for r in conn.execute("SELECT DISTINCT substr(request_id, 5, 8) FROM decisions").fetchall()}
    calls = [e for e in load.log if e[0] > t_ready]
    figures = {"wall_s": round(time.monotonic() - t_start, 1), "routes": sum(1 for e in load.log if e[1] == "route"),
               "feedback_acked": len(load.acked), "feedback_stored": len(stored), "router_instances_in_store": len(routers),
               "error_rate_after_ready": round(sum(1 for e in calls if not e[2]) / max(1, len(calls)), 3),
               "router_node_loss": router_loss, "learner_node_loss": learner_loss,
               "audit": {k: a[k] for k in ("accepted", "learnt", "before_chain", "n_lost", "n_duplicated", "waiting", "broken")},
               "learner_instance": status["instance"]}
    print("\nmultinode figures: " + json.dumps(figures))
    # every acknowledged feedback event stored once (the unique request id: at most once) ...
    assert load.acked and all(stored.get(rid) == 1 for rid in load.acked) and len(set(load.acked)) == len(load.acked)
    # ... and learnt once, through both losses
    assert (a["n_lost"], a["n_duplicated"], a["waiting"], a["broken"]) == (0, 0, 0, None), a
    assert a["learnt"] + a["before_chain"] == a["accepted"] == len(stored), a
    # decisions of every router replica (the lost one, the survivor, the replacement) in the one store
    assert len(routers) == 3, routers
    # the losses cost a bounded share of calls and a bounded time: measured over the 5 s after each
    # loss and over the whole run (the calls up to the last failure alone can be just that failure)
    for loss in (router_loss, learner_loss):
        assert loss["recover_s"] < 60 and loss["error_rate_first_5s"] <= 0.5, loss
    assert figures["error_rate_after_ready"] <= 0.1, figures
    assert learner_loss["errors"] == 0, learner_loss  # losing the learner costs no request
