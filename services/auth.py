"""Scoped API keys: storage (SQLite, hashed), verification, per-key rate limits and body caps.

A key is ``cmr-<id>.<secret>``: ``id`` (12 hex characters) is public and names the key in
listings, logs and decisions; ``secret`` is 32 random bytes (URL-safe base64) and is shown once,
when the key is created. Only ``sha256(salt ‖ secret)`` and the per-key salt are stored. A slow
password hash (scrypt, PBKDF2) protects low-entropy passwords against guessing; a 256-bit random
secret cannot be guessed, so one salted SHA-256 is enough and keeps verification per request in
microseconds.

Scopes: ``infer`` (chat, completions, route, model list), ``feedback`` (``/v1/feedback``),
``admin`` (``/v1/admin/*``). Each key belongs to a tenant; feedback is accepted only from a key
of the tenant whose key made the request (an ``infer`` key in the app and a ``feedback`` key in
the evaluation pipeline of the same tenant both work; another tenant's key gets 403).

Limits per key (else the ``AuthArgs`` defaults): a token bucket (``rate_per_s``, ``burst``;
429 with ``Retry-After``) and a request-body cap (``max_body_bytes``; 413). Buckets live in the
ingress replica's memory: with several ingress replicas each enforces the rate on its share.

Open mode (``AuthArgs.open``, ``cmr serve --open``) skips keys (no tenant, no rate limit) but keeps
the body cap. It is never the default.

Nothing in this module imports Ray or FastAPI: the ASGI middleware speaks raw ASGI.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from cmr.errors import CMRError
from cmr.state import PgDatabase, SharedVersion, is_postgres, private_file

SCOPES = ("infer", "feedback", "admin")
KEYS_FILE = "keys.sqlite"
BOOTSTRAP_FILE = "bootstrap.key"
_TOKEN_RE = re.compile(r"^cmr-([0-9a-f]{12})\.([A-Za-z0-9_\-]{20,100})$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
  id TEXT PRIMARY KEY,
  tenant TEXT NOT NULL,
  scopes TEXT NOT NULL,
  salt BLOB NOT NULL,
  hash BLOB NOT NULL,
  rate_per_s REAL,
  burst REAL,
  max_body_bytes INTEGER,
  note TEXT NOT NULL DEFAULT '',
  created REAL NOT NULL,
  revoked REAL
);
"""


class KeyAdminError(CMRError):
    """Bad key administration input (unknown id, bad scope, bad tenant): one line for the CLI."""


class AuthError(CMRError):
    """A request refused by authentication: HTTP ``status`` (401, 403, 413, 429) and metric ``reason``."""

    def __init__(self, status: int, message: str, reason: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.reason, self.retry_after = status, message, reason, retry_after


@dataclass(frozen=True)
class KeyRecord:
    """A stored key, without its secret."""

    id: str
    tenant: str
    scopes: tuple[str, ...]
    rate_per_s: float | None = None
    burst: float | None = None
    max_body_bytes: int | None = None
    note: str = ""
    created: float = 0.0
    revoked: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "tenant": self.tenant, "scopes": list(self.scopes), "rate_per_s": self.rate_per_s, "burst": self.burst,
                "max_body_bytes": self.max_body_bytes, "note": self.note, "created": self.created, "revoked": self.revoked}


@dataclass(frozen=True)
class Principal:
    """Who made a request: a key (id, tenant, scopes), or nobody in open mode (all None)."""

    key_id: str | None = None
    tenant: str | None = None
    scopes: tuple[str, ...] = SCOPES


OPEN = Principal()
_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("cmr_principal", default=None)


def current_principal() -> Principal | None:
    """The principal of the request being handled (set by the middleware or the gRPC servicer)."""
    return _current.get()


def set_principal(p: Principal | None) -> None:
    _current.set(p)


def _hash(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def _check_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", tenant):
        raise KeyAdminError(f"field 'tenant': 1-64 letters, digits, '.', '_' or '-', got {tenant!r}")
    return tenant


def _check_scopes(scopes) -> tuple[str, ...]:
    scopes = tuple(dict.fromkeys(scopes or ()))
    if not scopes:
        raise KeyAdminError(f"field 'scope': at least one of {', '.join(SCOPES)}")
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise KeyAdminError(f"field 'scope': unknown scope {bad[0]!r}; scopes: {', '.join(SCOPES)}")
    return scopes


def _check_positive(name: str, v: float | None, integer: bool = False) -> float | int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise KeyAdminError(f"field '{name}': must be a positive number, got {v!r}")
    return int(v) if integer else float(v)


class KeyStoreProtocol(Protocol):
    """Key storage as ``cmr keys`` and the ``Authenticator`` use it. ``data_version`` is cheap and
    changes whenever a key is created or revoked (by any process or replica)."""

    def create(self, tenant: str, scopes, rate_per_s: float | None = None, burst: float | None = None,
               max_body_bytes: int | None = None, note: str = "") -> tuple[KeyRecord, str]: ...
    def list(self, include_revoked: bool = True) -> list[KeyRecord]: ...
    def revoke(self, key_id: str) -> KeyRecord: ...
    def secrets_table(self) -> dict[str, tuple[KeyRecord, bytes, bytes]]: ...
    def data_version(self) -> int: ...
    def close(self) -> None: ...


def open_key_store(dsn: str | None, path: Path | str) -> KeyStoreProtocol:
    """PostgreSQL when ``dsn`` is a postgresql:// DSN, else the SQLite file ``path``."""
    return PgKeyStore(dsn) if is_postgres(dsn) else KeyStore(path)


class _Keys:
    """What both backends do with keys, over ``_read(fn)`` / ``_change(fn)``: ``fn(ex)`` runs SQL
    through ``ex(query, params) -> rows`` (``?`` placeholders), a change in one transaction."""

    _COLS = "id, tenant, scopes, rate_per_s, burst, max_body_bytes, note, created, revoked"

    @staticmethod
    def _row(r) -> KeyRecord:
        return KeyRecord(id=r[0], tenant=r[1], scopes=tuple(json.loads(r[2])), rate_per_s=r[3], burst=r[4], max_body_bytes=r[5],
                         note=r[6], created=r[7], revoked=r[8])

    def create(self, tenant: str, scopes, rate_per_s: float | None = None, burst: float | None = None,
               max_body_bytes: int | None = None, note: str = "") -> tuple[KeyRecord, str]:
        """Create a key; returns its record and the token ``cmr-<id>.<secret>`` (shown only now)."""
        tenant = _check_tenant(tenant)
        scopes = _check_scopes(scopes)
        rate = _check_positive("rate_per_s", rate_per_s)
        burst_ = _check_positive("burst", burst)
        cap = _check_positive("max_body_bytes", max_body_bytes, integer=True)
        kid, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_bytes(16)
        rec = KeyRecord(id=kid, tenant=tenant, scopes=scopes, rate_per_s=rate, burst=burst_, max_body_bytes=cap, note=str(note), created=time.time())
        self._change(lambda ex: ex(f"INSERT INTO keys ({self._COLS}, salt, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                   (kid, tenant, json.dumps(list(scopes)), rate, burst_, cap, rec.note, rec.created, None, salt, _hash(salt, secret))))
        return rec, f"cmr-{kid}.{secret}"

    def list(self, include_revoked: bool = True) -> list[KeyRecord]:
        q = f"SELECT {self._COLS} FROM keys" + ("" if include_revoked else " WHERE revoked IS NULL") + " ORDER BY created"
        return [self._row(r) for r in self._read(lambda ex: ex(q, ()))]

    def revoke(self, key_id: str) -> KeyRecord:
        """Revoke a key (kept for the record; it stops working within ``AuthArgs.reload_s``)."""
        def change(ex):
            if not ex("SELECT 1 FROM keys WHERE id=?", (key_id,)):
                raise KeyAdminError(f"field 'id': no key with id {key_id!r} (cmr keys list shows them)")
            ex("UPDATE keys SET revoked=? WHERE id=? AND revoked IS NULL", (time.time(), key_id))
            return ex(f"SELECT {self._COLS} FROM keys WHERE id=?", (key_id,))[0]
        return self._row(self._change(change))

    def secrets_table(self) -> dict[str, tuple[KeyRecord, bytes, bytes]]:
        """Every key (revoked ones too) with its salt and hash: what an ``Authenticator`` caches."""
        rows = self._read(lambda ex: ex(f"SELECT {self._COLS}, salt, hash FROM keys", ()))
        return {r[0]: (self._row(r[:9]), bytes(r[9]), bytes(r[10])) for r in rows}


class KeyStore(_Keys):
    """API keys in SQLite (WAL), file mode 0600. Safe to open from several processes."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        private_file(self.path)  # 0600 before SQLite writes anything into it (and its -wal/-shm)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a created or revoked key survives a crash
        self._db.executescript(_SCHEMA)

    def _read(self, fn):
        with self._lock:
            return fn(lambda q, p: self._db.execute(q, p).fetchall())

    def _change(self, fn):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(lambda q, p: self._db.execute(q, p).fetchall())
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return out

    def data_version(self) -> int:
        """Changes whenever another connection commits: cheap check for a reload."""
        with self._lock:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


_PG_SCHEMA = ("""
CREATE TABLE keys (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, scopes TEXT NOT NULL, salt BYTEA NOT NULL, hash BYTEA NOT NULL,
                   rate_per_s DOUBLE PRECISION, burst DOUBLE PRECISION, max_body_bytes BIGINT, note TEXT NOT NULL DEFAULT '',
                   created DOUBLE PRECISION NOT NULL, revoked DOUBLE PRECISION)
""",)


class PgKeyStore(_Keys):
    """API keys in PostgreSQL, shared by every ingress replica. ``data_version`` is this replica's
    view of the keys version (``cmr.state.SharedVersion``): a revocation reaches every replica
    when its commit is notified, with a periodic re-sync as the safety net."""

    def __init__(self, db: PgDatabase | str):
        self.db = PgDatabase.shared(db) if isinstance(db, str) else db
        self.db.migrate("keys", _PG_SCHEMA)
        self._version = SharedVersion(self.db, "keys")

    @staticmethod
    def _ex(conn):
        def ex(q, p):
            cur = conn.execute(q.replace("?", "%s"), p)
            return cur.fetchall() if cur.description else []
        return ex

    def _read(self, fn):
        with self.db.connection() as conn:
            return fn(self._ex(conn))

    def _change(self, fn):
        with self.db.connection() as conn:
            out = fn(self._ex(conn))
            v = self._version.bump(conn)
        self._version.seen(v)
        return out

    def data_version(self) -> int:
        return self._version.get()

    def close(self) -> None:
        self._version.close()
        self.db.release()


def keys_path(state_dir: Path, configured: str | None = None) -> Path:
    return Path(configured) if configured else Path(state_dir) / KEYS_FILE


def ensure_bootstrap_key(state_dir: Path, configured: str | None = None, dsn: str | None = None) -> tuple[Path, str | None]:
    """First start without keys: create a ``default`` tenant key with every scope and write it to
    ``<state>/bootstrap.key`` (mode 0600). Returns the file and the token when created now, else
    ``(file, None)`` (keys exist already; the token is never printed twice). ``dsn``: the store
    (``AppArgs.store_dsn()``; None: the SQLite file)."""
    state_dir = Path(state_dir)
    path = state_dir / BOOTSTRAP_FILE
    store = open_key_store(dsn, keys_path(state_dir, configured))
    try:
        if store.list(include_revoked=False):
            return path, None
        _, token = store.create("default", SCOPES, note="bootstrap key (cmr serve, first start)")
    finally:
        store.close()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return path, token


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``take`` says how long to wait when empty."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = float(rate), max(1.0, float(burst))
        self.tokens, self.last = self.burst, time.monotonic()

    def take(self, now: float | None = None) -> float:
        """Take one token: returns 0 when granted, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass
class AuthSettings:
    """What the authenticator needs from ``AuthArgs`` (plain values, no pydantic here)."""

    open: bool = False
    rate_per_s: float = 50.0
    burst: float = 100.0
    max_body_bytes: int = 1 << 20
    reload_s: float = 1.0


@dataclass
class _Cache:
    table: dict[str, tuple[KeyRecord, bytes, bytes]] = field(default_factory=dict)
    version: int = -1
    checked: float = 0.0


class Authenticator:
    """Verifies ``Authorization: Bearer`` tokens against the key store (cached, reloaded when the
    store changes), checks the scope, and applies the key's rate limit and body cap."""

    def __init__(self, settings: AuthSettings, store_path: Path | str | None, dsn: str | None = None):
        self.settings = settings
        self.store = None if settings.open or store_path is None else open_key_store(dsn, store_path)
        # PostgreSQL: data_version is a local view the listener keeps fresh, free to read per request
        self._pushed = isinstance(self.store, PgKeyStore)
        self._cache = _Cache()
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def _table(self) -> dict[str, tuple[KeyRecord, bytes, bytes]]:
        c, now = self._cache, time.monotonic()
        if self.store is not None and (self._pushed or now - c.checked >= self.settings.reload_s):
            c.checked = now
            v = self.store.data_version()
            if v != c.version or not c.table:
                c.table, c.version = self.store.secrets_table(), v
        return c.table

    def body_cap(self, p: Principal) -> int:
        if p.key_id is not None:
            rec = self._table().get(p.key_id)
            if rec is not None and rec[0].max_body_bytes:
                return int(rec[0].max_body_bytes)
        return int(self.settings.max_body_bytes)

    def authenticate(self, authorization: str | None, scope: str | None) -> Principal:
        """The principal for an ``Authorization`` header value, or ``AuthError``. ``scope`` None:
        any valid key will do. Takes one token of the key's rate bucket."""
        if self.settings.open:
            return OPEN
        from services import metrics

        try:
            return self._authenticate(authorization, scope)
        except AuthError as e:
            metrics.auth_rejection(e.reason)
            raise

    def _authenticate(self, authorization: str | None, scope: str | None) -> Principal:
        if not authorization:
            raise AuthError(401, "missing API key: send 'Authorization: Bearer <key>' (cmr keys create makes one)", "missing")
        kind, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if kind.lower() != "bearer" or not token:
            raise AuthError(401, "invalid Authorization header: expected 'Bearer <key>'", "invalid")
        m = _TOKEN_RE.match(token)
        hit = self._table().get(m.group(1)) if m else None
        # compare a hash even for an unknown id: no timing difference between "no such id" and "wrong secret"
        rec, salt, digest = hit if hit is not None else (None, b"\0" * 16, b"\0" * 32)
        ok = hmac.compare_digest(_hash(salt, m.group(2) if m else token), digest)
        if rec is None or not ok:
            raise AuthError(401, "invalid API key", "invalid")
        if rec.revoked is not None:
            raise AuthError(401, f"API key {rec.id} was revoked", "revoked")
        if scope is not None and scope not in rec.scopes:
            raise AuthError(403, f"API key {rec.id} lacks the '{scope}' scope (it has: {', '.join(rec.scopes)})", "scope")
        with self._lock:
            b = self._buckets.get(rec.id)
            rate, burst = rec.rate_per_s or self.settings.rate_per_s, rec.burst or self.settings.burst
            if b is None or b.rate != rate or b.burst != max(1.0, burst):
                b = self._buckets[rec.id] = TokenBucket(rate, burst)
            wait = b.take()
        if wait > 0:
            raise AuthError(429, f"rate limit of API key {rec.id} exceeded ({rate:g} requests/s, burst {burst:g}); retry after {wait:.2f} s",
                            "rate", retry_after=wait)
        return Principal(key_id=rec.id, tenant=rec.tenant, scopes=rec.scopes)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


# -- HTTP ------------------------------------------------------------------------------------

#: paths anyone may read: probes and the API description
PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/console"})
#: path prefixes anyone may read: the console's static files (they hold no data; its /v1/console/* calls need a key)
PUBLIC_PREFIXES = ("/console/",)


def required_scope(method: str, path: str) -> str | None:
    """The scope an HTTP request needs (None: any valid key, e.g. for unknown paths → 404)."""
    if path.startswith("/v1/admin"):
        return "admin"
    if path == "/v1/feedback":
        return "feedback"
    if path in ("/v1/chat/completions", "/v1/completions", "/v1/route", "/v1/models"):
        return "infer"
    return None


_TYPES = {401: "authentication_error", 403: "permission_error", 413: "invalid_request_error", 429: "rate_limit_error"}

_active: Authenticator | None = None


def activate(auth: Authenticator | None) -> None:
    """Install the authenticator the middleware of this process uses (the ingress replica's)."""
    global _active
    _active = auth


def active() -> Authenticator | None:
    return _active


def error_dict(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The error shape of every non-2xx answer (OpenAI's): ``{"error": {message, type, param, code}}``."""
    kind = _TYPES.get(status) or ("invalid_request_error" if 400 <= status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_json(status: int, message: str, param: str | None = None) -> bytes:
    return json.dumps(error_dict(status, message, param)).encode()


async def _send_error(send, status: int, message: str, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = error_json(status, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AuthMiddleware:
    """Raw ASGI middleware: authenticate, check scope, rate and body size before the app runs.

    The body is read here (up to the cap) and replayed to the app, so an oversize body is refused
    with 413 whether or not it announced a ``Content-Length``. The principal is put in a context
    variable (``current_principal()``) and ``scope["state"]["cmr_principal"]``.
    """

    def __init__(self, app, get_auth: Callable[[], Authenticator | None] = active):
        self.app, self.get_auth = app, get_auth

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path in PUBLIC_PATHS or (path.startswith(PUBLIC_PREFIXES) and ".." not in path):
            return await self.app(scope, receive, send)
        auth = self.get_auth()
        if auth is None:  # fail closed: no authenticator installed in this process
            return await _send_error(send, 503, "authentication is not configured on this replica")
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        try:
            p = auth.authenticate(headers.get(b"authorization", b"").decode("latin-1") or None, required_scope(scope.get("method", ""), path))
        except AuthError as e:
            extra = []
            if e.status == 401:
                extra.append((b"www-authenticate", b'Bearer realm="cmr"'))
            if e.retry_after is not None:
                extra.append((b"retry-after", str(max(1, math.ceil(e.retry_after))).encode()))
            return await _send_error(send, e.status, e.message, extra)
        cap = auth.body_cap(p)
        try:
            declared = int(headers.get(b"content-length", b"-1"))
        except ValueError:
            return await _send_error(send, 400, "invalid Content-Length header")
        if declared > cap:
            return await self._too_large(send, cap)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > cap:
                return await self._too_large(send, cap)
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        scope.setdefault("state", {})["cmr_principal"] = p
        token = _current.set(p)
        try:
            await self.app(scope, replay, send)
        finally:
            _current.reset(token)

    @staticmethod
    async def _too_large(send, cap: int) -> None:
        from services import metrics

        metrics.auth_rejection("size")
        await _send_error(send, 413, f"request body larger than {cap} bytes (the API key's max_body_bytes)")


# -- gRPC ------------------------------------------------------------------------------------

GRPC_SCOPES = {"Route": "infer", "Chat": "infer", "ListModels": "infer", "Feedback": "feedback", "RegisterModel": "admin"}


def grpc_authenticate(auth: Authenticator | None, metadata, method: str, size: int) -> Principal:
    """Authenticate a gRPC call from its ``authorization`` metadata (``Bearer <key>``, or the bare
    key); raises ``AuthError`` (mapped to UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED)."""
    if auth is None:
        raise AuthError(503, "authentication is not configured on this replica", "unconfigured")
    value = None
    for k, v in metadata or ():
        if k.lower() == "authorization":
            value = v.decode("latin-1") if isinstance(v, bytes) else v
            break
    if value and not value.lower().startswith("bearer "):
        value = f"Bearer {value}"
    p = auth.authenticate(value, GRPC_SCOPES.get(method))
    cap = auth.body_cap(p)
    if size > cap:
        from services import metrics

        metrics.auth_rejection("size")
        raise AuthError(413, f"request message larger than {cap} bytes (the API key's max_body_bytes)", "size")
    return p

