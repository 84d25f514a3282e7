"""EXPLAIN sampling and HypoPG-verified index advice, through the proxy with psycopg."""

from __future__ import annotations

import re
import time

import psycopg
import pytest

from proxy.inspect.advisor import filtered_on, filters_and_sorts
from proxy.protocol.statement import ColumnUse, statement_facts
from tests.support.tools import require_hypopg

ROWS = 200_000


@pytest.fixture(scope="module")
def big_table(pg):
    with pg.connect() as c:
        c.execute("drop table if exists adv_orders")
        c.execute("create table adv_orders (id bigint primary key, customer_id int, status text, "
                  "amount numeric, created_at timestamptz)")
        c.execute(f"insert into adv_orders select g, g % 5000, case when g % 10 = 0 then 'open' else 'done' end, "
                  f"g % 997, now() - (g || ' seconds')::interval from generate_series(1, {ROWS}) g")
        c.execute("create index adv_orders_status on adv_orders (status)")
        c.execute("analyze adv_orders")
    yield "adv_orders"
    with pg.connect() as c:
        c.execute("drop table if exists adv_orders")


def wait_for(fn, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            return v
        time.sleep(0.2)


def hypothetical_indexes(proxy, user, db="pgscope_test"):
    """hypopg_list_indexes() on the EXPLAIN sampler's side connection (the backend the advisor used)."""
    from proxy.inspect.explain import ExplainSampler

    async def ask():
        sampler = next(c for c in proxy.proxy.inspector.consumers if isinstance(c, ExplainSampler))
        async with sampler.side.lock(db, user):
            srv = await sampler.side.get(db, user)
            rows, err = await srv.fetch("SELECT index_name FROM hypopg_list_indexes")
            assert err is None, err
            # the control: on this backend, a hypothetical index would show
            probe, err = await srv.fetch("SELECT count(*) FROM hypopg_create_index('CREATE INDEX ON adv_orders "
                                         "(amount)'), hypopg_list_indexes")
            assert err is None and probe == [["1"]], (err, probe)
            assert await srv.simple_query("SELECT hypopg_reset()") is None
        return rows
    return proxy.call(ask)


def advisor_proxy(proxy_factory, **kw):
    over = {"inspect.slow_query_ms": 1.0, "inspect.flush_interval_ms": 50, "inspect.explain_cooldown_s": 0.0,
            "inspect.explain_max_per_minute": 600}
    over.update(kw)
    return proxy_factory(**over)


@pytest.mark.hypopg
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_seq_scan_gets_a_hypopg_recommendation(proxy_factory, pg, big_table, mode):
    require_hypopg(pg)
    proxy = advisor_proxy(proxy_factory, pool_mode=mode)
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        # server-side parameters: ints go in binary (a generic plan), strings as text (custom plans) ...
        for i in range(3):
            c.execute("select id, amount from adv_orders where customer_id = %s", (42 + i,))
            c.execute("select id, amount from adv_orders where customer_id = %s::int", (str(50 + i),))
        # ... and literals
        c.execute("select count(*) from adv_orders where customer_id = 77")
    recs = wait_for(lambda: [r for r in proxy.api("/api/recommendations")["recommendations"]
                             if r["table"] == "adv_orders" and len(r["fingerprints"]) >= 2])
    assert len(recs) == 1, recs
    r = recs[0]
    assert r["columns"] == ["customer_id"] and r["method"] == "hypopg" and r["benefit"] >= 0.5
    assert r["create_statement"] == "CREATE INDEX CONCURRENTLY ON adv_orders (customer_id)"
    assert len(r["fingerprints"]) == 2 and r["calls"] >= 7 and r["total_ms"] > 0
    plans = proxy.api("/api/explains")["explains"]
    assert plans and all(set(p) >= {"fingerprint", "query", "plan", "duration_ms", "sampled_at"} for p in plans)
    nodes = []

    def walk(n):
        nodes.append(n["Node Type"])
        for ch in n.get("Plans", []):
            walk(ch)
    walk(plans[0]["plan"][0]["Plan"])
    assert "Seq Scan" in nodes
    assert {p["method"] for p in plans} == {"parameters", "literal", "generic"}
    text = proxy.metrics()
    assert 'pgscope_index_recommendation_benefit{columns="customer_id",db="pgscope_test",method="hypopg",' \
           'table="adv_orders"}' in text
    assert "pgscope_explain_samples_total{fingerprint=" in text
    # no hypothetical index is left behind on the side connection that made them (HypoPG's are per
    # backend: only that backend's hypopg_list_indexes shows them), and nothing real was created
    assert hypothetical_indexes(proxy, pg.superuser) == []
    with pg.connect() as admin:
        assert admin.execute("select count(*) from pg_indexes where tablename = 'adv_orders'").fetchone()[0] == 2


@pytest.mark.hypopg
def test_indexed_column_gets_no_recommendation(proxy_factory, pg, big_table):
    require_hypopg(pg)
    proxy = advisor_proxy(proxy_factory)
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        for _ in range(3):
            c.execute("select count(*) from adv_orders where status = %s and amount >= 0", ("closed",))
        # the positive control: sampled (and considered by the advisor) after the statements above
        c.execute("select id from adv_orders where customer_id = %s", (7,))
    recs = wait_for(lambda: [r for r in proxy.api("/api/recommendations")["recommendations"]
                             if r["table"] == "adv_orders" and r["columns"][0] == "customer_id"])
    assert recs, "the unindexed column got no recommendation"
    plans = proxy.api("/api/explains")["explains"]
    assert any("status" in p["query"] for p in plans), "the slow statement should still be sampled"
    recs = [r for r in proxy.api("/api/recommendations")["recommendations"] if r["table"] == "adv_orders"]
    assert not any(r["columns"][0] == "status" for r in recs), recs


def test_candidate_columns_filters_before_sorts():
    cols = statement_facts("SELECT status, count(*) FROM orders WHERE created_at > $1 GROUP BY status "
                           "ORDER BY status").columns
    assert cols == {"orders": ColumnUse(eq=(), range=("created_at",), order=("status",))}
    assert filters_and_sorts(cols["orders"]) == (["created_at"], ["status"])
    # an index leading with created_at leaves no filter to lead a new one: status stays a sort column
    assert filters_and_sorts(cols["orders"], {"created_at"}) == ([], ["status"])
    cols = statement_facts("SELECT * FROM t WHERE b > 1 AND a = $1 ORDER BY a, c").columns["t"]
    assert filters_and_sorts(cols) == (["a", "b"], ["c"])
    # JOIN … ON with a value filters the joined table; a column-to-column condition does not
    cols = statement_facts("SELECT * FROM o JOIN c ON c.id = o.customer_id AND c.region = $1 "
                           "WHERE o.status = 'open' ORDER BY o.created_at").columns
    assert cols["c"] == ColumnUse(eq=("region",))
    assert cols["o"] == ColumnUse(eq=("status",), order=("created_at",))
    # OR is not a filter an index on one column serves
    cols = statement_facts("SELECT * FROM t WHERE a = 1 OR b = 2 ORDER BY c").columns["t"]
    assert filters_and_sorts(cols) == ([], ["c"])


def test_filtered_on_matches_whole_identifiers():
    scan = {"Node Type": "Seq Scan", "Filter": "((o.status_code = 3) AND (created_at > '2020-01-01'::date))"}
    assert filtered_on(scan, "created_at") and filtered_on(scan, "status_code")
    assert not filtered_on(scan, "status") and not filtered_on(scan, "code")
    assert not filtered_on({"Node Type": "Seq Scan"}, "status")


@pytest.fixture(scope="module")
def dated_table(pg):
    with pg.connect() as c:
        c.execute("drop table if exists adv_events")
        c.execute("create table adv_events (id bigint, status text, kind int, created_at timestamptz)")
        c.execute("insert into adv_events select g, 's' || (g % 7), g % 1000, now() - (g || ' minutes')::interval "
                  "from generate_series(1, 60000) g")
        c.execute("create index adv_events_created_at on adv_events (created_at)")
        c.execute("analyze adv_events")
    yield "adv_events"
    with pg.connect() as c:
        c.execute("drop table if exists adv_events")


def test_heuristic_leads_only_with_a_filter_column(proxy_factory, pg, big_table, dated_table):
    """Without HypoPG, a column only sorted or grouped on is never recommended (it was: `(status)` for
    a GROUP BY/ORDER BY status whose only filter, created_at, already had an index)."""
    proxy = advisor_proxy(proxy_factory, advisor={"use_hypopg": False})
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        c.execute("SELECT status, count(*) FROM adv_events WHERE created_at > '2000-01-01' "
                  "GROUP BY status ORDER BY status")
        c.execute("SELECT id FROM adv_events WHERE status = 's1' OR kind = 3 ORDER BY created_at, id")
        c.execute("SELECT id FROM adv_orders WHERE customer_id = %s ORDER BY amount", (31,))
    recs = wait_for(lambda: [r for r in proxy.api("/api/recommendations")["recommendations"]
                             if r["table"] == "adv_orders"])
    assert [(r["columns"], r["method"]) for r in recs] == [(["customer_id"], "heuristic")], recs
    explained = wait_for(lambda: len({p["fingerprint"] for p in proxy.api("/api/explains")["explains"]}) >= 3)
    assert explained
    # samples and the advisor's look at each run one after another, in order: the adv_orders
    # recommendation above (the last statement) means both adv_events plans were considered
    recs = proxy.api("/api/recommendations")["recommendations"]
    assert [r for r in recs if r["table"] == "adv_events"] == [], recs


def test_writes_are_never_analyzed(proxy_factory, pg, big_table):
    proxy = advisor_proxy(proxy_factory, **{"inspect.explain_analyze": True})
    with pg.connect() as admin:
        before = admin.execute("select count(*), sum(amount) from adv_orders where status = 'open'").fetchone()
    with psycopg.connect(proxy.dsn(pg.superuser)) as c:
        c.execute("update adv_orders set amount = amount + 1 where customer_id = %s", (5,))
        c.rollback()  # the client's own change is rolled back: any change left would be the sampler's
        c.execute("delete from adv_orders where customer_id = 6")
        c.rollback()
    plans = wait_for(lambda: proxy.api("/api/explains")["explains"])
    assert plans
    assert all("Actual Total Time" not in p["plan"][0]["Plan"] for p in plans), "a write was ANALYZEd"
    with pg.connect() as admin:
        after = admin.execute("select count(*), sum(amount) from adv_orders where status = 'open'").fetchone()
        assert admin.execute("select count(*) from adv_orders").fetchone()[0] == ROWS
    assert before == after
    # a read-only SELECT is analyzed when asked for
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        c.execute("select max(amount) from adv_orders where customer_id = 9")
    analyzed = wait_for(lambda: [p for p in proxy.api("/api/explains")["explains"]
                                 if "Actual Total Time" in p["plan"][0]["Plan"]])
    assert analyzed


def test_sampling_is_rate_limited(proxy_factory, pg, big_table):
    proxy = advisor_proxy(proxy_factory, **{"inspect.explain_max_per_minute": 2})
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        for i in range(8):
            c.execute(f"select count(*) from adv_orders as t{i} where amount = {i}")

    def skipped():
        m = re.search(r'^pgscope_explain_skipped_total\{reason="rate limit"\} (\S+)$', proxy.metrics(), re.M)
        return float(m.group(1)) if m else 0.0
    # every one of the 8 decided: 2 sampled, 6 refused by the rate limit
    assert wait_for(lambda: skipped() >= 6 and len(proxy.api("/api/explains")["explains"]) >= 2), \
        (skipped(), proxy.api("/api/explains")["explains"])
    assert skipped() == 6 and len(proxy.api("/api/explains")["explains"]) == 2


@pytest.mark.hypopg
def test_report_command(proxy_factory, pg, big_table):
    import subprocess
    import sys

    require_hypopg(pg)
    proxy = advisor_proxy(proxy_factory)
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        c.execute("select count(*) from adv_orders where customer_id = 12")
    wait_for(lambda: proxy.api("/api/recommendations")["recommendations"])
    out = subprocess.run([sys.executable, "-m", "proxy", "report", "--from", f"http://127.0.0.1:{proxy.metrics_port}"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "Top statements by total time" in out.stdout
    assert "select count(*) from adv_orders where customer_id = $1" in out.stdout
    assert "costliest: Seq Scan adv_orders" in out.stdout
    assert "CREATE INDEX CONCURRENTLY ON adv_orders (customer_id);" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "proxy", "report", "--from", "http://127.0.0.1:1"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "cannot read" in bad.stderr
