"""Locks on a second PostgreSQL: a ``[databases]`` entry on another server gets pg_locks samples of its own.

The lock tracker's pg_locks sampler reads the upstream's server; clients of an alias on another
server hold and wait for locks there, where only a sampler of that server sees who blocks whom.
These tests start a second throwaway PostgreSQL (proxy.throwaway, as the suite's own).
"""

from __future__ import annotations

import threading

import psycopg
import pytest

from proxy.throwaway import start_postgres, wait_connectable
from tests.support.pg import PgServer
from tests.support.wire import wait_for


@pytest.fixture(scope="module")
def pg2():
    try:
        cluster = start_postgres()
    except RuntimeError as e:  # (CI has the binaries: a skip there is a failure, see conftest.py)
        pytest.skip(f"no second PostgreSQL to start: {e}")
    server = PgServer(cluster, dbname="postgres")
    try:
        wait_connectable(lambda: server.connect(dbname="postgres"))
        with server.connect(dbname="postgres") as c:
            c.execute("create table far_rows (id int primary key, v text)")
            c.execute("insert into far_rows values (1, 'a'), (2, 'b')")
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_lock_held_on_another_server_is_reported_with_whom_it_blocks(proxy_factory, pg, pg2, mode):
    proxy = proxy_factory(pool_mode=mode, databases={
        "far": {"host": pg2.host, "port": pg2.port, "dbname": "postgres"}, pg.dbname: {}},
        **{"inspect.lock_hold_ms": 500.0, "inspect.lock_sample_interval_ms": 100.0,
           "inspect.flush_interval_ms": 50})
    su = pg.superuser
    near = psycopg.connect(proxy.dsn(su, application_name="near-client"), autocommit=True)  # the upstream's
    holder = psycopg.connect(proxy.dsn(su, dbname="far", application_name="far-holder"))
    waiter = psycopg.connect(proxy.dsn(su, dbname="far", application_name="far-waiter"), autocommit=True)
    done: list[bool] = []
    try:
        assert near.execute("select current_database()").fetchone()[0] == pg.dbname
        assert holder.execute("select inet_server_port()").fetchone()[0] == pg2.port  # really the other server
        holder.execute("select * from far_rows where id = 1 for update")
        pid = holder.execute("select pg_backend_pid()").fetchone()[0]  # its server there (the same till commit)

        def wait_on_row() -> None:
            waiter.execute("update far_rows set v = 'c' where id = 1")
            done.append(True)

        t = threading.Thread(target=wait_on_row, daemon=True)
        t.start()
        pg2.wait_blocked("update far_rows set v = 'c'", 1.0)  # the control: blocked there, for 1 s by now

        def reported():
            return [lk for lk in proxy.api("/api/locks")["locks"]
                    if lk["application_name"] == "far-holder" and lk["blocked"] == 1]
        mine = wait_for(reported, timeout=10.0, what="far-holder reported with its waiter")
        lk = mine[0]
        assert [c["application_name"] for c in lk["blocked_clients"]] == ["far-waiter"], lk
        assert "far_rows" in lk["relations"] and lk["db"] == "far", lk
        assert lk["server_pid"] == pid
        assert "pgscope_blocked_clients 1.0" in proxy.metrics()
        assert not done
        holder.commit()
        t.join(10)
        assert done
    finally:
        holder.close()
        waiter.close()
        near.close()
    assert wait_for(lambda: "pgscope_blocked_clients 0.0" in proxy.metrics(), what="no one blocked any more")
