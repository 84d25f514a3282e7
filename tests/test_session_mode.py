"""Session pooling through the proxy with the clients people use: psql, pgbench, psycopg 3."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time

import psycopg
import pytest

from tests.support.client import login_error
from tests.support.tools import require


def connect(proxy, pg, **kw):
    kw.setdefault("autocommit", True)
    return psycopg.connect(proxy.dsn(pg.superuser), **kw)


def test_psql_through_proxy(proxy, pg):
    psql = require("psql")
    out = subprocess.run(
        [psql, proxy.dsn(pg.superuser), "-XAtc", "select 40 + 2", "-c", "show application_name"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PGAPPNAME": "psqltest"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["42", "psqltest"]


def test_psql_error_then_recovery_and_copy(proxy, pg, tmp_path):
    psql = require("psql")
    src = tmp_path / "in.csv"
    src.write_text("".join(f"{i},{i * i}\n" for i in range(1000)))
    script = (
        "select 1/0;\n"
        "create temp table c(a int, b int);\n"
        f"\\copy c from '{src}' csv\n"
        "select count(*), sum(b) from c;\n"
        f"\\copy c to '{tmp_path / 'out.csv'}' csv\n"
    )
    out = subprocess.run([psql, proxy.dsn(pg.superuser), "-XAt"], input=script,
                         capture_output=True, text=True, timeout=60)
    assert "division by zero" in out.stderr
    assert "1000|332833500" in out.stdout
    assert (tmp_path / "out.csv").read_text() == src.read_text()


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_tpcb_and_select_only(proxy_factory, pg, mode):
    pgbench = require("pgbench")
    proxy = proxy_factory(pool_size=12)
    dsn = proxy.dsn(pg.superuser)
    init = subprocess.run([pgbench, "-i", "-s", "1", "-q", dsn], capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    for extra in ([], ["-S"]):
        run = subprocess.run([pgbench, "-M", mode, "-c", "8", "-j", "2", "-t", "150", *extra, dsn],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr + run.stdout
        assert "number of transactions actually processed: 1200/1200" in run.stdout
        m = re.search(r"number of failed transactions: (\d+)", run.stdout)
        assert m is None or m.group(1) == "0"


def test_psycopg_simple_prepared_pipeline(proxy, pg):
    with connect(proxy, pg) as conn:
        assert conn.execute("select 1 + 1").fetchone() == (2,)
        assert conn.execute("select %s::int * 2", (21,), prepare=True).fetchone() == (42,)
        for i in range(5):  # reuse the server-side prepared statement
            assert conn.execute("select %s::int * 2", (i,), prepare=True).fetchone() == (i * 2,)
        conn.execute("create temp table p(x int)")
        with conn.pipeline():
            for i in range(50):
                conn.execute("insert into p values (%s)", (i,))
            cur = conn.execute("select count(*), sum(x) from p")
        assert cur.fetchone() == (50, 1225)


def test_psycopg_copy_both_ways_and_large_result(proxy, pg):
    with connect(proxy, pg) as conn:
        conn.execute("create temp table big(id int, t text)")
        with conn.cursor().copy("copy big from stdin") as cp:
            for i in range(20000):
                cp.write_row((i, "x" * 50))
        rows = []
        with conn.cursor().copy("copy big to stdout") as cp:
            for row in cp.rows():
                rows.append(row)
        assert len(rows) == 20000
        cur = conn.execute("select g, repeat('y', 200) from generate_series(1, 100000) g")
        n = 0
        for _ in cur:
            n += 1
        assert n == 100000


def test_psycopg_errors_then_recovery(proxy, pg):
    with connect(proxy, pg, autocommit=False) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        conn.rollback()
        assert conn.execute("select 7").fetchone() == (7,)
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from no_such_table where x = %s", (1,))
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
        assert conn.execute("select 8").fetchone() == (8,)


def test_server_reused_with_reset_and_right_parameters(proxy_factory, pg):
    proxy = proxy_factory(pool_size=1)
    with psycopg.connect(proxy.dsn(pg.superuser, application_name="first"), autocommit=True) as c1:
        pid1 = c1.info.backend_pid  # session mode: the server's own process id
        server_pid = c1.execute("select pg_backend_pid()").fetchone()[0]
        assert pid1 == server_pid
        c1.execute("set work_mem = '7MB'")
        c1.execute("prepare p1 as select 1")
        assert c1.info.parameter_status("application_name") == "first"
    with psycopg.connect(proxy.dsn(pg.superuser, application_name="second",
                                   options="-c statement_timeout=4321"), autocommit=True) as c2:
        assert c2.execute("select pg_backend_pid()").fetchone()[0] == server_pid  # reused
        assert c2.info.backend_pid == server_pid
        assert c2.info.parameter_status("application_name") == "second"
        assert c2.execute("show application_name").fetchone() == ("second",)
        assert c2.execute("show work_mem").fetchone() != ("7MB",)  # DISCARD ALL ran
        assert c2.execute("show statement_timeout").fetchone() == ("4321ms",)
        assert c2.execute("select count(*) from pg_prepared_statements").fetchone() == (0,)
        for name in ("server_version", "client_encoding", "DateStyle", "TimeZone",
                     "standard_conforming_strings", "integer_datetimes"):
            assert c2.info.parameter_status(name), name
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c3:
        # no application_name asked for: the previous client's is not inherited
        assert c3.execute("show application_name").fetchone() != ("second",)


def test_query_wait_timeout_gives_postgres_style_error(proxy_factory, pg):
    proxy = proxy_factory(pool_size=1, query_wait_timeout=0.5)
    holder = psycopg.connect(proxy.dsn(pg.superuser), autocommit=True)
    try:
        assert "pgscope_query_wait_timeouts_total 0.0" in proxy.metrics()
        t0 = time.monotonic()
        e = login_error(proxy.dsn(pg.superuser))
        assert time.monotonic() - t0 < 5
        assert e.sqlstate == "08P01" and e.args[0] == "query_wait_timeout"
        assert "pgscope_query_wait_timeouts_total 1.0" in proxy.metrics()
    finally:
        holder.close()
    with psycopg.connect(proxy.dsn(pg.superuser)) as c:  # the pool frees up
        assert c.execute("select 1").fetchone() == (1,)


def test_broken_server_is_dropped_not_reused(proxy_factory, pg):
    proxy = proxy_factory(pool_size=2)
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        victim = c.execute("select pg_backend_pid()").fetchone()[0]
        with pg.connect() as admin:
            admin.execute("select pg_terminate_backend(%s)", (victim,))
        with pytest.raises(psycopg.OperationalError):
            c.execute("select 1")
    for _ in range(3):
        with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
            assert c.execute("select pg_backend_pid()").fetchone()[0] != victim


def _server_gone(pg, pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    with pg.connect() as admin:
        while time.monotonic() < deadline:
            if not admin.execute("select count(*) from pg_stat_activity where pid = %s", (pid,)).fetchone()[0]:
                return True
            time.sleep(0.1)
    return False


@pytest.mark.parametrize("reason", ["server_idle_timeout", "server_lifetime"])
def test_server_idle_timeout_and_lifetime_reap(proxy_factory, pg, reason):
    """Each setting alone closes a server: idle past server_idle_timeout, or older than server_lifetime
    (kept busy, so never idle that long; closed when it comes back to the pool)."""
    if reason == "server_idle_timeout":
        proxy = proxy_factory(pool_size=1, server_idle_timeout=1.0, server_lifetime=0)
        with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
            pid = c.execute("select pg_backend_pid()").fetchone()[0]
        assert _server_gone(pg, pid), "idle server was not reaped"
        return
    lifetime = 2.0
    proxy = proxy_factory(pool_size=1, server_idle_timeout=0, server_lifetime=lifetime)
    pids = []
    t0 = time.monotonic()  # the first server is made after this
    deadline = t0 + 30
    while len(set(pids)) < 2 and time.monotonic() < deadline:  # one client after another, back to back
        with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
            pids.append(c.execute("select pg_backend_pid()").fetchone()[0])
            replaced_by = time.monotonic()  # the last pid seen (the new server's) was made before this
            time.sleep(0.2)  # pacing: each client keeps the server a while, so it is never idle long
    assert len(set(pids)) == 2 and pids[1] == pids[0], pids  # reused at first, then replaced
    assert replaced_by - t0 > lifetime, "replaced before it was server_lifetime old"
    assert _server_gone(pg, pids[0]), "the old server was not closed"
    # and with neither setting, the server stays. The control, first: a second proxy with
    # server_idle_timeout = 2 s reaps its server, which went idle after the kept one; meanwhile the kept
    # one idled over 2 s, through two rounds of its own proxy's janitor (one a second)
    keep = proxy_factory(pool_size=1, server_idle_timeout=0, server_lifetime=0)
    control = proxy_factory(pool_size=1, server_idle_timeout=2.0, server_lifetime=0)
    with psycopg.connect(keep.dsn(pg.superuser), autocommit=True) as c:
        pid = c.execute("select pg_backend_pid()").fetchone()[0]
    with psycopg.connect(control.dsn(pg.superuser), autocommit=True) as c:
        control_pid = c.execute("select pg_backend_pid()").fetchone()[0]
    assert _server_gone(pg, control_pid, timeout=30.0), "the control's idle server was not reaped"
    with psycopg.connect(keep.dsn(pg.superuser), autocommit=True) as c:
        assert c.execute("select pg_backend_pid()").fetchone()[0] == pid


def test_max_client_conn(proxy_factory, pg):
    proxy = proxy_factory(max_client_conn=2, pool_size=5)
    a = psycopg.connect(proxy.dsn(pg.superuser))
    b = psycopg.connect(proxy.dsn(pg.superuser))
    try:
        assert login_error(proxy.dsn(pg.superuser)).sqlstate == "53300"
    finally:
        a.close()
        b.close()


def test_unknown_database_is_3D000(proxy, pg):
    e = login_error(proxy.dsn(pg.superuser, dbname="no_such_db"))
    assert e.sqlstate == "3D000"
    assert e.args[0] == 'database "no_such_db" does not exist'


def test_many_concurrent_clients_threads(proxy_factory, pg):
    proxy = proxy_factory(pool_size=30)
    errors = []

    def worker(i):
        try:
            with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
                for j in range(20):
                    assert c.execute("select %s::int + %s::int", (i, j)).fetchone() == (i + j,)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(25)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors
