"""proxy.inspect.scrub: values out of SQL text and plans, found by PostgreSQL's lexer (no server needed)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.inspect.scrub import CUT, NAME_KEYS, scrub_plan, scrub_sql


@pytest.mark.parametrize("text,expect", [
    ("(ssn = 'SECRET-123-45-6789'::text)", "(ssn = $1::text)"),
    ("(email = 'it''s me'::text)", "(email = $1::text)"),  # a quote inside a string
    ("(a = E'line\\nnext\\'q'::text)", "(a = $1::text)"),  # E'' escapes, an escaped quote
    ("(a = e'x''y')", "(a = $1)"),
    ("(body = $$it's $1 'here'$$)", "(body = $1)"),  # dollar quotes, with quotes and a $1 inside
    ("(body = $tag$ $$ nested $$ $tag$)", "(body = $1)"),
    ("(a = U&'d\\0061t\\+000061')", "(a = $1)"),
    ("(a = N'national')", "(a = $1)"),
    ("(flags = B'101') AND (mask = X'1F')", "(flags = $1) AND (mask = $2)"),
    ("(n = 42) AND (f = 1.5e-3) AND (g = .5) AND (h = 0x1F) AND (i = 1_000_000)",
     "(n = $1) AND (f = $2) AND (g = $3) AND (h = $4) AND (i = $5)"),
    ("(n = -5) AND (m = (- 3.5)) AND (k = +7)", "(n = $1) AND (m = ($2)) AND (k = $3)"),  # unary signs go too
    ("(total = (amount - 5))", "(total = (amount - $1))"),  # a binary minus stays
    ("(ids = '{1,2,3}'::integer[])", "(ids = $1::integer[])"),
    ("(doc @> '{\"k\": [1, \"v\"]}'::jsonb)", "(doc @> $1::jsonb)"),
    ("(raw = '\\x00ff'::bytea)", "(raw = $1::bytea)"),
    ("(d > '2024-02-29'::date) AND (t < '2024-01-01 10:00:00+00'::timestamp with time zone)",
     "(d > $1::date) AND (t < $2::timestamp with time zone)"),
    ("(a = '-12'::integer)", "(a = $1::integer)"),  # how PostgreSQL prints a negative constant
    ("(data ? 'key'::text)", "(data ? $1::text)"),  # the jsonb ? operator is not a placeholder
    ("(col1 = 3) AND (t2.x9 = \"2nd\") AND (\"1\" = 4)", "(col1 = $1) AND (t2.x9 = \"2nd\") AND (\"1\" = $2)"),
    ("(a = $1) AND (b = 5) AND (c = $3)", "(a = $1) AND (b = $4) AND (c = $3)"),  # past the text's own $k
    ("(x = 'é€😀') AND (y = 5)", "(x = $1) AND (y = $2)"),  # characters, not bytes
    ("((x)::numeric(10,2) = 5.25) AND ((y)::character varying(20) = 'v'::text)",
     "((x)::numeric(10,2) = $1) AND ((y)::character varying(20) = $2::text)"),  # type modifiers stay
    ("((x)::text ~~ (5))", "((x)::text ~~ ($1))"),
    ("(a IS NULL) AND (b = true)", "(a IS NULL) AND (b = true)"),  # keywords are not values
    ("select 1 /* a comment */", "select $1 /* a comment */"),
    ("", ""),
    ("no constants at all", "no constants at all"),
])
def test_scrub_sql(text, expect):
    assert scrub_sql(text) == expect


def test_adjacent_strings_and_continuations():
    assert scrub_sql("select 'a'\n'b', 'c' 'd'") == "select $1, $2 $3"  # 'a'\n'b' is one constant


@pytest.mark.parametrize("text,expect", [
    ("select * from t where x = 'SECRET tail cut by track_activity_query_si", "select * from t where x = " + CUT),
    ("select $$SECRET never closed", "select " + CUT),
    ("select 5, /* SECRET", "select $1, " + CUT),
    ('select 5, "SECRET', "select $1, " + CUT),
    ("select 1e SECRET", CUT),  # trailing junk after a number: nothing readable before it is kept whole
    ("select 'a' \x00 'SECRET' 42", "select $1 " + CUT),  # the lexer stops at a NUL: the rest is dropped
])
def test_unreadable_text_is_cut(text, expect):
    out = scrub_sql(text)
    assert "SECRET" not in out and "42" not in out
    assert out.endswith(CUT)
    if expect != CUT:
        assert out == expect


def test_subplan_numbers_stay_in_plans_only():
    plan = [{"Plan": {"Node Type": "Seq Scan", "Filter": "((NOT (hashed SubPlan 1)) AND (x = 7))",
                      "Plans": [{"Subplan Name": "SubPlan 1", "Node Type": "Seq Scan",
                                 "Filter": "(y = (InitPlan 2).col1)"}]}}]
    out = scrub_plan(plan)
    assert out[0]["Plan"]["Filter"] == "((NOT (hashed SubPlan 1)) AND (x = $1))"
    assert out[0]["Plan"]["Plans"][0]["Subplan Name"] == "SubPlan 1"
    assert out[0]["Plan"]["Plans"][0]["Filter"] == "(y = (InitPlan 2).col1)"
    assert scrub_sql("select SubPlan 1") == "select SubPlan $1"  # not a plan: a number is a number


PLAN = [{
    "Plan": {
        "Node Type": "Nested Loop", "Join Type": "Inner", "Startup Cost": 0.42, "Total Cost": 1234.5,
        "Plan Rows": 10, "Plan Width": 64, "Parallel Aware": False,
        "Output": ["o.id", "'SECRET-out'::text", "(o.amount * 1.23)"],
        "Join Filter": "(o.customer_id = c.id)",
        "Plans": [
            {"Node Type": "Seq Scan", "Parent Relationship": "Outer", "Relation Name": "orders", "Schema": "public",
             "Alias": "o", "Total Cost": 1000.0, "Plan Rows": 10,
             "Filter": "((o.status = 'SECRET-status'::text) AND (o.created_at > '2020-01-01'::date))"},
            {"Node Type": "Index Scan", "Parent Relationship": "Inner", "Index Name": "customers_pkey",
             "Relation Name": "customers", "Alias": "c", "Scan Direction": "Forward", "Total Cost": 0.3,
             "Index Cond": "(c.id = o.customer_id)", "Filter": "(c.email = $1)"},
            {"Node Type": "Sort", "Sort Key": ["(CASE WHEN (o.amount > 99) THEN 'SECRET-case'::text END)"],
             "Group Key": ["o.status"], "Sort Method": "quicksort", "Total Cost": 2.0,
             "Grouping Sets": [{"Group Keys": [["o.status", "(o.amount > 1000)"]]}]},
        ],
    },
    "Planning Time": 0.1, "Triggers": [], "Execution Time": 3.2,
}]


def test_scrub_plan_keeps_the_shape():
    out = scrub_plan(PLAN)
    text = json.dumps(out)
    assert "SECRET" not in text and "99" not in text and "1000)" not in text and "1.23" not in text
    assert "2020-01-01" not in text
    top = out[0]["Plan"]
    # structure, names, costs and estimates unchanged
    assert top["Node Type"] == "Nested Loop" and top["Total Cost"] == 1234.5 and top["Plan Rows"] == 10
    assert [p["Node Type"] for p in top["Plans"]] == ["Seq Scan", "Index Scan", "Sort"]
    assert top["Plans"][0]["Relation Name"] == "orders" and top["Plans"][1]["Index Name"] == "customers_pkey"
    assert top["Join Filter"] == "(o.customer_id = c.id)"
    # the real parameter keeps $1; removed values are numbered past it, across the plan
    assert top["Plans"][1]["Filter"] == "(c.email = $1)"
    assert top["Output"] == ["o.id", "$2::text", "(o.amount * $3)"]
    assert top["Plans"][0]["Filter"] == "((o.status = $4::text) AND (o.created_at > $5::date))"
    assert top["Plans"][2]["Sort Key"] == ["(CASE WHEN (o.amount > $6) THEN $7::text END)"]
    assert top["Plans"][2]["Grouping Sets"] == [{"Group Keys": [["o.status", "(o.amount > $8)"]]}]
    assert PLAN[0]["Plan"]["Output"][1] == "'SECRET-out'::text"  # a copy: the input is untouched


def test_name_keys_are_not_scrubbed_but_unknown_keys_are():
    plan = [{"Plan": {"Node Type": "Seq Scan", "Relation Name": "it's 2024", "Alias": "42",
                      "Some Future Field": "(x = 'SECRET')"}}]
    out = scrub_plan(plan)[0]["Plan"]
    assert out["Relation Name"] == "it's 2024" and out["Alias"] == "42"
    assert out["Some Future Field"] == "(x = $1)"
    assert {"Node Type", "Relation Name", "Index Name", "Alias"} <= NAME_KEYS
    assert not NAME_KEYS & {"Filter", "Index Cond", "Recheck Cond", "Hash Cond", "Merge Cond", "Join Filter",
                            "One-Time Filter", "Output", "Sort Key", "Group Key", "Cache Key", "Subplan Name"}


# ------------------------------------------------------------------ any value, however written

MARK = "Zq7xK"


def sql_literal(v: str) -> str:
    """How a client or PostgreSQL's deparser may write a string value."""
    if "\\" in v:
        return "E'" + v.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + v.replace("'", "''") + "'"


values = st.one_of(
    st.text(min_size=0, max_size=20).map(lambda s: s.replace("\x00", "")),
    st.sampled_from(["it's", "$$", "$t$", "E'\\n'", "\\x00ff", "{1,2}", '{"a": [1, "b"]}', "--", "/*", "*/",
                     "2024-02-29", "-5", "1e5", "B'101'", "X'1F'", "\\", "''", '"']),
)


@settings(max_examples=200, deadline=None)
@given(value=values, how=st.sampled_from(["plain", "dollar", "tagged", "escape", "cast"]),
       number=st.integers(min_value=-10**12, max_value=10**12))
def test_no_written_value_survives(value, how, number):
    v = f"{MARK}{value}{MARK}"
    if how == "plain":
        lit = sql_literal(v)
    elif how == "dollar":
        lit = "$$" + v.replace("$$", "") + "$$"
    elif how == "tagged":
        lit = "$q1$" + v.replace("$q1$", "") + "$q1$"
    elif how == "escape":
        lit = "E'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    else:
        lit = sql_literal(v) + "::text"
    num = f"{number}98765"
    text = f"((col_1 = {lit}) AND (\"9lives\" > {num}) AND (x = '-{abs(number)}'::bigint))"
    out = scrub_sql(text)
    assert MARK not in out, (text, out)
    assert num.lstrip("-") not in out
    assert "col_1" in out and '"9lives"' in out  # identifiers that hold digits stay
    plan = scrub_plan([{"Plan": {"Node Type": "Seq Scan", "Filter": text, "Output": [lit]}}])
    assert MARK not in json.dumps(plan)
