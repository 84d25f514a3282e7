"""Operations: cancel routing, limits, reload, drain, upstream failure, readiness, start-up guards."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from tests.support.client import login_error
from tests.support.proxy import ProxyProcess
from tests.support.wire import WireClient, wait_for


def _sleep_in_thread(conn, sql, result):
    def run():
        try:
            conn.execute(sql)
            result.append("done")
        except psycopg.Error as e:
            result.append(e)
    t = threading.Thread(target=run)
    t.start()
    return t


def _wait_active(pg, pattern, timeout=10):
    deadline = time.monotonic() + timeout
    with pg.connect() as admin:
        while time.monotonic() < deadline:
            n = admin.execute("select count(*) from pg_stat_activity where state = 'active' and query like %s",
                              (pattern,)).fetchone()[0]
            if n:
                return
            time.sleep(0.05)
    raise AssertionError(f"no active query like {pattern}")


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_cancel_reaches_the_server_the_client_holds(proxy_factory, pg, mode):
    proxy = proxy_factory(pool_mode=mode, pool_size=3)
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as conn, \
            psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as other:
        other.execute("select 1")
        result: list = []
        t = _sleep_in_thread(conn, "select pg_sleep(20) /* cancel-me */", result)
        _wait_active(pg, "%cancel-me%")
        t0 = time.monotonic()
        conn.cancel_safe()
        t.join(10)
        assert time.monotonic() - t0 < 5
        assert isinstance(result[0], psycopg.errors.QueryCanceled), result
        assert result[0].sqlstate == "57014"
        assert conn.execute("select 11").fetchone() == (11,)
        assert other.execute("select 12").fetchone() == (12,)


def test_cancel_for_client_holding_no_server_is_a_noop(proxy_factory, pg):
    proxy = proxy_factory(pool_mode="transaction", pool_size=1)
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as idle, \
            psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as busy:
        idle.execute("select 1")  # ran on the only server, then gave it back
        result: list = []
        t = _sleep_in_thread(busy, "select pg_sleep(1.5) /* busy-one */", result)
        _wait_active(pg, "%busy-one%")
        idle.cancel_safe()  # idle holds nothing: must not cancel busy's query on "its" old server
        t.join(10)
        assert result == ["done"]
        assert idle.execute("select 2").fetchone() == (2,)


def test_reserve_pool_serves_after_timeout(proxy_factory, pg):
    proxy = proxy_factory(pool_size=1, reserve_pool_size=1, reserve_pool_timeout=0.3, query_wait_timeout=10)
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as a:
        a.execute("select 1")
        t0 = time.monotonic()
        with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as b:
            assert b.execute("select 2").fetchone() == (2,)
        assert 0.25 <= time.monotonic() - t0 < 5


def test_server_connect_timeout(proxy_factory, pg):
    """An upstream that accepts TCP and never answers: a clean 08006 after server_connect_timeout."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    port = lsock.getsockname()[1]
    try:
        proxy = proxy_factory(upstream=f"postgresql://{pg.superuser}@127.0.0.1:{port}/pgscope_test",
                              server_connect_timeout=0.5)
        t0 = time.monotonic()
        e = login_error(proxy.dsn(pg.superuser))
        assert time.monotonic() - t0 < 5
        assert e.sqlstate == "08006"
        assert "timed out" in e.args[0]
    finally:
        lsock.close()


def test_upstream_terminated_backends(proxy_factory, pg):
    """Clients in a transaction get an error; idle clients keep working; the pool heals."""
    proxy = proxy_factory(pool_mode="transaction", pool_size=4)
    dsn = proxy.dsn(pg.superuser, application_name="victims")
    idle = [psycopg.connect(dsn, autocommit=True) for _ in range(3)]
    busy = psycopg.connect(dsn)
    try:
        for c in idle:
            c.execute("select 1")
        busy.execute("select 1")  # transaction open: busy holds a server
        with pg.connect() as admin:
            admin.execute("select pg_terminate_backend(pid) from pg_stat_activity "
                          "where datname = 'pgscope_test' and pid <> pg_backend_pid() "
                          "and backend_type = 'client backend'")
            deadline = time.monotonic() + 15  # the servers are gone (their FATAL sent) before the client asks
            while admin.execute("select count(*) from pg_stat_activity where datname = 'pgscope_test' "
                                "and pid <> pg_backend_pid() and backend_type = 'client backend'").fetchone()[0]:
                assert time.monotonic() < deadline, "pg_terminate_backend did not end the servers"
                time.sleep(0.05)
        with pytest.raises(psycopg.OperationalError) as ei:
            busy.execute("select 2")
        assert ei.value.sqlstate == "57P01", ei.value.sqlstate  # the server's FATAL, as it said it
        for i, c in enumerate(idle):
            assert c.execute("select %s::int", (i,)).fetchone() == (i,)
        with psycopg.connect(dsn, autocommit=True) as fresh:
            assert fresh.execute("select 3").fetchone() == (3,)
    finally:
        for c in idle + [busy]:
            c.close()


def test_upstream_restart(proxy_factory, pg):
    if not getattr(pg, "managed", False) or not hasattr(pg, "restart"):
        pytest.skip("needs a throwaway cluster the tests may restart")
    proxy = proxy_factory(pool_mode="transaction", pool_size=4)
    dsn = proxy.dsn(pg.superuser)
    idle = [psycopg.connect(dsn, autocommit=True) for _ in range(3)]
    try:
        for c in idle:
            c.execute("select 1")
        pg.restart()
        deadline = time.monotonic() + 20
        for i, c in enumerate(idle):
            while True:
                try:
                    assert c.execute("select %s::int", (i,)).fetchone() == (i,)
                    break
                except psycopg.OperationalError as e:
                    # only while PostgreSQL is still starting up ("57P03") may a query fail
                    assert e.sqlstate in ("57P03", "08006") and time.monotonic() < deadline, e
                    assert not c.closed, "an idle client must not lose its connection"
                    time.sleep(0.2)
    finally:
        for c in idle:
            c.close()


def test_healthz_and_readyz(proxy):
    assert proxy.http("/healthz")[0] == 200
    assert proxy.http("/readyz")[0] == 200


def test_readyz_when_postgres_is_unreachable(proxy_factory, pg):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    proxy = proxy_factory(upstream=f"postgresql://{pg.superuser}@127.0.0.1:{dead}/pgscope_test")
    assert proxy.http("/healthz")[0] == 200
    assert proxy.http("/readyz")[0] == 503


def _metric(text: str, sample: str) -> float | None:
    """The value of one sample (name with its labels as the exposition writes them), or None."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_pool_refusal_and_readiness_metrics(proxy_factory, pg, tmp_path):
    """Per-pool waiting and wait time, limits, refused clients, failed logins both sides, readiness."""
    from proxy import __version__

    users = tmp_path / "userlist.txt"
    users.write_text('"pgscope_md5" "md5pass"\n')
    proxy = proxy_factory(pool_mode="transaction", pool_size=1, max_client_conn=2, auth_type="md5",
                          auth_file=str(users))
    assert login_error(proxy.dsn("pgscope_md5", "wrong")).sqlstate == "28P01"
    assert login_error(proxy.dsn("pgscope_md5", "md5pass", dbname="no_such_db_metrics")).sqlstate == "3D000"
    pool = 'db="pgscope_test",user="pgscope_md5"'
    holder = psycopg.connect(proxy.dsn("pgscope_md5", "md5pass"))
    other = psycopg.connect(proxy.dsn("pgscope_md5", "md5pass"), autocommit=True)
    try:
        holder.execute("select 1")  # holds the pool's only server until it commits
        result: list = []
        t = _sleep_in_thread(other, "select 2", result)
        deadline = time.monotonic() + 10
        while _metric(proxy.metrics(), f"pgscope_pool_waiting_clients{{{pool}}}") != 1.0:
            assert time.monotonic() < deadline, proxy.metrics()
            time.sleep(0.05)
        waiting_seen = time.monotonic()  # the waiter queued before this
        assert login_error(proxy.dsn("pgscope_md5", "md5pass")).sqlstate == "53300"  # a third client
        released = time.monotonic()  # ... and cannot have had a server before this
        holder.commit()
        t.join(10)
        assert result == ["done"]
    finally:
        holder.close()
        other.close()
    text = proxy.metrics()
    assert _metric(text, f"pgscope_pool_waiting_clients{{{pool}}}") == 0.0
    assert _metric(text, f"pgscope_pool_size{{{pool}}}") == 1.0
    # the waiter waited at least from waiting_seen to released: its wait is in the sum and above
    # every bucket boundary below that (measured, not a fixed sleep)
    waited = released - waiting_seen
    assert _metric(text, f"pgscope_pool_wait_seconds_sum{{{pool}}}") >= waited
    count = _metric(text, f"pgscope_pool_wait_seconds_count{{{pool}}}")
    below = [le for le in re.findall(
        r'^pgscope_pool_wait_seconds_bucket\{db="pgscope_test",le="([0-9.e+-]+)",user="pgscope_md5"\}', text, re.M)
        if float(le) < waited]
    assert below, (waited, text)  # at least one boundary to be above
    for le in below:
        assert _metric(text, f'pgscope_pool_wait_seconds_bucket{{db="pgscope_test",le="{le}",user="pgscope_md5"}}') \
            < count, (le, waited)
    assert _metric(text, 'pgscope_server_connect_failures_total{db="no_such_db_metrics",user="pgscope_md5"}') == 1.0
    assert _metric(text, f"pgscope_server_connect_failures_total{{{pool}}}") is None
    assert _metric(text, 'pgscope_clients_refused_total{reason="max_client_conn"}') == 1.0
    assert _metric(text, "pgscope_client_auth_failures_total") == 1.0
    assert _metric(text, "pgscope_max_client_connections") == 2.0
    assert _metric(text, "pgscope_inspect_queue_capacity") == 10000.0
    assert _metric(text, f'pgscope_build_info{{version="{__version__}"}}') == 1.0
    assert _metric(text, "pgscope_ready") == 1.0  # a server was used in the last 5 s


def test_ready_gauge_follows_the_upstream_without_blocking_a_scrape(proxy_factory, pg):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    down = proxy_factory(upstream=f"postgresql://{pg.superuser}@127.0.0.1:{dead}/pgscope_test")
    up = proxy_factory()
    for p, want in ((down, 0.0), (up, 1.0)):
        # the first scrape answers at once with what is known (nothing yet: 0) and starts a check
        assert _metric(p.metrics(), "pgscope_ready") == 0.0
        deadline = time.monotonic() + 10
        while _metric(p.metrics(), "pgscope_ready") != want:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert p.http("/readyz")[0] == (200 if want else 503)
    assert _metric(down.metrics(), 'pgscope_server_connect_failures_total{db="pgscope_test",user="%s"}'
                   % pg.superuser) >= 1.0


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_close_leaves_no_task_pending(pg, mode):
    """Shutdown cancels and waits for every background task: the lock sampler, the EXPLAIN sampler,
    the inspection loop, the janitors (else: "Task was destroyed but it is pending" at exit)."""
    import asyncio
    import gc

    from tests.support.proxy import RunningProxy, make_settings

    for _ in range(3):
        p = RunningProxy(make_settings(pg, pool_mode=mode, min_pool_size=2, **{
            "inspect.lock_sample_interval_ms": 10.0, "inspect.flush_interval_ms": 10,
            "inspect.slow_query_ms": 0.0, "inspect.explain_cooldown_s": 0.0,
            "inspect.explain_max_per_minute": 6000})).start()
        c = psycopg.connect(p.dsn(pg.superuser))
        for i in range(30):
            c.execute("select pg_sleep(0.001), %s::int", (i,))
        c.execute("select 1 from pg_class limit 1 for update")
        time.sleep(0.05)  # samplers under way while the client still holds its transaction
        p.stop()
        c.close()
        assert not p._thread.is_alive()
        pending = [t for t in asyncio.all_tasks(p.loop) if not t.done()]
        assert pending == [], pending
        assert p.proxy.locks.sampler.conn is None and not p.proxy.explain.side._conns
        del p, pending
        gc.collect()


# ---------------------------------------------------------------- the process

def test_trust_on_a_remote_listen_address_refuses_to_start(pg):
    out = subprocess.run([sys.executable, "-m", "proxy", "run", "--listen", "0.0.0.0:0",
                          "--metrics-listen", "", "--upstream", pg.dsn()],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "refusing_trust_on_remote_listen" in out.stdout + out.stderr


def test_open_files_limit_raised(pg):
    p = ProxyProcess(["--upstream", pg.dsn()]).wait_ready()
    try:
        limits = open(f"/proc/{p.proc.pid}/limits").read()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        soft, hard = line.split()[3:5]
        assert soft == hard, line
    finally:
        p.stop()


def idle_close_error(msgs) -> str | None:
    """The SQLSTATE of the last message before the proxy closed, if it is an ErrorResponse."""
    from proxy.protocol.messages import decode_error_fields

    assert msgs, "closed without a word"
    t, body = msgs[-1]
    assert t == b"E", msgs
    return decode_error_fields(body).get("C")


def test_sighup_reload(pg, tmp_path):
    cfg = tmp_path / "pgscope.toml"
    cfg.write_text(f'upstream = "{pg.dsn()}"\npool_mode = "transaction"\nlog_level = "info"\n')
    p = ProxyProcess(["--config", str(cfg)]).wait_ready()
    try:
        with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as c:
            assert c.execute("select 1").fetchone() == (1,)
            cfg.write_text(f'upstream = "{pg.dsn()}"\npool_mode = "session"\nlog_level = "info"\n'
                           'client_idle_timeout = 1\n')
            p.signal(signal.SIGHUP)
            ev = p.wait_event("reloaded")
            assert "client_idle_timeout" in ev["changed"]
            p.wait_event("reload_key_needs_restart", key="pool_mode")
            # the client survived the reload and still works
            assert c.execute("select 2").fetchone() == (2,)
            # the new timeout is in force: an idle client is closed with 57P05 (read on the wire: libpq
            # does not keep the SQLSTATE of an error that arrives while it is not reading)
            w = WireClient(p.port, pg.superuser, "pgscope_test")
            t0 = time.monotonic()
            assert idle_close_error(w.read_to_eof(timeout=15)) == "57P05"
            assert time.monotonic() - t0 >= 0.9
            with pytest.raises(psycopg.OperationalError) as ei:
                c.execute("select 3")
            assert "idle-session timeout" in str(ei.value)
        # a bad file is refused and the old settings stay
        cfg.write_text("pool_size = 'many'\n")
        p.signal(signal.SIGHUP)
        ev = p.wait_event("reload_failed")
        assert "pool_size" in ev["error"]
        with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as c:
            assert c.execute("select 4").fetchone() == (4,)
    finally:
        p.stop()


def test_sigterm_drains_running_transactions(pg):
    p = ProxyProcess(["--upstream", pg.dsn()]).wait_ready()
    conn = psycopg.connect(p.dsn(pg.superuser))
    try:
        conn.execute("create temp table d(x int)")
        conn.execute("insert into d values (1)")
        result: list = []
        t = _sleep_in_thread(conn, "select pg_sleep(1) /* drain-me */", result)
        _wait_active(pg, "%drain-me%")
        p.signal(signal.SIGTERM)
        p.wait_event("draining")
        # no new clients while draining
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(p.dsn(pg.superuser), connect_timeout=3)
        t.join(10)
        assert result == ["done"]
        conn.execute("insert into d values (2)")
        conn.commit()  # the running transaction may finish
        assert p.proc.wait(20) == 0
        assert any(e.get("event") == "draining" for e in p.events())
    finally:
        conn.close()
        p.stop()


def test_health_check_before_reuse(proxy_factory, pg):
    """server_check_delay = 0: an idle server is checked with server_check_query before a client gets it."""
    proxy = proxy_factory(pool_size=1, server_check_delay=0, server_check_query="select 1 /* pgscope-health */")
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        pid = c.execute("select pg_backend_pid()").fetchone()[0]
    # the server reset and back in the pool as idle (a client waiting would get it handed over unchecked)
    wait_for(lambda: _metric(proxy.metrics(), f'pgscope_server_connections{{db="pgscope_test",state="idle",'
                                              f'user="{pg.superuser}"}}') == 1.0, what="the server idle")
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        with pg.connect() as admin:
            last = admin.execute("select query from pg_stat_activity where pid = %s", (pid,)).fetchone()
        assert last == ("select 1 /* pgscope-health */",)
        assert c.execute("select pg_backend_pid()").fetchone()[0] == pid
