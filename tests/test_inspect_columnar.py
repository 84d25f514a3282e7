"""The inspector's columnar path gives what the per-record path gives, on random streams.

``Inspector.process`` handles runs of statement records with C-level passes and
per-group updates; ``Inspector.process_each`` is the one-record-at-a-time
reference.  Fed the same records (in random slices), both must leave the same
statistics, histograms, N+1 state and bursts, and feed every consumer the same
records in the same order (a consumer with ``feed_batch``, the N+1 detector, gets
a slice's statements first and its other records after: its state must still
come out the same, since a client's disconnect follows its statements).
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
from hypothesis import given, settings as hsettings, strategies as hs

from proxy.protocol.records import ClientEvent, ClientInfo, StatementEvent, TransactionEvent
from proxy.inspect.consumer import Consumer
from proxy.inspect.inspector import Inspector
from proxy.inspect.nplusone import NPlusOneDetector
from proxy.inspect.pipeline import EventSink


def inspect_settings():
    return SimpleNamespace(enabled=True, queue_size=100, flush_interval_ms=10, slow_query_ms=20.0,
                           max_fingerprints=5000, export_top_k=100, query_label_max=200, log_parameters=False,
                           slow_log_rate=1000.0, fingerprint_cache_size=1000, nplusone_threshold=4,
                           nplusone_window_ms=50.0, nplusone_min_total_ms=1.0, nplusone_max_interleave=1,
                           nplusone_allow_fingerprints="", nplusone_allow_apps="", nplusone_keep=1000)


class Recorder(Consumer):
    def __init__(self, wants):
        self.wants = wants
        self.fed = []

    def feed(self, ev, info, now):
        self.fed.append((type(ev).__name__, ev, None if info is None else info.fingerprint))


CLIENTS = [ClientInfo(i, "db", "alice" if i % 3 else "bob", f"app{i}", f"10.0.0.{i}:5000") for i in range(4)]
TEXTS = ["SELECT * FROM orders WHERE id = {n}", "select * from orders where id={n}", "SELECT name FROM users",
         "UPDATE orders SET n = {n} WHERE id = $1", "SELECT * FROM items WHERE order_id = $1", "BEGIN",
         "COMMIT", "SELECT '{n}'::text", "SELECT 1; SELECT {n}", "not sql at all {n}"]


def make_stream(seed: int, n: int) -> list:
    rnd = random.Random(seed)
    t = 100.0
    out = []
    clients = list(CLIENTS)
    next_id = [100]
    for _ in range(n):
        c = rnd.choice(clients)
        r = rnd.random()
        t += rnd.choice((0.0001, 0.001, 0.01, 0.2))
        if r < 0.05:
            out.append(TransactionEvent(c, rnd.choice("ITE"), t, 7))
            continue
        if r < 0.07:  # a disconnect ends that client: its slot gets a new one (ids are never reused)
            connected = rnd.random() < 0.5
            out.append(ClientEvent(c, connected, t))
            if not connected:
                fresh = ClientInfo(next_id[0], c.db, c.user, c.application_name, c.client_addr)
                next_id[0] += 1
                clients[clients.index(c)] = fresh
            continue
        if r < 0.12:  # an ORM loop: a list query, then one SELECT per row (sometimes interleaved)
            for j in range(rnd.randint(0, 12)):
                text = "SELECT * FROM orders LIMIT 20" if j == 0 else rnd.choice(
                    ["SELECT * FROM items WHERE order_id = $1"] * 6 + ["SELECT name FROM users"])
                out.append(StatementEvent(c, text, 0, True, "", None, 7, t, t + 0.001, 0.0, "SELECT",
                                          20 if j == 0 else 1, None, False))
                t += 0.0015
            continue
        text = rnd.choice(TEXTS).format(n=rnd.randint(0, 99))
        index = rnd.randint(0, 1) if ";" in text else 0
        dur = rnd.choice((0.0001, 0.0004, 0.002, 0.05, 0.0, 1.5))
        state = rnd.choice((None,) * 8 + ("23505", "57014"))
        out.append(StatementEvent(c, text, index, "$1" in text, "", None, 7, t, t + dur, 0.0, "SELECT",
                                  rnd.choice((0, 1, 20)), state, rnd.random() < 0.3))
        t += dur
    return out


def run(events, columnar: bool, seed: int):
    s = inspect_settings()
    insp = Inspector(s, EventSink())
    insp.wall_offset = 0.0  # both paths convert times alike
    recs = [Recorder("slow"), Recorder("in_transaction")]
    nplus = NPlusOneDetector(s)
    nplus.wall_offset = 0.0
    insp.add_consumer(recs[0])
    insp.add_consumer(nplus)
    insp.add_consumer(recs[1])
    all_rec = Recorder("all")
    insp.add_consumer(all_rec)
    rnd = random.Random(seed)
    i = 0
    while i < len(events):
        k = rnd.randint(1, 40)
        (insp.process if columnar else insp.process_each)(events[i:i + k], 1000.0)
        i += k
    return insp, nplus, recs + [all_rec]


def snapshot_stats(insp):
    out = {}
    for key, st in insp.stats.entries.items():
        out[key] = dict(calls=st.calls, rows=st.rows, errors=st.errors, by_class=dict(st.errors_by_class),
                        slow=st.slow, min=st.min, max=st.max, total=st.total, stddev=st.stddev,
                        first=st.first_seen, last=st.last_seen, query=st.query)
    hists = {k: (list(h.counts), h.count, h.sum) for k, h in insp.stats.command_hists.items()}
    return out, hists


def snapshot_nplusone(nplus):
    runs = {cid: {fp: (r.count, r.last_end, r.parent, r.others, r.burst is not None) for fp, r in st.runs.items()}
            for cid, st in nplus.clients.items()}
    last = {cid: (st.last_info and st.last_info.fingerprint, st.last_ev) for cid, st in nplus.clients.items()}
    return runs, last, list(nplus.bursts), dict(nplus.bursts_by_fp), dict(nplus.statements_by_fp)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@hsettings(max_examples=80, deadline=None)
@given(hs.integers(0, 10**6), hs.integers(1, 400))
def test_columnar_path_matches_the_per_record_path(seed, n):
    events = make_stream(seed, n)
    a, na, ra = run(events, True, seed)
    b, nb, rb = run(events, False, seed)
    sa, ha = snapshot_stats(a)
    sb, hb = snapshot_stats(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        x, y = sa[key], sb[key]
        for f in ("calls", "rows", "errors", "by_class", "slow", "min", "max", "first", "last", "query"):
            assert x[f] == y[f], (key, f, x[f], y[f])
        assert close(x["total"], y["total"]) and close(x["stddev"], y["stddev"]), (key, x, y)
    assert ha.keys() == hb.keys()
    for k in ha:
        assert ha[k][0] == hb[k][0] and ha[k][1] == hb[k][1] and close(ha[k][2], hb[k][2])
    assert snapshot_nplusone(na) == snapshot_nplusone(nb)
    for x, y in zip(ra, rb):
        assert [(t, id(e), fp) for t, e, fp in x.fed] == [(t, id(e), fp) for t, e, fp in y.fed], x.wants
    assert a.events_processed == b.events_processed == len(events)
    assert a.slow_logs_suppressed == b.slow_logs_suppressed


def test_a_steady_stream_is_one_group_per_client_and_exact():
    """pgbench-like: one statement class, ten clients, different literals: counts are exact."""
    s = inspect_settings()
    insp = Inspector(s, EventSink())
    insp.add_consumer(NPlusOneDetector(s))
    clients = [ClientInfo(i, "bench", "u", "pgbench", "x") for i in range(10)]
    events = [StatementEvent(clients[i % 10], f"SELECT abalance FROM pgbench_accounts WHERE aid = {i * 7919 % 100000};",
                             0, False, "", None, 1, i * 0.001, i * 0.001 + 0.0005, 0.0, "SELECT", 1, None, False)
              for i in range(1370)]
    for i in range(0, len(events), 256):
        insp.process(events[i:i + 256], 2.0)
    (st,) = insp.stats.entries.values()
    assert st.calls == 1370 and st.rows == 1370 and st.errors == 0
    assert st.total == pytest.approx(1370 * 0.0005) and st.stddev == pytest.approx(0.0, abs=1e-12)
    assert insp.fingerprinter.misses == 1
