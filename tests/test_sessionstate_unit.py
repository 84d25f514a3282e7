"""The session-state prefilter: its fast path answers exactly what the regex answers."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from proxy.session.rules import _PREFILTER, classify, might_leave_state

PIECES = ["SET", "set", "Set", "setx", "set1", "RESET", "LISTEN", "unlisten", "LOAD", "PREPARE", "DEALLOCATE",
          "DISCARD", "DECLARE", "CREATE", "TEMP", "TEMPORARY", "INTO", "into", "SELECT", "UPDATE", "t", "x",
          "pg_advisory_lock(1)", "pg_try_advisory_lock_shared(2)", "=", "1", "'a;b'", ";", " ", "  ", "\n", "\t",
          "--c\n", "/* c */", "(", ")", "é", "SETé", "WHERE", "abalance + -2345"]


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=12), st.sampled_from(["", " ", ";", " ; ", "\n"]))
def test_fast_prefilter_agrees_with_the_regex(pieces, tail):
    sql = " ".join(pieces) + tail
    assert might_leave_state(sql) == (_PREFILTER.search(sql) is not None), sql


def test_common_statements():
    assert not might_leave_state("UPDATE pgbench_accounts SET abalance = abalance + -2345 WHERE aid = 5;")
    assert not might_leave_state("INSERT INTO pgbench_history (tid) VALUES (1);")
    assert might_leave_state("  set search_path = x")
    assert might_leave_state("SELECT 1; SET x = 1")
    assert might_leave_state("/* hi */ LISTEN ch")
    assert might_leave_state("select pg_advisory_lock(1)")
    assert might_leave_state("SELECT * INTO TEMP t FROM x")
    assert classify("UPDATE t SET a = 1") is None
    assert classify("SET search_path = x") is not None
