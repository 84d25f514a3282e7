"""Findings (issue 16) through a real proxy against a real PostgreSQL: each kind made to fire, with its API
entry, metric and advice; the endpoint's parameters and token; a disabled kind; the quiet cases."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import psycopg
import pytest

from tests.test_nplusone_locks import wait_for


@pytest.fixture(scope="module")
def items(pg):
    with pg.connect() as c:
        c.execute("drop table if exists f_items, f_log, f_scratch")
        c.execute("create table f_items (id int primary key, name text not null, n int not null)")
        c.execute("insert into f_items select g, 'item ' || g, g % 100 from generate_series(1, 20000) g")
        c.execute("create table f_log (id serial primary key, item int)")
        c.execute("create table f_scratch (id int primary key, n int)")
        c.execute("insert into f_scratch select g, 0 from generate_series(1, 50) g")
        c.execute("analyze f_items")
        c.commit()
    yield
    with pg.connect() as c:
        c.execute("drop table if exists f_items, f_log, f_scratch")
        c.commit()


def findings(proxy, kind: str | None = None, **match) -> list[dict]:
    rows = proxy.api("/api/findings?limit=1000" + (f"&kind={kind}" if kind else ""))["findings"]
    return [f for f in rows if all(f.get(k) == v for k, v in match.items())]


def one(proxy, kind: str, timeout: float = 20.0, **match) -> dict:
    found = wait_for(lambda: findings(proxy, kind, **match), timeout=timeout)
    assert found, (kind, match, findings(proxy))
    assert len(found) == 1, found
    return found[0]


def fproxy(proxy_factory, **kw):
    over = {"pool_mode": "transaction", "inspect.flush_interval_ms": 50}
    over.update(kw)
    return proxy_factory(**over)


def test_statement_kinds_api_and_metric(proxy_factory, pg, items):
    proxy = fproxy(proxy_factory)
    with psycopg.connect(proxy.dsn(pg.superuser, application_name="shop"), autocommit=True) as c:
        c.execute("update f_scratch set n = n + 1")  # no WHERE: 50 rows
        assert len(c.execute("select id, name from f_items").fetchall()) == 20000  # once: not yet "repeatedly"
        c.execute("select id from f_items order by id limit 10 offset 5000").fetchall()  # literal OFFSET
        c.execute("select id from f_items order by id limit 10 offset %s", (7000,)).fetchall()  # Bind value
        c.execute("select id from f_items order by id limit 10 offset 20").fetchall()  # shallow: fine
    nw = one(proxy, "no_where")
    assert nw["query"].startswith("update f_scratch set n = n +") and nw["count"] == 1
    assert nw["detail"] == {"table": "f_scratch", "command": "UPDATE", "rows": 50, "rows_max": 50}
    assert nw["application_name"] == "shop" and nw["db"] == "pgscope_test" and nw["user"] == pg.superuser
    assert nw["impact_ms"] > 0 and nw["first_seen"] <= nw["last_seen"] and "WHERE" in nw["advice"]
    # the literal and the Bind value: one fingerprint, one finding; the offsets are values: not shown
    deep = wait_for(lambda: [f for f in findings(proxy, "deep_offset") if f["count"] == 2])
    assert deep and deep[0]["detail"] == {"offset": None, "offset_max": None, "threshold": 1000, "order_by": ["id"]}
    assert "OFFSET past 1000" in deep[0]["advice"] and "ORDER BY id LIMIT n" in deep[0]["advice"]
    assert "7000" not in json.dumps(findings(proxy)) and "5000" not in json.dumps(findings(proxy))
    # the offsets above were processed after the first big SELECT: once is not a finding
    assert findings(proxy, "unbounded_select") == []
    with psycopg.connect(proxy.dsn(pg.superuser, application_name="shop"), autocommit=True) as c:
        c.execute("select id, name from f_items").fetchall()
    ub = one(proxy, "unbounded_select")
    assert ub["count"] == 2 and ub["detail"]["rows_max"] == 20000 and ub["detail"]["threshold"] == 10000
    assert "LIMIT" in ub["advice"]
    # the endpoint: newest first, kind filter, limit, bad parameters
    everything = findings(proxy)
    assert [f["last_seen"] for f in everything] == sorted((f["last_seen"] for f in everything), reverse=True)
    assert len(proxy.api("/api/findings?limit=1")["findings"]) == 1
    status, body = proxy.http("/api/findings?kind=nonsense")
    assert status == 400 and b"kind must be one of" in body
    assert proxy.http("/api/findings?limit=0")[0] == 400
    text = proxy.metrics()
    assert 'pgscope_findings_total{db="pgscope_test",kind="no_where"} 1.0' in text
    assert 'pgscope_findings_total{db="pgscope_test",kind="deep_offset"} 2.0' in text
    assert 'pgscope_findings_total{db="pgscope_test",kind="unbounded_select"} 2.0' in text
    family = [line for line in text.splitlines() if line.startswith("pgscope_findings_total")]
    assert family and not any("fingerprint" in line for line in family)


def test_offsets_are_shown_with_log_parameters(proxy_factory, pg, items):
    proxy = fproxy(proxy_factory, **{"inspect.log_parameters": True})
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        c.execute("select id from f_items order by id limit 10 offset %s", (7000,)).fetchall()
        c.execute("select id from f_items order by id limit 10 offset 5000").fetchall()
    deep = wait_for(lambda: [f for f in findings(proxy, "deep_offset") if f["count"] == 2])
    assert deep and deep[0]["detail"]["offset"] == 5000 and deep[0]["detail"]["offset_max"] == 7000
    assert "OFFSET past 7000" in deep[0]["advice"]


def test_a_disabled_kind_is_never_raised_and_the_token_guards_the_endpoint(proxy_factory, pg, items):
    proxy = fproxy(proxy_factory, **{"inspect.findings_disabled": ["no_where"], "http_token": "findings-token"})
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        c.execute("delete from f_log")
        c.execute("select id from f_items order by id limit 10 offset 3000").fetchall()  # the positive control
    assert proxy.http("/api/findings")[0] == 401

    def api(path):
        req = urllib.request.Request(f"http://127.0.0.1:{proxy.metrics_port}{path}",
                                     headers={"Authorization": "Bearer findings-token"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())["findings"]
    assert wait_for(lambda: api("/api/findings?kind=deep_offset"))
    assert [f["kind"] for f in api("/api/findings")] == ["deep_offset"]


def test_loop_fires_and_request_lookups_stay_quiet(proxy_factory, pg, items):
    # local lookups take well under 0.3 ms; a low threshold, so that the quiet clients below would reach it
    proxy = fproxy(proxy_factory, **{"inspect.loop_min_total_ms": 1.0, "inspect.loop_threshold": 10})
    # many clients each running one lookup per request, and one client serving requests with pauses
    for i in range(25):
        with psycopg.connect(proxy.dsn(pg.superuser, application_name="web"), autocommit=True) as c:
            c.execute("select name from f_items where id = %s", (i + 1,)).fetchone()
    with psycopg.connect(proxy.dsn(pg.superuser, application_name="web"), autocommit=True) as c:
        for i in range(12):
            c.execute("select name from f_items where id = %s", (i + 1,)).fetchone()
            c.execute("insert into f_log (item) values (%s)", (i,))
            time.sleep(0.15)  # the next request comes later than inspect.loop_gap_ms
    # the loop: ids from elsewhere, looked up one by one, a write between each
    with psycopg.connect(proxy.dsn(pg.superuser, application_name="sync"), autocommit=True) as c:
        for i in range(150):
            c.execute("select name from f_items where id = %s", (i + 1,)).fetchone()
            c.execute("insert into f_log (item) values (%s)", (i,))
    loop = one(proxy, "loop", application_name="sync")
    wait_for(lambda: findings(proxy, "loop", application_name="sync")[0]["detail"]["count"] == 150)
    loop = findings(proxy, "loop", application_name="sync")[0]
    assert loop["query"] == "select name from f_items where id = $1" and loop["count"] == 1
    assert loop["detail"]["count"] == 150 and loop["detail"]["total_ms"] > 0
    assert loop["detail"]["between"] == "insert into f_log (item) values ($1)"
    assert "ANY" in loop["advice"]
    assert [f for f in findings(proxy, "loop") if f["application_name"] != "sync"] == []


def test_lock_wait_names_the_blocker_on_the_slow_sample_and_the_statement(proxy_factory, pg, items):
    proxy = fproxy(proxy_factory, **{"inspect.slow_query_ms": 300.0, "inspect.lock_sample_interval_ms": 100.0})
    holder = psycopg.connect(proxy.dsn(pg.superuser, application_name="holder"))
    try:
        holder.execute("update f_items set n = n where id = 1")  # a row lock, transaction left open
        waiter_done = threading.Event()

        def wait():
            with psycopg.connect(proxy.dsn(pg.superuser, application_name="waiter"), autocommit=True) as c:
                c.execute("update f_items set name = name where id = 1")
            waiter_done.set()
        t = threading.Thread(target=wait)
        t.start()
        pg.wait_blocked("update f_items set name = name where id = 1", 1.2)  # the holder's think time
        assert not waiter_done.is_set()
        holder.commit()
        t.join(10)
    finally:
        holder.close()
    lw = one(proxy, "lock_wait", application_name="waiter")
    d = lw["detail"]
    assert lw["query"] == "update f_items set name = name where id = $1"
    assert 900 <= d["wait_ms"] <= d["duration_ms"] and d["seen_ms"] > 0
    b = d["blocker"]
    assert b["application_name"] == "holder" and b["client_addr"].startswith("127.0.0.1:")
    assert b["query"] == "update f_items set n = n where id = $1"  # normalized: no values
    assert b["xact_open_ms"] >= 900 and "holder" in lw["advice"]  # open since before the wait began
    st = wait_for(lambda: [s for s in proxy.api("/api/statements?limit=100")["statements"]
                           if s["fingerprint"] == lw["fingerprint"] and s["lock_wait_ms"] > 0])
    assert st and st[0]["lock_wait_ms"] >= 900
    sample = wait_for(lambda: [e for e in proxy.api("/api/explains")["explains"]
                               if e["fingerprint"] == lw["fingerprint"]])
    assert sample and sample[0]["lock_wait"]["blocker"]["application_name"] == "holder"


@pytest.mark.parametrize("ddl, operation", [("create index f_items_n_idx on f_items (n)", "CREATE INDEX"),
                                            ("lock table f_items", "LOCK TABLE"),
                                            ("alter table f_items alter column name set not null", "SET NOT NULL"),
                                            ("alter table f_items add column f_extra float default random()",
                                             "ADD COLUMN DEFAULT volatile")])
def test_blocking_ddl_counts_whom_it_blocked(proxy_factory, pg, items, ddl, operation):
    proxy = fproxy(proxy_factory, **{"inspect.lock_sample_interval_ms": 100.0})
    mig = psycopg.connect(proxy.dsn(pg.superuser, application_name="migration"))
    try:
        mig.execute(ddl)
        done = threading.Event()

        def write():
            with psycopg.connect(proxy.dsn(pg.superuser, application_name="writer"), autocommit=True) as c:
                c.execute("update f_items set n = n where id = 2")
            done.set()
        t = threading.Thread(target=write)
        t.start()
        pg.wait_blocked("update f_items set n = n where id = 2", 0.8)
        assert not done.is_set()
        mig.commit()
        t.join(10)
    finally:
        mig.close()
        with pg.connect() as c:
            c.execute("drop index if exists f_items_n_idx")
            c.execute("alter table f_items drop column if exists f_extra")
            c.commit()
    f = one(proxy, "blocking_ddl", application_name="migration")
    d = f["detail"]
    assert d["operation"] == operation and d["table"] == "f_items" and d["in_transaction"] is True
    assert d["blocked_clients"] == 1 and d["blocked_ms"] > 300 and d["held_ms"] >= 800
    assert {"CREATE INDEX": "CONCURRENTLY", "LOCK TABLE": "FOR UPDATE", "SET NOT NULL": "NOT VALID",
            "ADD COLUMN DEFAULT volatile": "backfill"}[operation] in f["advice"]
    assert "lock_timeout" in f["advice"]


@pytest.fixture(scope="module")
def people(pg):
    with pg.connect() as c:
        c.execute("drop table if exists f_people")
        c.execute("create table f_people (id int primary key, email text not null)")
        c.execute("insert into f_people select g, 'p' || g || '@example.com' from generate_series(1, 60000) g")
        c.execute("create index f_people_email on f_people (email text_pattern_ops)")
        c.execute("analyze f_people")
        c.commit()
    yield
    with pg.connect() as c:
        c.execute("drop table if exists f_people")
        c.execute("drop extension if exists pg_trgm")
        c.commit()


def test_leading_wildcard_on_a_seq_scan_gets_trigram_advice(proxy_factory, pg, people):
    sampled = {"inspect.slow_query_ms": 0.0, "inspect.explain_cooldown_s": 0.0, "inspect.explain_max_per_minute": 1000}
    proxy = fproxy(proxy_factory, **sampled)
    with psycopg.connect(proxy.dsn(pg.superuser, application_name="search"), autocommit=True) as c:
        c.execute("select count(*) from f_people where email like 'p12%'").fetchone()  # anchored: an index serves it
        c.execute("select count(*) from f_people where email like '%7@example.com'").fetchone()
        c.execute("select id from f_people where email ilike %s", ("%99@EXAMPLE.com",)).fetchall()
    lit = one(proxy, "leading_wildcard", query="select count(*) from f_people where email like $1")
    par = one(proxy, "leading_wildcard", query="select id from f_people where email ilike $1")
    assert lit["detail"] == {"table": "f_people", "column": "email", "operator": "LIKE", "pattern_from": "literal",
                             "scan_rows": lit["detail"]["scan_rows"], "pg_trgm": "available"}
    assert par["detail"]["operator"] == "ILIKE" and par["detail"]["pattern_from"] == "parameter"
    assert "CREATE EXTENSION pg_trgm; CREATE INDEX CONCURRENTLY ON f_people USING gin (email gin_trgm_ops)" \
        in lit["advice"]
    assert "7@example" not in json.dumps(lit) and "99@" not in json.dumps(par)  # the patterns are not shown
    # the anchored pattern was sampled first (one fingerprint with the literal one: its text was judged alone)
    assert len(findings(proxy, "leading_wildcard")) == 2
    with pg.connect() as c:
        c.execute("create extension if not exists pg_trgm")
        c.commit()
    proxy2 = fproxy(proxy_factory, **sampled)
    with psycopg.connect(proxy2.dsn(pg.superuser), autocommit=True) as c:
        c.execute("select count(*) from f_people where email like '%7@example.com'").fetchone()
    f = one(proxy2, "leading_wildcard")
    assert f["detail"]["pg_trgm"] == "installed" and "CREATE EXTENSION" not in f["advice"]


def test_plan_change_with_both_plans(proxy_factory, pg):
    with pg.connect() as c:
        c.execute("drop table if exists f_pc")
        c.execute("create table f_pc (id int, c int)")
        c.execute("insert into f_pc select g, g % 5000 from generate_series(1, 200000) g")
        c.execute("create index f_pc_c on f_pc (c)")
        c.execute("analyze f_pc")
        c.commit()
    try:
        proxy = fproxy(proxy_factory, **{"inspect.slow_query_ms": 0.0, "inspect.explain_cooldown_s": 0.0,
                                         "inspect.explain_max_per_minute": 1000, "inspect.plan_change_min_calls": 5})
        q = "select count(*) from f_pc where c = %s"
        with psycopg.connect(proxy.dsn(pg.superuser, application_name="pc"), autocommit=True) as c:
            for i in range(8):
                c.execute(q, (i,)).fetchone()
            fp = wait_for(lambda: [e for e in proxy.api("/api/explains")["explains"] if "f_pc" in e["query"]])
            assert fp
            with pg.connect() as admin:
                admin.execute("drop index f_pc_c")
                admin.commit()
            c.execute(q, (1,)).fetchone()
            assert wait_for(lambda: [e for e in proxy.api("/api/explains")["explains"] if "f_pc" in e["query"]
                                     and e["plan"][0]["Plan"]["Plans"][0]["Node Type"] != "Bitmap Heap Scan"
                                     and "Seq Scan" in json.dumps(e["plan"])], timeout=20)
            for i in range(6):
                c.execute(q, (i,)).fetchone()
        f = one(proxy, "plan_change")
        d = f["detail"]
        assert f["query"] == "select count(*) from f_pc where c = $1" and f["application_name"] == "pc"
        assert "Seq Scan" not in json.dumps(d["plan_before"]) and "Seq Scan" in json.dumps(d["plan_after"])
        assert d["mean_ms_after"] > 1.5 * d["mean_ms_before"] and d["calls_after"] >= 5 and f["impact_ms"] > 0
    finally:
        with pg.connect() as c:
            c.execute("drop table if exists f_pc")
            c.commit()


def test_unused_and_duplicate_indexes_never_constraints(proxy_factory, pg):
    with pg.connect() as c:
        c.execute("drop table if exists f_ix, f_small")
        c.execute("create table f_ix (id int primary key, a int, b int unique, c int)")
        c.execute("insert into f_ix select g, g % 1000, g, g % 77 from generate_series(1, 60000) g")
        c.execute("create index f_ix_a on f_ix (a)")
        c.execute("create index f_ix_ab on f_ix (a, b)")
        c.execute("create index f_ix_b on f_ix (b)")  # the same as the unique constraint's index
        c.execute("create index f_ix_c on f_ix (c)")
        c.execute("create table f_small (x int)")
        c.execute("create index f_small_x on f_small (x)")  # unused, but under the size threshold
        c.commit()
    try:
        proxy = fproxy(proxy_factory, **{"inspect.index_sample_interval_s": 1.0,
                                         "inspect.unused_index_min_bytes": 400000})
        with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
            c.execute("select 1").fetchone()  # the database shows up
        got = wait_for(lambda: {f["detail"]["index"] for f in findings(proxy, "unused_index")} >= {"f_ix_c"}
                       and {f["detail"]["index"] for f in findings(proxy, "duplicate_index")} >= {"f_ix_a", "f_ix_b"})
        assert got, findings(proxy)
        unused = [f for f in findings(proxy, "unused_index") if f["detail"]["index"] == "f_ix_c"][0]
        d = unused["detail"]
        assert d["table"] == "f_ix" and d["size_bytes"] >= 400000 and d["idx_scan"] == 0 and "stats_reset" in d
        assert unused["advice"].startswith("No scan used public.f_ix_c since the statistics were")
        assert "DROP INDEX CONCURRENTLY public.f_ix_c; frees" in unused["advice"]
        assert unused["fingerprint"] is None and unused["db"] == "pgscope_test"
        dups = {f["detail"]["index"]: f for f in findings(proxy, "duplicate_index")}
        assert dups["f_ix_a"]["detail"]["covered_by"] == "f_ix_ab"
        assert dups["f_ix_b"]["detail"]["covered_by"] == "f_ix_b_key"
        assert "DROP INDEX CONCURRENTLY public.f_ix_a" in dups["f_ix_a"]["advice"]
        named = {f["detail"]["index"] for f in findings(proxy) if f["kind"] in ("unused_index", "duplicate_index")}
        assert not named & {"f_ix_pkey", "f_ix_b_key", "f_small_x"}, named  # constraints, and too small
        assert 'pgscope_findings_total{db="pgscope_test",kind="duplicate_index"}' in proxy.metrics()
    finally:
        with pg.connect() as c:
            c.execute("drop table if exists f_ix, f_small")
            c.commit()


@pytest.fixture(scope="module")
def bench_db(pg):
    """A database of its own for pgbench (initialized directly, not through the proxy), with a control table
    whose index is never used."""
    import subprocess

    from tests.support.tools import require

    pgbench = require("pgbench")
    with psycopg.connect(pg.dsn(dbname="postgres"), autocommit=True) as c:
        c.execute("drop database if exists findings_bench with (force)")
        c.execute("create database findings_bench")
    init = subprocess.run([pgbench, "-i", "-s", "1", "-q", pg.dsn(dbname="findings_bench")],
                          capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    with psycopg.connect(pg.dsn(dbname="findings_bench"), autocommit=True) as c:
        c.execute("create table f_control (id int primary key, n int)")
        c.execute("insert into f_control select g, g from generate_series(1, 100) g")
        c.execute("create index f_control_n on f_control (n)")
    yield pgbench
    with psycopg.connect(pg.dsn(dbname="postgres"), autocommit=True) as c:
        c.execute("drop database if exists findings_bench with (force)")


def _pgbench(pgbench: str, dsn: str, *args: str) -> None:
    import subprocess

    out = subprocess.run([pgbench, "-n", "-c", "4", "-j", "2", *args, dsn], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-2000:]


def _after_control(proxy, pg, since: float) -> list[dict]:
    """The positive control for the absences: a no_where from app "control" (the stream's statements before
    it have all been judged once it shows) and an index sample after ``since`` (it found the control's
    unused index).  Returns the findings other than the control's."""
    with psycopg.connect(proxy.dsn(pg.superuser, dbname="findings_bench", application_name="control"),
                         autocommit=True) as c:
        c.execute("update f_control set n = n")
    one(proxy, "no_where", application_name="control")
    assert wait_for(lambda: [f for f in findings(proxy, "unused_index") if f["detail"]["index"] == "f_control_n"
                             and f["last_seen"] > since], timeout=20)
    return [f for f in findings(proxy) if f["application_name"] != "control"
            and not (f["kind"] == "unused_index" and f["detail"]["index"] == "f_control_n")]


@pytest.mark.parametrize("mode", ["simple", "prepared"])
def test_pgbench_tpcb_raises_nothing_but_lock_waits_and_select_only_nothing_but_loops(proxy_factory, pg, bench_db,
                                                                                      mode):
    proxy = fproxy(proxy_factory, **{"inspect.index_sample_interval_s": 1.0, "inspect.unused_index_min_bytes": 0,
                                     "inspect.slow_query_ms": 50.0, "inspect.lock_sample_interval_ms": 200.0})
    dsn = proxy.dsn(pg.superuser, dbname="findings_bench")
    _pgbench(bench_db, dsn, "-M", mode, "-t", "150")  # TPC-B
    rest = _after_control(proxy, pg, time.time())
    assert {f["kind"] for f in rest} <= {"lock_wait"}, rest
    _pgbench(bench_db, dsn, "-M", mode, "-S", "-t", "1000")  # select-only: each client one lookup, 1000 times
    rest = _after_control(proxy, pg, time.time())
    assert {f["kind"] for f in rest} <= {"lock_wait", "loop"}, rest
    loops = [f for f in rest if f["kind"] == "loop"]
    assert loops and all("pgbench_accounts" in f["query"] and f["detail"]["count"] >= 100 for f in loops), loops
