"""The log events docs/metrics.md lists that no other test reads, from a real ``pgscope run``
process's JSON log, with the fields the table promises: client_pinned, explain_sampled,
explain_failed, lock_hold and lock_hold_ended, server_closed (a server dropped past
server_drain_timeout)."""

from __future__ import annotations

import time

import psycopg

from proxy.protocol import messages as m
from tests.support.proxy import ProxyProcess
from tests.support.wire import WireClient


def test_documented_log_events_and_their_fields(pg, tmp_path):
    cfg = tmp_path / "pgscope.toml"
    cfg.write_text("\n".join([
        f'upstream = "{pg.dsn()}"', 'pool_mode = "transaction"', 'log_level = "info"', "server_drain_timeout = 0.2",
        "[inspect]", "flush_interval_ms = 50", "slow_query_ms = 10.0", "explain_cooldown_s = 0.0",
        "explain_analyze = true", "explain_timeout_ms = 100", "lock_hold_ms = 200.0",
    ]) + "\n")
    p = ProxyProcess(["--config", str(cfg)]).wait_ready()
    try:
        dsn = p.dsn(pg.superuser)
        with psycopg.connect(dsn + "?application_name=logged", autocommit=True) as c:
            c.execute("select pg_sleep(0.02)")  # slow; its EXPLAIN ANALYZE fits in 100 ms
            sampled = p.wait_event("explain_sampled", timeout=30)
            c.execute("select pg_sleep(0.5)")  # slow; its EXPLAIN ANALYZE does not
            failed = p.wait_event("explain_failed", timeout=30)
            c.execute("set work_mem = '7MB'")  # session state in transaction mode: pinned
            pinned = p.wait_event("client_pinned")
        with psycopg.connect(dsn + "?application_name=holder") as h:
            h.execute("create temp table if not exists t_log (id int)")  # (pins; the lock is what counts)
            h.execute("lock table t_log in access exclusive mode")
            h.execute("select pg_sleep(0.4)")  # holding the lock past lock_hold_ms, not idle
            hold = p.wait_event("lock_hold", application_name="holder")
            h.commit()
        ended = p.wait_event("lock_hold_ended", application_name="holder")
        # a client leaves with a statement running past server_drain_timeout: its server is closed
        leaver = WireClient(p.port, pg.superuser, "pgscope_test")
        leaver.send(m.query("select pg_sleep(1)"))
        leaver.terminate()
        closed = p.wait_event("server_closed")
    finally:
        p.stop()

    for ev in (sampled, failed):
        assert ev["fingerprint"]
    assert sampled["level"] == "info" and set(sampled) >= {"ms", "method", "total_cost", "node"}, sampled
    assert sampled["node"] == "Result" and sampled["ms"] >= 20
    assert failed["level"] == "warning" and failed["sqlstate"] == "57014", failed  # statement_timeout
    assert "error" in failed and "pg_sleep" not in str(failed["error"])  # only the SQLSTATE without log_parameters
    assert pinned["level"] == "info" and pinned["kind"] == "SET", pinned
    assert pinned["db"] == "pgscope_test" and pinned["user"] == pg.superuser
    assert pinned["application_name"] == "logged"
    assert hold["level"] == "warning" and hold["held_ms"] >= 200, hold
    assert ended["level"] == "warning" and ended["held_ms"] >= hold["held_ms"], ended
    assert closed["level"] == "info" and closed["db"] == "pgscope_test" and closed["user"] == pg.superuser, closed
    assert isinstance(closed["server_pid"], int) and "did not finish in time" in closed["reason"], closed


def test_log_connections_and_disconnections(pg, tmp_path):
    """client_login and client_closed at info, as PgBouncer's log_connections and log_disconnections (on by
    default); each can be turned off (then at debug: absent from an info log)."""
    def run(*lines: str) -> list[dict]:
        cfg = tmp_path / "pgscope.toml"
        cfg.write_text("\n".join([f'upstream = "{pg.dsn()}"', 'log_level = "info"', *lines]) + "\n")
        p = ProxyProcess(["--config", str(cfg)]).wait_ready()
        try:
            with psycopg.connect(p.dsn(pg.superuser) + "?application_name=come-and-go") as c:
                c.execute("select 1")
            p.wait_event("client_closed")  # (log_disconnections stays on in both runs)
            return p.events()
        finally:
            p.stop()

    events = run()
    [login] = [e for e in events if e.get("event") == "client_login"]
    [closed] = [e for e in events if e.get("event") == "client_closed"]
    assert login["level"] == "info" and login["application_name"] == "come-and-go", login
    assert login["db"] == "pgscope_test" and login["user"] == pg.superuser and login["tls"] is False, login
    assert closed["level"] == "info" and closed["client_id"] == login["client_id"], closed
    assert closed["db"] == "pgscope_test" and closed["reason"] == "client terminated", closed  # (a Terminate)
    assert closed["connected_s"] >= 0 and closed["client_addr"] == login["client_addr"]
    # off: the logins go unlogged at info, the ends still are (the control that the client came and went)
    events = run("log_connections = false")
    assert [e for e in events if e.get("event") == "client_closed"]
    assert not [e for e in events if e.get("event") == "client_login"]


def test_log_stats_every_stats_period(pg, tmp_path):
    """The stats event, as PgBouncer's stats line: the rates of the last stats_period over all
    databases; log_stats = false keeps it out (while the averages still move on)."""
    def run(log_stats: bool) -> list[dict]:
        cfg = tmp_path / "pgscope.toml"
        cfg.write_text("\n".join([f'upstream = "{pg.dsn()}"', 'log_level = "info"', "stats_period = 1",
                                  f"log_stats = {str(log_stats).lower()}", f'admin_users = ["{pg.superuser}"]'])
                       + "\n")
        p = ProxyProcess(["--config", str(cfg)]).wait_ready()
        try:
            with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as c:
                for i in range(30):
                    c.execute("select %s::int", (i,))
            with psycopg.connect(p.dsn(pg.superuser, dbname="pgscope"), autocommit=True,
                                 cursor_factory=psycopg.ClientCursor) as adm:
                def avg_xacts() -> int:
                    return int(dict(adm.execute("SHOW TOTALS").fetchall())["avg_xact_count"])
                assert avg_xacts() > 0
                deadline = time.monotonic() + 30
                while avg_xacts() != 0:  # two periods without traffic: the refresh ran at least twice
                    assert time.monotonic() < deadline, "the averages never moved on"
                    time.sleep(0.1)
            return p.events()
        finally:
            p.stop()

    stats = [e for e in run(True) if e.get("event") == "stats"]
    busy = [e for e in stats if e["xacts_per_s"] > 0]
    assert busy and stats[-1]["xacts_per_s"] == 0, stats
    assert busy[0]["level"] == "info" and busy[0]["queries_per_s"] >= busy[0]["xacts_per_s"] > 0, busy
    assert busy[0]["in_bytes_per_s"] > 0 and busy[0]["out_bytes_per_s"] > 0 and busy[0]["xact_us"] > 0, busy
    assert {"client_parses_per_s", "server_parses_per_s", "binds_per_s", "query_us", "wait_us"} <= set(busy[0])
    assert not [e for e in run(False) if e.get("event") == "stats"]
