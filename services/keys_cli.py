"""``cmr keys``: create, list and revoke the served app's API keys.

Keys live in ``<state>/keys.sqlite`` (``$CMR_HOME/serve/keys.sqlite`` unless ``--home`` or
``--keys-file``), or in the PostgreSQL store (``--store postgresql://…``, default ``CMR_STORE``); a running server picks up changes within ``AuthArgs.reload_s`` (1 s). The key
itself is printed once, at creation; only its salted hash is stored.

    cmr keys create --tenant acme --scope infer --scope feedback [--rate-per-s 20] [--burst 40]
    cmr keys list [--all] [--json]
    cmr keys revoke 3f2a9c0d1b7e
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", help="state folder of the served app (default CMR_HOME)")
    p.add_argument("--keys-file", help="key store file (default <home>/serve/keys.sqlite; AuthArgs.keys_path)")
    p.add_argument("--store", help="the served app's state store: 'sqlite' (the key store file) or a postgresql://… DSN "
                                   "(AppArgs.store; default CMR_STORE)")
    sub = p.add_subparsers(dest="keys_command", required=True)
    c = sub.add_parser("create", help="create a key and print it (once)")
    c.add_argument("--tenant", required=True, help="tenant the key belongs to (feedback only for this tenant's requests)")
    c.add_argument("--scope", action="append", choices=("infer", "feedback", "admin"), required=True,
                   help="infer (chat, completions, route, models), feedback, admin (/v1/admin); repeat for several")
    c.add_argument("--rate-per-s", type=float, help="token bucket rate (default AuthArgs.rate_per_s)")
    c.add_argument("--burst", type=float, help="token bucket size (default AuthArgs.burst)")
    c.add_argument("--max-body-bytes", type=int, help="request-body cap (default AuthArgs.max_body_bytes)")
    c.add_argument("--note", default="", help="free text shown by `cmr keys list`")
    c.add_argument("--json", action="store_true", help="print the key and its record as JSON")
    ls = sub.add_parser("list", help="list keys (never their secrets)")
    ls.add_argument("--all", action="store_true", help="include revoked keys")
    ls.add_argument("--json", action="store_true")
    r = sub.add_parser("revoke", help="revoke a key by id (takes effect within a second on a running server)")
    r.add_argument("id", help="the key id (the 12 hex characters after 'cmr-')")


def _store_path(ns: argparse.Namespace) -> Path:
    if ns.keys_file:
        return Path(ns.keys_file)
    from cmr import constants
    from services.auth import KEYS_FILE

    home = Path(ns.home) if ns.home else constants.cmr_home()
    return home / "serve" / KEYS_FILE


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def run(ns: argparse.Namespace) -> int:
    from cmr import constants
    from cmr.state import check_store, redact
    from services.auth import KeyAdminError, open_key_store

    try:
        dsn = check_store(getattr(ns, "store", None) or constants.store_dsn())
    except ValueError as e:
        raise KeyAdminError(f"field 'store': {e}") from None
    path = _store_path(ns)
    if dsn is None and ns.keys_command != "create" and not path.is_file():
        raise KeyAdminError(f"{path}: no key store (create a key first: cmr keys create --tenant T --scope infer)")
    store = open_key_store(dsn, path)
    if dsn is not None:
        path = redact(dsn)
    try:
        if ns.keys_command == "create":
            rec, token = store.create(ns.tenant, ns.scope, rate_per_s=ns.rate_per_s, burst=ns.burst, max_body_bytes=ns.max_body_bytes, note=ns.note)
            if ns.json:
                print(json.dumps({"key": token, **rec.to_dict()}))
            else:
                print(token)
                print(f"cmr: key {rec.id} for tenant {rec.tenant!r}, scopes {','.join(rec.scopes)}; shown only now (stored hashed in {path})")
        elif ns.keys_command == "list":
            recs = store.list(include_revoked=ns.all)
            if ns.json:
                print(json.dumps([r.to_dict() for r in recs]))
            else:
                print(f"{'id':12s}  {'tenant':16s}  {'scopes':22s}  {'rate/s':>7s}  {'burst':>6s}  {'created (UTC)':19s}  {'revoked (UTC)':19s}  note")
                for r in recs:
                    print(f"{r.id:12s}  {r.tenant:16s}  {','.join(r.scopes):22s}  {r.rate_per_s or '-'!s:>7s}  {r.burst or '-'!s:>6s}  "
                          f"{_when(r.created):19s}  {_when(r.revoked):19s}  {r.note}")
        else:
            rec = store.revoke(ns.id)
            print(f"cmr: key {rec.id} (tenant {rec.tenant!r}) revoked at {_when(rec.revoked)} UTC")
    finally:
        store.close()
    return 0
