"""The real PostgreSQL the tests talk to (see proxy.throwaway for how one is found).

``PGSCOPE_TEST_DSN`` names an existing server (superuser); otherwise a throwaway
cluster is started. ``PGSCOPE_TEST_SERVER=binaries`` (set by .ci/run) insists on a
throwaway cluster from local server binaries, whose hba the auth tests rely on:
no DSN, no container, no pgserver wheel.  Either way the database ``pgscope_test`` and three roles
with passwords exist: pgscope_md5/md5pass (stored md5), pgscope_scram/scrampass
and pgscope_plain/plainpass (stored SCRAM; the throwaway cluster's hba asks md5,
scram-sha-256 and cleartext password of them over TCP).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit, unquote

import psycopg

from proxy.throwaway import Cluster, find_bindir, start_binaries, start_postgres, wait_connectable

DBNAME = "pgscope_test"
ROLES = (("pgscope_md5", "md5pass", "md5"), ("pgscope_scram", "scrampass", "scram-sha-256"),
         ("pgscope_plain", "plainpass", "scram-sha-256"))


@dataclass
class PgServer:
    cluster: Cluster
    version: int = 0
    has_hypopg: bool = False
    dbname: str = DBNAME

    @property
    def host(self) -> str:
        return self.cluster.host

    @property
    def port(self) -> int:
        return self.cluster.port

    @property
    def superuser(self) -> str:
        return self.cluster.superuser

    @property
    def managed(self) -> bool:
        return self.cluster.managed

    def dsn(self, user: str | None = None, password: str | None = None, dbname: str | None = None) -> str:
        return self.cluster.dsn(user, password, dbname or self.dbname)

    def connect(self, dbname: str | None = None, **kw) -> psycopg.Connection:
        kw.setdefault("autocommit", True)
        return psycopg.connect(self.dsn(dbname=dbname), **kw)

    def restart(self) -> None:
        self.cluster.restart()
        wait_connectable(self.connect)

    def stop(self) -> None:
        self.cluster.stop()

    def wait_blocked(self, query: str, at_least: float, timeout: float = 30.0) -> float:
        """Wait until a backend running a statement that starts with ``query`` is blocked on another
        session's lock (``pg_blocking_pids``) and has run for ``at_least`` seconds by the server's clock.
        The positive control before a test asserts that the blocked client has not finished, and a lower
        bound on how long its blocker held the lock (it took it before that statement began).
        Returns those seconds; fails after ``timeout``."""
        from tests.support.wire import wait_for

        def blocked_for() -> float | None:
            with self.connect() as c:
                row = c.execute("select extract(epoch from clock_timestamp() - query_start)::float8 "
                                "from pg_stat_activity where pid <> pg_backend_pid() and starts_with(query, %s) "
                                "and cardinality(pg_blocking_pids(pid)) > 0", (query,)).fetchone()
            return row[0] if row and row[0] >= at_least else None
        return wait_for(blocked_for, timeout=timeout, interval=0.1,
                        what=f"{query!r} blocked on a lock for {at_least}s")


def _from_dsn(dsn: str) -> Cluster:
    u = urlsplit(dsn)
    return Cluster(u.hostname or "127.0.0.1", u.port or 5432, unquote(u.username or "postgres"), "dsn", False,
                   password=unquote(u.password) if u.password else None)


def start_pg() -> PgServer:
    dsn = os.environ.get("PGSCOPE_TEST_DSN")
    if os.environ.get("PGSCOPE_TEST_SERVER") == "binaries":
        if dsn:
            raise RuntimeError("PGSCOPE_TEST_SERVER=binaries and PGSCOPE_TEST_DSN are both set")
        bindir = find_bindir()
        if not bindir:
            raise RuntimeError("PGSCOPE_TEST_SERVER=binaries: no local PostgreSQL server binaries")
        cluster = start_binaries(bindir)
    else:
        cluster = _from_dsn(dsn) if dsn else start_postgres()
    server = PgServer(cluster)
    try:
        wait_connectable(lambda: server.connect(dbname="postgres"))
        _prepare(server)
    except Exception:
        server.stop()
        raise
    return server


def _prepare(server: PgServer) -> None:
    with server.connect(dbname="postgres") as c:
        server.version = c.info.server_version // 10000
        if not c.execute("select 1 from pg_database where datname = %s", (DBNAME,)).fetchone():
            c.execute(f"create database {DBNAME}")
        for role, password, encryption in ROLES:
            c.execute(f"set password_encryption = '{encryption}'")
            verb = "alter" if c.execute("select 1 from pg_roles where rolname = %s", (role,)).fetchone() else "create"
            c.execute(f"{verb} role {role} login password '{password}'")
            c.execute(f"grant all on database {DBNAME} to {role}")
        c.execute("reset password_encryption")
    with server.connect() as c:
        for role, _, _ in ROLES:
            c.execute(f"grant all on schema public to {role}")
        try:
            c.execute("create extension if not exists hypopg")
            server.has_hypopg = True
        except psycopg.Error:
            server.has_hypopg = False
