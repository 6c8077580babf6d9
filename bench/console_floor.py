"""What the console costs a ``/v1/route`` request when nobody watches it: the CPU time of the
request-path parts the console touched, per request, measured in this process (no Ray).

* ``route``: ``RouterCore.route`` of one recorded request (encode, score, decide, record), the
  part that now stamps each decision with its batch's latency;
* ``auth``: the auth middleware around a request (now also checks the console's public prefix).

The console's own endpoints are not called: this is the cost of its presence. Run it on two
trees (``PYTHONPATH=TREE python TREE_WITH_THIS/bench/console_floor.py``) and compare; the numbers
of the README were taken that way, alternating the trees.

    python bench/console_floor.py --home /tmp/floor --n 400 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time


def _route_cpu(core, n: int, offset: int) -> float:
    from services.routing import RouteRequest

    qs = [f"question {offset + i}: how do I sort a list of {i} numbers in python quickly?" for i in range(n)]
    t0 = time.process_time()
    for q in qs:  # distinct queries: each one is encoded, as live traffic is
        core.route([RouteRequest(query=q, k=3, key_id="k", tenant="t")])
    return (time.process_time() - t0) / n


def _auth_cpu(mw, token: str, n: int) -> float:
    headers = [(b"authorization", f"Bearer {token}".encode()), (b"content-length", b"40")]

    async def receive():
        return {"type": "http.request", "body": b'{"query": "sort a list of numbers fast"}', "more_body": False}

    async def send(_):
        pass

    async def many():
        for _ in range(n):
            await mw({"type": "http", "path": "/v1/route", "method": "POST", "headers": headers}, receive, send)

    t0 = time.process_time()
    asyncio.run(many())
    return (time.process_time() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", required=True, help="state folder (trained once at the first run, reused after)")
    p.add_argument("--n", type=int, default=400, help="requests per round")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()

    from cmr.threads import limit_native_threads
    from services import auth
    from services.config import AppArgs
    from services.routing import RouterCore

    args = AppArgs(home=a.home, train_limit=20, tiny_models=False)
    core = RouterCore(args)
    limit_native_threads(args.native_threads)
    core.warm_up()
    state = args.state_dir()
    store = auth.open_key_store(None, auth.keys_path(state))
    _, token = store.create("t", ("infer",), rate_per_s=1e9, burst=1e9)  # never rate-limited: the full path runs
    store.close()
    authn = auth.Authenticator(args.auth.settings(), auth.keys_path(state))

    async def app(scope, receive, send):
        await receive()

    mw = auth.AuthMiddleware(app, get_auth=lambda: authn)
    route, mid = [], []
    for r in range(a.rounds):
        route.append(_route_cpu(core, a.n, r * a.n))
        mid.append(_auth_cpu(mw, token, a.n * 10))
    print(json.dumps({"route_cpu_us": [round(x * 1e6, 1) for x in route], "route_cpu_us_median": round(statistics.median(route) * 1e6, 1),
                      "auth_cpu_us": [round(x * 1e6, 2) for x in mid], "auth_cpu_us_median": round(statistics.median(mid) * 1e6, 2)}))
    core.close()


if __name__ == "__main__":
    main()
