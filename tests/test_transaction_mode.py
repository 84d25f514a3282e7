"""Transaction pooling with real clients: pgbench, psycopg, asyncpg, SQLAlchemy."""

from __future__ import annotations

import re
import subprocess
import time

import psycopg
import pytest
from sqlalchemy import Integer, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from tests.support.tools import require
from tests.support.wire import wait_for


def txn_proxy(proxy_factory, **kw):
    kw.setdefault("pool_mode", "transaction")
    return proxy_factory(**kw)


def pgbench_ok(out):
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-2000:]
    m = re.search(r"number of failed transactions: (\d+)", out.stdout)
    assert m is None or m.group(1) == "0", out.stdout


def test_pgbench_tpcb_100_clients_over_10_servers(proxy_factory, pg):
    pgbench = require("pgbench")
    proxy = txn_proxy(proxy_factory, pool_size=10, max_client_conn=300)
    dsn = proxy.dsn(pg.superuser)
    init = subprocess.run([pgbench, "-i", "-s", "2", "-q", dsn], capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    out = subprocess.run([pgbench, "-c", "100", "-j", "2", "-t", "20", dsn],
                         capture_output=True, text=True, timeout=600)
    pgbench_ok(out)
    assert "number of transactions actually processed: 2000/2000" in out.stdout
    with pg.connect() as admin:
        n = admin.execute("select count(*) from pg_stat_activity where datname = 'pgscope_test' "
                          "and backend_type = 'client backend' and pid <> pg_backend_pid() "
                          "and application_name <> 'pgscope-side'").fetchone()[0]
    assert n <= 10


@pytest.mark.parametrize("mode", ["extended", "prepared"])
def test_pgbench_protocol_modes(proxy_factory, pg, mode):
    pgbench = require("pgbench")
    proxy = txn_proxy(proxy_factory, pool_size=4)
    dsn = proxy.dsn(pg.superuser)
    init = subprocess.run([pgbench, "-i", "-s", "1", "-q", dsn], capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    for extra in ([], ["-S"]):
        out = subprocess.run([pgbench, "-M", mode, "-c", "12", "-j", "2", "-t", "50", *extra, dsn],
                             capture_output=True, text=True, timeout=300)
        pgbench_ok(out)
        assert "number of transactions actually processed: 600/600" in out.stdout


def test_psycopg_prepare_threshold_zero_many_connections(proxy_factory, pg):
    proxy = txn_proxy(proxy_factory, pool_size=2)
    conns = [psycopg.connect(proxy.dsn(pg.superuser), autocommit=True, prepare_threshold=0) for _ in range(6)]
    try:
        for rnd in range(10):
            for i, c in enumerate(conns):
                assert c.execute("select %s::int + %s::int", (i, rnd)).fetchone() == (i + rnd,)
                assert c.execute("select %s::text || 'z'", (str(i),)).fetchone() == (f"{i}z",)
        with conns[0].transaction():
            conns[0].execute("select 1")
            assert conns[0].execute("select %s::int", (5,)).fetchone() == (5,)
    finally:
        for c in conns:
            c.close()


def test_sqlalchemy_orm_in_transaction_mode(proxy_factory, pg):
    proxy = txn_proxy(proxy_factory, pool_size=2)

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = "sa_items"
        id: Mapped[int] = mapped_column(Integer, primary_key=True)
        name: Mapped[str] = mapped_column(String(50))

    url = proxy.dsn(pg.superuser).replace("postgresql://", "postgresql+psycopg://")
    engine = create_engine(url, pool_size=5, connect_args={"prepare_threshold": 0})
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Item(id=i, name=f"n{i}") for i in range(40)])
        s.commit()
    for _ in range(3):
        with Session(engine) as s:
            rows = s.scalars(select(Item).where(Item.id < 10).order_by(Item.id)).all()
            assert [r.name for r in rows] == [f"n{i}" for i in range(10)]
    engine.dispose()


def test_asyncpg_via_sqlalchemy_async(proxy_factory, pg):
    import asyncio

    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    proxy = txn_proxy(proxy_factory, pool_size=2)
    url = proxy.dsn(pg.superuser).replace("postgresql://", "postgresql+asyncpg://")

    async def main():
        engine = create_async_engine(url, pool_size=6)
        async def one(i):
            async with engine.connect() as c:
                return (await c.execute(text("select :x + 1"), {"x": i})).scalar()
        assert await asyncio.gather(*(one(i) for i in range(30))) == [i + 1 for i in range(30)]
        await engine.dispose()

    asyncio.run(main())


def test_startup_parameters_follow_the_client(proxy_factory, pg):
    proxy = txn_proxy(proxy_factory, pool_size=1)
    a = psycopg.connect(proxy.dsn(pg.superuser, application_name="alpha",
                                  options="-c search_path=alpha_schema,public -c statement_timeout=1234 -c TimeZone=Asia/Tokyo"),
                        autocommit=True)
    b = psycopg.connect(proxy.dsn(pg.superuser, application_name="beta",
                                  options="-c DateStyle=SQL,DMY"), autocommit=True)
    try:
        for _ in range(3):  # one server, alternating clients
            assert a.execute("show application_name").fetchone() == ("alpha",)
            assert a.execute("show search_path").fetchone() == ("alpha_schema,public",)
            assert a.execute("show statement_timeout").fetchone() == ("1234ms",)
            assert a.execute("show timezone").fetchone() == ("Asia/Tokyo",)
            assert b.execute("show application_name").fetchone() == ("beta",)
            assert b.execute("show search_path").fetchone() != ("alpha_schema,public",)
            assert b.execute("show statement_timeout").fetchone() == ("0",)
            assert b.execute("show datestyle").fetchone() == ("SQL, DMY",)
            assert b.execute("show timezone").fetchone() != ("Asia/Tokyo",)
        assert a.info.parameter_status("application_name") == "alpha"
        assert b.info.parameter_status("DateStyle") == "SQL, DMY"
    finally:
        a.close()
        b.close()


def _busy_servers(proxy) -> float:
    """Servers not idle (serving a client, being reset, connecting), from /metrics."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in proxy.metrics().splitlines()
               if line.startswith("pgscope_server_connections{") and 'state="idle"' not in line)


def test_session_state_pins_client(proxy_factory, pg):
    proxy = txn_proxy(proxy_factory, pool_size=2)
    a = psycopg.connect(proxy.dsn(pg.superuser), autocommit=True)
    b = psycopg.connect(proxy.dsn(pg.superuser), autocommit=True)
    try:
        a.execute("set work_mem = '7MB'")
        pid_a = a.execute("select pg_backend_pid()").fetchone()[0]
        for _ in range(5):
            assert b.execute("show work_mem").fetchone() != ("7MB",)
            assert b.execute("select pg_backend_pid()").fetchone()[0] != pid_a
            assert a.execute("show work_mem").fetchone() == ("7MB",)
        assert proxy.proxy.ctx.rules.pins == 1
        text = proxy.metrics()
        assert "pgscope_clients_pinned_total 1.0" in text
        assert 'pgscope_session_state_statements_total{kind="SET"} 1.0' in text
    finally:
        a.close()
        b.close()
    # after the pinned client leaves, its server is reset before reuse: wait until no server is
    # active (being reset counts as active), then every server the pool hands out must be clean
    wait_for(lambda: _busy_servers(proxy) == 0, what="the pinned client's server reset and idle")
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        for _ in range(4):
            assert c.execute("show work_mem").fetchone() != ("7MB",)


def test_session_state_policy_error(proxy_factory, pg):
    proxy = txn_proxy(proxy_factory, pool_size=2, session_state_policy="error")
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        with pytest.raises(psycopg.Error) as e:
            c.execute("listen somewhere")
        assert e.value.sqlstate == "0A000"


def test_close_from_one_client_keeps_shared_statement(proxy_factory, pg):
    proxy = txn_proxy(proxy_factory, pool_size=1)
    a = psycopg.connect(proxy.dsn(pg.superuser), autocommit=True, prepare_threshold=0)
    b = psycopg.connect(proxy.dsn(pg.superuser), autocommit=True, prepare_threshold=0)
    try:
        assert a.execute("select %s::int * 10", (1,)).fetchone() == (10,)
        assert b.execute("select %s::int * 10", (2,)).fetchone() == (20,)
        a.execute("deallocate all")  # psycopg-level statement reset on a
        a.close()
        assert b.execute("select %s::int * 10", (3,)).fetchone() == (30,)
    finally:
        b.close()


def test_max_prepared_statements_bounds_server_cache(proxy_factory, pg):
    proxy = txn_proxy(proxy_factory, pool_size=1, max_prepared_statements=3)
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True, prepare_threshold=0) as c:
        for rnd in range(2):
            for i in range(10):
                assert c.execute(f"select %s::int + {i}", (rnd,)).fetchone() == (rnd + i,)
        n = c.execute("select count(*) from pg_prepared_statements where name like 'PGS_%%'").fetchone()[0]
        assert n == 3  # 20 statements ran prepared on this one server: the cache holds its bound, no more


def test_transaction_mode_timeouts(proxy_factory, pg):
    proxy = txn_proxy(proxy_factory, pool_size=2, idle_transaction_timeout=0.5, query_timeout=1.0)
    c = psycopg.connect(proxy.dsn(pg.superuser))
    c.execute("select 1")  # opens a transaction, then sits idle in it
    from tests.support.wire import wait_for

    wait_for(lambda: proxy.call(lambda: len(proxy.proxy.sessions)) == 0, timeout=15,
             what="the idle-in-transaction client to be closed")
    with pytest.raises(psycopg.Error) as ei:
        c.execute("select 1")
    assert ei.value.sqlstate == "25P03"
    c.close()
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c2:
        with pytest.raises(psycopg.errors.QueryCanceled):
            c2.execute("select pg_sleep(20)")
        assert c2.execute("select 2").fetchone() == (2,)


def test_client_idle_timeout(proxy_factory, pg):
    from proxy.protocol.messages import decode_error_fields
    from tests.support.wire import WireClient

    proxy = proxy_factory(client_idle_timeout=0.5)
    w = WireClient(proxy.port, pg.superuser, "pgscope_test")
    t0 = time.monotonic()
    msgs = w.read_to_eof(timeout=15)  # the proxy closes it, after an ErrorResponse 57P05
    assert time.monotonic() - t0 >= 0.4
    assert msgs and msgs[-1][0] == b"E", msgs
    fields = decode_error_fields(msgs[-1][1])
    assert fields["C"] == "57P05" and fields["S"] == "FATAL", fields
    # a client busy for longer than the timeout is not closed: the timer runs while it is idle
    from proxy.protocol import messages as m

    w = WireClient(proxy.port, pg.superuser, "pgscope_test")
    w.send(m.query("select pg_sleep(1.2)"))
    assert [t for t, _ in w.read_until(b"Z", timeout=15)][-1] == b"Z"
    msgs = w.read_to_eof(timeout=15)
    assert msgs and decode_error_fields(msgs[-1][1])["C"] == "57P05", msgs


@pytest.mark.parametrize("sql", ["prepare q(int) as select $1 * 2", "listen chan", "select pg_advisory_lock(42)",
                                 "create temp table tt(a int)", "begin; declare c cursor with hold for select 1; commit"])
def test_sql_level_session_state_is_pinned(proxy_factory, pg, sql):
    proxy = txn_proxy(proxy_factory, pool_size=2)
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as a, \
            psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as b:
        a.execute(sql)
        pid = a.execute("select pg_backend_pid()").fetchone()[0]
        for _ in range(4):
            assert b.execute("select pg_backend_pid()").fetchone()[0] != pid
            assert a.execute("select pg_backend_pid()").fetchone()[0] == pid
        if sql.startswith("prepare"):
            assert a.execute("execute q(21)").fetchone() == (42,)
            a.execute("deallocate q")
    assert proxy.proxy.ctx.rules.pins == 1


def test_session_state_policy_warn_logs(proxy_factory, pg, capfd):
    proxy = txn_proxy(proxy_factory, pool_size=2, session_state_policy="warn")
    with psycopg.connect(proxy.dsn(pg.superuser, application_name="warned"), autocommit=True) as c:
        c.execute("set work_mem = '5MB'")
    assert proxy.proxy.ctx.rules.pins == 0
    err = capfd.readouterr().err
    assert "session_state_in_transaction_mode" in err and "warned" in err


def test_a_returning_client_gets_its_previous_server_when_idle(proxy_factory, pg):
    """Its settings synced and its statements prepared there: no SET, no re-Parse."""
    proxy = txn_proxy(proxy_factory, pool_size=2)
    a = psycopg.connect(proxy.dsn(pg.superuser))
    b = psycopg.connect(proxy.dsn(pg.superuser))
    try:
        pid_a = a.execute("select pg_backend_pid()").fetchone()[0]  # both transactions open:
        pid_b = b.execute("select pg_backend_pid()").fetchone()[0]  # two servers
        assert pid_a != pid_b
        a.commit()
        b.commit()  # released last: the top of the idle stack, what plain LIFO would hand out
        for _ in range(3):
            assert a.execute("select pg_backend_pid()").fetchone()[0] == pid_a
            a.commit()
    finally:
        a.close()
        b.close()
