"""Statement inspection end to end: real clients, a real server, exact counts, metrics and API."""

from __future__ import annotations

import asyncio
import json
import re
import time
import subprocess

import asyncpg
import psycopg
import pytest
from pglast import parser as pg_parser

from tests.support.tools import require

Q = "select id, id * 2 from generate_series(1, 3) as g(id) where id <= %s"
Q_ASYNCPG = "select id, id * 2 from generate_series(1, 3) as g(id) where id <= $1"


def stmt(proxy, fingerprint, **match):
    rows = [s for s in proxy.api("/api/statements?limit=10000")["statements"]
            if s["fingerprint"] == fingerprint and all(s[k] == v for k, v in match.items())]
    assert len(rows) <= 1
    return rows[0] if rows else None


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_137_executions_are_one_fingerprint(proxy_factory, pg, mode):
    proxy = proxy_factory(pool_mode=mode, pool_size=4)
    fp = pg_parser.fingerprint(Q_ASYNCPG)
    n = 0
    t0 = time.monotonic()
    # psycopg: client-side binding (simple protocol, literals differ) ...
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True, prepare_threshold=None) as c:
        for i in range(40):
            c.execute(Q.replace("%s", str(1 + i % 3)))
            n += 1
    # ... server-side parameters, unprepared (unnamed statement) ...
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True, prepare_threshold=None) as c:
        for i in range(30):
            c.execute(Q, (1 + i % 3,))
            n += 1
    # ... prepared (named statement) ...
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True, prepare_threshold=0) as c:
        for i in range(37):
            c.execute(Q, (1 + i % 3,), prepare=True)
            n += 1

    # ... and asyncpg, which always prepares
    async def main():
        conn = await asyncpg.connect(proxy.dsn(pg.superuser))
        try:
            for i in range(30):
                await conn.fetch(Q_ASYNCPG, 1 + i % 3)
        finally:
            await conn.close()

    asyncio.run(main())
    n += 30
    assert n == 137
    proxy.flush_inspection()
    s = stmt(proxy, fp, db="pgscope_test", user=pg.superuser)
    assert s is not None
    assert s["calls"] == 137
    # rows: id <= k for k cycling 1,2,3 → 1, 2 or 3 rows per call
    expected_rows = sum(1 + i % 3 for i in range(40)) + sum(1 + i % 3 for i in range(30)) \
        + sum(1 + i % 3 for i in range(37)) + sum(1 + i % 3 for i in range(30))
    assert s["rows"] == expected_rows
    assert s["errors"] == 0
    # the text is the first call's (simple protocol), every literal normalized away
    assert s["query"] == pg_parser.normalize(Q.replace("%s", "1")) == \
        "select id, id * $1 from generate_series($2, $3) as g(id) where id <= $4"
    assert 0 < s["min_ms"] <= s["mean_ms"] <= s["max_ms"]
    # the total is the proxy's own measure: between 137 of the fastest call and the clients' wall time
    client_ms = (time.monotonic() - t0) * 1000.0
    assert 137 * s["min_ms"] * 0.999 <= s["total_ms"] <= client_ms, (s, client_ms)
    assert s["max_ms"] <= s["total_ms"]
    assert s["first_seen"] <= s["last_seen"]
    text = proxy.metrics()
    assert re.search(rf'pgscope_statement_calls_total{{db="pgscope_test",fingerprint="{fp}",user="{pg.superuser}"}} 137.0',
                     text), text[:3000]


def test_multi_statement_query_and_errors(proxy, pg):
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        c.execute("create temp table m(x int); insert into m select generate_series(1, 5); select * from m")
        with pytest.raises(psycopg.errors.DivisionByZero):
            c.execute("select 1/0")
        with pytest.raises(psycopg.errors.SyntaxError):
            c.execute("selec broken")
    proxy.flush_inspection()
    rows = {s["query"]: s for s in proxy.api("/api/statements?limit=1000")["statements"]}
    insert = next(s for q, s in rows.items() if q.startswith("insert into m"))
    assert insert["rows"] == 5 and insert["calls"] == 1
    assert any(q.startswith("create temp table m") for q in rows)
    assert next(s for q, s in rows.items() if q.startswith("select * from m"))["rows"] == 5
    div = next(s for q, s in rows.items() if q.startswith("select $1/$2"))
    assert div["errors"] == 1
    broken = next(s for q, s in rows.items() if "selec broken" in q)
    assert broken["errors"] == 1 and len(broken["fingerprint"]) == 16


def test_eviction_and_other_fold(proxy_factory, pg):
    proxy = proxy_factory(**{"inspect.max_fingerprints": 5, "inspect.export_top_k": 2})
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        for i in range(30):
            c.execute(f"select 1 from pg_class as a{i} where false")  # 30 distinct fingerprints
        for _ in range(5):
            c.execute("select pg_sleep(0.01)")
    proxy.flush_inspection()
    body = proxy.api("/api/statements?limit=100")["statements"]
    assert len(body) <= 5
    text = proxy.metrics()
    evictions = float(re.search(r"^pgscope_inspect_evictions_total (\S+)$", text, re.M).group(1))
    assert evictions >= 25
    own = re.findall(r'^pgscope_statement_calls_total{db="pgscope_test",fingerprint="([0-9a-f]{16})"', text, re.M)
    assert 1 <= len(own) <= 2
    other = float(re.search(r'^pgscope_statement_calls_total{db="pgscope_test",fingerprint="_other",user="[^"]+"} (\S+)$',
                            text, re.M).group(1))
    total = sum(float(v) for v in re.findall(r'^pgscope_statement_calls_total{db="pgscope_test"[^}]*} (\S+)$', text, re.M))
    assert total == 35 and other >= 28
    # counters never go down across scrapes, whatever is promoted or folded
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        for i in range(10):
            c.execute(f"select 1 from pg_class as c{i} where false")
    proxy.flush_inspection()
    other2 = float(re.search(r'^pgscope_statement_calls_total{db="pgscope_test",fingerprint="_other",user="[^"]+"} (\S+)$',
                             proxy.metrics(), re.M).group(1))
    assert other2 >= other


@pytest.mark.promtool
def test_promtool_checks_a_real_scrape(proxy_factory, pg):
    promtool = require("promtool")
    proxy = proxy_factory(pool_mode="transaction")
    with psycopg.connect(proxy.dsn(pg.superuser, application_name="prom"), autocommit=True) as c:
        c.execute("select 1")
        c.execute("select 'a \"quoted\" \\\\ value\nwith newline' as x")
        with pytest.raises(psycopg.Error):
            c.execute("select * from no_such_table")
    proxy.flush_inspection()
    text = proxy.metrics()
    for name in ("pgscope_statement_calls_total", "pgscope_statement_duration_seconds_total",
                 "pgscope_statement_rows_total", "pgscope_statement_errors_total", "pgscope_slow_statements_total",
                 "pgscope_statement_info", "pgscope_query_duration_seconds_bucket", "pgscope_client_connections",
                 "pgscope_server_connections", "pgscope_pool_waiting_clients", "pgscope_pool_wait_seconds_bucket",
                 "pgscope_inspect_dropped_total", "process_cpu_seconds_total"):
        assert f"\n{name}" in text, name
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr
    assert 'command="SELECT"' in text


def test_api_orders_limits_and_errors(proxy, pg):
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        for _ in range(5):
            c.execute("select 1 as many")
        c.execute("select pg_sleep(0.05) as slow_one")
    proxy.flush_inspection()
    by_calls = proxy.api("/api/statements?order=calls&limit=1")["statements"]
    assert len(by_calls) == 1 and by_calls[0]["calls"] >= 5
    by_time = proxy.api("/api/statements?order=total_time&limit=1")["statements"][0]
    assert "pg_sleep" in by_time["query"]
    by_mean = proxy.api("/api/statements?order=mean_time")["statements"]
    assert by_mean == sorted(by_mean, key=lambda s: s["mean_ms"], reverse=True)
    fields = {"fingerprint", "query", "db", "user", "calls", "total_ms", "mean_ms", "min_ms", "max_ms",
              "stddev_ms", "rows", "errors", "errors_by_class", "slow", "first_seen", "last_seen", "lock_wait_ms"}
    assert set(by_time) == fields
    for bad in ("/api/statements?order=bogus", "/api/statements?limit=0", "/api/statements?limit=x"):
        status, body = proxy.http(bad)
        assert status == 400 and "error" in json.loads(body)
    assert proxy.http("/nope")[0] == 404


def test_slow_statement_log_without_parameters(proxy_factory, pg, capfd):
    proxy = proxy_factory(log_level="info", **{"inspect.slow_query_ms": 50})
    with psycopg.connect(proxy.dsn(pg.superuser, application_name="slowapp"), autocommit=True) as c:
        c.execute("select pg_sleep(0.1), %s::text as secret_value", ("hunter2-secret",))
    proxy.flush_inspection()
    err = capfd.readouterr().err
    events = [json.loads(x) for x in err.splitlines() if x.startswith("{") and "slow_statement" in x]
    assert len(events) == 1
    ev = events[0]
    assert ev["application_name"] == "slowapp" and ev["ms"] >= 100 and len(ev["fingerprint"]) == 16
    assert "hunter2-secret" not in err
    s = stmt(proxy, ev["fingerprint"], user=pg.superuser)
    assert s["slow"] == 1


def test_full_queue_drops_and_counts(proxy_factory, pg):
    proxy = proxy_factory(**{"inspect.queue_size": 5, "inspect.flush_interval_ms": 60000})
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        for i in range(50):
            c.execute("select 1")
    text = proxy.metrics()
    dropped = float(re.search(r"^pgscope_inspect_dropped_total (\S+)$", text, re.M).group(1))
    assert dropped >= 45 - 5


def test_inspection_off(proxy_factory, pg):
    proxy = proxy_factory(**{"inspect.enabled": False})
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        c.execute("select 1")
    assert proxy.api("/api/statements") == {"statements": []}
    assert "pgscope_client_connections" in proxy.metrics()
