"""Findings as pure parts (issue 16): the parse-tree facts, the book, the stream detectors and the loop rule
on synthetic records, no server (tests/test_findings.py runs each kind through a real proxy)."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest

from proxy.inspect.findings import KINDS, FindingsBook
from proxy.inspect.findings_facts import like_patterns, literal_offset, statement_risk
from proxy.inspect.findings_plans import plan_shape
from proxy.inspect.findings_stream import StatementFindings, bind_int
from proxy.inspect.inspector import Inspector
from proxy.inspect.nplusone import NPlusOneDetector
from proxy.inspect.pipeline import EventSink
from proxy.protocol.records import ClientInfo, StatementEvent

C = ClientInfo(1, "db", "u", "app", "127.0.0.1:1")


def settings(**kw):
    base = dict(enabled=True, queue_size=100, flush_interval_ms=10, slow_query_ms=500.0, max_fingerprints=5000,
                export_top_k=100, query_label_max=200, log_parameters=False, slow_log_rate=1000.0,
                fingerprint_cache_size=1000, nplusone_threshold=5, nplusone_window_ms=1000.0,
                nplusone_min_total_ms=50.0, nplusone_max_interleave=2, nplusone_allow_fingerprints="",
                nplusone_allow_apps="", nplusone_keep=100, findings_disabled=(), findings_keep=200,
                loop_threshold=20, loop_gap_ms=100.0, loop_min_total_ms=1.0, unbounded_rows=100,
                unbounded_min_count=2, deep_offset=1000, blocking_ddl_ms=1000.0, plan_change_min_rise=0.5,
                plan_change_min_calls=5)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("sql, expect", [
    ("update t set a = 1", {"no_where": True, "table": "t"}),
    ("delete from s.t", {"no_where": True, "table": "s.t"}),
    ("with x as (select 1) delete from t", {"no_where": True}),
    ("update t set a = 1 where id = 2", None),
    ("delete from t where current of c", None),  # WHERE CURRENT OF: one row
    ("select * from t", {"unbounded": True}),
    ("select * from t limit 5", None),
    ("select * from t fetch first 3 rows only", None),
    ("select * from t for update", None),
    ("select * from t order by a, b limit 10 offset 5000", {"offset": -1, "order": ("a", "b"), "unbounded": False}),
    ("select * from t offset $2", {"offset": 2, "unbounded": True}),
    ("create index on t (a)", {"ddl": "CREATE INDEX", "lock": "SHARE", "table": "t"}),
    ("create unique index on t (a)", {"ddl": "CREATE UNIQUE INDEX"}),
    ("create index concurrently on t (a)", None),
    ("alter table t add column x int default random()", {"ddl": "ADD COLUMN DEFAULT volatile", "lock": "ACCESS EXCLUSIVE"}),
    ("alter table t add column x uuid default gen_random_uuid()", {"ddl": "ADD COLUMN DEFAULT volatile"}),
    ("alter table t add column x timestamptz default now()", None),  # stable: no rewrite since PostgreSQL 11
    ("alter table t add column x int default 0", None),
    ("alter table t add column x int generated always as (a * 2) stored", {"ddl": "ADD COLUMN GENERATED STORED"}),
    ("alter table t alter column a set not null", {"ddl": "SET NOT NULL"}),
    ("alter table t alter column a type bigint", {"ddl": "ALTER COLUMN TYPE"}),
    ("alter table t add constraint c check (a > 0) not valid", None),
    ("vacuum full t", {"ddl": "VACUUM FULL", "table": "t"}),
    ("vacuum t", None),
    ("cluster t using t_pkey", {"ddl": "CLUSTER"}),
    ("lock table t", {"ddl": "LOCK TABLE", "lock": "ACCESS EXCLUSIVE"}),
    ("lock table t in share mode", {"ddl": "LOCK TABLE", "lock": "SHARE"}),
    ("lock table t in row exclusive mode", None),
    ("insert into t values (1)", None),
    ("not sql at all", None),
])
def test_statement_risk(sql, expect):
    risk = statement_risk(sql, sql.split()[0].upper())
    if expect is None:
        assert risk is None
    else:
        assert risk is not None and {k: getattr(risk, k) for k in expect} == expect


def test_like_patterns_and_offsets():
    uses = like_patterns("select a from t x join u on u.id = x.id where x.name ilike $1 and u.b like '%q' "
                         "and u.c not like '%z'")
    assert {(u.table, u.column, u.op, u.pattern, u.param) for u in uses} == {
        ("t", "name", "ILIKE", None, 1), ("u", "b", "LIKE", "%q", 0)}
    assert like_patterns("insert into t values ('%x')") == ()
    assert literal_offset("select 1 from t limit 5 OFFSET 2000") == 2000 and literal_offset("select 1") == 0
    text = b"".join((b"\0", b"\0", struct.pack("!hh", 1, 1), struct.pack("!h", 1), struct.pack("!i", 8),
                     struct.pack("!q", 7000)))
    assert bind_int(text, 1) == 7000 and bind_int(text, 2) == 0 and bind_int(None, 1) == 0


def test_the_book_is_bounded_newest_first_and_honours_disabled_kinds():
    book = FindingsBook(settings(findings_keep=3, findings_disabled=("no_where",)))
    for i in range(5):
        book.add("deep_offset", fingerprint=f"f{i}", query="q", db="db", user="u", application_name="a",
                 impact_ms=1.0, detail={}, advice="x", now=100.0 + i)
    assert book.add("no_where", fingerprint="n", query="q", db="db", user="u", application_name="a", impact_ms=1.0,
                    detail={}, advice="x") is None
    book.add("deep_offset", fingerprint="f2", query="q", db="db", user="u", application_name="a", impact_ms=2.0,
             detail={"offset": 9}, advice="y", now=200.0)
    rows = book.rows(10)
    assert [r["fingerprint"] for r in rows] == ["f2", "f4", "f3"]  # f0 and f1 dropped, f2 seen again last
    assert rows[0]["count"] == 2 and rows[0]["impact_ms"] == 3.0 and rows[0]["detail"] == {"offset": 9}
    assert book.rows(1, kind="deep_offset") == rows[:1] and book.rows(10, kind="loop") == []
    assert book.totals == {("deep_offset", "db"): 6}
    [family] = book.metric_rows()
    assert family.name == "pgscope_findings" and family.labels == ("kind", "db")
    assert set(KINDS) == {"loop", "lock_wait", "no_where", "unbounded_select", "deep_offset", "leading_wildcard",
                          "blocking_ddl", "unused_index", "duplicate_index", "plan_change"}


def _ev(sql, start, rows=1, dur=0.001, client=C, in_tx=False, bind=None):
    return StatementEvent(client, sql, 0, bind is not None, "", bind, 7, start, start + dur, 0.0, "SELECT", rows,
                          None, in_tx)


def _pipeline(s):
    insp = Inspector(s, EventSink())
    book = FindingsBook(s)
    nplus = NPlusOneDetector(s, findings=book)
    insp.add_consumer(nplus)
    insp.add_consumer(StatementFindings(s, book))
    return insp, book


@pytest.mark.parametrize("columnar", [True, False])
def test_statement_kinds_on_a_synthetic_stream(columnar):
    s = settings()
    insp, book = _pipeline(s)
    evs = [_ev("update t set n = 1", 1.0, rows=40), _ev("select * from big", 2.0, rows=500),
           _ev("select * from small", 3.0, rows=50), _ev("select * from big", 4.0, rows=800),
           _ev("select * from t order by id limit 10 offset 20", 5.0),
           _ev("select * from t order by id limit 10 offset 2000", 6.0)]
    (insp.process if columnar else insp.process_each)(evs, 10.0)
    kinds = {r["kind"]: r for r in book.rows(100)}
    assert set(kinds) == {"no_where", "unbounded_select", "deep_offset"}
    assert kinds["no_where"]["detail"]["rows"] == 40
    assert kinds["unbounded_select"]["count"] == 2 and kinds["unbounded_select"]["detail"]["rows_max"] == 800
    assert kinds["deep_offset"]["count"] == 1 and kinds["deep_offset"]["detail"]["offset"] is None  # a value


def _loop_stream(n, gap=0.001, rows=1, parent_rows=None, between=None, client=C, t=0.0):
    out = []
    if parent_rows is not None:
        out.append(_ev("select id from list", t, rows=parent_rows))
        t += 0.002
    for i in range(n):
        out.append(_ev(f"select name from items where id = {i}", t, rows=rows, client=client))
        t += 0.001 + gap
        if between:
            out.append(_ev(between, t))
            t += 0.002
    return out


@pytest.mark.parametrize("columnar", [True, False])
def test_loop_rule(columnar):
    def loops(evs, **kw):
        insp, book = _pipeline(settings(**kw))
        for i in range(0, len(evs), 7):  # slices of the stream, as the pipeline takes them
            (insp.process if columnar else insp.process_each)(evs[i:i + 7], 10.0)
        return book.rows(100, kind="loop")

    [f] = loops(_loop_stream(30, between="insert into log values (1)"))
    assert f["count"] == 1 and f["detail"]["count"] == 30 and f["detail"]["between"] == "insert into log values ($1)"
    [f] = loops(_loop_stream(30))
    assert f["detail"]["count"] == 30 and f["detail"]["between"] is None
    assert loops(_loop_stream(30, gap=0.2)) == []  # requests with a pause between: not a loop
    assert loops(_loop_stream(30, rows=3)) == []  # more than one row each
    assert loops(_loop_stream(19)) == []  # under the threshold
    assert loops(_loop_stream(30, parent_rows=30)) == []  # fed by a list query: the N+1 rule's
    assert loops(_loop_stream(30), findings_disabled=("loop",)) == []
    # TPC-B: the lookup comes back after four other statements: never one run
    tpcb = []
    t = 0.0
    for i in range(40):
        for sql in ("begin", f"update a set b = b + 1 where aid = {i}", f"select b from a where aid = {i}",
                    f"update t set b = b + 1 where tid = {i}", f"update br set b = b + 1 where bid = {i}",
                    f"insert into h values ({i})", "end"):
            tpcb.append(_ev(sql, t, in_tx=sql != "begin"))
            t += 0.0011
    assert loops(tpcb) == []


def test_plan_shape_is_node_types_and_relations_not_costs():
    a = [{"Plan": {"Node Type": "Limit", "Total Cost": 5.0, "Plans": [
        {"Node Type": "Index Scan", "Relation Name": "t", "Index Name": "t_a", "Total Cost": 4.0, "Plan Rows": 9}]}}]
    b = [{"Plan": {"Node Type": "Limit", "Total Cost": 50.0, "Plans": [
        {"Node Type": "Index Scan", "Relation Name": "t", "Index Name": "t_a", "Total Cost": 40.0, "Plan Rows": 1}]}}]
    c = [{"Plan": {"Node Type": "Limit", "Total Cost": 5.0, "Plans": [
        {"Node Type": "Seq Scan", "Relation Name": "t", "Total Cost": 4.0}]}}]
    assert plan_shape(a) == plan_shape(b) != plan_shape(c)


def test_a_reload_turns_kinds_off_and_on():
    s = settings()
    insp, book = _pipeline(s)
    insp.process(_loop_stream(30) + [_ev("update t set n = 1", 1.0)], 10.0)
    assert {r["kind"] for r in book.rows(10)} == {"loop", "no_where"}
    insp.reconfigure(settings(findings_disabled=("loop", "no_where"), findings_keep=1))
    assert len(book.rows(10)) == 1  # findings_keep applies at once
    other = ClientInfo(2, "db", "u", "app2", "127.0.0.1:2")
    insp.process([_ev("update t set n = 2", 20.0)] + _loop_stream(30, client=other, t=21.0), 30.0)
    assert book.totals[("no_where", "db")] == 1 and book.totals[("loop", "db")] == 1
    insp.reconfigure(settings())
    insp.process([_ev("update u set n = 2", 40.0)] + _loop_stream(30, client=ClientInfo(3, "db", "u", "a3", "x"),
                                                                  t=41.0), 50.0)
    assert book.totals[("no_where", "db")] == 2 and book.totals[("loop", "db")] == 2


def test_each_ddl_of_a_transaction_is_judged_when_it_ends():
    s = settings(blocking_ddl_ms=500.0)
    insp, book = _pipeline(s)
    evs = [_ev("begin", 1.0), _ev("alter table t alter column a set not null", 1.1, in_tx=True),
           _ev("create index on t (b)", 1.2, in_tx=True), _ev("select 1", 1.3, in_tx=True)]
    insp.process(evs, 2.0)
    assert book.rows(10) == []  # the locks are still held: nothing judged yet
    insp.process([_ev("commit", 1.9, in_tx=True), _ev("select 2", 2.0)], 3.0)  # the next statement outside
    ddl = {r["detail"]["operation"]: r["detail"] for r in book.rows(10, kind="blocking_ddl")}
    assert set(ddl) == {"SET NOT NULL", "CREATE INDEX"}  # held 0.9 s and 0.8 s: past blocking_ddl_ms
    assert ddl["SET NOT NULL"]["held_ms"] == pytest.approx(900.0) and ddl["CREATE INDEX"]["blocked_clients"] == 0
