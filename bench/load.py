"""Load and fault test: N requests at fixed concurrency with feedback, while a pool replica and the learner are killed.

``python -m bench.load [--requests 400] [--concurrency 16] [--out DIR]`` (or ``cmr bench load``).

Starts the served app in-process on 127.0.0.1 (Ray + Serve, a temporary ``home``; loopback only,
bounded in count and time, stops by itself): the CMRBench hub and a ``knn`` router trained at first
start, the two tiny local chat models in a pool of two replicas, the learner on, API keys off
(explicit open mode). Then it sends ``--requests`` requests at ``--concurrency`` (a mix of chat
``model="auto"`` and ``/v1/route`` over real CMRBench *test* prompts), posts a reward for each
answered one, kills a pool replica that is generating when ``--kill-replica-at`` of the requests are
done and the learner actor at ``--kill-learner-at``, waits for the learner to catch up, and
reports: requests lost (no 2xx; target 0), error rate, p50/p99 latency per kind, fallbacks,
feedback accepted vs learnt, lost and duplicated (target 0; from the checkpoints' applied offset
ranges, ``services.learner.audit``). Writes ``report.json`` + ``report.md`` into ``--out``
(default ``runs/load-<UTC>``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cmr.bench.common import fmt, run_info, utc_stamp, write_json, write_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=400, help="requests to send (each answered one gets a feedback post)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    p.add_argument("--chat-share", type=float, default=0.5, help="share of chat (model=auto) requests; the rest are /v1/route")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each chat request")
    p.add_argument("--kill-replica-at", type=float, default=0.3, help="kill a generating pool replica after this share of requests (<0: never)")
    p.add_argument("--kill-learner-at", type=float, default=0.5, help="kill the learner actor after this share of requests (<0: never)")
    p.add_argument("--learner-kill", choices=("crash", "permanent"), default="crash",
                   help="crash: Ray restarts it (max_restarts); permanent: no restart, the router re-creates it")
    p.add_argument("--replicas", type=int, default=2, help="replicas of the tiny-model pool")
    p.add_argument("--train-limit", type=int, default=40, help="first start: knn trained on this many requests per experience")
    p.add_argument("--time-limit", type=float, default=900.0, help="seconds for the whole run; what is unfinished then counts as lost")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/load-<UTC>)")
    p.add_argument("--keep-home", action="store_true", help="keep the temporary app home (state, checkpoints) for inspection")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pcts(ms: list[float]) -> dict[str, Any]:
    import numpy as np

    if not ms:
        return {"n": 0}
    a = np.asarray(ms, dtype=np.float64)
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


def _replicas(deployment: str) -> list:
    """Live replica actors of a deployment of the ``cmr`` app (Serve names them
    ``SERVE_REPLICA::cmr#<deployment>#<id>`` in namespace ``serve``)."""
    import ray

    out = []
    for r in ray.util.list_named_actors(all_namespaces=True):
        if r["namespace"] == "serve" and r["name"].startswith(f"SERVE_REPLICA::cmr#{deployment}#"):
            try:
                out.append(ray.get_actor(r["name"], namespace="serve"))
            except ValueError:
                pass
    return out


def kill_busy_replica(deployment: str, deadline_s: float = 30.0) -> dict[str, Any]:
    """Kill a replica of ``deployment`` while it has requests in flight (the first one, if none gets busy)."""
    import ray

    end = time.monotonic() + deadline_s
    reps = _replicas(deployment)
    while True:
        counts = ray.get([r.get_num_ongoing_requests.remote() for r in reps])
        busy = [(r, c) for r, c in zip(reps, counts) if c > 0]
        if busy or time.monotonic() > end:
            victim, ongoing = busy[0] if busy else (reps[0], 0)
            ray.kill(victim)
            return {"replicas": len(reps), "ongoing_on_victim": int(ongoing), "at": time.time()}
        time.sleep(0.02)


class _Run:
    """The request phase: a bounded queue of work items drained by ``concurrency`` workers."""

    def __init__(self, url: str, prompts: list[str], a: argparse.Namespace, on_progress):
        import numpy as np

        self.url, self.a, self.on_progress = url, a, on_progress
        rng = np.random.default_rng(a.seed)
        self.items = [("chat" if rng.random() < a.chat_share else "route", prompts[i % len(prompts)], float(rng.random()))
                      for i in range(a.requests)]
        self.results: list[dict[str, Any]] = [{} for _ in self.items]
        self.done = 0

    async def one(self, client, i: int) -> None:
        import httpx

        kind, prompt, reward = self.items[i]
        res = self.results[i]
        res["kind"] = kind
        body = ({"model": "auto", "messages": [{"role": "user", "content": prompt}], "max_tokens": self.a.max_tokens}
                if kind == "chat" else {"query": prompt})
        path = "/v1/chat/completions" if kind == "chat" else "/v1/route"
        t0 = time.perf_counter()
        try:
            r = await client.post(path, json=body)
            res["status"] = r.status_code
        except httpx.HTTPError as e:
            res["status"], res["error"] = None, f"{type(e).__name__}: {e}"
            return
        finally:
            res["ms"] = 1000 * (time.perf_counter() - t0)
        if r.status_code != 200:
            res["error"] = r.text[:300]
            return
        d = r.json()
        routing = d["routing"] if kind == "chat" else d
        res["request_id"] = routing["request_id"]
        res["model"] = routing["model"]
        if routing.get("fallback"):
            res["fallback"] = routing["fallback"]
        try:
            f = await client.post("/v1/feedback", json={"request_id": res["request_id"], "reward": reward})
            res["feedback_status"] = f.status_code
            if f.status_code == 200:
                res["offset"] = f.json()["offset"]
        except httpx.HTTPError as e:
            res["feedback_status"], res["feedback_error"] = None, f"{type(e).__name__}: {e}"

    async def drive(self) -> None:
        import httpx

        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(self.items)):
            queue.put_nowait(i)
        limits = httpx.Limits(max_connections=self.a.concurrency * 2, max_keepalive_connections=self.a.concurrency * 2)
        async with httpx.AsyncClient(base_url=self.url, timeout=120, limits=limits) as client:
            async def worker() -> None:
                while True:
                    try:
                        i = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    await self.one(client, i)
                    self.done += 1
                    await self.on_progress(self.done)

            await asyncio.gather(*(worker() for _ in range(self.a.concurrency)))


def _wait_learner(url: str, before: str | None, deadline: float) -> dict[str, Any]:
    """Poll ``/healthz`` until a learner other than ``before`` runs and has nothing waiting."""
    import httpx

    last: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=15) as c:
        while time.monotonic() < deadline:
            try:
                last = c.get("/healthz").json().get("learner", {})
            except (httpx.HTTPError, ValueError):
                last = {}
            if "instance" in last and last["instance"] != before and last.get("waiting") == 0:
                return last
            time.sleep(0.5)
    return last


def run_load(a: argparse.Namespace, home: Path) -> dict[str, Any]:
    """Start the app under ``home``, run the load with the kills, audit; the report dict."""
    import httpx
    import ray

    from cmr import raycluster
    from services.app import deploy, undeploy
    from bench.serve import test_prompts
    from services.config import AppArgs
    from services.learner import audit, learner_handle
    from services.routing import effective_pools, prepare_models

    t_start = time.monotonic()
    deadline = t_start + a.time_limit
    base = AppArgs(home=str(home))
    prepare_models(base)
    pools = [p.model_copy(update={"num_replicas": a.replicas}).model_dump(mode="json") for p in effective_pools(base)]
    fields: dict[str, Any] = {"home": str(home), "policy": "knn", "train_limit": a.train_limit, "pools": pools,
                              # every checkpoint kept: the audit then covers the whole run, from v1 on
                              "learner": {"poll_s": 0.5, "keep_checkpoints": 0}}
    if "auth" in AppArgs.model_fields:
        fields["auth"] = {"open": True}  # loopback test server: explicit open mode
    args = AppArgs(**fields)
    prompts = test_prompts(max(a.requests, 1), seed=a.seed)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    report: dict[str, Any] = {"config": {k: v for k, v in vars(a).items() if k not in ("func", "command", "protocol")}, **run_info(),
                              "loadavg_start": list(os.getloadavg()), "events": []}
    raycluster.start()
    try:
        deploy(args, port=port)
        report["startup_s"] = round(time.monotonic() - t_start, 1)
        learner0 = _wait_learner(url, None, min(deadline, time.monotonic() + 180))
        print(f"app up in {report['startup_s']} s on {url}; learner {learner0.get('instance')}", flush=True)
        kills = {"replica": int(a.kill_replica_at * a.requests) if a.kill_replica_at >= 0 else None,
                 "learner": int(a.kill_learner_at * a.requests) if a.kill_learner_at >= 0 else None}
        t0 = time.monotonic()

        async def on_progress(done: int) -> None:
            if done == kills["replica"]:
                kills["replica"] = None
                ev = await asyncio.to_thread(kill_busy_replica, "Pool-local")
                report["events"].append({"kill": "pool replica", "after_requests": done, "t_s": round(time.monotonic() - t0, 2), **ev})
                print(f"killed a pool replica after {done} requests ({ev['ongoing_on_victim']} in flight on it)", flush=True)
            if done == kills["learner"]:
                kills["learner"] = None
                h = learner_handle(args)
                if h is not None:
                    await asyncio.to_thread(ray.kill, h, no_restart=a.learner_kill == "permanent")
                report["events"].append({"kill": f"learner ({a.learner_kill})", "after_requests": done, "t_s": round(time.monotonic() - t0, 2)})
                print(f"killed the learner ({a.learner_kill}) after {done} requests", flush=True)
            if done % 100 == 0:
                print(f"{done}/{a.requests} requests", flush=True)

        run = _Run(url, prompts, a, on_progress)
        try:
            asyncio.run(asyncio.wait_for(run.drive(), timeout=max(1.0, deadline - time.monotonic())))
        except asyncio.TimeoutError:
            report["timed_out"] = "requests"
        wall = time.monotonic() - t0
        tc = time.monotonic()
        killed = any(e["kill"].startswith("learner") for e in report["events"])
        before = learner0.get("instance") if killed else None  # a killed learner must come back as a new instance
        learner1 = _wait_learner(url, before, deadline)
        caught_up = "instance" in learner1 and learner1["instance"] != before and learner1.get("waiting") == 0
        if not caught_up:
            report["timed_out"] = report.get("timed_out") or "learner catch-up"
        with httpx.Client(base_url=url, timeout=15) as c:
            health = c.get("/healthz").json()
        report.update(_summarise(run, wall, a))
        report["learner"] = {"before": learner0, "after": learner1, "caught_up": caught_up,
                             "catch_up_after_last_request_s": round(time.monotonic() - tc, 1), "router_checkpoint_version": health.get("checkpoint_version")}
        report["feedback"] = _feedback(run, audit(args))
    finally:
        report["loadavg_end"] = list(os.getloadavg())
        try:
            undeploy(args)
        finally:
            ray.shutdown()
    report["wall_s"] = round(time.monotonic() - t_start, 1)
    return report


def _summarise(run: _Run, wall: float, a: argparse.Namespace) -> dict[str, Any]:
    res = run.results
    sent = [r for r in res if "kind" in r]
    ok = [r for r in sent if r.get("status") == 200]
    lost = len(res) - len(ok)  # never answered with a 2xx (errors, timeouts, never sent before the time limit)
    fb = [r["fallback"] for r in ok if "fallback" in r]
    by_kind = {k: _pcts([r["ms"] for r in ok if r["kind"] == k]) for k in ("chat", "route")}
    errors: dict[str, int] = {}
    for r in sent:
        if r.get("status") != 200:
            key = f"{r.get('status')}: {(r.get('error') or '')[:120]}"
            errors[key] = errors.get(key, 0) + 1
    return {"requests": {"planned": len(res), "sent": len(sent), "ok": len(ok), "lost": lost, "error_rate": lost / max(1, len(res)),
                         "wall_s": round(wall, 1), "rps": len(ok) / wall if wall > 0 else None, "latency": {"all": _pcts([r["ms"] for r in ok]), **by_kind},
                         "errors": errors},
            "fallbacks": {"n": len(fb), "retried_same_model": sum(1 for f in fb if f["from"] == f["to"]),
                          "next_model": sum(1 for f in fb if f["from"] != f["to"]),
                          "reasons": sorted({f["reason"] for f in fb}), "examples": fb[:3]}}


def _feedback(run: _Run, au: dict[str, Any]) -> dict[str, Any]:
    answered = [r for r in run.results if r.get("status") == 200]
    accepted = [r for r in answered if r.get("feedback_status") == 200]
    return {"posted": sum(1 for r in answered if "feedback_status" in r), "accepted": len(accepted),
            "rejected": sum(1 for r in answered if "feedback_status" in r and r["feedback_status"] != 200),
            "stored": au["accepted"], "learnt": au["learnt"], "waiting": au.get("waiting"), "lost": au["n_lost"],
            "duplicated": au["n_duplicated"], "lost_offsets": au["lost"], "duplicated_offsets": au["duplicated"],
            "checkpoint_chain": au["chain"], "chain_broken": au["broken"], "audited_checkpoint": au["checkpoint_version"],
            "audited_from_offset": au.get("audited_from_offset"), "before_chain": au.get("before_chain"), "pruned_upto": au.get("pruned_upto")}


def _chain(vs: list[int]) -> str:
    if not vs:
        return "no checkpoint chain"
    gaps = [b for a, b in zip(vs, vs[1:]) if b != a + 1]
    return f"a chain of {len(vs)} checkpoints v{vs[0]}→v{vs[-1]}" + (f" (skipping to {gaps})" if gaps else "")


def render_md(r: dict[str, Any]) -> str:
    q, fb, f = r.get("requests", {}), r.get("fallbacks", {}), r.get("feedback", {})
    lat = q.get("latency", {})
    lines = [f"# Load and fault test ({r.get('date')})", "",
             f"`{r.get('command')}` — commit `{(r.get('git_commit') or '?')[:10]}`, {r['machine']['cpus']} CPUs, "
             f"load average {fmt(r['loadavg_start'][0], 2)} at start, {fmt(r['loadavg_end'][0], 2)} at end; app up in {r.get('startup_s')} s.", ""]
    if r.get("timed_out"):
        lines += [f"**Time limit reached during: {r['timed_out']}**", ""]
    lines += ["Events: " + "; ".join(f"{e['kill']} killed after {e['after_requests']} requests (t={e['t_s']} s"
                                     + (f", {e['ongoing_on_victim']} in flight on it" if "ongoing_on_victim" in e else "") + ")"
                                     for e in r.get("events", [])), "",
              "| requests | sent | ok | lost | error rate | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|---|"]
    for k in ("all", "chat", "route"):
        s = lat.get(k, {})
        if k == "all":
            lines.append(f"| all | {q.get('sent')} | {q.get('ok')} | **{q.get('lost')}** | {fmt(q.get('error_rate'), 4)} | {fmt(q.get('rps'), 1)} | "
                         f"{fmt(s.get('p50_ms'), 0)} | {fmt(s.get('p99_ms'), 0)} |")
        else:
            lines.append(f"| {k} | | {s.get('n', 0)} | | | | {fmt(s.get('p50_ms'), 0)} | {fmt(s.get('p99_ms'), 0)} |")
    lines += ["", f"Fallbacks: {fb.get('n')} responses said so ({fb.get('retried_same_model')} retried on another replica of the same model, "
                  f"{fb.get('next_model')} served by the runner-up model; reasons: {', '.join(fb.get('reasons', [])) or '—'}).", "",
              "| feedback | posted | accepted | stored | learnt | waiting | lost | duplicated |", "|---|---|---|---|---|---|---|---|",
              f"| events | {f.get('posted')} | {f.get('accepted')} | {f.get('stored')} | {f.get('learnt')} | {f.get('waiting')} | **{f.get('lost')}** | **{f.get('duplicated')}** |",
              "", f"Learner: instance {r.get('learner', {}).get('before', {}).get('instance')} → {r.get('learner', {}).get('after', {}).get('instance')}, "
                  f"caught up: {r.get('learner', {}).get('caught_up')} ({r.get('learner', {}).get('catch_up_after_last_request_s')} s after the last request); "
                  f"audited checkpoint v{f.get('audited_checkpoint')}, {_chain(f.get('checkpoint_chain') or [])}, broken: {f.get('chain_broken')}; "
                  f"events after offset {f.get('audited_from_offset')} audited ({f.get('before_chain')} earlier ones in pruned versions).",
              "", "Lost = no 2xx answer. Feedback lost/duplicated = stored events the newest valid checkpoint applied 0 or >1 times, "
                  "from the applied offset ranges along its base chain (`services.learner.audit`)."]
    if q.get("errors"):
        lines += ["", "Errors: " + "; ".join(f"{n}× {k}" for k, n in q["errors"].items())]
    return "\n".join(lines) + "\n"


def run(a: argparse.Namespace) -> int:
    from cmr.errors import CMRError

    if a.requests < 1 or a.concurrency < 1:
        raise CMRError("--requests and --concurrency must be at least 1")
    out = Path(a.out) if a.out else Path("runs") / f"load-{utc_stamp()}"
    home = Path(tempfile.mkdtemp(prefix="cmr-load-"))
    try:
        report = run_load(a, home)
    finally:
        if not a.keep_home:
            shutil.rmtree(home, ignore_errors=True)
    via_cli = getattr(a, "protocol", None) == "load"
    report["command"] = ("cmr " if via_cli else "python -m bench.load ") + " ".join(sys.argv[1:])
    if a.keep_home:
        report["home"] = str(home)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    write_text(out / "report.md", render_md(report))
    print(render_md(report))
    print(f"wrote {out}/report.json, report.md")
    ok = report["requests"]["lost"] == 0 and report["feedback"]["lost"] == 0 and report["feedback"]["duplicated"] == 0
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    from bench import cli
    from cmr.errors import CMRError

    return cli("python -m bench.load", __doc__, add_arguments, run, CMRError, "loadtest", argv)


if __name__ == "__main__":
    sys.exit(main())
