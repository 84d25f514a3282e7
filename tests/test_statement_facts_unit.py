"""Statement facts (proxy.protocol.statement): one parse per text, the facts inspection and the session rules ask."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from proxy.protocol.statement import FACTS_CACHE_SIZE, ColumnUse, first_keyword, statement_facts

try:  # the session's rules are moving to proxy.session.rules
    from proxy.session.rules import classify, might_leave_state
except ImportError:  # pragma: no cover
    from proxy.sessionstate import classify, might_leave_state


def test_takes_locks():
    assert statement_facts("update t set a = 1").takes_locks
    assert statement_facts("select * from t for update").takes_locks
    assert statement_facts("lock table t").takes_locks
    assert statement_facts("alter table t add column x int").takes_locks
    assert statement_facts("with x as (delete from t returning *) select * from x").takes_locks
    assert statement_facts("select * into t2 from t").takes_locks
    assert not statement_facts("select * from t").takes_locks
    assert not statement_facts("explain update t set a = 1").takes_locks
    assert not statement_facts("begin").takes_locks


def test_read_only_select_ddl_and_kinds():
    f = statement_facts("SELECT a FROM t WHERE id = $1")
    assert f.parsed and f.read_only_select and not f.ddl and f.kinds == ("SelectStmt",)
    assert f.first_keyword == "SELECT" and f.session_state is None
    for sql in ("select * from t for share", "with x as (select 1) select * from x", "select 1 into t2",
                "select 1; select 2", "update t set a = 1", "insert into t values (1)"):
        assert not statement_facts(sql).read_only_select, sql
    assert statement_facts("create index on t (a)").ddl and statement_facts("drop table t").ddl
    assert statement_facts("select 1; alter table t add b int").kinds == ("SelectStmt", "AlterTableStmt")
    assert not statement_facts("delete from t").ddl


def test_unparseable_text_has_empty_facts():
    f = statement_facts("selec 1 frm")
    assert not f.parsed and f.kinds == () and not f.takes_locks and not f.read_only_select
    assert f.session_state is None and dict(f.columns) == {} and f.first_keyword == "SELEC"


def test_first_keyword_skips_comments_and_parentheses():
    assert first_keyword("  -- c\n /* d */ ((select 1))") == "SELECT"
    assert first_keyword("with x as (select 1) select * from x") == "WITH"
    assert first_keyword("") == "" and first_keyword("  ;") == ""


def test_columns_are_read_only_and_cached_by_text():
    sql = "SELECT * FROM s.orders o WHERE o.customer_id = $1 AND o.created_at BETWEEN $2 AND $3 ORDER BY o.id"
    f = statement_facts(sql)
    assert f.columns == {"s.orders": ColumnUse(eq=("customer_id",), range=("created_at",), order=("id",))}
    with pytest.raises(TypeError):
        f.columns["x"] = ColumnUse()  # type: ignore[index]
    assert statement_facts(sql) is f  # one parse per text
    assert statement_facts.cache_info().maxsize == FACTS_CACHE_SIZE
    assert statement_facts("update t set a = 1 where b in (1, 2)").columns == {"t": ColumnUse(eq=("b",))}
    assert dict(statement_facts("select 1; select * from t where a = 1").columns) == {}  # one statement only


# ------------------------------------------------------------------ session state agrees with classify

CLASSIFY_CASES = [
    # tests/test_sessionstate_unit.py
    "UPDATE pgbench_accounts SET abalance = abalance + -2345 WHERE aid = 5;",
    "INSERT INTO pgbench_history (tid) VALUES (1);", "  set search_path = x", "SELECT 1; SET x = 1",
    "/* hi */ LISTEN ch", "select pg_advisory_lock(1)", "SELECT * INTO TEMP t FROM x", "UPDATE t SET a = 1",
    "SET search_path = x",
    # the session's classification test (tests/test_protocol_unit.py)
    "update t set a = 1", "SET x = 1", "  /* c */ set x=1", "select 1; set x = 2", "-- hi\nreset all",
    "create temp table t(a int)", "CREATE TABLE t(a int)", "select * into temp t from x",
    "declare c cursor with hold for select 1", "listen a", "begin; set local x = 1; commit",
    "prepare p as select 1", "unlisten *", "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;",
    "set transaction isolation level serializable", "discard all",
    # more
    "SET LOCAL statement_timeout = 5", "SET SESSION AUTHORIZATION bob", "RESET search_path", "LOAD 'auto_explain'",
    "DEALLOCATE ALL", "DEALLOCATE p; DISCARD PLANS; RESET x", "DISCARD ALL; RESET ALL", "UNLISTEN a; RESET a",
    "declare c cursor for select 1", "declare c cursor without hold for select 1",
    "create temporary sequence s", "create temp view v as select 1", "create temp table t as select 1",
    "create unlogged table t(a int)", "create table t as select 1", "select pg_try_advisory_lock_shared(1, 2)",
    "select pg_advisory_xact_lock(1)", "select public.PG_ADVISORY_LOCK(1)",
    "select * from f(pg_advisory_lock(3))", "with x as (select pg_advisory_lock(1)) select * from x",
    "explain select pg_advisory_lock(1)", "set time zone 'UTC'", "set transaction_isolation = 'serializable'",
    "reset session authorization", "prepare p(int) as select $1; execute p(1)", "unlisten *; listen b",
    "set x = 1; set local y = 2", "create temp table t(a int); discard temp", "select 1 into temporary t2",
    "SET x = 'a;b'", "select 'set x = 1'", "-- set x\nselect 1", "create function f() returns int as 'select 1' "
    "language sql", "setx", "set", "'", "",
]


@pytest.mark.parametrize("sql", CLASSIFY_CASES)
def test_session_state_agrees_with_classify(sql):
    expected = statement_facts(sql).session_state if might_leave_state(sql) else None
    assert classify(sql) == expected


def test_session_state_sees_past_the_session_prefilter():
    # the parse is the truth; the session's cheap prefilter (its own, applied before it asks) misses
    # INTO LOCAL TEMP, which PostgreSQL's grammar accepts
    assert statement_facts("select 1 into local temp t").session_state == "CREATE TEMP"


PIECES = ["SET", "set", "setx", "RESET", "LISTEN", "unlisten", "LOAD", "PREPARE", "DEALLOCATE", "DISCARD",
          "DECLARE", "CURSOR", "WITH", "HOLD", "FOR", "CREATE", "TABLE", "TEMP", "TEMPORARY", "LOCAL", "INTO",
          "SELECT", "UPDATE", "ALL", "t", "x", "a(int)", "pg_advisory_lock(1)", "pg_try_advisory_lock_shared(2)",
          "=", "1", "'a;b'", ";", "--c\n", "/* c */", "(", ")", "WHERE", "TRANSACTION", "ISOLATION"]


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=10))
def test_session_state_agrees_with_classify_on_generated_texts(pieces):
    sql = " ".join(pieces)
    expected = statement_facts(sql).session_state if might_leave_state(sql) else None
    assert classify(sql) == expected, sql
