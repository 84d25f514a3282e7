"""A client that leaves in any state ends its session at once and strands no server.

Terminate or a bare close, after an unsynced extended-protocol batch, in COPY,
with a query running, while waiting for a server: the proxy keeps no client,
its server is wound up (Sync, CopyFail, ROLLBACK) and given back or closed,
and the next client gets a server at once.  Both pooling modes, real
PostgreSQL, real drivers and raw protocol messages.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from proxy.protocol import messages as m
from tests.support.wire import (
    WireClient, bind, copy_data, copy_done, describe_portal, execute, flush, wait_for,
)

MODES = ["session", "transaction"]


def _settled(proxy) -> bool:
    """No client session left and every pool server idle (none attached, none being reset)."""
    def check():
        p = proxy.proxy
        return not p.sessions and all(not pool.active and not pool.connecting
                                      for pool in p.pools.pools.values())
    return proxy.call(check)


def _assert_settled(proxy, what: str = "", timeout: float = 15.0) -> None:
    wait_for(lambda: _settled(proxy), timeout, f"no client and no busy server left {what}")


def _new_client_works(proxy, pg) -> None:
    """A new client gets a server at once (pool_size 1: a lost slot would make it wait)."""
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True, connect_timeout=5) as c:
        assert c.execute("select 42").fetchone()[0] == 42


@pytest.fixture(params=MODES)
def tight_proxy(request, proxy_factory):
    """One server per pool, short waits: a stranded slot shows at once as a timeout."""
    return proxy_factory(pool_mode=request.param, pool_size=1, query_wait_timeout=5.0,
                         server_check_delay=30.0)


def test_asyncpg_close_after_client_side_failure(tight_proxy, pg):
    """The issue's reproduction: the bind fails in the driver after Parse/Describe/Flush."""
    proxy = tight_proxy

    async def go():
        con = await asyncpg.connect(proxy.dsn(pg.superuser), timeout=10)
        with pytest.raises(Exception):
            await con.fetchval("SELECT $1::int", "not an int")
        await asyncio.wait_for(con.close(), 5)

    asyncio.run(go())
    _assert_settled(proxy, "after asyncpg closed")
    _new_client_works(proxy, pg)


@pytest.mark.parametrize("ending", ["terminate", "close", "reset"])
def test_unsynced_batch_then_leave(tight_proxy, pg, ending):
    proxy = tight_proxy
    c = WireClient(proxy.port, pg.superuser, "pgscope_test")
    c.send(m.parse("", "select $1::int") + m.frame(b"D", b"S\x00") + flush())  # what asyncpg sends
    got = [t for t, _ in c.read_until(b"T")]
    assert got[:2] == [b"1", b"t"]  # ParseComplete, ParameterDescription: the batch ran
    if ending == "terminate":
        c.terminate()
    else:
        c.close(reset=ending == "reset")
    _assert_settled(proxy, f"after {ending}")
    _new_client_works(proxy, pg)


def test_terminate_is_answered_by_a_close_at_once(tight_proxy, pg):
    """Terminate after an unsynced batch: the proxy closes the client's socket itself."""
    proxy = tight_proxy
    c = WireClient(proxy.port, pg.superuser, "pgscope_test")
    c.send(m.parse("s1", "select 1") + flush())
    assert [t for t, _ in c.read_until(b"1")] == [b"1"]
    c.send(m.terminate())
    c.read_to_eof(timeout=5)  # raises if the proxy keeps the connection open
    _assert_settled(proxy)


@pytest.mark.parametrize("ending", ["terminate", "close"])
def test_leave_with_a_query_running(tight_proxy, pg, ending):
    proxy = tight_proxy
    c = WireClient(proxy.port, pg.superuser, "pgscope_test")
    c.send(m.query("select pg_sleep(0.3)"))
    if ending == "terminate":
        c.terminate()
    else:
        c.close()
    # the session is gone before the query ends; the server follows once it has answered
    wait_for(lambda: proxy.call(lambda: not proxy.proxy.sessions), 5, "session gone")
    _assert_settled(proxy)
    _new_client_works(proxy, pg)


@pytest.mark.parametrize("ending", ["terminate", "close"])
def test_leave_in_copy_in(tight_proxy, pg, ending):
    proxy = tight_proxy
    with pg.connect() as d:
        d.execute("create table if not exists exit_copy (n int)")
        d.execute("truncate exit_copy")
    c = WireClient(proxy.port, pg.superuser, "pgscope_test")
    c.send(m.query("copy exit_copy from stdin"))
    c.read_until(b"G")
    c.send(copy_data(b"1\n2\n"))
    if ending == "terminate":
        c.terminate()
    else:
        c.close()
    _assert_settled(proxy, "after leaving in COPY")
    with pg.connect() as d:  # the COPY was failed, not completed
        assert d.execute("select count(*) from exit_copy").fetchone()[0] == 0
    _new_client_works(proxy, pg)


def test_leave_in_open_transaction_rolls_back(tight_proxy, pg):
    proxy = tight_proxy
    with pg.connect() as d:
        d.execute("create table if not exists exit_tx (n int)")
        d.execute("truncate exit_tx")
    c = WireClient(proxy.port, pg.superuser, "pgscope_test")
    c.send(m.query("begin; insert into exit_tx values (1)"))
    c.read_until(b"Z")
    c.send(m.parse("", "insert into exit_tx values ($1::int)") + bind("", "", [b"2"]) + execute() + flush())
    c.read_until(b"C")
    c.terminate()
    _assert_settled(proxy)
    with pg.connect() as d:
        assert d.execute("select count(*) from exit_tx").fetchone()[0] == 0
    _new_client_works(proxy, pg)


def test_client_waiting_for_a_server_leaves(proxy_factory, pg):
    """Transaction mode: a client queued for the only server closes; it leaves the queue at once
    (its reading is paused, so the proxy asks the socket) and the holder is not disturbed."""
    proxy = proxy_factory(pool_mode="transaction", pool_size=1, query_wait_timeout=60.0)
    holder = WireClient(proxy.port, pg.superuser, "pgscope_test")
    waiter = WireClient(proxy.port, pg.superuser, "pgscope_test")  # logs in (a server) first
    holder.send(m.query("begin"))
    holder.read_until(b"Z")
    waiter.send(m.query("select 1"))
    wait_for(lambda: proxy.call(lambda: proxy.proxy.pools.waiting) == 1, 5, "the waiter queued")
    waiter.close()
    wait_for(lambda: proxy.call(lambda: len(proxy.proxy.sessions)) == 1 and
             proxy.call(lambda: proxy.proxy.pools.waiting) == 0, 5, "the waiter gone")
    holder.send(m.query("select 7; commit"))
    msgs = holder.read_until(b"Z")
    assert [body for t, body in msgs if t == b"D"] == [b"\x00\x01\x00\x00\x00\x017"]
    holder.terminate()
    _assert_settled(proxy)
    _new_client_works(proxy, pg)


def test_client_waiting_at_login_leaves(proxy_factory, pg):
    """Session mode: a client whose login waits for the only server (held by another client)
    closes; it leaves the queue at once, and the server goes to the next client when freed."""
    import socket

    proxy = proxy_factory(pool_mode="session", pool_size=1, query_wait_timeout=60.0)
    holder = WireClient(proxy.port, pg.superuser, "pgscope_test")
    waiter = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    waiter.sendall(m.startup_message({"user": pg.superuser, "database": "pgscope_test"}))
    wait_for(lambda: proxy.call(lambda: proxy.proxy.pools.waiting) == 1, 5, "the waiter queued")
    waiter.close()
    wait_for(lambda: proxy.call(lambda: len(proxy.proxy.sessions)) == 1 and
             proxy.call(lambda: proxy.proxy.pools.waiting) == 0, 5, "the waiter gone")
    holder.send(m.query("select 7"))
    assert [body for t, body in holder.read_until(b"Z") if t == b"D"] == [b"\x00\x01\x00\x00\x00\x017"]
    holder.terminate()
    _assert_settled(proxy)
    _new_client_works(proxy, pg)


# ------------------------------------------------------------------ property test

_INT_TABLE = "exit_prop"


def _steps():
    """One client step: (label, bytes to send, whether it ends with something the server answers)."""
    simple = st.sampled_from([
        ("Q select", m.query("select 1")),
        ("Q sleep", m.query("select pg_sleep(0.02)")),
        ("Q rows", m.query("select generate_series(1, 2000)")),
        ("Q error", m.query("select 1/0")),
        ("Q begin", m.query("begin")),
        ("Q insert", m.query(f"insert into {_INT_TABLE} values (1)")),
        ("Q commit", m.query("commit")),
        ("Q copy out", m.query("copy (select generate_series(1, 500)) to stdout")),
        ("Q copy in", m.query(f"copy {_INT_TABLE} from stdin")),
        ("copy data", copy_data(b"5\n")),
        ("copy done", copy_done()),
    ])
    extended = st.sampled_from([
        ("P", m.parse("", "select $1::int")),
        ("P named", m.parse("s_exit", "select $1::int + 1")),
        ("B ok", bind("", "", [b"3"])),
        ("B bad", bind("", "", [b"x"])),
        ("B named", bind("", "s_exit", [b"4"])),
        ("D", describe_portal("")),
        ("E", execute()),
        ("H", flush()),
        ("S", m.sync()),
        ("C named", m.close_statement("s_exit")),
    ])
    return st.one_of(simple, extended)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(_steps(), min_size=1, max_size=12),
       cut=st.integers(min_value=0, max_value=10_000),
       read=st.booleans(),
       ending=st.sampled_from(["terminate", "close", "reset"]))
def test_cut_anywhere_strands_nothing(tight_proxy, pg, steps, cut, read, ending):
    proxy = tight_proxy
    with pg.connect() as d:
        d.execute(f"create table if not exists {_INT_TABLE} (n int)")
    stream = b"".join(data for _, data in steps)
    cut = cut % (len(stream) + 1)  # anywhere, mid-message included
    c = WireClient(proxy.port, pg.superuser, "pgscope_test")
    try:
        c.send(stream[:cut])
        if read:
            c.read_available(0.05)
        if ending == "terminate":  # after a cut message it is more of that message's bytes
            c.send(m.terminate())
            c.close()
        else:
            c.close(reset=ending == "reset")
    except OSError:
        pass  # the proxy may have closed first (a protocol violation in a cut message)
    _assert_settled(proxy, f"after {[label for label, _ in steps]} cut at {cut}/{len(stream)}, {ending}")
    _new_client_works(proxy, pg)


# ------------------------------------------------------------------ then a clean, quick shutdown

def _clients(p) -> float:
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(r'^pgscope_client_connections\{[^}]*\} (\S+)$', text, re.M))


@pytest.mark.parametrize("mode", MODES)
def test_sigterm_after_the_faults_exits_at_once(pg, mode):
    """After each fault above, with no client left, SIGTERM exits within about a second (not
    after shutdown_timeout, which a stranded client would make it wait out)."""
    import signal

    from tests.support.proxy import ProxyProcess

    p = ProxyProcess(["--upstream", pg.dsn(), "--pool-mode", mode, "--pool-size", "2"],
                     env={"PGSCOPE_SHUTDOWN_TIMEOUT": "30"}).wait_ready()
    try:
        async def asyncpg_fault():
            con = await asyncpg.connect(p.dsn(pg.superuser), timeout=10)
            with pytest.raises(Exception):
                await con.fetchval("SELECT $1::int", "not an int")
            await asyncio.wait_for(con.close(), 5)

        asyncio.run(asyncpg_fault())
        c = WireClient(p.port, pg.superuser, "pgscope_test")
        c.send(m.query("select pg_sleep(0.2)"))
        c.terminate()
        c = WireClient(p.port, pg.superuser, "pgscope_test")
        c.send(m.parse("", "select 1") + flush())
        c.read_until(b"1")
        c.close()
        with pg.connect() as d:
            d.execute("create table if not exists exit_copy (n int)")
        c = WireClient(p.port, pg.superuser, "pgscope_test")
        c.send(m.query("copy exit_copy from stdin") + copy_data(b"1\n"))
        c.read_until(b"G")
        c.close(reset=True)
        wait_for(lambda: _clients(p) == 0, 10, "no client left")
        t0 = time.monotonic()
        p.signal(signal.SIGTERM)
        assert p.proc.wait(20) == 0
        took = time.monotonic() - t0
        assert took < 2.0, f"SIGTERM took {took:.2f}s with no client left"
    finally:
        p.stop()


@pytest.mark.parametrize("mode", MODES)
def test_a_fault_of_pgscopes_own_at_login_ends_the_session_with_an_error(proxy_factory, pg, monkeypatch, mode):
    """An unexpected exception in pgscope's login code (here: injected into the statement that
    sends the startup answer, after the server was checked out) gets the client XX000 and a
    close, not a client left waiting; the server it held goes back, and the next client logs in."""
    from proxy.protocol import messages as pm
    from proxy.session import client as client_mod

    proxy = proxy_factory(pool_mode=mode, pool_size=1, query_wait_timeout=5.0, server_check_delay=30.0)
    _new_client_works(proxy, pg)  # a positive control first
    real = pm.backend_key_data

    def broken(*a, **kw):
        raise RuntimeError("injected")

    monkeypatch.setattr(client_mod.m, "backend_key_data", broken)
    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as ei:
        psycopg.connect(proxy.dsn(pg.superuser), connect_timeout=10)
    assert time.monotonic() - t0 < 8
    assert "internal error in pgscope during login" in str(ei.value)
    monkeypatch.setattr(client_mod.m, "backend_key_data", real)
    _assert_settled(proxy, "after the fault")
    _new_client_works(proxy, pg)  # pool_size 1: the faulted login's server came back
