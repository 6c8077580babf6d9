"""API keys without Ray: the key store (hashed, 0600), verification, scopes, revocation, token
bucket, the ASGI middleware on a real FastAPI app, the bootstrap key and the ``cmr keys`` CLI."""

from __future__ import annotations

import os
import sqlite3
import stat
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from services.auth import (AuthError, Authenticator, AuthMiddleware, AuthSettings, KeyAdminError, KeyStore, TokenBucket,
                           current_principal, ensure_bootstrap_key, grpc_authenticate, open_key_store)


def test_keys_are_stored_hashed_in_a_private_file(tmp_path):
    st = KeyStore(tmp_path / "keys.sqlite")
    rec, token = st.create("acme", ["infer", "feedback"], rate_per_s=3, note="ci")
    assert token.startswith(f"cmr-{rec.id}.") and len(token) > 50
    assert stat.S_IMODE(os.stat(tmp_path / "keys.sqlite").st_mode) == 0o600
    st.close()
    secret = token.split(".", 1)[1]
    db = sqlite3.connect(tmp_path / "keys.sqlite")
    dump = "\n".join(db.iterdump())
    db.close()
    assert secret not in dump and token not in dump  # only salt and hash
    st = KeyStore(tmp_path / "keys.sqlite")
    assert [(r.id, r.tenant, r.scopes, r.rate_per_s, r.note) for r in st.list()] == [(rec.id, "acme", ("infer", "feedback"), 3.0, "ci")]


@pytest.mark.parametrize("kwargs, field", [
    ({"tenant": "", "scopes": ["infer"]}, "tenant"), ({"tenant": "a b", "scopes": ["infer"]}, "tenant"),
    ({"tenant": "t", "scopes": []}, "scope"), ({"tenant": "t", "scopes": ["root"]}, "scope"),
    ({"tenant": "t", "scopes": ["infer"], "rate_per_s": 0}, "rate_per_s"), ({"tenant": "t", "scopes": ["infer"], "burst": float("nan")}, "burst"),
])
def test_bad_key_input_names_the_field(tmp_path, kwargs, field, store_dsn):
    st = open_key_store(store_dsn, tmp_path / "keys.sqlite")
    with pytest.raises(KeyAdminError, match=f"field '{field}'"):
        st.create(**kwargs)
    assert st.list() == []
    with pytest.raises(KeyAdminError, match="field 'id'"):
        st.revoke("nope")


def test_authenticate_scopes_revocation_and_rate(tmp_path, store_dsn):
    st = open_key_store(store_dsn, tmp_path / "keys.sqlite")
    rec, token = st.create("acme", ["infer"], rate_per_s=0.01, burst=2)  # slow refill: no token comes back during the test
    _, admin = st.create("ops", ["admin"])
    auth = Authenticator(AuthSettings(reload_s=0.0), tmp_path / "keys.sqlite", dsn=store_dsn)
    p = auth.authenticate(f"Bearer {token}", "infer")
    assert (p.key_id, p.tenant, p.scopes) == (rec.id, "acme", ("infer",))
    cases = [(None, "infer", 401, "missing"), ("Basic abc", "infer", 401, "invalid"), (f"Bearer {token}x", "infer", 401, "invalid"),
             (f"Bearer cmr-000000000000.{token.split('.')[1]}", "infer", 401, "invalid"), ("Bearer garbage", "infer", 401, "invalid"),
             (f"Bearer {admin}", "infer", 403, "scope"), (f"Bearer {token}", "admin", 403, "scope")]
    for header, scope, status, reason in cases:
        with pytest.raises(AuthError) as e:
            auth.authenticate(header, scope)
        assert (e.value.status, e.value.reason) == (status, reason), header
    # burst 2: the first call above took one token, one is left, then 429 with a wait
    auth.authenticate(f"Bearer {token}", "infer")
    with pytest.raises(AuthError) as e:
        auth.authenticate(f"Bearer {token}", "infer")
    assert e.value.status == 429 and 0 < e.value.retry_after <= 100.0 and "retry after" in e.value.message
    # revocation by another connection (the CLI) is seen at the next reload, within 1 s
    open_key_store(store_dsn, tmp_path / "keys.sqlite").revoke(rec.id)
    deadline = time.monotonic() + 1.0
    while True:
        with pytest.raises(AuthError) as e:
            auth.authenticate(f"Bearer {token}", "infer")
        if e.value.reason != "rate" or time.monotonic() > deadline:  # 429 until the revocation arrives
            break
        time.sleep(0.005)
    assert (e.value.status, e.value.reason) == (401, "revoked")


def test_open_mode_needs_no_key(tmp_path):
    auth = Authenticator(AuthSettings(open=True, max_body_bytes=2048), None)
    p = auth.authenticate(None, "admin")
    assert p.key_id is None and p.tenant is None and auth.body_cap(p) == 2048


def test_token_bucket_refills_at_its_rate():
    b = TokenBucket(rate=10, burst=3)
    t0 = b.last
    assert [b.take(t0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(t0) == pytest.approx(0.1)
    assert b.take(t0 + 0.11) == 0.0  # one token back after 1/rate seconds
    assert b.take(t0 + 0.11) > 0


def _app(auth: Authenticator) -> TestClient:
    app = FastAPI()
    app.add_middleware(AuthMiddleware, get_auth=lambda: auth)

    @app.post("/v1/route")
    async def route(request: Request):
        p = current_principal()
        return {"tenant": p.tenant, "key": p.key_id, "n": len(await request.body())}

    @app.post("/v1/feedback")
    async def feedback():
        return {"ok": True}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    return TestClient(app)


def test_middleware_statuses_headers_and_body_cap(tmp_path):
    st = KeyStore(tmp_path / "keys.sqlite")
    rec, infer = st.create("acme", ["infer"], rate_per_s=0.01, burst=3, max_body_bytes=4096)
    auth = Authenticator(AuthSettings(reload_s=0.0), tmp_path / "keys.sqlite")
    c = _app(auth)
    assert c.get("/healthz").status_code == 200  # probes need no key
    r = c.post("/v1/route", json={"q": "x"})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer") and "missing API key" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "authentication_error"
    h = {"Authorization": f"Bearer {infer}"}
    r = c.post("/v1/route", content=b'{"q": "x"}', headers=h)
    assert r.status_code == 200 and r.json() == {"tenant": "acme", "key": rec.id, "n": 10}  # the body reaches the app whole
    r = c.post("/v1/feedback", json={}, headers=h)
    assert r.status_code == 403 and "'feedback' scope" in r.json()["error"]["message"]
    r = c.post("/v1/route", content=b"x" * 5000, headers=h)  # over the key's cap, with Content-Length
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
    # burst 3: two tokens taken (the 403 took none, it failed before the bucket), one left, then 429
    assert c.post("/v1/route", json={}, headers=h).status_code == 200
    r = c.post("/v1/route", json={}, headers=h)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "rate_limit_error"


def test_middleware_refuses_oversize_bodies_without_content_length(tmp_path):
    st = KeyStore(tmp_path / "keys.sqlite")
    _, tok = st.create("acme", ["infer"], max_body_bytes=2000)
    c = _app(Authenticator(AuthSettings(reload_s=0.0), tmp_path / "keys.sqlite"))
    h = {"Authorization": f"Bearer {tok}"}

    def chunks(n):
        for _ in range(n):
            yield b"y" * 500

    r = c.post("/v1/route", content=chunks(5), headers=h)  # chunked transfer: no Content-Length
    assert r.status_code == 413 and "2000 bytes" in r.json()["error"]["message"]
    r = c.post("/v1/route", content=chunks(3), headers=h)
    assert r.status_code == 200 and r.json()["n"] == 1500


def test_middleware_fails_closed_without_an_authenticator():
    app = FastAPI()
    app.add_middleware(AuthMiddleware, get_auth=lambda: None)

    @app.get("/v1/models")
    async def models():
        return {}

    r = TestClient(app).get("/v1/models")
    assert r.status_code == 503 and "error" in r.json()


def test_grpc_authentication_from_metadata(tmp_path):
    st = KeyStore(tmp_path / "keys.sqlite")
    rec, tok = st.create("acme", ["feedback"], max_body_bytes=1024)
    auth = Authenticator(AuthSettings(reload_s=0.0), tmp_path / "keys.sqlite")
    assert grpc_authenticate(auth, [("authorization", f"Bearer {tok}")], "Feedback", 10).key_id == rec.id
    assert grpc_authenticate(auth, [("authorization", tok)], "Feedback", 10).tenant == "acme"  # bare key accepted
    for md, method, size, status in [((), "Feedback", 10, 401), ([("authorization", tok)], "Route", 10, 403),
                                     ([("authorization", tok)], "Feedback", 5000, 413)]:
        with pytest.raises(AuthError) as e:
            grpc_authenticate(auth, md, method, size)
        assert e.value.status == status


def test_bootstrap_key_is_created_once_and_private(tmp_path):
    path, token = ensure_bootstrap_key(tmp_path / "serve")
    assert token and path.read_text().strip() == token and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    auth = Authenticator(AuthSettings(reload_s=0.0), tmp_path / "serve" / "keys.sqlite")
    assert set(auth.authenticate(f"Bearer {token}", "admin").scopes) == {"infer", "feedback", "admin"}
    assert ensure_bootstrap_key(tmp_path / "serve") == (path, None)  # never printed twice


def test_cmr_keys_cli(tmp_path, capsys):
    from cmr.cli import main

    home = ["keys", "--home", str(tmp_path)]
    assert main([*home, "create", "--tenant", "acme", "--scope", "infer", "--scope", "feedback", "--rate-per-s", "5"]) == 0
    token = capsys.readouterr().out.splitlines()[0]
    kid = token[4:16]
    assert main([*home, "list"]) == 0
    out = capsys.readouterr().out
    assert kid in out and "acme" in out and token.split(".")[1] not in out
    assert main([*home, "revoke", kid]) == 0 and "revoked" in capsys.readouterr().out
    assert main([*home, "list"]) == 0 and kid not in capsys.readouterr().out
    assert main([*home, "revoke", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "field 'id'" in err[0]
    assert main([*home, "create", "--tenant", "a b", "--scope", "infer"]) == 2
    assert "field 'tenant'" in capsys.readouterr().err
    assert main(["keys", "--home", str(tmp_path / "none"), "list"]) == 2
    assert "no key store" in capsys.readouterr().err
