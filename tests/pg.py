"""A throwaway PostgreSQL server for tests and measurements: ``initdb`` in a temp folder, the
server on a unix socket there (no TCP port to collide on), stopped and deleted afterwards.

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` system user (the
one the distribution's package creates).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def pg_bindir() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(dirs[-1]).parent if dirs else None


def unavailable() -> str | None:
    """Why no throwaway server can start here (None: it can)."""
    if pg_bindir() is None:
        return "PostgreSQL server binaries not found (apt-get install postgresql; .ci/run installs them)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' system user to run the server as"
    return None


@contextmanager
def throwaway_postgres(fsync: bool = False) -> Iterator[str]:
    """Start a server, yield its DSN, stop it (immediately) and delete its folder. ``fsync``
    False (tests): faster, and a test never survives a power cut anyway."""
    why = unavailable()
    if why:
        raise RuntimeError(why)
    bindir = pg_bindir()
    root = Path(tempfile.mkdtemp(prefix="cmr-pg-"))
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        pw = pwd.getpwnam(user)
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data, log = root / "data", root / "server.log"

    def run(*cmd: str) -> None:
        subprocess.run(cmd, check=True, user=user, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        opts = f"-k {root} -c listen_addresses='' -c max_connections=200" + ("" if fsync else " -c fsync=off -c synchronous_commit=off")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start")
        try:
            yield f"postgresql://postgres@/postgres?host={root}"
        finally:
            subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], user=user,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    except subprocess.CalledProcessError as e:
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(f"throwaway PostgreSQL failed: {e.stderr.decode(errors='replace')[-2000:]}{tail}") from None
    finally:
        shutil.rmtree(root, ignore_errors=True)


def new_database(server_dsn: str, name: str) -> str:
    """Create database ``name`` on the server (a fresh one per test) and return its DSN."""
    import psycopg

    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_dsn.replace("/postgres?", f"/{name}?", 1)
