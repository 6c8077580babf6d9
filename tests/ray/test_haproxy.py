"""``cmr serve --proxy haproxy``: Ray Serve's HAProxy on the HTTP and gRPC ports, the ingress replica
serving both itself (direct ingress), no Python proxy hop. Everything the ingress serves goes
through it: the official ``openai`` client (``model="auto"``, streamed and not), ``/v1/route``,
``/v1/feedback``, API keys (401/403/429/413) and gRPC (Route, Chat streaming).

Its own ``cmr serve`` subprocess and Ray instance: Ray reads ``RAY_SERVE_ENABLE_HA_PROXY`` when its
processes start, so it cannot share the session's Ray (tests/ray/conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import httpx
import pytest

from services.proxy import haproxy_problem
from tests.ray.serve_process import cmr_serve, free_port

_PROBLEM = haproxy_problem()  # None: Ray Serve can run HAProxy here
pytestmark = [pytest.mark.ray, pytest.mark.skipif(_PROBLEM is not None, reason=f"HAProxy front door unavailable: {_PROBLEM}")]

CHAT = [{"role": "user", "content": "Tell me a short story about a lighthouse."}]


def _listeners(port: int) -> set[str]:
    """Names (``/proc/PID/comm``) of the processes holding a listening TCP socket on ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":  # 0A: LISTEN
                inodes.add(f"socket:[{f[9]}]")
    names = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                names.add(Path(f"/proc/{pid}/comm").read_text().strip())
        except OSError:  # gone, or another user's process
            continue
    return names


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``cmr serve --proxy haproxy`` with API keys on; keys made in its key store before it starts."""
    from services.auth import KeyStore
    from services.config import AppArgs

    home = tmp_path_factory.mktemp("cmr_haproxy")
    st = KeyStore(AppArgs(home=str(home)).state_dir() / "keys.sqlite")
    keys = {"full": st.create("acme", ["infer", "feedback"], rate_per_s=1000, burst=1000)[1],
            "infer": st.create("acme", ["infer"], rate_per_s=1000, burst=1000, max_body_bytes=2048)[1],
            "slow": st.create("acme", ["infer"], rate_per_s=0.01, burst=2)[1]}
    st.close()
    port, grpc_port = free_port(), free_port()
    args = ["--proxy", "haproxy", "--grpc-port", str(grpc_port), "--home", str(home), "--train-limit", "20", "--no-learner", "--num-cpus", "2"]
    with cmr_serve(args, port) as lines:
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "grpc_port": grpc_port, "keys": keys, "lines": lines}


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_haproxy_is_the_front_door(server):
    assert any(line.startswith("cmr: front door: haproxy") for line in server["lines"]), server["lines"]
    # HAProxy itself holds both ports; Serve's Python proxy (kept only as HAProxy's fallback) does not
    for port in (server["port"], server["grpc_port"]):
        assert _listeners(port) == {"haproxy"}, (port, _listeners(port))
    with httpx.Client(base_url=server["url"], timeout=60) as c:
        assert c.get("/healthz").json()["checkpoint_version"] == 1


def test_openai_chat_route_feedback_through_haproxy(server):
    import openai

    full = server["keys"]["full"]
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key=full, max_retries=0, timeout=120)
    r = client.chat.completions.create(model="auto", messages=CHAT, max_tokens=6)
    assert r.model in ("tiny-gpt2-a", "tiny-gpt2-b") and r.choices[0].message.content and r.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="auto", messages=CHAT, max_tokens=6, stream=True))
    assert len(chunks) >= 3 and all(c.model == chunks[0].model for c in chunks) and chunks[0].model in ("tiny-gpt2-a", "tiny-gpt2-b")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("length", "stop")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # tokens streamed through HAProxy
    with httpx.Client(base_url=server["url"], timeout=120) as c:
        route = c.post("/v1/route", json={"query": "Translate this sentence into French."}, headers=_h(full))
        assert route.status_code == 200 and route.headers["x-cmr-model"] == route.json()["model"]
        rid = route.json()["request_id"]
        fb = c.post("/v1/feedback", json={"request_id": rid, "reward": 1.0}, headers=_h(full))
        assert fb.status_code == 200 and fb.json()["offset"] >= 1
        assert c.post("/v1/feedback", json={"request_id": rid, "reward": 1.0}, headers=_h(full)).status_code == 409
        r = c.post("/v1/route", json={"query": ""}, headers=_h(full))
        assert r.status_code in (400, 422) and "query" in r.text


def test_api_keys_through_haproxy(server):
    keys, body = server["keys"], {"query": "Classify the sentiment of this review."}
    with httpx.Client(base_url=server["url"], timeout=120) as c:
        assert c.post("/v1/route", json=body).status_code == 401
        assert c.post("/v1/route", json=body, headers=_h("cmr-nope.nope")).status_code == 401
        rid = c.post("/v1/route", json=body, headers=_h(keys["infer"])).json()["request_id"]
        r = c.post("/v1/feedback", json={"request_id": rid, "reward": 1.0}, headers=_h(keys["infer"]))
        assert r.status_code == 403 and "feedback" in r.json()["error"]["message"]
        r = c.post("/v1/route", json={"query": "x" * 3000}, headers=_h(keys["infer"]))  # over the key's 2048 bytes
        assert r.status_code == 413 and "2048 bytes" in r.json()["error"]["message"]
        codes = [c.post("/v1/route", json=body, headers=_h(keys["slow"])).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = c.post("/v1/route", json=body, headers=_h(keys["slow"]))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


def test_grpc_through_haproxy(server):
    from services.grpc import cmr_pb2 as pb
    from services.grpc import cmr_pb2_grpc

    md = [("authorization", f"Bearer {server['keys']['full']}")]
    with grpc.insecure_channel(f"127.0.0.1:{server['grpc_port']}") as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = cmr_pb2_grpc.CMRStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Route(pb.RouteRequest(query="Translate this sentence into French."), timeout=60)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        r = stub.Route(pb.RouteRequest(query="Translate this sentence into French.", routing=pb.Routing(k=3)), metadata=md, timeout=60)
        assert r.request_id.startswith("cmr-") and r.model and len(r.alternatives) == 2
        assert stub.Feedback(pb.FeedbackRequest(request_id=r.request_id, reward=1.0), metadata=md, timeout=60).accepted
        chunks = list(stub.Chat(pb.ChatRequest(model="auto", max_tokens=8, messages=[pb.Message(role="user", content="Tell me a story.")]),
                                metadata=md, timeout=120))
        assert len(chunks) >= 2 and chunks[0].model in ("tiny-gpt2-a", "tiny-gpt2-b") and chunks[0].routing.model == chunks[0].model
        assert chunks[-1].finish_reason in ("length", "stop") and chunks[-1].completion_tokens > 0
        with pytest.raises(grpc.RpcError) as e:
            stub.Route(pb.RouteRequest(query=""), metadata=md, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "query" in e.value.details()


def test_front_door_floors_and_a_restart_after_kill_9(tmp_path):
    """Issue 14 (2, 3), as an attacker and a crash: held and half-sent connections do not starve
    ``/healthz``, and the request-header timeout closes them; a keyless oversize gRPC message is
    refused before it is read into the ingress; HAProxy's stats page and exporter are off; after
    kill -9 of ``cmr serve`` and its Ray (HAProxy lives on, holding the ports) the next start stops
    it and serves, no manual step. ``python -m bench.front_door`` measures the same at full scale."""
    from services.proxy import front_door_dir

    port, grpc_port = free_port(), free_port()
    args = ["--proxy", "haproxy", "--grpc-port", str(grpc_port), "--home", str(tmp_path), "--train-limit", "20", "--no-learner", "--num-cpus", "2"]
    door = front_door_dir(tmp_path / "serve")
    try:
        _crash_and_restart(args, port, grpc_port, door)
    finally:
        if not door.is_relative_to(tmp_path):  # the temp-dir folder of a long state path
            import shutil

            shutil.rmtree(door, ignore_errors=True)


def _crash_and_restart(args, port, grpc_port, door):
    from bench import front_door as fd
    from services.proxy import stale_front_doors
    from tests.ray.serve_process import kill_9_all_but_haproxy

    with cmr_serve(args, port) as lines:
        edited = "\n".join(p.read_text() for p in door.glob("*/haproxy.cfg.cmr"))
        binds = {line.split()[1] for line in edited.splitlines() if line.split()[:1] == ["bind"]}
        assert binds == {f"127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"}, binds  # no stats page, no exporter
        assert "timeout http-request 10s" in edited and "mode 666" not in edited
        idle = fd.idle_connections(port, 500, header_timeout_s=10)
        assert max(idle["healthz_s"]) < 1.0 and idle["closed_after_timeout"] == 500, idle
        big = fd.oversize_grpc(grpc_port, 64)
        assert big["code"] == "RESOURCE_EXHAUSTED" and big["ingress_pids"] and big["ingress_peak_growth_mb"] < 32, big
        haproxy = stale_front_doors(door)
        assert haproxy
        kill_9_all_but_haproxy(lines.proc)
        assert stale_front_doors(door) == haproxy  # the crash's leftover, holding the ports
    with cmr_serve(args, port) as lines:
        assert any(line.startswith("cmr: stopped the front door a crashed cmr serve left running") for line in lines), lines
        assert not set(haproxy) & set(stale_front_doors(door))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            assert c.get("/healthz").status_code == 200
