"""Values stay inside pgscope unless inspect.log_parameters: plans, statement texts, the report and the log.

Through real proxies (in-process for the API, ``pgscope run`` as a child for its JSON log) in front of
the real PostgreSQL, with psycopg sending values as Bind parameters and as inline literals.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.proxy import ProxyProcess

API = ("/api/statements?limit=1000", "/api/explains?limit=1000", "/api/recommendations", "/api/nplusone",
       "/api/locks", "/api/findings?limit=1000")


def wait_for(fn, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def people(pg):
    with pg.connect() as c:
        c.execute("drop table if exists priv_people")
        c.execute("create table priv_people (id int primary key, ssn text, email text, n bigint, f float8, "
                  "tags int[], doc jsonb, raw bytea, born date, flags bit(3))")
        c.execute("insert into priv_people select g, 's' || g, 'e' || g, g, g, array[g], '{}', '\\x00', "
                  "'2000-01-01', B'000' from generate_series(1, 50) g")
        c.execute("analyze priv_people")
    yield "priv_people"
    with pg.connect() as c:
        c.execute("drop table if exists priv_people")


def sampling_proxy(factory, **kw):
    over = {"inspect.slow_query_ms": 0.0, "inspect.flush_interval_ms": 50, "inspect.explain_cooldown_s": 0.0,
            "inspect.explain_max_per_minute": 6000, "advisor": {"min_table_rows": 1}}
    over.update(kw)
    return factory(**over)


def explains_of(proxy, needle):
    return [e for e in proxy.api("/api/explains?limit=1000")["explains"] if needle in e["query"]]


def test_issue_example_plans_carry_no_values(proxy_factory, pg, people):
    """The two statements of issue 17: a Bind parameter and an inline literal, sampled, their plans scrubbed."""
    proxy = sampling_proxy(proxy_factory)
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        c.execute("select * from priv_people where ssn = %s", ("SECRET-123-45-6789",))
        c.execute("select * from priv_people where email = 'inline-secret@corp.example'")
    by_ssn = wait_for(lambda: explains_of(proxy, "where ssn = $1"), what="the ssn plan")
    by_email = wait_for(lambda: explains_of(proxy, "where email = $1"), what="the email plan")
    assert by_ssn[0]["method"] == "parameters" and by_email[0]["method"] == "literal"
    assert by_ssn[0]["plan"][0]["Plan"]["Filter"] == "(ssn = $1::text)"
    assert by_email[0]["plan"][0]["Plan"]["Filter"] == "(email = $1::text)"
    assert by_ssn[0]["plan"][0]["Plan"]["Relation Name"] == "priv_people"
    body = b"".join(proxy.http(path)[1] for path in API)
    assert b"SECRET-123-45-6789" not in body and b"inline-secret@corp.example" not in body


# ------------------------------------------------------------------ the log switch, in a real process

def _config(path, pg, log_parameters: bool) -> None:
    path.write_text(f'upstream = "{pg.dsn()}"\nlog_level = "info"\n[inspect]\nslow_query_ms = 1\n'
                    f'flush_interval_ms = 50\nexplain_cooldown_s = 0\n'
                    f'log_parameters = {"true" if log_parameters else "false"}\n')


def _slow_event(p: ProxyProcess, alias: str) -> dict:
    def find():
        return next((e for e in p.events() if e.get("event") == "slow_statement" and alias in e.get("query", "")),
                    None)
    return wait_for(find, what=f"a slow_statement event for {alias}\n{p.logs()[-3000:]}")


def test_log_parameters_is_applied_at_start_and_on_sighup(pg, tmp_path):
    cfg = tmp_path / "pgscope.toml"
    _config(cfg, pg, log_parameters=False)
    p = ProxyProcess(["--config", str(cfg)]).wait_ready()
    try:
        hidden, shown = f"hidden-{uuid.uuid4().hex}", f"shown-{uuid.uuid4().hex}"
        with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as c:
            c.execute("select pg_sleep(0.01) as log_off from generate_series(1, 2) g where g::text <> %s", (hidden,))
            ev = _slow_event(p, "log_off")  # the statement was logged ...
            assert ev.get("parameters") in (None, "***")
            assert hidden not in p.logs()  # ... without its value
            _config(cfg, pg, log_parameters=True)
            p.signal(signal.SIGHUP)
            reloaded = p.wait_event("reloaded")
            assert "inspect.log_parameters" in reloaded["changed"]
            c.execute("select pg_sleep(0.01) as log_on from generate_series(1, 2) g where g::text <> %s", (shown,))
            assert _slow_event(p, "log_on")["parameters"] == [shown]
        # the plans: the first one without its value, the second one (sampled after the switch) with it
        def plans():
            status, body = _http(p, "/api/explains?limit=100")
            assert status == 200
            return {e["query"].split(" as ")[1].split()[0]: json.dumps(e["plan"])
                    for e in json.loads(body)["explains"]}
        got = wait_for(lambda: (lambda x: x if {"log_off", "log_on"} <= set(x) else None)(plans()),
                       what="both plans")
        assert "g)::text <> $1::text" in got["log_off"] and hidden not in got["log_off"]
        assert shown in got["log_on"]
        assert hidden not in p.logs()
    finally:
        p.stop()


def test_log_parameters_on_from_the_start(pg):
    p = ProxyProcess(["--upstream", pg.dsn()], env={"PGSCOPE_INSPECT_LOG_PARAMETERS": "true",
                                                      "PGSCOPE_INSPECT_SLOW_QUERY_MS": "1",
                                                      "PGSCOPE_INSPECT_FLUSH_INTERVAL_MS": "50"}).wait_ready()
    try:
        shown = f"shown-{uuid.uuid4().hex}"
        with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as c:
            c.execute("select pg_sleep(0.01), %s::text as from_start", (shown,))
        assert _slow_event(p, "from_start")["parameters"] == [shown]
    finally:
        p.stop()


def _http(p: ProxyProcess, path: str, token: str | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{p.metrics_port}{path}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ------------------------------------------------------------------ any value, as a property

KINDS = ("text", "dollar", "escape", "int", "float", "array", "json", "bytea", "date")
TRICKY = ("it's", "''", "$$", "$t$", "\\n", "\\", '"', "--", "/*", "*/", "{", "}", "E'", "\n", "\t", ";", "%s")


def sql_literal(v: str) -> str:
    """A standard string literal, or an escape string when there is a backslash (as libpq's quoting)."""
    if "\\" in v:
        return "E'" + v.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + v.replace("'", "''") + "'"


def e_literal(v: str) -> str:
    """An E'' string with its specials as escapes: E'a\\nb\\'c'."""
    return "E'" + v.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\t", "\\t") + "'"


def build(kind: str, how: str, text: str, n: int, neg: bool, tricky: str) -> tuple[str, tuple, str]:
    """(the statement, its Bind parameters or (), the distinctive string no output may show)."""
    marker = "mk" + uuid.uuid4().hex[:12]
    alias = "a_" + uuid.uuid4().hex[:10]  # an identifier: tells this statement's plan apart
    n9 = 100_000_000 + n % 899_999_999  # fits an int4
    head = f"select id from priv_people as {alias} where "
    if kind in ("text", "dollar", "escape"):
        value = f"{marker}{tricky}{text}" + ("$$" if kind == "dollar" else "\n\t") + marker
        if how == "bind":
            return head + "ssn = %s", (value,), marker
        lit = {"text": sql_literal(value), "dollar": "$q$" + value.replace("$q$", "") + "$q$",
               "escape": e_literal(value)}[kind]
        return head + f"ssn = {lit}", (), marker
    if kind == "int":
        digits = str(10**11 + n % (9 * 10**11))  # 12 digits
        value = ("-" if neg else "") + digits
        return (head + "n = %s::bigint", (value,), digits) if how == "bind" else (head + f"n = {value}", (), digits)
    if kind == "float":
        value = ("-" if neg else "") + f"{n9}.25"
        return (head + "f = %s::float8", (value,), str(n9)) if how == "bind" else (head + f"f = {value}", (), str(n9))
    if kind == "array":
        value = "{" + f"{n9},2" + "}"
        sql = head + ("tags @> %s::int[]" if how == "bind" else f"tags @> {sql_literal(value)}::int[]")
        return sql, ((value,) if how == "bind" else ()), str(n9)
    if kind == "json":
        value = json.dumps({"k": f"{marker}{tricky}{text}", "n": [1, n9]})
        sql = head + ("doc @> %s::jsonb" if how == "bind" else f"doc @> {sql_literal(value)}::jsonb")
        return sql, ((value,) if how == "bind" else ()), marker
    if kind == "bytea":
        hexed = uuid.uuid4().hex[:16]
        value = "\\x" + hexed + "00"
        sql = head + ("raw = %s::bytea" if how == "bind" else f"raw = {sql_literal(value)}::bytea")
        return sql, ((value,) if how == "bind" else ()), hexed
    date = f"{2100 + n % 800}-{1 + n % 12:02d}-{1 + n % 28:02d}"  # far from any timestamp in the log
    sql = head + ("born = %s::date" if how == "bind" else (f"born = date '{date}'" if neg else f"born = '{date}'::date"))
    return sql, ((date,) if how == "bind" else ()), date


cases = st.fixed_dictionaries({
    "kind": st.sampled_from(KINDS),
    "how": st.sampled_from(("bind", "inline")),
    "text": st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
    "n": st.integers(min_value=0, max_value=10**15),
    "neg": st.booleans(),
    "tricky": st.sampled_from(TRICKY),
})


def _proxy_process(pg, log_parameters: bool) -> ProxyProcess:
    env = {"PGSCOPE_INSPECT_SLOW_QUERY_MS": "0", "PGSCOPE_INSPECT_FLUSH_INTERVAL_MS": "50",
           "PGSCOPE_INSPECT_EXPLAIN_COOLDOWN_S": "0", "PGSCOPE_INSPECT_EXPLAIN_MAX_PER_MINUTE": "100000",
           "PGSCOPE_INSPECT_EXPLAIN_KEEP": "1000", "PGSCOPE_INSPECT_SLOW_LOG_RATE": "100000",
           "PGSCOPE_INSPECT_LOG_PARAMETERS": "true" if log_parameters else "false", "PGSCOPE_LOG_LEVEL": "info"}
    return ProxyProcess(["--upstream", pg.dsn()], env=env).wait_ready()


def _sampled_plan(p: ProxyProcess, alias: str) -> dict:
    def find():
        status, body = _http(p, "/api/explains?limit=1000")
        assert status == 200, body
        return next((e for e in json.loads(body)["explains"] if alias in e["query"]), None)
    return wait_for(find, what=f"the plan of the statement with {alias}\n{p.logs()[-2000:]}")


@pytest.mark.parametrize("log_parameters", [False, True], ids=["values-hidden", "log_parameters"])
def test_no_value_leaves_pgscope_unless_asked(pg, people, log_parameters):
    p = _proxy_process(pg, log_parameters)
    shown: list[str] = []
    try:
        with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as conn:

            @settings(max_examples=20, deadline=None, derandomize=False,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
            @given(case=cases)
            def one(case):
                sql, params, secret = build(**case)
                conn.execute(sql, params or None)
                alias = sql.split(" as ", 1)[1].split()[0]
                plan = _sampled_plan(p, alias)  # the positive control: this statement's plan was sampled
                assert plan["method"] == ("parameters" if params else "literal"), plan
                plan_text = json.dumps(plan["plan"])
                if log_parameters:
                    assert secret in plan_text, (case, sql, plan_text)  # the opt-in shows the value
                    shown.append(secret)
                    return
                assert "$" in plan_text and secret not in plan_text, (case, sql, plan_text)
                for path in API:
                    status, body = _http(p, path)
                    assert status == 200 and secret.encode() not in body, (path, case, sql)
                assert secret not in p.logs(), (case, sql)
                shown.append(secret)

            one()
        assert len(shown) >= 15
        logs = p.logs()
        slow = [e for e in p.events() if e.get("event") == "slow_statement" and "priv_people" in e.get("query", "")]
        assert len(slow) >= len(shown)  # every statement was logged as slow ...
        if log_parameters:
            assert any(e.get("parameters") for e in slow)  # ... with its Bind values when asked
            return
        assert not any(s in logs for s in shown)  # ... and without any value otherwise
        # pgscope report reads the same API
        out = subprocess.run([sys.executable, "-m", "proxy", "report", "--from", f"http://127.0.0.1:{p.metrics_port}",
                              "--limit", "1000"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "priv_people as a_" in out.stdout and "costliest: Seq Scan priv_people" in out.stdout
        assert not [s for s in shown if s in out.stdout]
    finally:
        p.stop()
