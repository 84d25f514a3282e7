"""Inspection units, no server: fingerprints, statistics, eviction and the _other fold, the
inspector's pipeline and its slow-statement logs."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from types import SimpleNamespace

import pytest
import structlog
from pglast import parser as pg_parser

from proxy.protocol.records import ClientEvent, ClientInfo, StatementEvent, TransactionEvent
from proxy.inspect.consumer import Consumer
from proxy.inspect.fingerprint import Fingerprinter, StatementInfo
from proxy.inspect.inspector import Inspector
from proxy.inspect.pipeline import EventSink
from proxy.inspect.stats import StatsTable

CLIENT = ClientInfo(1, "db", "alice", "app", "127.0.0.1:5000")
BOB = ClientInfo(2, "db", "bob", "batch", "127.0.0.1:5001")


def settings(**kw):
    base = dict(enabled=True, queue_size=100, flush_interval_ms=10, slow_query_ms=500.0, max_fingerprints=5000,
                export_top_k=100, query_label_max=200, log_parameters=False, slow_log_rate=10.0,
                fingerprint_cache_size=100)
    base.update(kw)
    return SimpleNamespace(**base)


def event(query, start=0.0, dur=0.001, rows=1, sqlstate=None, index=0, bind=None, client=CLIENT, tx=False):
    return StatementEvent(client, query, index, bind is not None, "", bind, 42, start, start + dur, 0.0,
                          "SELECT", rows, sqlstate, tx)


def info(fp, command="SELECT"):
    return StatementInfo(fp, f"q {fp}", command, command, True, f"q {fp}")


def bind_body(*values: bytes) -> bytes:
    """A Bind message body: unnamed portal and statement, text format, these values."""
    out = b"\0\0" + b"\0\0" + len(values).to_bytes(2, "big")
    for v in values:
        out += len(v).to_bytes(4, "big") + v
    return out + b"\0\0"


class FakeLog:
    def __init__(self):
        self.events = []

    def warning(self, event, **kw):
        self.events.append((event, kw))

    error = info = warning

    def named(self, name):
        return [kw for e, kw in self.events if e == name]


# ------------------------------------------------------------------ fingerprints


def test_fingerprints_match_pglast_and_ignore_constants():
    f = Fingerprinter(10)
    a = f.lookup("SELECT * FROM t WHERE id = 1")
    b = f.lookup("SELECT * FROM t WHERE id = 2")
    c = f.lookup("select * from t where id=3")
    assert a.fingerprint == b.fingerprint == c.fingerprint == pg_parser.fingerprint("SELECT * FROM t WHERE id = 1")
    assert len(a.fingerprint) == 16 and int(a.fingerprint, 16) >= 0
    assert a.normalized == pg_parser.normalize("SELECT * FROM t WHERE id = 1") == "SELECT * FROM t WHERE id = $1"
    assert a.parse_ok and a.command == "SELECT" and a.first_keyword == "SELECT"
    assert a.text == "SELECT * FROM t WHERE id = 1"
    assert f.lookup("SELECT * FROM u WHERE id = 1").fingerprint != a.fingerprint
    assert f.lookup("WITH x AS (SELECT 1) DELETE FROM t").command == "DELETE"
    assert f.lookup("with x as (delete from t returning *) select last_updated from x").command == "SELECT"
    assert f.lookup("WITH RECURSIVE x(a) AS (SELECT 1) UPDATE t SET a = 'select'").command == "UPDATE"
    assert f.lookup("  /* c */ (select 1)").command == "SELECT"
    assert f.lookup("insert into t values (1)").command == "INSERT"
    assert f.lookup("UPDATE t SET a = 1").command == "UPDATE"
    assert f.lookup("begin").command == "OTHER" and f.lookup("begin").first_keyword == "BEGIN"


def test_a_repeated_text_costs_a_lookup():
    f = Fingerprinter(10)
    q = "select * from t where id = $1"
    first = f.lookup(q)
    misses = f.misses
    assert f.lookup(q) is first and f.misses == misses


def test_unparseable_sql_gets_a_stable_id_and_never_raises():
    f = Fingerprinter(10)
    a = f.lookup("selec  broken   thing where pw = 'hunter2'")
    b = Fingerprinter(10).lookup("selec broken\n thing where pw = 'hunter2'")
    assert not a.parse_ok and a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    int(a.fingerprint, 16)
    assert "hunter2" not in a.normalized  # literal values masked in the display text
    assert a.normalized == "selec broken thing where pw = $1"
    # what the lexer finds, a regex would not: dollar quotes, E'' strings, bit strings; a truncated
    # text (pg_stat_activity.query is cut at track_activity_query_size) loses its unreadable tail
    for text in ("selec x where a = $$hunter2$$ and b = E'hunter2\\n' and c = B'101'",
                 "update t set pw = 'hunter2', note = 'hunter2 and more text cut he"):
        got = f.lookup(text)
        assert not got.parse_ok and "hunter2" not in got.normalized and "101" not in got.normalized, got
    assert a.command == "OTHER"
    for junk in ("", ";", "))))", "select 'unterminated", "\ufffd\ufffd", "select " * 10000):
        got = f.lookup(junk)
        assert isinstance(got.fingerprint, str) and len(got.fingerprint) == 16


def test_multi_statement_split():
    f = Fingerprinter(50)
    q = "select 1; insert into t values (1); update t set x = 2"
    infos = [f.lookup(q, i) for i in range(3)]
    assert [i.command for i in infos] == ["SELECT", "INSERT", "UPDATE"]
    assert [i.text for i in infos] == ["select 1", "insert into t values (1)", "update t set x = 2"]
    assert infos[1].fingerprint == pg_parser.fingerprint("insert into t values (1)")
    assert f.lookup(q, 1) is infos[1]
    assert len(f._splits) == 1  # split once per text
    # index 0 of a multi-statement text is its first statement, not the whole text
    assert f.lookup(q).fingerprint == pg_parser.fingerprint("select 1")
    # an index past the end does not raise
    assert f.lookup(q, 7).fingerprint


def test_cache_is_bounded():
    f = Fingerprinter(5)
    for i in range(50):
        f.lookup(f"select {i} from t{i}")
        f.lookup(f"select 1 from t{i}; select 2", 1)
    assert len(f) <= 5 and len(f._splits) <= 5


def test_literal_shapes_never_merge_different_fingerprints():
    """Statements equal but for a token the regex takes for a literal: each keeps its own fingerprint."""
    pairs = [
        ('select "1" from t', 'select "2" from t'),  # quoted identifiers
        ("fetch 5 from c", "fetch 10 from c"),  # a count the fingerprint keeps
        ("notify ch, 'a'", "notify ch, 'b'"),  # a payload the fingerprint keeps
        ("select E'\\'' , a from t where b = 'z'", "select E'\\'' , c from t where b = 'z'"),
        ("select a -- it's\n, b from t where c = 'x'", "select a -- it's\n, d from t where c = 'x'"),
        ("select $$it's$$, a, 'x'", "select $$it's$$, b, 'x'"),
    ]
    for a, b in pairs:
        f = Fingerprinter(100)
        f.lookup(a)
        assert f.lookup(b).fingerprint == pg_parser.fingerprint(b), b
    # a shape can never be taken for a real text
    f = Fingerprinter(100)
    f.lookup("select * from t where d ? 'k'")
    got = f.lookup("select * from t where d ? ?")
    assert not got.parse_ok


def test_literal_shapes_hit_and_agree_with_pglast():
    rnd = random.Random(3)
    f = Fingerprinter(10000)
    templates = ["select * from t{a} where id = {n}", "select * from t1 where id = ${a}",
                 "select c{a} from t where x = {n} limit {n}", "select * from t where x = {n}.5e{a}",
                 "select $${n}$$ from t{a}", "select * from t where s = 'v{n}' and id = {a}",
                 "select x from t where x in ({n}, {n}) -- note {n}", 'select "c{a}" from t where x = {n}',
                 "/* app='x{a}' */ select * from t where id = {n}", "fetch {n} from c{a}",
                 "select * from t order by {a} limit {n};"]
    for _ in range(3000):
        q = rnd.choice(templates).format(a=rnd.randint(1, 3), n=rnd.randint(0, 10**6))
        assert f.lookup(q).fingerprint == pg_parser.fingerprint(q), q
    assert f.shape_hits > 1000


# ------------------------------------------------------------------ statistics


def test_stats_are_exact():
    t = StatsTable(100, slow_query_ms=10)
    durs = [random.uniform(0.0001, 0.02) for _ in range(137)]
    for i, d in enumerate(durs):
        t.record(info("fp"), "db", "u", d, i % 3, "22012" if i % 10 == 0 else None, 1000.0 + i)
    st = t.entries[("fp", "db", "u")]
    assert st.calls == 137 and st.rows == sum(i % 3 for i in range(137))
    assert st.errors == 14 and st.errors_by_class == {"22": 14}
    assert st.slow == sum(d > 0.01 for d in durs)
    assert st.total == pytest.approx(sum(durs))
    assert st.min == min(durs) and st.max == max(durs)
    assert st.stddev == pytest.approx(statistics.pstdev(durs))
    assert (st.first_seen, st.last_seen) == (1000.0, 1136.0)
    d = st.as_dict()
    assert d["calls"] == 137 and d["mean_ms"] == pytest.approx(statistics.mean(durs) * 1000, abs=1e-3)
    assert d["stddev_ms"] == pytest.approx(statistics.pstdev(durs) * 1000, abs=1e-3)
    assert set(d) == {"fingerprint", "query", "db", "user", "calls", "total_ms", "mean_ms", "min_ms", "max_ms",
                      "stddev_ms", "rows", "errors", "errors_by_class", "slow", "first_seen", "last_seen", "lock_wait_ms"}
    # the (db, command) latency histogram saw every call
    h = t.command_hists[("db", "SELECT")]
    assert h.count == 137 and h.sum == pytest.approx(sum(durs))


def test_stats_keyed_by_fingerprint_db_and_user():
    t = StatsTable(100)
    t.record(info("fp"), "db", "alice", 0.1, 0, None, 0.0)
    t.record(info("fp"), "db", "bob", 0.1, 0, None, 0.0)
    t.record(info("fp"), "db2", "bob", 0.1, 0, None, 0.0)
    t.record(info("fp2", "UPDATE"), "db2", "bob", 0.1, 0, None, 0.0)
    assert len(t) == 4
    assert set(t.command_hists) == {("db", "SELECT"), ("db2", "SELECT"), ("db2", "UPDATE")}
    assert [s.fingerprint for s in t.top("calls", 2)] and len(t.top("calls", 2)) == 2


def test_eviction_keeps_the_costliest_and_counts():
    t = StatsTable(10)
    for i in range(100):
        t.record(info(f"fp{i}"), "db", "u", (i + 1) / 1000, 1, None, 0.0)
        assert len(t) <= 11  # the cap plus 10%, amortised
    assert t.evictions >= 89 and len(t) + t.evictions == 100
    assert ("fp99", "db", "u") in t.entries and ("fp0", "db", "u") not in t.entries
    kept = sorted(s.total for s in t)
    assert min(kept) > max((i + 1) / 1000 for i in range(100 - len(t) - 1))
    ev = t.evicted[("db", "u")]
    assert ev.calls == t.evictions and ev.rows == t.evictions


def test_other_fold_with_top_k_2():
    t = StatsTable(100)
    for i, total in enumerate([5.0, 4.0, 1.0, 0.5, 0.25]):
        t.record(info(f"fp{i}"), "db", "u", total, 2, "40001" if i == 4 else None, 0.0)
    t.record(info("fpx"), "db", "bob", 0.1, 7, None, 0.0)
    top, other = t.exported(2)
    assert sorted(st.fingerprint for st, _ in top) == ["fp0", "fp1"]
    assert all(base.calls == 0 for _, base in top)
    o = other[("db", "u")]
    assert (o.calls, o.rows, o.errors) == (3, 6, 1) and o.total == pytest.approx(1.75)
    assert other[("db", "bob")].rows == 7


def test_counters_never_decrease_across_eviction():
    t = StatsTable(4)
    seen: dict[tuple, tuple] = {}

    def scrape():
        top, other = t.exported(2)
        now = {(st.fingerprint, st.db, st.user): (st.calls - b.calls, st.total - b.total) for st, b in top}
        now.update({("_other",) + k: (o.calls, o.total) for k, o in other.items()})
        for k, (calls, total) in now.items():
            if k in seen:
                assert calls >= seen[k][0] and total >= seen[k][1] - 1e-9, k
        seen.update(now)
        exported_calls = sum(c for c, _ in now.values())
        assert exported_calls == sum(s.calls for s in t) + sum(e.calls for e in t.evicted.values())
        return now

    for i in range(4):
        t.record(info(f"fp{i}"), "db", "u", 1.0 + i, 0, None, 0.0)
    first = scrape()
    assert ("_other", "db", "u") in first
    # new, costlier statements push the old ones (exported ones too) out of the table
    for i in range(4, 12):
        t.record(info(f"fp{i}"), "db", "u", 10.0 + i, 0, None, 0.0)
        scrape()
    assert t.evictions >= 8
    last = scrape()
    assert last[("_other", "db", "u")][0] >= first[("_other", "db", "u")][0]


def test_exported_respects_a_lowered_top_k():
    t = StatsTable(100)
    for i in range(10):
        t.record(info(f"fp{i}"), "db", "u", 1.0 + i, 0, None, 0.0)
    assert len(t.exported(5)[0]) == 5
    top, other = t.exported(2)
    assert len(top) == 2 and other[("db", "u")].calls == 8
    assert t.exported(0)[0] == []


def test_random_workload_never_decreases_an_exported_series():
    rnd = random.Random(7)
    t = StatsTable(20)
    last: dict[tuple, float] = {}
    for _ in range(60):
        for _ in range(50):
            i = int(rnd.paretovariate(1.2)) % 40
            t.record(info(f"fp{i}"), "db", rnd.choice("uv"), rnd.random() / 100, 1, None, 0.0)
        top, other = t.exported(5)
        assert len(top) <= 5
        now = {("own", st.fingerprint, st.user): st.calls - base.calls for st, base in top}
        now.update({("other",) + k: o.calls for k, o in other.items()})
        for k, v in now.items():
            if k in last:
                assert v >= last[k], k
        assert sum(now.values()) == sum(s.calls for s in t) + sum(e.calls for e in t.evicted.values())
        last = now


# ------------------------------------------------------------------ the inspector


class Recorder(Consumer):
    def __init__(self):
        self.fed = []
        self.ticks = []

    def feed(self, ev, info, now):
        self.fed.append((type(ev).__name__, info.fingerprint if info is not None else None, now))

    def tick(self, now):
        self.ticks.append(now)


def test_inspector_process_counts_converts_time_and_feeds_consumers():
    insp = Inspector(settings(), EventSink())
    rec = Recorder()
    insp.add_consumer(rec)
    t0 = time.monotonic()
    events = [ClientEvent(CLIENT, True, t0),
              event("select * from t where id = 1", start=t0, dur=0.002, rows=1),
              event("select * from t where id = 2", start=t0 + 1, dur=0.004, rows=1),
              event("select * from t where id = 3", start=t0 + 2, dur=0.005, sqlstate="57014", client=BOB),
              TransactionEvent(CLIENT, "T", t0 + 3, 42)]
    insp.process(events, now=t0 + 4)
    assert insp.events_processed == 5
    fp = pg_parser.fingerprint("select * from t where id = 1")
    assert rec.fed == [("ClientEvent", None, t0 + 4), ("StatementEvent", fp, t0 + 4),
                       ("StatementEvent", fp, t0 + 4), ("StatementEvent", fp, t0 + 4),
                       ("TransactionEvent", None, t0 + 4)]
    rows = insp.statements("calls", 10)
    alice = next(r for r in rows if r["user"] == "alice")
    assert alice["calls"] == 2 and alice["total_ms"] == pytest.approx(6.0)
    assert alice["first_seen"] == pytest.approx(time.time() + 0.002, abs=1.0)
    assert alice["last_seen"] - alice["first_seen"] == pytest.approx(1.002, abs=0.01)
    bob = next(r for r in rows if r["user"] == "bob")
    assert bob["errors"] == 1 and bob["errors_by_class"] == {"57": 1} and bob["query"] == "select * from t where id = $1"
    assert [r["user"] for r in insp.statements("total_time", 1)] == ["alice"]
    assert [r["user"] for r in insp.statements("mean_time", 1)] == ["bob"]
    with pytest.raises(ValueError):
        insp.statements("nope")


def test_inspector_survives_bad_records_and_consumers():
    log = FakeLog()
    insp = Inspector(settings(), EventSink(), logger=log)

    class Broken(Consumer):
        def feed(self, ev, info, now):
            raise RuntimeError("boom")

    insp.add_consumer(Broken())
    bad = event(None)  # a query that is not a str
    insp.process([bad, event("select 1"), event("select 2")], now=1.0)
    assert insp.events_processed == 3 and len(insp.stats) == 1
    assert insp.stats.entries[(pg_parser.fingerprint("select 1"), "db", "alice")].calls == 2
    assert len(log.named("inspect_error")) == 1 and len(log.named("inspect_consumer_error")) == 1


def test_run_loop_drains_ticks_and_survives_exceptions():
    sink = EventSink()
    log = FakeLog()
    insp = Inspector(settings(flush_interval_ms=5), sink, logger=log)
    rec = Recorder()
    insp.add_consumer(rec)
    real_process = insp.process
    calls = {"n": 0}

    def flaky(events, now):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("first batch fails")
        real_process(events, now)

    insp.process = flaky  # type: ignore[method-assign]

    async def main():
        sink.emit(event("select 0"))  # the first batch (this record) fails
        task = asyncio.create_task(insp.run())
        await asyncio.sleep(0.05)
        sink.emit(event("select 1"))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if insp.events_processed:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert insp.events_processed == 1 and len(sink) == 0
    assert len(rec.ticks) >= 2 and log.named("inspect_error")


def test_reconfigure_applies_limits():
    insp = Inspector(settings(max_fingerprints=100), EventSink())
    # (relation names without trailing digits: pg_query folds "t10", "t11" ... together, like partitions)
    names = [f"t_{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(50)]
    insp.process([event(f"select * from {n}", dur=0.001 * (i + 1)) for i, n in enumerate(names)], now=1.0)
    assert len(insp.stats) == 50
    insp.reconfigure(settings(max_fingerprints=10, slow_query_ms=1.0, fingerprint_cache_size=7))
    assert len(insp.stats) == 10 and insp.stats.evictions == 40
    assert insp.stats.slow_s == 0.001 and insp.fingerprinter.cache_size == 7


# ------------------------------------------------------------------ slow-statement logs


def test_slow_log_rate_limit_and_no_parameters_by_default():
    log = FakeLog()
    insp = Inspector(settings(slow_query_ms=1.0, slow_log_rate=2.0), EventSink(), logger=log)
    bind = bind_body(b"secret")
    insp.process([event("select * from t where pw = $1", dur=0.5, bind=bind) for _ in range(10)], now=100.0)
    slow = log.named("slow_statement")
    assert len(slow) == 2 and insp.slow_logs_suppressed == 8
    first = slow[0]
    assert first["fingerprint"] == pg_parser.fingerprint("select * from t where pw = $1")
    assert first["ms"] == 500.0 and first["db"] == "db" and first["user"] == "alice"
    assert first["application_name"] == "app" and "suppressed" not in first
    assert all("parameters" not in kw and "secret" not in repr(kw) for kw in slow)
    # fast statements are not logged
    insp.process([event("select 1", dur=0.0001)], now=100.5)
    assert len(log.named("slow_statement")) == 2
    # tokens refill at slow_log_rate per second; the next event reports what was left out
    insp.process([event("select * from t where pw = $1", dur=0.5, bind=bind)], now=110.0)
    last = log.named("slow_statement")[-1]
    assert last["suppressed"] == 8
    insp.process([event("select * from t where pw = $1", dur=0.5, bind=bind)], now=120.0)
    assert "suppressed" not in log.named("slow_statement")[-1]


def test_slow_log_parameters_only_when_enabled():
    log = FakeLog()
    insp = Inspector(settings(slow_query_ms=1.0, log_parameters=True), EventSink(), logger=log)
    insp.process([event("select $1, $2", dur=0.5, bind=bind_body(b"secret", b"x"))], now=1.0)
    assert log.named("slow_statement")[-1]["parameters"] == ["secret", "x"]
    insp.process([event("select $1", dur=0.5, bind=b"\0garbage")], now=2.0)  # undecodable: no exception
    assert log.named("slow_statement")[-1]["parameters"] == ["<undecodable>"]


def test_slow_log_through_structlog_hides_parameters():
    """Through structlog itself: one event with the fields, no parameter values."""
    from structlog.testing import capture_logs

    with capture_logs() as logs:  # restores the global structlog set-up afterwards
        insp = Inspector(settings(slow_query_ms=1.0), EventSink(), logger=structlog.get_logger())
        insp.process([event("select * from t where pw = $1", dur=0.75, bind=bind_body(b"hunter2"))], now=1.0)
    assert len(logs) == 1
    ev = logs[0]
    assert ev["event"] == "slow_statement" and ev["log_level"] == "warning" and ev["ms"] == 750.0
    assert ev["application_name"] == "app" and "hunter2" not in repr(ev)


def test_run_loop_processes_a_large_batch_in_chunks_between_loop_turns():
    """A big batch is processed a chunk at a time, the event loop running in between."""
    sink = EventSink()
    insp = Inspector(settings(flush_interval_ms=5), sink)
    sizes = []
    real_process = insp.process

    def spy(events, now):
        sizes.append(len(events))
        real_process(events, now)

    insp.process = spy  # type: ignore[method-assign]
    n = insp.chunk * 3 + 7
    for i in range(n):
        sink.emit(event("select 1", start=float(i)))
    turns = 0

    async def main():
        nonlocal turns
        task = asyncio.create_task(insp.run())
        while insp.events_processed < n:
            await asyncio.sleep(0)
            turns += 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert sizes[:4] == [insp.chunk] * 3 + [7]
    assert insp.stats.entries[(pg_parser.fingerprint("select 1"), "db", "alice")].calls == n
    assert turns >= 4  # the loop ran between chunks


def test_a_full_chunk_is_processed_on_the_next_loop_turn_without_waiting_for_the_flush():
    sink = EventSink()
    insp = Inspector(settings(flush_interval_ms=60000), sink)  # the periodic drain never comes

    async def main():
        task = asyncio.create_task(insp.run())
        await asyncio.sleep(0)
        for i in range(insp.chunk * 2 + 5):  # the relay emits, on the loop's thread
            sink.emit(event("select 1", start=float(i)))
        assert insp.events_processed == 0  # nothing runs on the relay's stack
        for _ in range(5):
            await asyncio.sleep(0)
        processed = insp.events_processed
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return processed

    assert asyncio.run(main()) == insp.chunk * 2  # two full chunks; the 5 left wait for the flush
    assert len(sink) == 5 and sink.on_batch is None  # the callback goes with the loop
