"""A throwaway PostgreSQL server for the job-store tests: ``RECONSERVE_TEST_DATABASE_URL`` if
set, else a cluster of Debian's ``postgresql`` package (``.ci/run`` installs it) started in a
temporary folder on a Unix socket (as the ``postgres`` user when run as root)."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@contextmanager
def postgres_url():
    """Yields a SQLAlchemy URL, or None when no PostgreSQL server can be had here."""
    if os.environ.get("RECONSERVE_TEST_DATABASE_URL"):
        yield os.environ["RECONSERVE_TEST_DATABASE_URL"]
        return
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not initdb or not pg_ctl:
        if os.environ.get("RECONSERVE_REQUIRE_POSTGRES"):  # CI: never skip silently
            raise RuntimeError("RECONSERVE_REQUIRE_POSTGRES is set but no PostgreSQL is installed")
        yield None
        return
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    tmp = tempfile.mkdtemp(prefix="reconserve-pg-")
    if run_as:
        shutil.chown(tmp, "postgres")
    db, port = os.path.join(tmp, "db"), 55000 + os.getpid() % 1000
    subprocess.run(run_as + [initdb, "-D", db, "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True, cwd=tmp)
    subprocess.run(run_as + [pg_ctl, "-D", db, "-l", os.path.join(tmp, "log"), "-w", "start",
                             "-o", f"-k {tmp} -p {port} -c listen_addresses=''"], check=True,
                   capture_output=True, cwd=tmp)
    try:  # pg_ctl -w returned once the server accepts connections
        yield f"postgresql+psycopg://postgres@/postgres?host={tmp}&port={port}"
    finally:
        subprocess.run(run_as + [pg_ctl, "-D", db, "-m", "immediate", "stop"], capture_output=True, cwd=tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def fresh_database(url: str, name: str) -> str:
    """A new, empty database ``name`` on the server of ``url`` (dropped first if it exists) ->
    its URL. Tests that count rows or run a cluster need a store of their own."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return engine.url.set(database=name).render_as_string(hide_password=False)
