"""The documented EXPLAIN and advisor settings, each shown to take effect through a running proxy
(psycopg clients, the HTTP API and /metrics): inspect.explain_cooldown_s, explain_sample_rate,
explain_timeout_ms, explain_keep; advisor.enabled, min_table_rows, min_benefit; and ``limit`` on
/api/explains, /api/nplusone and /api/locks."""

from __future__ import annotations

import re

import psycopg
import pytest

from tests.support.wire import wait_for

ROWS = 20_000
SLOW = "select pg_sleep(0.015), count(*) from set_orders where customer_id = %s"


@pytest.fixture(scope="module")
def orders(pg):
    with pg.connect() as c:
        c.execute("drop table if exists set_orders")
        c.execute("create table set_orders (id serial primary key, customer_id int, amount numeric)")
        c.execute(f"insert into set_orders (customer_id, amount) select g % 500, g from generate_series(1, {ROWS}) g")
        # VACUUM too: left to autovacuum, the visibility map would change the index-only scan's cost
        # (and so the advisor's benefit) between two scenes of one test
        c.execute("vacuum analyze set_orders")
    yield "set_orders"
    with pg.connect() as c:
        c.execute("drop table if exists set_orders")


def sampling_proxy(proxy_factory, **kw):
    over = {"inspect.slow_query_ms": 10.0, "inspect.flush_interval_ms": 50, "inspect.explain_cooldown_s": 0.0,
            "inspect.explain_max_per_minute": 6000}
    over.update(kw)
    return proxy_factory(**over)


def counter(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when there are none)."""
    total = 0.0
    for m in re.finditer(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def decided(proxy) -> tuple[float, dict[str, float]]:
    """(plans sampled, slow statements skipped by reason)."""
    text = proxy.metrics()
    skipped = {r: float(n) for r, n in re.findall(r'^pgscope_explain_skipped_total\{reason="([^"]+)"\} (\S+)$',
                                                     text, re.M)}
    return counter(text, "pgscope_explain_samples_total"), skipped


def wait_decided(proxy, n: int) -> tuple[float, dict[str, float]]:
    """Wait until the sampler has decided about ``n`` slow statements (sampled or skipped)."""
    wait_for(lambda: sum([decided(proxy)[0], *decided(proxy)[1].values()]) >= n, timeout=30,
             what=f"{n} slow statements decided")
    return decided(proxy)


def sampler_idle(proxy) -> bool:
    ex = proxy.proxy.explain
    return proxy.call(lambda: not ex.pending and (ex._task is None or ex._task.done()))


def run_slow(proxy, pg, n: int, start: int = 0) -> None:
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        for i in range(start, start + n):
            c.execute(SLOW, (i,))


# ------------------------------------------------------------------ EXPLAIN sampling

def test_explain_cooldown(proxy_factory, pg, orders):
    """One fingerprint three times: with a cooldown sampled once and skipped twice; without, thrice."""
    cool = sampling_proxy(proxy_factory, **{"inspect.explain_cooldown_s": 3600.0, "advisor": {"enabled": False}})
    run_slow(cool, pg, 3)
    assert wait_decided(cool, 3) == (1.0, {"cooldown": 2.0})
    assert len(cool.api("/api/explains")["explains"]) == 1
    hot = sampling_proxy(proxy_factory, **{"inspect.explain_cooldown_s": 0.0, "advisor": {"enabled": False}})
    run_slow(hot, pg, 3)
    assert wait_decided(hot, 3) == (3.0, {})
    wait_for(lambda: len(hot.api("/api/explains")["explains"]) == 3, what="three plans")


def test_explain_sample_rate(proxy_factory, pg, orders):
    none = sampling_proxy(proxy_factory, **{"inspect.explain_sample_rate": 0.0, "advisor": {"enabled": False}})
    run_slow(none, pg, 5)
    assert wait_decided(none, 5) == (0.0, {"sample rate": 5.0})
    assert none.api("/api/explains")["explains"] == []
    half = sampling_proxy(proxy_factory, **{"inspect.explain_sample_rate": 0.5, "advisor": {"enabled": False}})
    run_slow(half, pg, 40)
    sampled, skipped = wait_decided(half, 40)
    assert set(skipped) == {"sample rate"} and sampled + skipped["sample rate"] == 40
    assert 5 <= sampled <= 35, sampled  # binomial(40, 0.5): outside this with probability < 1e-6
    every = sampling_proxy(proxy_factory, **{"inspect.explain_sample_rate": 1.0, "advisor": {"enabled": False}})
    run_slow(every, pg, 5)
    assert wait_decided(every, 5) == (5.0, {})


def test_explain_timeout_ms(proxy_factory, pg):
    """EXPLAIN ANALYZE of a read-only SELECT that runs 0.4 s: within explain_timeout_ms it is sampled,
    with a 50 ms statement_timeout it fails (counted, logged) and no plan is kept."""
    over = {"inspect.explain_analyze": True, "advisor": {"enabled": False}}
    ok = sampling_proxy(proxy_factory, **{"inspect.explain_timeout_ms": 10_000, **over})
    short = sampling_proxy(proxy_factory, **{"inspect.explain_timeout_ms": 50, **over})
    for p in (ok, short):
        with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as c:
            c.execute("select pg_sleep(0.4)")
    (plan,) = wait_for(lambda: ok.api("/api/explains")["explains"], what="the plan within the timeout")
    assert "Actual Total Time" in plan["plan"][0]["Plan"]  # ANALYZE ran: the timeout was not in the way
    assert counter(ok.metrics(), "pgscope_explain_errors_total") == 0
    wait_for(lambda: counter(short.metrics(), "pgscope_explain_errors_total") == 1, what="the EXPLAIN timed out")
    assert counter(short.metrics(), "pgscope_explain_samples_total") == 0
    assert short.api("/api/explains")["explains"] == []


def test_explain_keep_and_the_limit_on_api_explains(proxy_factory, pg, orders):
    p = sampling_proxy(proxy_factory, **{"inspect.explain_keep": 2, "advisor": {"enabled": False}})
    run_slow(p, pg, 5)
    assert wait_decided(p, 5) == (5.0, {})
    wait_for(lambda: sampler_idle(p), what="the sampler done")
    kept = p.api("/api/explains")["explains"]
    assert len(kept) == 2  # five sampled, the newest two kept
    assert kept[0]["sampled_at"] >= kept[1]["sampled_at"]
    assert p.api("/api/explains?limit=1")["explains"] == kept[:1]
    assert p.api("/api/explains?limit=5")["explains"] == kept


# ------------------------------------------------------------------ the advisor

@pytest.mark.hypopg
def test_advisor_enabled_min_table_rows_and_min_benefit(proxy_factory, pg, orders):
    def scene(**advisor):
        p = sampling_proxy(proxy_factory, advisor={"min_table_rows": 1000, **advisor})
        run_slow(p, pg, 1)
        wait_for(lambda: p.api("/api/explains")["explains"], what="the plan sampled")
        wait_for(lambda: sampler_idle(p), what="the sampler and the advisor done")
        return p

    control = scene()
    (rec,) = control.api("/api/recommendations")["recommendations"]
    assert rec["table"] == "set_orders" and rec["columns"] == ["customer_id"] and rec["method"] == "hypopg"
    benefit = rec["benefit"]
    assert 0.5 <= benefit < 1.0
    # advisor.enabled = false: the plan is sampled, the advisor never looks at it
    off = scene(enabled=False)
    assert off.api("/api/recommendations")["recommendations"] == []
    assert counter(off.metrics(), "pgscope_index_advisor_plans_total") == 0
    # advisor.min_table_rows above the table's rows: considered, but the table is too small
    small = scene(min_table_rows=ROWS * 10)
    assert counter(small.metrics(), "pgscope_index_advisor_plans_total") == 1
    assert small.api("/api/recommendations")["recommendations"] == []
    # advisor.min_benefit above what the index saves: HypoPG's candidate rejected
    strict = scene(min_benefit=benefit + (1.0 - benefit) / 2)
    assert counter(strict.metrics(), "pgscope_index_advisor_rejected_total") == 1
    assert strict.api("/api/recommendations")["recommendations"] == []
    lenient = scene(min_benefit=benefit - 0.01)
    assert [r["columns"] for r in lenient.api("/api/recommendations")["recommendations"]] == [["customer_id"]]


# ------------------------------------------------------------------ limit on the other lists

def test_limit_on_api_nplusone_and_api_locks(proxy_factory, pg, orders):
    def key(row: dict) -> tuple:  # what identifies a report (held_ms of an open one grows between reads)
        return row["application_name"], row["started_at"]

    p = proxy_factory(**{"inspect.flush_interval_ms": 50, "inspect.nplusone_min_total_ms": 0.0,
                         "inspect.slow_query_ms": 10_000.0, "inspect.lock_hold_ms": 200.0})
    for app in ("loop-a", "loop-b"):
        with psycopg.connect(p.dsn(pg.superuser, application_name=app), autocommit=True) as c:
            ids = [r[0] for r in c.execute("select id from set_orders order by id limit 10").fetchall()]
            for i in ids:
                c.execute("select amount from set_orders where id = %s", (i,))
    wait_for(lambda: [b["count"] for b in p.api("/api/nplusone")["bursts"]] == [10, 10], what="both bursts whole")
    bursts = [key(b) for b in p.api("/api/nplusone")["bursts"]]
    assert {b[0] for b in bursts} == {"loop-a", "loop-b"}
    assert [key(b) for b in p.api("/api/nplusone?limit=1")["bursts"]] == bursts[:1]
    assert [key(b) for b in p.api("/api/nplusone?limit=2")["bursts"]] == bursts

    holders = [psycopg.connect(p.dsn(pg.superuser, application_name=f"holder-{i}")) for i in (1, 2)]
    try:
        for i, h in enumerate(holders, start=1):
            h.execute("select * from set_orders where id = %s for update", (i,))
        wait_for(lambda: len(p.api("/api/locks")["locks"]) == 2, what="two lock reports")
        locks = [key(lk) for lk in p.api("/api/locks")["locks"]]
        assert {lk[0] for lk in locks} == {"holder-1", "holder-2"}
        assert [key(lk) for lk in p.api("/api/locks?limit=1")["locks"]] == locks[:1]
        assert [key(lk) for lk in p.api("/api/locks?limit=2")["locks"]] == locks
    finally:
        for h in holders:
            h.close()
