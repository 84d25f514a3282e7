"""What the server says reaches the client as the server said it; pgscope's own connections
never stand in the way of DROP DATABASE; session mode shows the server's real process id."""

from __future__ import annotations

import asyncio
import select
import socket
import time

import asyncpg
import psycopg
import pytest

from proxy.protocol import messages as m
from tests.support.wire import WireClient, bind, execute, wait_for

MODES = ["session", "transaction"]


def _idle_servers(proxy, db: str) -> int:
    return proxy.call(lambda: sum(len(p.idle) for (d, _), p in proxy.proxy.pools.pools.items() if d == db))


def _use_database(proxy, pg, db: str) -> None:
    """Connect to ``db`` through the proxy, run a query, leave; wait until the pool keeps
    an idle server to it (the positive control: that server is what would block DROP)."""
    with psycopg.connect(proxy.dsn(pg.superuser, dbname=db), autocommit=True) as c:
        assert c.execute("select current_database()").fetchone() == (db,)
    wait_for(lambda: _idle_servers(proxy, db) >= 1, 10, f"an idle server to {db}")


@pytest.mark.parametrize("mode", MODES)
def test_drop_database_after_using_it(proxy_factory, pg, mode):
    proxy = proxy_factory(pool_mode=mode, pool_size=3)
    name = f"fence_drop_{mode}"
    with psycopg.connect(proxy.dsn(pg.superuser, dbname="postgres"), autocommit=True) as admin:
        admin.execute(f"drop database if exists {name}")
        admin.execute(f"create database {name}")
        _use_database(proxy, pg, name)
        admin.execute(f"drop database {name}")  # extended protocol (psycopg); 55006 if blocked
        assert admin.execute("select count(*) from pg_database where datname = %s", (name,)).fetchone() == (0,)
    assert _idle_servers(proxy, name) == 0
    # the fence is lifted: the pool opens connections again (to another database: this one is gone)
    with psycopg.connect(proxy.dsn(pg.superuser, dbname="pgscope_test"), autocommit=True) as c:
        assert c.execute("select 1").fetchone() == (1,)
    assert proxy.call(lambda: proxy.proxy.pools.fences) == {}


def test_rename_and_template_and_simple_protocol(proxy_factory, pg):
    proxy = proxy_factory(pool_mode="transaction", pool_size=3)

    async def admin(sql: str) -> None:
        con = await asyncpg.connect(proxy.dsn(pg.superuser, dbname="postgres"))
        try:
            await con.execute(sql)  # no arguments: the simple protocol
        finally:
            await con.close()

    asyncio.run(admin("drop database if exists fence_b"))
    asyncio.run(admin("drop database if exists fence_a"))
    asyncio.run(admin("drop database if exists fence_c"))
    asyncio.run(admin("create database fence_a"))
    _use_database(proxy, pg, "fence_a")
    asyncio.run(admin("alter database fence_a rename to fence_b"))
    _use_database(proxy, pg, "fence_b")
    asyncio.run(admin("create database fence_c template fence_b"))
    _use_database(proxy, pg, "fence_c")
    asyncio.run(admin("drop database fence_c"))
    asyncio.run(admin("drop database fence_b"))


@pytest.mark.parametrize("mode", MODES)
def test_drop_database_in_use_gets_postgres_error_and_user_unharmed(proxy_factory, pg, mode):
    proxy = proxy_factory(pool_mode=mode, pool_size=3)
    with psycopg.connect(proxy.dsn(pg.superuser, dbname="postgres"), autocommit=True) as admin:
        admin.execute("drop database if exists fence_busy")
        admin.execute("create database fence_busy")
        user = psycopg.connect(proxy.dsn(pg.superuser, dbname="fence_busy"))
        try:
            user.execute("select 1")  # a transaction open: its server is in use
            with pytest.raises(psycopg.errors.ObjectInUse):
                admin.execute("drop database fence_busy")
            assert user.execute("select 2").fetchone() == (2,)
            user.commit()
        finally:
            user.close()
        admin.execute("drop database fence_busy")


# ---------------------------------------------------------------- the server's own words

@pytest.mark.parametrize("mode", MODES)
def test_terminate_own_backend_gives_the_servers_error(proxy_factory, pg, mode):
    proxy = proxy_factory(pool_mode=mode, pool_size=2)

    async def outcome(dsn: str):
        con = await asyncpg.connect(dsn)
        try:
            await con.execute("select pg_terminate_backend(pg_backend_pid())")
        except Exception as e:  # what the driver reports
            return type(e).__name__, getattr(e, "sqlstate", None), str(e)
        finally:
            con.terminate()
        return None

    direct = asyncio.run(outcome(pg.dsn()))
    via = asyncio.run(outcome(proxy.dsn(pg.superuser)))
    assert direct is not None and "terminating connection due to administrator command" in direct[2]
    assert via == direct


def test_server_fatal_reaches_idle_client_alone(proxy_factory, pg):
    """Session mode: the server's FATAL 57P01 is the last and only message the client reads."""
    proxy = proxy_factory(pool_mode="session", pool_size=2)
    c = WireClient(proxy.port, pg.superuser, "pgscope_test")
    c.send(m.query("select 1"))
    c.read_until(b"Z")
    with pg.connect() as d:  # the pid the client was given is its server's
        assert d.execute("select pg_terminate_backend(%s)", (c.pid,)).fetchone() == (True,)
    msgs = c.read_to_eof(timeout=10)
    errors = [m.decode_error_fields(body) for t, body in msgs if t == b"E"]
    assert [(e["C"], e["M"]) for e in errors] == [("57P01", "terminating connection due to administrator command")]


def test_idle_session_timeout_fatal_reaches_the_client_as_the_server_said_it(proxy_factory, pg):
    """Session mode, PostgreSQL's own idle_session_timeout (set by the client): the server's FATAL
    57P05 is what the client reads, as the server worded it, and then the close."""
    proxy = proxy_factory(pool_mode="session", pool_size=2)
    c = WireClient(proxy.port, pg.superuser, "pgscope_test")
    c.send(m.query("set idle_session_timeout = '300ms'"))
    c.read_until(b"Z")  # a positive control: the session works and the setting took
    msgs = c.read_to_eof(timeout=15)  # the server ends the idle session on its own
    errors = [m.decode_error_fields(body) for t, body in msgs if t == b"E"]
    assert [(e["S"], e["C"], e["M"]) for e in errors] == [
        ("FATAL", "57P05", "terminating connection due to idle-session timeout")], msgs


def test_session_mode_reports_the_real_backend_pid(proxy_factory, pg):
    proxy = proxy_factory(pool_mode="session", pool_size=4)
    listener = psycopg.connect(proxy.dsn(pg.superuser), autocommit=True)
    sender = psycopg.connect(proxy.dsn(pg.superuser, application_name="pid-sender"), autocommit=True)
    try:
        for c in (listener, sender):
            assert c.info.backend_pid == c.execute("select pg_backend_pid()").fetchone()[0]
        listener.execute("listen pidcheck")
        sender.execute("notify pidcheck, 'hi'")
        note = next(listener.notifies(timeout=10))
        assert note.pid == sender.info.backend_pid
        with pg.connect() as d:
            row = d.execute("select application_name from pg_stat_activity where pid = %s",
                            (sender.info.backend_pid,)).fetchone()
            assert row == ("pid-sender",)
            d.execute("select pg_terminate_backend(%s)", (sender.info.backend_pid,))
        with pytest.raises(psycopg.errors.AdminShutdown):
            sender.execute("select 1")
    finally:
        listener.close()
        sender.close()

    async def asyncpg_pid():
        con = await asyncpg.connect(proxy.dsn(pg.superuser))
        try:
            return con.get_server_pid(), await con.fetchval("select pg_backend_pid()")
        finally:
            await con.close()

    a, b = asyncio.run(asyncpg_pid())
    assert a == b

    # cancel still goes through pgscope, with its own secret, to the right server (raw messages:
    # psycopg's cancel() holds the GIL while it waits, and this test's proxy is a thread)
    c = WireClient(proxy.port, pg.superuser, "pgscope_test")
    c.send(m.query("select pg_backend_pid()"))
    rows = [body for t, body in c.read_until(b"Z") if t == b"D"]
    assert int(m.decode_data_row(rows[0])[0]) == c.pid
    c.send(m.query("select pg_sleep(30)"))
    with pg.connect() as d:  # wait until it runs
        wait_for(lambda: d.execute("select count(*) from pg_stat_activity where pid = %s and "
                                   "query like 'select pg_sleep%%' and state = 'active'", (c.pid,)
                                   ).fetchone()[0] == 1, 10, "the sleep running")
    pid, key = c.key
    with socket.create_connection(("127.0.0.1", proxy.port)) as wrong:
        wrong.sendall(m.cancel_request(pid, bytes(b ^ 0xFF for b in key)))  # right pid, wrong secret
        assert wrong.recv(1) == b""
    with pytest.raises(TimeoutError):
        c.read_until(b"E", timeout=1.0)  # nothing was cancelled
    with socket.create_connection(("127.0.0.1", proxy.port)) as cancel:
        cancel.sendall(m.cancel_request(pid, key))
        assert cancel.recv(1) == b""  # the proxy closes it, as PostgreSQL does
    errors = [m.decode_error_fields(body)["C"] for t, body in c.read_until(b"Z", timeout=10) if t == b"E"]
    assert errors == ["57014"]
    assert "pgscope_cancel_requests_total 2.0" in proxy.metrics()  # the wrong secret and the right one
    c.terminate()


def test_transaction_mode_keeps_made_up_pids(proxy_factory, pg):
    proxy = proxy_factory(pool_mode="transaction", pool_size=1)
    pids = set()
    for _ in range(3):
        with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
            server_pid = c.execute("select pg_backend_pid()").fetchone()[0]
            assert c.info.backend_pid != server_pid
            pids.add(c.info.backend_pid)
    assert len(pids) == 3  # each client its own


@pytest.mark.parametrize("mode", MODES)
def test_error_flows_back_while_the_client_is_still_writing(proxy_factory, pg, mode):
    """A pipelined batch far larger than every buffer on the way, the server failing at its
    third row: the ErrorResponse reaches the client before it has finished writing, as it
    does directly (the proxy keeps reading the server while it holds the client back)."""
    proxy = proxy_factory(pool_mode=mode, pool_size=1)
    c = WireClient(proxy.port, pg.superuser, "pgscope_test")
    big = b"x" * 32768
    parts = [m.parse("", "select pg_sleep(0.05), length($1::text) / ($2::int - 3)")]
    parts += [bind("", "", [big, str(i + 1).encode()]) + execute() for i in range(2048)]  # 64 MB
    batch = b"".join(parts) + m.sync()
    s = c.sock
    s.setblocking(False)
    sent, error_at = 0, None
    deadline = time.monotonic() + 60
    while error_at is None and time.monotonic() < deadline:
        r, w, _ = select.select([s], [s] if sent < len(batch) else [], [], 1.0)
        if r:
            data = s.recv(65536)
            assert data, "connection closed"
            c.fb.feed(data)
            for t, body in c.fb.messages():
                if t == 0x45:
                    error_at = sent
                    assert m.decode_error_fields(body)["C"] == "22012"
        if w and sent < len(batch):
            try:
                sent += s.send(batch[sent:sent + 262144])
            except BlockingIOError:
                pass
    assert error_at is not None, "no error"
    assert error_at < len(batch), "the error came only after the whole batch was written"
    s.setblocking(True)
    rest = batch[sent:]
    if rest:
        s.sendall(rest)
    c.read_until(b"Z", timeout=60)
    c.terminate()
