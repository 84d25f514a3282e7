"""N+1 and lock detectors as pure consumers: synthetic statement streams, no server."""

from __future__ import annotations

from types import SimpleNamespace

from proxy.protocol.records import ClientEvent, ClientInfo, StatementEvent, TransactionEvent
from proxy.inspect.fingerprint import Fingerprinter
from proxy.inspect.locks import LockTracker
from proxy.inspect.nplusone import NPlusOneDetector

C = ClientInfo(1, "db", "u", "app", "127.0.0.1:1")
FP = Fingerprinter(100)


def settings(**kw):
    base = dict(nplusone_threshold=5, nplusone_window_ms=1000.0, nplusone_min_total_ms=50.0,
                nplusone_max_interleave=2, nplusone_allow_fingerprints="", nplusone_allow_apps="",
                nplusone_keep=100, lock_hold_ms=1000.0, lock_sample_interval_ms=0.0, locks_keep=100)
    base.update(kw)
    return SimpleNamespace(**base)


class Stream:
    def __init__(self, consumer, client=C):
        self.c = consumer
        self.t = 0.0
        self.client = client

    def run(self, sql, dur=0.003, rows=1, gap=0.001, in_tx=False):
        start = self.t + gap
        ev = StatementEvent(self.client, sql, 0, False, "", None, 7, start, start + dur, 0.0, "SELECT", rows, None,
                            in_tx)
        self.t = start + dur
        self.c.feed(ev, FP.lookup(sql), self.t)

    def tx(self, status):
        self.c.feed(TransactionEvent(self.client, status, self.t, 7), None, self.t)


def test_loop_over_parent_rows_is_one_burst():
    d = NPlusOneDetector(settings())
    s = Stream(d)
    s.run("select * from books", rows=30)
    for i in range(30):
        s.run(f"select * from authors where id = {i}")
        if i % 3 == 0:
            s.run(f"select * from publishers where id = {i}")  # a related lookup inside the loop
    s.run("update stats set n = n + 1")
    s.run("update stats set n = n + 1")
    s.run("update stats set n = n + 1")
    bursts = d.as_list()
    assert len(bursts) == 1
    b = bursts[0]
    assert b["count"] == 30 and b["parent_query"] == "select * from books"
    assert b["total_ms"] >= 50 and b["span_ms"] > b["total_ms"]


def test_steady_repetition_without_a_parent_is_no_burst():
    d = NPlusOneDetector(settings())
    s = Stream(d)
    for i in range(500):  # pgbench -S
        s.run(f"select abalance from pgbench_accounts where aid = {i}")
    for i in range(100):  # pgbench TPC-B
        s.run(f"update pgbench_accounts set abalance = abalance + 1 where aid = {i}")
        s.run(f"select abalance from pgbench_accounts where aid = {i}")
        s.run(f"update pgbench_tellers set tbalance = tbalance + 1 where tid = {i}")
        s.run(f"update pgbench_branches set bbalance = bbalance + 1 where bid = {i}")
        s.run(f"insert into pgbench_history values ({i})")
    assert d.as_list() == []


def test_thresholds_and_allow_lists():
    for kw, client in (({"nplusone_min_total_ms": 500.0}, C),
                       ({"nplusone_allow_apps": "batch"}, ClientInfo(2, "db", "u", "batch", "x"))):
        d = NPlusOneDetector(settings(**kw))
        s = Stream(d, client)
        s.run("select * from books", rows=30)
        for i in range(30):
            s.run(f"select * from authors where id = {i}")
        assert d.as_list() == []
    d = NPlusOneDetector(settings())
    s = Stream(d)
    s.run("select * from books", rows=3)  # the parent returned fewer rows than the threshold
    for i in range(30):
        s.run(f"select * from authors where id = {i}")
    assert d.as_list() == []


def test_two_loops_are_two_bursts_and_disconnect_closes():
    d = NPlusOneDetector(settings())
    s = Stream(d)
    for _ in range(2):
        s.run("select * from books", rows=30)
        for i in range(10):
            s.run(f"select * from authors where id = {i}", dur=0.006)
        s.t += 5.0  # a pause longer than the window
    d.feed(ClientEvent(C, False, s.t), None, s.t)
    assert [b["count"] for b in d.as_list()] == [10, 10]
    assert all(not b["open"] for b in d.bursts)


def test_lock_hold_reported_then_final():
    lt = LockTracker(settings(), fingerprinter=FP)
    s = Stream(lt)
    s.run("begin")
    s.tx("T")
    s.run("select * from t where id = 1 for update", in_tx=True)
    lt.tick(s.t + 0.5)
    assert lt.as_list() == []
    lt.tick(s.t + 1.5)
    [r] = lt.as_list()
    assert r["held_ms"] >= 1500 and r["state"] == "idle in transaction" and "for update" in r["query"]
    s.t += 2.0
    s.run("commit", in_tx=True)
    s.tx("I")
    [r] = lt.as_list()
    assert r["state"] == "ended" and r["held_ms"] >= 2000
    assert lt.hold_hist.count == 1 and lt.holds_by_db == {"db": 1}


def test_blocker_chain_reported_once_under_its_root():
    lt = LockTracker(settings(), fingerprinter=FP, pid_to_client=lambda pid: None)
    rows = [
        ["10", "idle in transaction", "3.0", "{}", "root-app", "10.0.0.1", "5000", "select 1", "t"],
        ["11", "active", "2.0", "{10}", "w1", "10.0.0.2", "5001", "update t set a = 1 where id = 1", "t"],
        ["12", "active", "1.0", "{11}", "w2", "10.0.0.3", "5002", "update t set a = 2 where id = 1", None],
    ]
    lt.absorb(rows, 100.0)
    lt.absorb(rows, 101.0)
    reports = lt.as_list()
    assert len(reports) == 1
    r = reports[0]
    assert r["application_name"] == "root-app" and r["blocked"] == 2 and r["relations"] == ["t"]
    assert sorted(c["application_name"] for c in r["blocked_clients"]) == ["w1", "w2"]
    assert lt.blocked_now == 2


def test_blocker_query_from_the_server_is_stored_without_values():
    """pg_stat_activity.query carries the blocker's literals, and may be cut mid-string
    (track_activity_query_size): the report keeps a normalized text only."""
    lt = LockTracker(settings(), fingerprinter=Fingerprinter(100), pid_to_client=lambda pid: None)
    for i, query in enumerate(("update accounts set pin = 'SECRET-4711' where id = 424242",
                               "update accounts set pin = $q$SECRET-4711$q$, note = 'SECRET-4711 and then cut")):
        root = str(20 + i)
        lt.absorb([[root, "idle in transaction", "3.0", "{}", "root-app", "10.0.0.1", "5000", query, "accounts"],
                   [str(30 + i), "active", "2.0", "{%s}" % root, "w", "10.0.0.2", "5001", query, "accounts"]],
                  100.0 + i)
    reports = lt.as_list()
    assert len(reports) == 2 and all(r["query"].startswith("update accounts set pin = $1") for r in reports)
    text = repr(reports)
    assert "SECRET" not in text and "424242" not in text


def _chain_rows(holder_age: float, waiter_running: float | None = None, began: float = 1.7e9):
    """One holder (pid 10, its transaction begun at ``began``) and one waiter (pid 11); with the
    statements' ages and the transactions' starts when the waiter's statement age is given."""
    rows = [
        ["10", "idle in transaction", str(holder_age), "{}", "holder", "10.0.0.1", "5000",
         "select * from t where id = 1 for update", "t"],
        ["11", "active", str(holder_age / 2), "{10}", "waiter", "10.0.0.2", "5001",
         "update t set a = 1 where id = 1", "t"],
    ]
    if waiter_running is not None:
        rows[0] += ["0.0", str(began)]
        rows[1] += [str(waiter_running), str(began + holder_age / 2)]
    return rows


def test_short_hold_with_a_waiter_is_not_reported_but_counts_as_blocked():
    # seen in the field: a 216 ms hold logged (and counted) with a 500 ms threshold
    lt = LockTracker(settings(lock_hold_ms=500.0), fingerprinter=FP, pid_to_client=lambda pid: None)
    lt.absorb(_chain_rows(0.216, 0.1), 100.0)
    assert lt.as_list() == [] and lt.holds_by_db == {}
    assert lt.blocked_now == 1
    # the same transaction, still holding, past the threshold: reported once, with what was seen before
    lt.absorb(_chain_rows(0.716, 0.6), 100.5)
    lt.absorb(_chain_rows(1.216, 1.1), 101.0)
    [r] = lt.as_list()
    assert r["held_ms"] >= 1216 and r["blocked"] == 1 and r["relations"] == ["t"]
    assert [c["application_name"] for c in r["blocked_clients"]] == ["waiter"]
    lt.absorb([], 102.0)
    assert lt.blocked_now == 0


def test_a_long_wait_reports_the_hold():
    # the waiter has waited past the threshold behind a holder whose current transaction looks young
    lt = LockTracker(settings(lock_hold_ms=500.0), fingerprinter=FP, pid_to_client=lambda pid: None)
    lt.absorb(_chain_rows(0.2, 0.9), 100.0)
    [r] = lt.as_list()
    assert r["blocked"] == 1 and r["application_name"] == "holder"


def test_short_hold_of_a_proxy_client_waits_for_the_threshold():
    lt = LockTracker(settings(lock_hold_ms=500.0), fingerprinter=FP, pid_to_client=lambda pid: C if pid == 10 else None)
    s = Stream(lt)
    s.run("begin")
    s.tx("T")
    s.run("select * from t where id = 1 for update", in_tx=True)
    began = lt.txs[C.client_id].began
    lt.absorb(_chain_rows(0.216, 0.1), began + 0.216)
    lt.tick(began + 0.3)
    assert lt.as_list() == [] and lt.holds_by_db == {}
    assert lt.blocked_now == 1
    # tick reports it once the transaction passes lock_hold_ms, with the waiter the sample saw
    lt.tick(began + 0.6)
    [r] = lt.as_list()
    assert r["blocked"] == 1 and [c["application_name"] for c in r["blocked_clients"]] == ["waiter"]
    assert r["relations"] == ["t"] and "for update" in r["query"]
    assert lt.holds_by_db == {"db": 1}
    lt.absorb(_chain_rows(0.8, 0.7), began + 0.8)
    assert len(lt.as_list()) == 1 and lt.holds_by_db == {"db": 1}


def test_short_transaction_seen_blocking_then_ended_is_never_reported():
    lt = LockTracker(settings(lock_hold_ms=500.0), fingerprinter=FP, pid_to_client=lambda pid: C if pid == 10 else None)
    s = Stream(lt)
    s.run("begin")
    s.tx("T")
    s.run("update t set a = 2 where id = 1", in_tx=True)
    began = lt.txs[C.client_id].began
    lt.absorb(_chain_rows(0.216, 0.1), began + 0.216)
    s.t = began + 0.3
    s.run("commit", in_tx=True)
    s.tx("I")
    lt.tick(began + 2.0)
    assert lt.as_list() == [] and lt.holds_by_db == {}
    assert lt.hold_hist.count == 1  # the histogram still sees every lock-taking transaction


def test_a_blocker_is_told_apart_by_its_transaction_start():
    lt = LockTracker(settings(lock_hold_ms=500.0), fingerprinter=FP, pid_to_client=lambda pid: None)
    for i in range(5):  # one transaction over five samples: one report
        lt.absorb(_chain_rows(0.6 + i, 0.5 + i), 100.0 + i)
    assert len(lt.as_list()) == 1
    lt.absorb(_chain_rows(0.7, 0.6, began=1.7e9 + 6.0), 106.0)  # the same backend, its next transaction
    assert len(lt.as_list()) == 2


def test_a_statement_in_flight_is_not_idle_in_transaction():
    """Quiet on the stream past lock_hold_ms: idle only if the client has no statement still running."""
    busy: dict[int, float] = {}
    b1, b2, b3 = (ClientInfo(i, "db", "u", app, f"127.0.0.1:{i}")
                  for i, app in ((11, "busy"), (12, "idle"), (13, "locker")))
    lt = LockTracker(settings(lock_hold_ms=500.0), fingerprinter=FP,
                     pid_to_client=lambda pid: {21: b1, 23: b3}.get(pid), busy_since=busy.get)
    streams = {c.client_id: Stream(lt, client=c) for c in (b1, b2, b3)}
    for s in streams.values():
        s.run("begin")
        s.tx("T")
    streams[13].run("update t set a = 1 where id = 2", in_tx=True)  # takes locks, then runs a long statement
    busy[11] = streams[11].t + 0.01  # its next statement was sent and is still running
    busy[13] = streams[13].t + 0.01
    lt.tick(2.0)
    reports = {r["application_name"]: r for r in lt.as_list()}
    assert set(reports) == {"idle", "locker"}
    assert reports["idle"]["state"] == "idle in transaction"
    assert reports["locker"]["state"] == "active" and "update" in reports["locker"]["query"]
    assert lt.idle_in_tx_now == 1
    # a pg_locks sample sees both busy clients blocked (by pid 30, outside the proxy): their state is "waiting"
    rows = [["30", "idle in transaction", "5.0", "{}", "other", "10.0.0.9", "5000", "select 1", "t"],
            ["21", "active", "1.0", "{30}", "busy", "127.0.0.1", "11", "update t set a = 3 where id = 1", "t"],
            ["23", "active", "1.0", "{30}", "locker", "127.0.0.1", "13", "update t set a = 4 where id = 1", "t"]]
    lt.absorb(rows, 2.1)
    lt.tick(2.2)
    assert {r["application_name"]: r["state"] for r in lt.as_list()}["locker"] == "waiting"
    assert "busy" not in {r["application_name"] for r in lt.as_list()}
    assert [r["blocked"] for r in lt.as_list() if r["application_name"] == "other"] == [2]
    assert lt.idle_in_tx_now == 1
    # a statement sent after the sample is not taken for the blocked one
    busy[13] = 2.15
    lt.tick(2.3)
    assert {r["application_name"]: r["state"] for r in lt.as_list()}["locker"] == "active"
    # the statements finish (the stream says when), then both clients sit idle: now they are idle in transaction
    del busy[11], busy[13]
    for cid in (11, 13):
        streams[cid].t = 2.4
        streams[cid].run("select 1", in_tx=True)
    lt.tick(2.5)
    assert lt.idle_in_tx_now == 1  # only the one idle since the start
    lt.tick(3.0)
    states = {r["application_name"]: r["state"] for r in lt.as_list()}
    assert states == {"idle": "idle in transaction", "locker": "idle in transaction", "busy": "idle in transaction",
                      "other": "idle in transaction"}  # the blocker outside the proxy, from the sample
    assert lt.idle_in_tx_now == 3


def test_without_busy_since_quiet_transactions_count_as_idle():
    lt = LockTracker(settings(lock_hold_ms=500.0), fingerprinter=FP)
    s = Stream(lt)
    s.run("begin")
    s.tx("T")
    lt.tick(s.t + 1.0)
    [r] = lt.as_list()
    assert r["state"] == "idle in transaction" and lt.idle_in_tx_now == 1
