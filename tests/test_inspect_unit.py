"""Inspection and export units, no server: fingerprints, statistics, the _other fold, the HTTP server."""

from __future__ import annotations

import asyncio
import random
import statistics
import subprocess
from types import SimpleNamespace

import pytest
from pglast import parser as pg_parser

from proxy.export.api import build_routes
from proxy.export.http import ExportServer
from proxy.export.metrics import build_registry, query_label
from proxy.inspect.events import ClientInfo, StatementEvent
from proxy.inspect.fingerprint import Fingerprinter
from proxy.inspect.inspector import Inspector
from proxy.inspect.pipeline import EventSink
from proxy.inspect.stats import StatsTable
from tests.support.tools import find, in_ci

CLIENT = ClientInfo(1, "db", "alice", "app", "127.0.0.1:5000")


def settings(**kw):
    base = dict(enabled=True, queue_size=100, flush_interval_ms=10, slow_query_ms=500.0, max_fingerprints=5000,
                export_top_k=100, query_label_max=200, log_parameters=False, slow_log_rate=10.0,
                fingerprint_cache_size=100)
    base.update(kw)
    return SimpleNamespace(**base)


def event(query, start=0.0, dur=0.001, rows=1, sqlstate=None, index=0, bind=None):
    return StatementEvent(CLIENT, query, index, bind is not None, "", bind, 42, start, start + dur, 0.0,
                          "SELECT", rows, sqlstate, False)


class FakeLog:
    def __init__(self):
        self.events = []

    def warning(self, event, **kw):
        self.events.append((event, kw))

    error = info = warning


def test_fingerprints_match_pglast_and_ignore_constants():
    f = Fingerprinter(10)
    a = f.lookup("SELECT * FROM t WHERE id = 1")
    b = f.lookup("select * from t where id=2")
    assert a.fingerprint == b.fingerprint == pg_parser.fingerprint("SELECT * FROM t WHERE id = 1")
    assert a.normalized == "SELECT * FROM t WHERE id = $1" and a.parse_ok and a.command == "SELECT"
    assert f.lookup("select * from u where id = 1").fingerprint != a.fingerprint
    assert f.lookup("WITH x AS (SELECT 1) DELETE FROM t").command == "DELETE"
    assert f.lookup("begin").command == "OTHER"


def test_unparseable_sql_gets_a_stable_id():
    f = Fingerprinter(10)
    a = f.lookup("selec  broken   thing")
    b = Fingerprinter(10).lookup("selec broken thing")
    assert not a.parse_ok and a.fingerprint == b.fingerprint and len(a.fingerprint) == 16


def test_multi_statement_split_and_bounded_cache():
    f = Fingerprinter(5)
    q = "select 1; insert into t values (1); update t set x = 2"
    assert [f.lookup(q, i).command for i in range(3)] == ["SELECT", "INSERT", "UPDATE"]
    for i in range(50):
        f.lookup(f"select {i} from t{i}")
    assert len(f) <= 5


def test_stats_are_exact():
    t = StatsTable(100, slow_query_ms=10)
    durs = [random.uniform(0.0001, 0.02) for _ in range(137)]
    for i, d in enumerate(durs):
        t.record("fp", "q", "SELECT", "db", "u", d, i % 3, "22012" if i % 10 == 0 else None, float(i))
    st = t.entries[("fp", "db", "u")]
    assert st.calls == 137 and st.rows == sum(i % 3 for i in range(137))
    assert st.errors == 14 and st.errors_by_class == {"22": 14}
    assert st.slow == sum(d > 0.01 for d in durs)
    assert st.total == pytest.approx(sum(durs))
    assert st.min == min(durs) and st.max == max(durs)
    assert st.stddev == pytest.approx(statistics.pstdev(durs))
    assert (st.first_seen, st.last_seen) == (0.0, 136.0)


def test_eviction_keeps_the_costliest():
    t = StatsTable(10)
    for i in range(100):
        t.record(f"fp{i}", "q", "SELECT", "db", "u", i / 1000, 0, None, 0.0)
    assert len(t) <= 11 and t.evictions >= 89
    assert ("fp99", "db", "u") in t.entries and ("fp0", "db", "u") not in t.entries


def test_exported_counters_never_decrease():
    """Whatever moves between its own series and _other, no exported number goes down."""
    rnd = random.Random(7)
    t = StatsTable(20)
    last: dict[tuple, float] = {}
    for _ in range(60):
        for _ in range(50):
            i = int(rnd.paretovariate(1.2)) % 40
            t.record(f"fp{i}", "q", "SELECT", "db", "u", rnd.random() / 100, 1, None, 0.0)
        top, other = t.exported(5)
        assert len(top) <= 5
        now = {("own", st.fingerprint): st.calls - base.calls for st, base in top}
        now.update({("other", k): o.calls for k, o in other.items()})
        for k, v in now.items():
            if k in last and k[0] == "other":
                assert v >= last[k], k
        # a series that stays present never decreases
        for k, v in now.items():
            if k in last:
                assert v >= last[k], k
        assert sum(now.values()) == sum(s.calls for s in t.entries.values()) + sum(
            e.calls for e in t.evicted.values())
        last = now


def test_slow_log_rate_limit_and_no_parameters():
    log = FakeLog()
    insp = Inspector(settings(slow_query_ms=1.0, slow_log_rate=2.0), EventSink(), logger=log)
    bind = b"\0\0" + b"\0\0" + b"\0\x01" + b"\0\0\0\x06secret" + b"\0\0"
    insp.process([event("select pg_sleep(1)", dur=0.5, bind=bind) for _ in range(10)], now=100.0)
    slow = [kw for e, kw in log.events if e == "slow_statement"]
    assert len(slow) == 2 and insp.slow_logs_suppressed == 8
    assert all("parameters" not in kw for kw in slow)
    insp.process([event("select pg_sleep(1)", dur=0.5, bind=bind)], now=110.0)
    last = [kw for e, kw in log.events if e == "slow_statement"][-1]
    assert last["suppressed"] == 8
    insp2 = Inspector(settings(slow_query_ms=1.0, log_parameters=True), EventSink(), logger=log)
    insp2.process([event("select $1", dur=0.5, bind=bind)], now=1.0)
    assert [kw for e, kw in log.events if e == "slow_statement"][-1]["parameters"] == ["secret"]


def test_query_label():
    assert query_label("select\n  1,\t2", 200) == "select 1, 2"
    assert len(query_label("x" * 500, 200)) == 200


def test_http_server_and_promtool():
    insp = Inspector(settings(), EventSink())
    insp.process([event("select 1", dur=0.002), event("select * from t where a = 'x\"y'", dur=0.003, sqlstate="42P01")],
                 now=1.0)
    registry = build_registry(insp, client_counts=lambda: {"active": 1, "idle": 2},
                              server_counts=lambda: {("db", "alice"): {"active": 1, "idle": 0}},
                              waiting_clients=lambda: 0, pool_wait_hist=lambda: insp.stats.command_hists[("db", "SELECT")])
    state = {"ready": True}

    async def ready():
        return state["ready"]

    async def main():
        srv = ExportServer("127.0.0.1", 0, build_routes(insp, registry, ready))
        await srv.start()
        port = srv.port

        async def get(raw: bytes) -> bytes:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(raw)
            await w.drain()
            data = await asyncio.wait_for(r.read(), 15)
            w.close()
            return data

        out = {}
        out["metrics"] = await get(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        out["health"] = await get(b"GET /healthz HTTP/1.1\r\n\r\n")
        out["ready"] = await get(b"GET /readyz HTTP/1.1\r\n\r\n")
        state["ready"] = False
        out["notready"] = await get(b"GET /readyz HTTP/1.1\r\n\r\n")
        out["api"] = await get(b"GET /api/statements?order=calls&limit=1 HTTP/1.1\r\n\r\n")
        out["bad"] = await get(b"GET /api/statements?order=nope HTTP/1.1\r\n\r\n")
        out["post"] = await get(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        out["garbage"] = await get(b"\x00\x01garbage\r\n\r\n")
        out["huge"] = await get(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
        out["after"] = await get(b"GET /healthz HTTP/1.1\r\n\r\n")
        await srv.close()
        return out

    out = asyncio.run(main())
    assert out["metrics"].startswith(b"HTTP/1.1 200") and b"Content-Type: text/plain; version=" in out["metrics"]
    assert out["health"].startswith(b"HTTP/1.1 200") and out["ready"].startswith(b"HTTP/1.1 200")
    assert out["notready"].startswith(b"HTTP/1.1 503")
    assert out["api"].startswith(b"HTTP/1.1 200") and b'"statements":[{' in out["api"]
    assert out["bad"].startswith(b"HTTP/1.1 400")
    assert out["post"].startswith(b"HTTP/1.1 405")
    assert out["garbage"].startswith(b"HTTP/1.1 400")
    assert out["huge"].startswith(b"HTTP/1.1 431")
    assert out["after"].startswith(b"HTTP/1.1 200")
    body = out["metrics"].split(b"\r\n\r\n", 1)[1].decode()
    promtool = find("promtool")
    if promtool is None:
        if in_ci():
            pytest.fail("promtool is required in CI")
        return
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def test_shape_caches_never_mix_fingerprints():
    """Texts that differ only in literal values share an entry; names and parameters never do."""
    import random as _r

    rnd = _r.Random(3)
    f = Fingerprinter(10000)
    templates = ["select * from t{a} where id = {n}", "select * from t1 where id = ${a}",
                 "select c{a} from t where x = {n} limit {n}", "select * from t where x = {n}.5e{a}",
                 "select $${n}$$ from t{a}", "select * from t where s = 'v{n}' and id = {a}",
                 "select x from t where x in ({n}, {n}) -- note {n}"]
    for _ in range(3000):
        q = rnd.choice(templates).format(a=rnd.randint(1, 3), n=rnd.randint(0, 10**6))
        assert f.lookup(q).fingerprint == pg_parser.fingerprint(q), q
    assert f.shape_hits > 1000
