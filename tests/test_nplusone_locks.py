"""N+1 bursts and long-held locks through the proxy, with SQLAlchemy and psycopg, in both pooling modes."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from sqlalchemy import ForeignKey, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "np_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Book(Base):
    __tablename__ = "np_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    author_id: Mapped[int] = mapped_column(ForeignKey("np_authors.id"))
    author: Mapped[Author] = relationship(lazy="select")


@pytest.fixture(scope="module")
def library(pg):
    engine = create_engine(pg.dsn().replace("postgresql://", "postgresql+psycopg://"))
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        authors = [Author(id=i, name=f"author {i}") for i in range(1, 31)]
        s.add_all(authors)
        s.add_all([Book(id=i, title=f"book {i}", author_id=i) for i in range(1, 31)])
        s.commit()
    engine.dispose()
    yield
    engine = create_engine(pg.dsn().replace("postgresql://", "postgresql+psycopg://"))
    Base.metadata.drop_all(engine)
    engine.dispose()


def wait_for(fn, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(0.1)


def control_loop(proxy, pg) -> list[dict]:
    """The positive control for an absence: a real N+1 loop (app "control") run after the workload
    under test, waited for until reported whole.
    A burst shows once it qualifies and counts on while open: the inspector takes statements in order,
    so once the control's burst has all 30, every statement of the workload before it has been seen.
    Returns the other bursts."""
    with psycopg.connect(proxy.dsn(pg.superuser, application_name="control"), autocommit=True) as c:
        ids = [r[0] for r in c.execute("select id from np_books order by id").fetchall()]
        for i in ids:
            c.execute("select name from np_authors where id = %s", (i,))
    bursts = wait_for(lambda: [b for b in proxy.api("/api/nplusone")["bursts"]
                               if b["application_name"] == "control" and b["count"] == 30], timeout=20.0)
    assert bursts and bursts[0]["count"] == 30, "the control loop was not reported"
    return [b for b in proxy.api("/api/nplusone")["bursts"] if b["application_name"] != "control"]


def np_proxy(proxy_factory, mode, **kw):
    over = {"pool_mode": mode, "inspect.flush_interval_ms": 50, "inspect.nplusone_min_total_ms": 1.0,
            "inspect.slow_query_ms": 10000.0}
    over.update(kw)
    return proxy_factory(**over)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_lazy_load_loop_is_one_burst_with_its_parent(proxy_factory, pg, library, mode):
    proxy = np_proxy(proxy_factory, mode)
    engine = create_engine(proxy.dsn(pg.superuser, application_name="bookshop").replace(
        "postgresql://", "postgresql+psycopg://"))
    with Session(engine) as s:
        books = s.scalars(select(Book).order_by(Book.id)).all()
        names = [b.author.name for b in books]  # 30 lazy loads: the N+1
    engine.dispose()
    assert len(names) == 30
    # a burst shows once it qualifies and counts on while the loop goes on
    assert wait_for(lambda: [b for b in proxy.api("/api/nplusone")["bursts"] if b["count"] == 30], timeout=20.0)
    bursts = proxy.api("/api/nplusone")["bursts"]
    assert len(bursts) == 1, bursts
    b = bursts[0]
    assert b["count"] == 30
    assert "np_authors" in b["query"] and "np_books" in b["parent_query"]
    assert b["application_name"] == "bookshop" and b["client_addr"].startswith("127.0.0.1:")
    assert b["span_ms"] > 0 and b["total_ms"] > 0 and b["started_at"] > 0
    text = proxy.metrics()
    assert f'pgscope_nplusone_bursts_total{{db="pgscope_test",fingerprint="{b["fingerprint"]}"}} 1.0' in text
    assert f'pgscope_nplusone_statements_total{{db="pgscope_test",fingerprint="{b["fingerprint"]}"}} 30.0' in text


def test_burst_series_of_fingerprints_without_own_statement_series_go_to_other(proxy_factory, pg, library):
    """pgscope_nplusone_*{fingerprint} keep their own label only for fingerprints in the exported top-K."""
    proxy = np_proxy(proxy_factory, "session", **{"inspect.export_top_k": 0})
    engine = create_engine(proxy.dsn(pg.superuser, application_name="bookshop").replace(
        "postgresql://", "postgresql+psycopg://"))
    with Session(engine) as s:
        books = s.scalars(select(Book).order_by(Book.id)).all()
        assert len([b.author.name for b in books]) == 30
    engine.dispose()
    assert wait_for(lambda: [b for b in proxy.api("/api/nplusone")["bursts"] if b["count"] == 30], timeout=20.0)
    [b] = proxy.api("/api/nplusone")["bursts"]  # the API still names it
    text = proxy.metrics()
    assert b["fingerprint"] not in text
    assert 'pgscope_nplusone_bursts_total{db="pgscope_test",fingerprint="_other"} 1.0' in text
    assert 'pgscope_nplusone_statements_total{db="pgscope_test",fingerprint="_other"} 30.0' in text


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_steady_loops_are_not_bursts(proxy_factory, pg, library, mode):
    proxy = np_proxy(proxy_factory, mode)
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        # pgbench -S style: the same lookup back to back, no list query feeding it
        for i in range(60):
            c.execute("select name from np_authors where id = %s", (1 + i % 30,))
        # TPC-B style: the lookup repeats across transactions, among other statements
        for i in range(30):
            with c.transaction():
                c.execute("update np_books set title = title where id = %s", (1 + i % 30,))
                c.execute("select name from np_authors where id = %s", (1 + i % 30,))
                c.execute("update np_authors set name = name where id = %s", (1 + i % 30,))
                c.execute("select count(*) from np_books where author_id = %s", (1 + i % 30,))
    assert control_loop(proxy, pg) == []


def test_allow_list_by_application_name(proxy_factory, pg, library):
    proxy = np_proxy(proxy_factory, "session", **{"inspect.nplusone_allow_apps": "nightly-batch"})
    with psycopg.connect(proxy.dsn(pg.superuser, application_name="nightly-batch"), autocommit=True) as c:
        ids = [r[0] for r in c.execute("select id from np_books order by id").fetchall()]
        for i in ids:
            c.execute("select name from np_authors where id = %s", (i,))
    assert control_loop(proxy, pg) == []  # the same loop from an app not on the list is reported


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_row_lock_held_while_another_client_waits(proxy_factory, pg, library, mode):
    proxy = np_proxy(proxy_factory, mode, **{"inspect.lock_hold_ms": 1000.0,
                                              "inspect.lock_sample_interval_ms": 200.0})
    holder = psycopg.connect(proxy.dsn(pg.superuser, application_name="holder"))
    # the waiter's UPDATE is its own transaction (a waiter in a transaction block: the test below)
    waiter = psycopg.connect(proxy.dsn(pg.superuser, application_name="waiter"), autocommit=True)
    done = []
    try:
        holder.execute("select * from np_authors where id = 7 for update")

        def wait_on_row():
            waiter.execute("update np_authors set name = name where id = 7")
            done.append(time.monotonic())

        t = threading.Thread(target=wait_on_row)
        t.start()
        # the control: PostgreSQL shows the waiter blocked, for 2 s now (twice lock_hold_ms)
        pg.wait_blocked("update np_authors set name = name where id = 7", 2.0)
        assert not done, "the waiter should still be blocked"
        holder.commit()
        t.join(10)
        assert done
    finally:
        holder.close()
        waiter.close()
    assert wait_for(lambda: [lk for lk in proxy.api("/api/locks")["locks"]
                             if lk["application_name"] == "holder" and lk["state"] == "ended"])
    locks = proxy.api("/api/locks")["locks"]
    mine = [lk for lk in locks if lk["application_name"] == "holder"]
    assert len(mine) == 1, locks
    lk = mine[0]
    assert lk["held_ms"] >= 2000
    assert lk["blocked"] == 1
    assert [c["application_name"] for c in lk["blocked_clients"]] == ["waiter"]
    assert "np_authors" in lk["relations"]
    assert "for update" in (lk["query"] or "").lower()
    assert lk["state"] == "ended" and lk["blocked_fingerprints"]
    text = proxy.metrics()
    assert 'pgscope_lock_holds_total{db="pgscope_test"} 1.0' in text
    assert "pgscope_lock_hold_seconds_bucket" in text and "pgscope_blocked_clients" in text


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_waiters_hold_counts_from_when_it_got_the_lock(proxy_factory, pg, library, mode):
    """A transaction whose UPDATE waited 2 s for another's row lock holds it from the grant, not from
    its start: reported once it has held it lock_hold_ms, with that hold, not with the wait in it."""
    proxy = np_proxy(proxy_factory, mode, **{"inspect.lock_hold_ms": 1000.0,
                                              "inspect.lock_sample_interval_ms": 100.0})
    holder = psycopg.connect(proxy.dsn(pg.superuser, application_name="first-holder"))
    waiter = psycopg.connect(proxy.dsn(pg.superuser, application_name="late-holder"))  # a transaction block
    got: list[float] = []
    try:
        holder.execute("select * from np_authors where id = 11 for update")
        t_sent = time.monotonic()

        def wait_on_row():
            waiter.execute("update np_authors set name = name where id = 11")
            got.append(time.monotonic())

        t = threading.Thread(target=wait_on_row)
        t.start()
        pg.wait_blocked("update np_authors set name = name where id = 11", 2.0)  # blocked 2 s by now
        assert not got
        holder.commit()
        t.join(10)
        assert got
        # the waiter keeps its transaction (and the row lock) open until it is reported
        mine = wait_for(lambda: [lk for lk in proxy.api("/api/locks")["locks"]
                                 if lk["application_name"] == "late-holder"], timeout=10.0)
        t_seen = time.monotonic()
        assert mine, proxy.api("/api/locks")
        lk = mine[0]
        assert t_seen - t_sent >= 2.5  # its transaction began 2 s before its lock and more ...
        assert 1000 <= lk["held_ms"] <= (t_seen - got[0] + 0.5) * 1000, (lk, t_seen - got[0])  # ... its hold ~1 s
        assert lk["state"] in ("active", "idle in transaction"), lk
        waiter.commit()
        t_end = time.monotonic()
    finally:
        holder.close()
        waiter.close()
    ended = wait_for(lambda: [lk for lk in proxy.api("/api/locks")["locks"]
                              if lk["application_name"] == "late-holder" and lk["state"] == "ended"])
    assert ended and 1000 <= ended[0]["held_ms"] <= (t_end - got[0] + 0.5) * 1000, ended
    # the holder's own hold (2 s and more) is reported as before
    first = [lk for lk in proxy.api("/api/locks")["locks"] if lk["application_name"] == "first-holder"]
    assert first and first[0]["held_ms"] >= 2000, first


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_short_hold_with_a_waiter_is_not_a_long_lock_hold(proxy_factory, pg, library, mode):
    """A waiter seen by the sampler does not make a hold shorter than lock_hold_ms a reported one."""
    proxy = np_proxy(proxy_factory, mode, **{"inspect.lock_hold_ms": 2000.0,
                                              "inspect.lock_sample_interval_ms": 50.0})
    holder = psycopg.connect(proxy.dsn(pg.superuser, application_name="brief-holder"))
    waiter = psycopg.connect(proxy.dsn(pg.superuser, application_name="brief-waiter"))
    try:
        holder.execute("select * from np_authors where id = 8 for update")
        t = threading.Thread(target=lambda: (waiter.execute("update np_authors set name = name where id = 8"),
                                             waiter.commit()))
        t.start()
        # the sampler sees the waiter (the gauge), while the hold is still far below lock_hold_ms
        assert wait_for(lambda: "pgscope_blocked_clients 1.0" in proxy.metrics(), timeout=1.5)
        holder.commit()
        t.join(10)
    finally:
        holder.close()
        waiter.close()
    # the control: both transactions' holds were measured (and found short) before the absence is read
    assert wait_for(lambda: "pgscope_lock_hold_seconds_count 2.0" in proxy.metrics()), proxy.metrics()
    assert proxy.api("/api/locks")["locks"] == []
    text = proxy.metrics()
    assert "pgscope_lock_holds_total{" not in text
    assert "pgscope_blocked_clients 0.0" in text
    assert "pgscope_lock_hold_seconds_count 2.0" in text  # both transactions took locks, briefly


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_idle_in_transaction_is_reported(proxy_factory, pg, library, mode):
    proxy = np_proxy(proxy_factory, mode, **{"inspect.lock_hold_ms": 500.0})
    with psycopg.connect(proxy.dsn(pg.superuser, application_name="dawdler")) as c:
        c.execute("select 1")  # opens a transaction, then sits idle in it
        # nothing calls the tracker but the running proxy's own ticks
        mine = wait_for(lambda: [lk for lk in proxy.api("/api/locks")["locks"] if lk["application_name"] == "dawdler"])
        assert mine and mine[0]["state"] == "idle in transaction" and mine[0]["held_ms"] >= 500
        assert "pgscope_idle_in_transaction_clients 1.0" in proxy.metrics()
        c.rollback()


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_client_blocked_on_a_lock_is_not_idle_in_transaction(proxy_factory, pg, library, mode):
    """The holder sits idle in its transaction; the waiter's statement is running (blocked): it is not idle."""
    proxy = np_proxy(proxy_factory, mode, **{"inspect.lock_hold_ms": 500.0,
                                              "inspect.lock_sample_interval_ms": 100.0})
    holder = psycopg.connect(proxy.dsn(pg.superuser, application_name="idle-holder"))
    waiter = psycopg.connect(proxy.dsn(pg.superuser, application_name="blocked-waiter"))
    done = []

    def by_app():
        out: dict[str, list[dict]] = {}
        for lk in proxy.api("/api/locks")["locks"]:
            out.setdefault(lk["application_name"], []).append(lk)
        return out

    try:
        t_hold = time.monotonic()  # the holder's transaction begins after this
        holder.execute("select * from np_authors where id = 9 for update")

        def wait_on_row():
            waiter.execute("update np_authors set name = name where id = 9")
            waiter.commit()
            done.append(time.monotonic())

        t_wait = time.monotonic()  # the waiter's transaction begins after this
        t = threading.Thread(target=wait_on_row)
        t.start()
        # the holder: reported idle in transaction, blocking the waiter, by a tick at least 1 s (twice
        # lock_hold_ms) after the waiter began: that tick judged the waiter, quiet on the stream that long
        # (held_ms is the tick's time less the holder's start, which came after t_hold)
        later = (t_wait - t_hold + 1.0) * 1000.0
        assert wait_for(lambda: [lk for lk in by_app().get("idle-holder", [])
                                 if lk["blocked"] == 1 and lk["held_ms"] >= later], timeout=20.0), by_app()
        assert not done, "the waiter should still be blocked"
        reports = by_app()
        [lk] = reports["idle-holder"]
        assert lk["state"] == "idle in transaction" and "for update" in (lk["query"] or "").lower()
        assert [c["application_name"] for c in lk["blocked_clients"]] == ["blocked-waiter"]
        assert all(w["state"] in ("active", "waiting") for w in reports.get("blocked-waiter", [])), reports
        text = proxy.metrics()
        assert "pgscope_idle_in_transaction_clients 1.0" in text  # the holder only
        assert "pgscope_blocked_clients 1.0" in text
        holder.commit()
        t.join(10)
        assert done
    finally:
        holder.close()
        waiter.close()
    assert wait_for(lambda: [lk["state"] for lk in by_app().get("idle-holder", [])] == ["ended"])
    reports = by_app()
    assert [lk["state"] for lk in reports["idle-holder"]] == ["ended"]
    # the waiter's transaction took its lock once unblocked and ended at once: at most an ended report
    assert all(w["state"] in ("active", "waiting", "ended") for w in reports.get("blocked-waiter", [])), reports
    assert "pgscope_idle_in_transaction_clients 0.0" in proxy.metrics()


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_pgbench_tpcb_is_not_n_plus_one(proxy_factory, pg, mode):
    import subprocess

    from tests.support.tools import require

    pgbench = require("pgbench")
    proxy = np_proxy(proxy_factory, mode, pool_size=4)
    dsn = proxy.dsn(pg.superuser)
    init = subprocess.run([pgbench, "-i", "-s", "1", "-q", dsn], capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    for extra in ([], ["-S"]):
        out = subprocess.run([pgbench, "-c", "4", "-j", "2", "-t", "100", *extra, dsn],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
    assert control_loop(proxy, pg) == []
    assert int(proxy.api("/api/statements?order=calls&limit=1")["statements"][0]["calls"]) >= 400


def test_allow_list_by_fingerprint(proxy_factory, pg, library):
    from pglast import parser as pg_parser

    allowed = "select title from np_books where id = $1"
    proxy = np_proxy(proxy_factory, "session", **{"inspect.nplusone_allow_fingerprints":
                                                  f"0000000000000000,{pg_parser.fingerprint(allowed)}"})
    with psycopg.connect(proxy.dsn(pg.superuser, application_name="reader"), autocommit=True) as c:
        ids = [r[0] for r in c.execute("select id from np_authors order by id").fetchall()]
        for i in ids:
            c.execute("select title from np_books where id = %s", (i,))
    assert control_loop(proxy, pg) == []  # the control's loop, another fingerprint, is reported
