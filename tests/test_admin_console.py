"""The admin console (docs/admin.md) through a real proxy and a real PostgreSQL, with psql, pgbench and psycopg.

Connecting to the virtual database ``pgscope`` or ``pgbouncer`` as a user in
``admin_users`` (every command) or ``stats_users`` (SHOW only) opens the console;
answers are result sets with PgBouncer's column names.
"""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import threading

import psycopg
import pytest

from tests.support.client import login_error
from tests.support.tools import require
from proxy.protocol import messages as m
from tests.support.wire import WireClient, bind, execute, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# PgBouncer's columns (its doc/usage.md and src/admin.c), and pgscope's own views (/api/* fields)
COLUMNS = {
    "POOLS": "database user cl_active cl_waiting cl_active_cancel_req cl_waiting_cancel_req sv_active "
             "sv_active_cancel sv_being_canceled sv_idle sv_used sv_tested sv_login maxwait maxwait_us pool_mode "
             "load_balance_hosts",
    "CLIENTS": "type user database replication state addr port local_addr local_port connect_time request_time "
               "wait wait_us close_needed ptr link remote_pid tls application_name prepared_statements id",
    "STATS": "database total_server_assignment_count total_xact_count total_query_count total_received "
             "total_sent total_xact_time total_query_time total_wait_time total_client_parse_count "
             "total_server_parse_count total_bind_count total_client_connect_count avg_server_assignment_count "
             "avg_xact_count avg_query_count avg_recv avg_sent avg_xact_time avg_query_time avg_wait_time "
             "avg_client_parse_count avg_server_parse_count avg_bind_count avg_client_connect_count",
    "STATS_TOTALS": "database server_assignment_count xact_count query_count bytes_received bytes_sent xact_time "
                    "query_time wait_time client_parse_count server_parse_count bind_count client_connect_count",
    "STATS_AVERAGES": "database server_assignment_count xact_count query_count bytes_received bytes_sent xact_time "
                      "query_time wait_time avg_client_parse_count avg_server_parse_count avg_bind_count "
                      "client_connect_count",
    "TOTALS": "name value",
    "DATABASES": "name host port database force_user pool_size min_pool_size reserve_pool_size server_lifetime "
                 "pool_mode load_balance_hosts max_connections current_connections max_client_connections "
                 "current_client_connections paused disabled",
    "USERS": "name pool_size reserve_pool_size pool_mode max_user_connections current_connections "
             "max_user_client_connections current_client_connections",
    "CONFIG": "key value default changeable",
    "LISTS": "list items",
    "VERSION": "version",
    "STATE": "key value",
    "QUERIES": "fingerprint query db user calls total_ms mean_ms min_ms max_ms stddev_ms rows errors "
               "errors_by_class slow first_seen last_seen",
    "EXPLAINS": "fingerprint query plan duration_ms sampled_at db user method",
    "NPLUSONE": "fingerprint query count span_ms total_ms parent_fingerprint parent_query application_name "
                "client_addr started_at db",
    "LOCKS": "fingerprint query held_ms blocked blocked_fingerprints blocked_clients relations application_name "
             "client_addr state started_at db user server_pid",
    "RECOMMENDATIONS": "db table columns create_statement benefit method fingerprints calls total_ms cost_before "
                       "cost_after",
}
COLUMNS["SERVERS"] = COLUMNS["CLIENTS"]


def psql(proxy, user: str, command: str, db: str = "pgscope", check: bool = True,
         timeout: float = 60) -> subprocess.CompletedProcess:
    out = subprocess.run([require("psql"), "-X", "--csv", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", user,
                          "-d", db, "-c", command], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PGCONNECT_TIMEOUT": "10"})
    if check:
        assert out.returncode == 0, out.stderr
    return out


def table(proxy, user: str, command: str, db: str = "pgscope") -> tuple[list[str], list[dict[str, str]]]:
    rows = list(csv.reader(io.StringIO(psql(proxy, user, command, db).stdout)))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def console(proxy, user: str, db: str = "pgscope") -> psycopg.Connection:
    """psycopg on the console: ClientCursor sends plain Query messages (the simple protocol)."""
    return psycopg.connect(proxy.dsn(user, dbname=db), autocommit=True, cursor_factory=psycopg.ClientCursor)


def in_time(proxy, user: str, command: str, timeout: float = 30) -> None:
    """Run a command that waits (PAUSE, WAIT_CLOSE) with psql, and fail, not hang, when it does not return."""
    try:
        psql(proxy, user, command, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{command} did not return within {timeout}s") from None


def start_psql(proxy, user: str, command: str) -> subprocess.Popen:
    """A waiting command under way in psql (``finish`` collects it)."""
    return subprocess.Popen([require("psql"), "-X", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", user,
                             "-d", "pgscope", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(p: subprocess.Popen, timeout: float = 15) -> str:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError(f"{p.args[-1]} did not return within {timeout}s") from None
    assert p.returncode == 0, err
    return out


def rows_of(conn: psycopg.Connection, command: str) -> list[dict]:
    cur = conn.execute(command)
    names = [d.name for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


@pytest.fixture
def admin_proxy(proxy_factory, pg):
    def make(**kw):
        kw.setdefault("admin_users", [pg.superuser])
        kw.setdefault("stats_users", ["watcher"])
        return proxy_factory(**kw)
    return make


def test_psql_runs_every_show_command_and_gets_the_documented_columns(admin_proxy, pg):
    proxy = admin_proxy(**{"inspect.slow_query_ms": 0.0, "inspect.explain_cooldown_s": 0.0})
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True, application_name="seen-app") as c:
        c.execute("select 42 as answer")
        for db in ("pgscope", "pgbouncer"):
            for what, cols in COLUMNS.items():
                header, _ = table(proxy, pg.superuser, f"SHOW {what}", db)
                assert header == cols.split(), what
        proxy.flush_inspection()
        _, pools = table(proxy, pg.superuser, "SHOW POOLS")
        mine = [r for r in pools if r["database"] == pg.dbname and r["user"] == pg.superuser]
        assert len(mine) == 1 and mine[0]["sv_active"] == "1" and mine[0]["cl_active"] == "1", pools
        _, clients = table(proxy, pg.superuser, "SHOW CLIENTS")
        app = [r for r in clients if r["application_name"] == "seen-app"]
        assert len(app) == 1 and app[0]["database"] == pg.dbname and app[0]["state"] == "active", clients
        assert any(r["database"] == "pgscope" and r["user"] == pg.superuser for r in clients)  # the console itself
        _, servers = table(proxy, pg.superuser, "SHOW SERVERS")
        pid = c.execute("select pg_backend_pid()").fetchone()[0]
        assert [r["remote_pid"] for r in servers if r["link"] == app[0]["ptr"]] == [str(pid)], servers
        _, queries = table(proxy, pg.superuser, "SHOW QUERIES")
        assert any(r["query"] == "select $1 as answer" and r["calls"] == "1" for r in queries), queries
        _, stats = table(proxy, pg.superuser, "SHOW STATS_TOTALS")
        mine = [r for r in stats if r["database"] == pg.dbname]
        assert mine and int(mine[0]["query_count"]) >= 1 and int(mine[0]["server_assignment_count"]) >= 1, stats
        wait_for(lambda: table(proxy, pg.superuser, "SHOW EXPLAINS")[1], what="an EXPLAIN sample")
        _, explains = table(proxy, pg.superuser, "SHOW EXPLAINS")
        assert explains[0]["plan"].startswith("[{") and explains[0]["db"] == pg.dbname, explains
        _, config = table(proxy, pg.superuser, "SHOW CONFIG")
        byname = {r["key"]: r for r in config}
        assert byname["admin_users"]["value"] == pg.superuser and byname["pool_size"]["changeable"] == "yes"
        assert byname["listen"]["changeable"] == "no" and byname["pool_size"]["default"] == "20"
        _, state = table(proxy, pg.superuser, "SHOW STATE")
        assert {r["key"]: r["value"] for r in state} == {"active": "yes", "paused": "no", "suspended": "no"}
        _, version = table(proxy, pg.superuser, "SHOW VERSION")
        assert version[0]["version"].startswith("pgscope ")
        _, dbs = table(proxy, pg.superuser, "SHOW DATABASES")
        assert {r["name"] for r in dbs} >= {pg.dbname, "pgscope", "pgbouncer"}
        _, users = table(proxy, pg.superuser, "SHOW USERS")
        assert [r["current_client_connections"] for r in users if r["name"] == pg.superuser] == ["1"], users
        _, lists = table(proxy, pg.superuser, "SHOW LISTS")
        assert {r["list"]: int(r["items"]) for r in lists}["pools"] >= 1


STATS_KEYS = ("xact_count", "query_count", "client_parse_count", "server_parse_count", "bind_count",
              "client_connect_count", "bytes_received", "bytes_sent")


def _totals(proxy, user: str, db: str) -> dict[str, int]:
    _, rows = table(proxy, user, "SHOW STATS_TOTALS")
    mine = [r for r in rows if r["database"] == db]
    return {k: int(mine[0][k]) if mine else 0 for k in STATS_KEYS + ("xact_time", "query_time")}


def _metric(text: str, name: str, db: str) -> float:
    found = re.search(rf'^{name}{{db="{db}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_show_stats_counts_transactions_queries_statements_and_bytes_as_pgbouncer(admin_proxy, pg, mode):
    """A raw client's known conversation, counted exactly: SHOW STATS_TOTALS, SHOW STATS and /metrics,
    while it is connected and after it left."""
    proxy = admin_proxy(pool_mode=mode, pool_size=1)
    before = _totals(proxy, pg.superuser, pg.dbname)
    metrics_before = proxy.metrics()
    c = WireClient(proxy.port, pg.superuser, pg.dbname)
    sent = received = 0

    def ask(data: bytes) -> list:
        nonlocal sent, received
        c.send(data)
        sent += len(data)
        msgs = c.read_until(b"Z")
        received += sum(5 + len(body) for _, body in msgs)
        return msgs

    ask(m.query("select 1"))  # a query, a transaction
    for sql in ("begin", "select 2", "commit"):  # three queries, one transaction
        ask(m.query(sql))
    # the extended protocol: one named Parse, two Bind/Execute batches (two queries, two transactions)
    msgs = ask(m.parse("counted", "select $1::int") + bind("", "counted", [b"7"]) + execute() + m.sync())
    assert [t for t, _ in msgs] == [b"1", b"2", b"D", b"C", b"Z"], msgs
    ask(bind("", "counted", [b"8"]) + execute() + m.sync())
    want = {"xact_count": 4, "query_count": 6, "client_parse_count": 1, "server_parse_count": 1, "bind_count": 2,
            "client_connect_count": 1, "bytes_received": sent, "bytes_sent": received}
    live = _totals(proxy, pg.superuser, pg.dbname)
    assert {k: live[k] - before[k] for k in STATS_KEYS} == want, live
    assert live["xact_time"] > before["xact_time"] and live["query_time"] > before["query_time"]
    c.terminate()
    # the client left: its counts stay (the Terminate's 5 bytes were read too)
    want["bytes_received"] += 5
    wait_for(lambda: _totals(proxy, pg.superuser, pg.dbname)["bytes_received"] - before["bytes_received"] == sent + 5,
             what="the Terminate counted")
    after = _totals(proxy, pg.superuser, pg.dbname)
    assert {k: after[k] - before[k] for k in STATS_KEYS} == want, after
    header, stats = table(proxy, pg.superuser, "SHOW STATS")
    row = [r for r in stats if r["database"] == pg.dbname][0]
    assert int(row["total_xact_count"]) == after["xact_count"] and int(row["total_received"]) == after["bytes_received"]
    assert 0 < int(row["avg_xact_time"]) <= int(row["total_xact_time"])  # a mean, µs
    _, averages = table(proxy, pg.superuser, "SHOW STATS_AVERAGES")
    avg = [r for r in averages if r["database"] == pg.dbname][0]
    assert avg["xact_time"] == row["avg_xact_time"] and int(avg["bytes_received"]) > 0  # per second since start
    text = proxy.metrics()
    for key, name in (("xact_count", "pgscope_transactions_total"), ("query_count", "pgscope_queries_total"),
                      ("bytes_received", "pgscope_client_bytes_received_total"),
                      ("bytes_sent", "pgscope_client_bytes_sent_total"), ("bind_count", "pgscope_binds_total"),
                      ("client_parse_count", "pgscope_client_parses_total"),
                      ("server_parse_count", "pgscope_server_parses_total"),
                      ("client_connect_count", "pgscope_client_logins_total")):
        assert _metric(text, name, pg.dbname) - _metric(metrics_before, name, pg.dbname) == want[key], name
    assert _metric(text, "pgscope_transaction_seconds_total", pg.dbname) > 0


def _backend_pid(c: WireClient) -> int:
    c.send(m.query("select pg_backend_pid()"))
    [row] = [body for t, body in c.read_until(b"Z") if t == b"D"]
    return int(row[6:].decode())  # (one column: its count, its length, its text)


def test_transaction_mode_counts_a_parse_for_each_server_that_needs_the_statement(admin_proxy, pg):
    """Renamed statements: a client's one Parse, prepared again on a second server when it runs there."""
    proxy = admin_proxy(pool_mode="transaction", pool_size=2)
    before = _totals(proxy, pg.superuser, pg.dbname)
    a = WireClient(proxy.port, pg.superuser, pg.dbname)
    b = WireClient(proxy.port, pg.superuser, pg.dbname)
    try:
        a.send(m.parse("twice", "select $1::int") + bind("", "twice", [b"1"]) + execute() + m.sync())
        a.read_until(b"Z")
        b.send(m.query("begin"))  # b holds one server ...
        b.read_until(b"Z")
        a.send(m.query("begin"))  # ... so a's transaction gets a second one
        a.read_until(b"Z")
        assert _backend_pid(a) != _backend_pid(b)  # two servers: a's is not the one it prepared on
        b.send(m.query("commit"))
        b.read_until(b"Z")
        a.send(bind("", "twice", [b"2"]) + execute() + m.sync())
        msgs = a.read_until(b"Z")
        assert [t for t, _ in msgs][-3:] == [b"D", b"C", b"Z"], msgs
        a.send(m.query("commit"))
        a.read_until(b"Z")
        a.send(bind("", "twice", [b"3"]) + execute() + m.sync())  # on a's last server again: prepared there
        a.read_until(b"Z")
        live = _totals(proxy, pg.superuser, pg.dbname)
        delta = {k: live[k] - before[k] for k in ("client_parse_count", "server_parse_count", "bind_count")}
        assert delta == {"client_parse_count": 1, "server_parse_count": 2, "bind_count": 3}, live
    finally:
        a.terminate()
        b.terminate()


def _totals_view(proxy, user: str) -> dict[str, int]:
    header, rows = table(proxy, user, "SHOW TOTALS")
    assert header == ["name", "value"]
    return {r["name"]: int(r["value"]) for r in rows}


def test_averages_cover_the_last_stats_period_and_the_stats_event_logs_them(admin_proxy, pg):
    """As PgBouncer's: SHOW STATS, STATS_AVERAGES and TOTALS average over the last one or two
    stats_period, not since start (the stats log event: test_log_events.py)."""
    proxy = admin_proxy(stats_period=1)
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        for i in range(50):
            c.execute("select %s::int", (i,))
    busy = _totals_view(proxy, pg.superuser)
    assert busy["total_xact_count"] >= 50 and busy["avg_xact_count"] > 0, busy  # the traffic is in the window
    assert busy["total_client_connect_count"] >= 1 and busy["total_client_bytes"] > 0 and busy["avg_xact_time"] > 0
    assert list(busy)[:3] == ["total_server_assignment_count", "total_xact_count", "total_query_count"]
    assert len(busy) == 24 and "avg_ps_bind_count" in busy  # PgBouncer's names
    _, rows = table(proxy, pg.superuser, "SHOW STATS_AVERAGES")
    assert int([r for r in rows if r["database"] == pg.dbname][0]["xact_count"]) > 0
    # two periods later with no traffic the averages are 0, the totals stay
    wait_for(lambda: _totals_view(proxy, pg.superuser)["avg_xact_count"] == 0, what="the averages' window moved on")
    quiet = _totals_view(proxy, pg.superuser)
    assert quiet["total_xact_count"] == busy["total_xact_count"] and quiet["avg_xact_time"] == 0, quiet
    _, stats = table(proxy, pg.superuser, "SHOW STATS")
    row = [r for r in stats if r["database"] == pg.dbname][0]
    assert int(row["total_xact_count"]) >= 50 and row["avg_xact_count"] == "0", row


def test_show_help_lists_the_commands_and_pgbouncers_missing_ones_say_why(admin_proxy, pg):
    proxy = admin_proxy()
    out = psql(proxy, pg.superuser, "SHOW HELP")
    assert "Console usage" in out.stderr and "SHOW TOTALS" in out.stderr and "KILL_CLIENT id" in out.stderr, out
    with console(proxy, pg.superuser) as adm:
        for command in ("SUSPEND", "SHOW FDS", "SHOW MEM", "SHOW SOCKETS", "SHOW DNS_HOSTS", "SHOW PEER_POOLS"):
            with pytest.raises(psycopg.errors.FeatureNotSupported) as e:
                adm.execute(command)
            assert "not supported by pgscope" in str(e.value) and e.value.diag.message_hint, command
        with pytest.raises(psycopg.errors.SyntaxError):  # an unknown command is still a syntax error
            adm.execute("SHOW NOTHING_OF_THE_KIND")
        assert rows_of(adm, "SHOW STATE")  # and the console goes on


def test_the_docs_list_every_command_and_column():
    with open(os.path.join(ROOT, "docs", "admin.md")) as f:
        doc = f.read()
    from proxy.admin.console import KNOWN

    for command in KNOWN:
        assert f"`{command}`" in doc, command
    for what, cols in COLUMNS.items():
        section = doc.split(f"### `SHOW {what}`", 1)[1].split("\n### ", 1)[0]
        for col in cols.split():
            assert re.search(rf"`{col}`", section), (what, col)


def _backends(pg, app: str) -> list[int]:
    with pg.connect() as c:
        return [r[0] for r in c.execute("select pid from pg_stat_activity where application_name = %s", (app,))]


def _history(pg) -> int:
    with pg.connect() as c:
        return c.execute("select count(*) from pgbench_history").fetchone()[0]


def test_pause_holds_pgbench_and_resume_releases_it_without_errors(admin_proxy, pg):
    pgbench = require("pgbench")
    init = subprocess.run([pgbench, "-i", "-s", "1", "-q", pg.dsn()], capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    proxy = admin_proxy(pool_mode="transaction", pool_size=4)
    run = subprocess.Popen([pgbench, "-n", "-c", "4", "-j", "2", "-T", "5", proxy.dsn(pg.superuser)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PGAPPNAME": "bench-paused"})
    try:
        wait_for(lambda: _history(pg) > 50, what="pgbench running through the proxy")
        with console(proxy, pg.superuser) as adm:
            in_time(proxy, pg.superuser, "PAUSE")  # returns once every server is closed
            assert _backends(pg, "bench-paused") == []
            assert rows_of(adm, "SHOW SERVERS") == []
            state = {r["key"]: r["value"] for r in rows_of(adm, "SHOW STATE")}
            assert state["paused"] == "yes"
            wait_for(lambda: sum(r["cl_waiting"] for r in rows_of(adm, "SHOW POOLS")) == 4,
                     what="all four pgbench clients waiting")
            held = _history(pg)
            assert _backends(pg, "bench-paused") == [] and _history(pg) == held  # nothing ran meanwhile
            adm.execute("RESUME")
            wait_for(lambda: _history(pg) > held, what="transactions again after RESUME")
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, err + out
    assert "number of failed transactions: 0" in out or "failed" not in out, out
    assert "aborted" not in out + err, out + err


def test_pause_waits_for_the_transaction_under_way(admin_proxy, pg):
    proxy = admin_proxy(pool_mode="transaction")
    with psycopg.connect(proxy.dsn(pg.superuser), application_name="in-tx") as c, \
            console(proxy, pg.superuser) as watch:
        c.execute("select 1")  # a transaction is open (psycopg's implicit BEGIN), its server held
        pause = start_psql(proxy, pg.superuser, f"PAUSE {pg.dbname}")
        wait_for(lambda: [r["paused"] for r in rows_of(watch, "SHOW DATABASES") if r["name"] == pg.dbname] == [1],
                 what="the database shown paused")
        assert pause.poll() is None and len(_backends(pg, "in-tx")) == 1  # PAUSE waits for the transaction
        c.commit()
        finish(pause)
        assert _backends(pg, "in-tx") == []  # released, then closed
        watch.execute(f"RESUME {pg.dbname}")
        assert c.execute("select 2").fetchone() == (2,)
        c.commit()


def test_reconnect_closes_servers_once_released_and_wait_close_waits(admin_proxy, pg):
    proxy = admin_proxy(pool_mode="transaction")
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True, application_name="rc-idle") as a, \
            psycopg.connect(proxy.dsn(pg.superuser), application_name="rc-busy") as b, \
            console(proxy, pg.superuser) as adm:
        busy_pid = b.execute("select pg_backend_pid()").fetchone()[0]  # held: a transaction is open
        idle_pid = a.execute("select pg_backend_pid()").fetchone()[0]  # another server, back idle after
        adm.execute("RECONNECT")
        wait_for(lambda: idle_pid not in _backends_all(pg), what="the idle server closed at once")
        servers = {r["remote_pid"]: r for r in rows_of(adm, "SHOW SERVERS")}
        assert servers[busy_pid]["close_needed"] == 1 and busy_pid in _backends_all(pg)
        wait_close = start_psql(proxy, pg.superuser, "WAIT_CLOSE")
        wait_for(lambda: any(r["application_name"] == "psql" and r["database"] == "pgscope"
                             for r in rows_of(adm, "SHOW CLIENTS")), what="WAIT_CLOSE's client in")
        with pytest.raises(subprocess.TimeoutExpired):  # still in use: WAIT_CLOSE waits
            wait_close.wait(0.3)
        assert busy_pid in _backends_all(pg)
        b.commit()  # released: closed now
        finish(wait_close)
        assert busy_pid not in _backends_all(pg)
        fresh = a.execute("select pg_backend_pid()").fetchone()[0]
        assert fresh not in (idle_pid, busy_pid)


def _backends_all(pg) -> list[int]:
    with pg.connect() as c:
        return [r[0] for r in c.execute("select pid from pg_stat_activity")]


def test_kill_drops_clients_and_servers_and_new_clients_wait_for_resume(admin_proxy, pg):
    proxy = admin_proxy()
    victim = psycopg.connect(proxy.dsn(pg.superuser), autocommit=True, application_name="killed")
    pid = victim.execute("select pg_backend_pid()").fetchone()[0]
    with console(proxy, pg.superuser) as adm:
        adm.execute(f"KILL {pg.dbname}")
        with pytest.raises(psycopg.OperationalError) as e:
            victim.execute("select 1")
        assert "administrator command" in str(e.value)
        wait_for(lambda: pid not in _backends_all(pg), what="the killed client's server closed")
        result = {}

        def late():
            with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
                result["v"] = c.execute("select 7").fetchone()[0]
        t = threading.Thread(target=late, daemon=True)
        t.start()
        wait_for(lambda: any(r["cl_waiting"] for r in rows_of(adm, "SHOW POOLS")), what="a new client waiting")
        assert "v" not in result  # held while killed
        adm.execute("RESUME")
        t.join(15)
        assert result == {"v": 7}
    victim.close()


def test_kill_client_ends_that_client_only(admin_proxy, pg):
    proxy = admin_proxy()
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True, application_name="victim") as v, \
            psycopg.connect(proxy.dsn(pg.superuser), autocommit=True, application_name="bystander") as b, \
            console(proxy, pg.superuser) as adm:
        pid = v.execute("select pg_backend_pid()").fetchone()[0]
        b.execute("select 1")
        ids = {r["application_name"]: r["id"] for r in rows_of(adm, "SHOW CLIENTS")}
        adm.execute(f"KILL_CLIENT {ids['victim']}")
        with pytest.raises(psycopg.OperationalError):
            v.execute("select 1")
        wait_for(lambda: pid not in _backends_all(pg), what="its server closed")
        assert b.execute("select 2").fetchone() == (2,)
        with pytest.raises(psycopg.errors.UndefinedObject):
            adm.execute("KILL_CLIENT 999999")


def test_access_admin_stats_and_others(admin_proxy, pg, tmp_path):
    from proxy.protocol.scram import make_verifier

    users = tmp_path / "userlist.txt"
    users.write_text(f'"{pg.superuser}" "{make_verifier("adminpw")}"\n"watcher" "watchpw"\n"nobody" "nopw"\n')
    proxy = admin_proxy(auth_type="scram-sha-256", auth_file=str(users))
    with psycopg.connect(proxy.dsn(pg.superuser, "adminpw", dbname="pgbouncer"), autocommit=True,
                         cursor_factory=psycopg.ClientCursor) as adm:
        assert rows_of(adm, "SHOW STATE")  # positive control: the admin is in
    assert login_error(proxy.dsn(pg.superuser, "wrong", dbname="pgscope")).sqlstate == "28P01"  # auth first
    e = login_error(proxy.dsn("nobody", "nopw", dbname="pgscope"))
    assert e.sqlstate == "28000" and "may not use the admin console" in str(e), e
    with psycopg.connect(proxy.dsn("watcher", "watchpw", dbname="pgscope"), autocommit=True,
                         cursor_factory=psycopg.ClientCursor) as st:
        assert rows_of(st, "SHOW POOLS") is not None and rows_of(st, "SHOW QUERIES") is not None
        for command in ("PAUSE", "RELOAD", "SET pool_size = 3", "KILL_CLIENT 1", "SHUTDOWN"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                st.execute(command)
        assert {r["key"]: r["value"] for r in rows_of(st, "SHOW STATE")}["paused"] == "no"
        with pytest.raises(psycopg.errors.SyntaxError) as e:
            st.execute("SELECT 1")  # nothing reaches a server
        assert "SHOW POOLS" in e.value.diag.message_detail and "PAUSE [db]" in e.value.diag.message_detail
    with psycopg.connect(proxy.dsn("watcher", "watchpw", dbname="pgscope"), autocommit=True) as ext:
        with pytest.raises(psycopg.errors.FeatureNotSupported):  # psycopg's default cursor: Parse/Bind
            ext.execute("SHOW POOLS", prepare=True)
        assert psycopg.ClientCursor(ext).execute("SHOW VERSION").fetchone()[0].startswith("pgscope")


def test_disable_enable_and_set(admin_proxy, pg):
    proxy = admin_proxy()
    with console(proxy, pg.superuser) as adm, psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as stays:
        adm.execute(f"DISABLE {pg.dbname}")
        assert login_error(proxy.dsn(pg.superuser)).sqlstate == "55000"
        assert [r["disabled"] for r in rows_of(adm, "SHOW DATABASES") if r["name"] == pg.dbname] == [1]
        assert stays.execute("select 3").fetchone() == (3,)  # connected clients go on
        adm.execute(f"ENABLE {pg.dbname}")
        with psycopg.connect(proxy.dsn(pg.superuser)) as c:
            assert c.execute("select 1").fetchone() == (1,)
        adm.execute("SET pool_size = 3")
        adm.execute("SET inspect.slow_query_ms = '250'")
        config = {r["key"]: r["value"] for r in rows_of(adm, "SHOW CONFIG")}
        assert config["pool_size"] == "3" and config["inspect.slow_query_ms"] == "250.0"
        assert proxy.proxy.pools.cfg.pool_size == 3  # applied as a reload applies it
        for bad, error in (("SET listen = '0.0.0.0:1'", psycopg.errors.CantChangeRuntimeParam),
                           ("SET pool_size = 'many'", psycopg.errors.InvalidParameterValue),
                           ("SET pool_size = 0", psycopg.errors.InvalidParameterValue),
                           ("SET no_such_key = 1", psycopg.errors.UndefinedObject),
                           ("SET http_token_file = '/etc/passwd'", psycopg.errors.CantChangeRuntimeParam)):
            with pytest.raises(error):
                adm.execute(bad)
        assert {r["key"]: r["value"] for r in rows_of(adm, "SHOW CONFIG")}["pool_size"] == "3"


def test_reload_and_shutdown_from_the_console(pg, tmp_path):
    from tests.support.proxy import ProxyProcess

    conf = tmp_path / "pgscope.toml"
    conf.write_text(f'upstream = "{pg.dsn()}"\nadmin_users = ["{pg.superuser}"]\npool_size = 7\n')
    p = ProxyProcess(["--config", str(conf)]).wait_ready()
    try:
        header, rows = table(p, pg.superuser, "SHOW CONFIG")
        assert {r["key"]: r["value"] for r in rows}["pool_size"] == "7"
        conf.write_text(f'upstream = "{pg.dsn()}"\nadmin_users = ["{pg.superuser}"]\npool_size = 9\n')
        psql(p, pg.superuser, "RELOAD")
        assert {r["key"]: r["value"] for r in table(p, pg.superuser, "SHOW CONFIG")[1]}["pool_size"] == "9"
        psql(p, pg.superuser, "SET server_check_query = 'select 271828'")
        out = psql(p, pg.superuser, "SHUTDOWN", check=False)
        assert p.proc.wait(30) == 0, out.stderr + p.logs()[-2000:]
    finally:
        p.stop()
    # the documented log events (docs/metrics.md), and never a SET value
    login = p.wait_event("admin_login", user=pg.superuser)
    assert login["admin"] is True and login["client_addr"].startswith("127.0.0.1:")
    assert p.wait_event("admin_command", command="RELOAD")["args"] == []
    assert p.wait_event("admin_set")["key"] == "server_check_query" and "271828" not in p.logs()
    assert p.wait_event("admin_shutdown")["level"] == "info"


def test_shutdown_wait_for_clients_stops_accepting_and_exits_when_the_last_client_leaves(pg, tmp_path):
    import urllib.error
    import urllib.request

    from tests.support.proxy import ProxyProcess

    def readyz(p) -> int:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/readyz", timeout=10).status
        except urllib.error.HTTPError as e:
            return e.code

    conf = tmp_path / "pgscope.toml"
    conf.write_text(f'upstream = "{pg.dsn()}"\nadmin_users = ["{pg.superuser}"]\n')
    p = ProxyProcess(["--config", str(conf)]).wait_ready()
    try:
        bad = psql(p, pg.superuser, "SHUTDOWN NOW", check=False)
        assert bad.returncode != 0 and "WAIT_FOR_CLIENTS" in bad.stderr, bad.stderr
        stayer = psycopg.connect(p.dsn(pg.superuser), autocommit=True)
        stayer.execute("begin")
        stayer.execute("select 1")
        assert readyz(p) == 200  # positive control
        with console(p, pg.superuser) as adm:
            adm.execute("SHUTDOWN WAIT_FOR_CLIENTS")
            wait_for(lambda: readyz(p) == 503, what="/readyz not ready once no longer accepting")
            with pytest.raises(psycopg.OperationalError):  # no new clients
                psycopg.connect(p.dsn(pg.superuser), connect_timeout=5)
            # the connected client goes on, in and out of its transaction, as long as it likes
            assert stayer.execute("select 2").fetchone() == (2,)
            stayer.execute("commit")
            assert stayer.execute("select 3").fetchone() == (3,)
            assert p.proc.poll() is None and rows_of(adm, "SHOW STATE")  # still running; the console too
        stayer.close()  # the last client leaves: pgscope shuts down
        assert p.proc.wait(30) == 0, p.logs()[-2000:]
    finally:
        p.stop()
    assert p.wait_event("admin_shutdown")["mode"] == "WAIT_FOR_CLIENTS"
    assert p.wait_event("waiting_for_clients")["clients"] == 1


def test_several_commands_in_one_query_and_an_error_stops_the_rest(admin_proxy, pg):
    proxy = admin_proxy()
    with console(proxy, pg.superuser) as adm:
        cur = adm.execute("show version; SHOW STATE;")
        assert cur.fetchone()[0].startswith("pgscope")
        assert cur.nextset() and {r[0] for r in cur.fetchall()} == {"active", "paused", "suspended"}
        with pytest.raises(psycopg.errors.SyntaxError):
            adm.execute("PAUSE; BOGUS; RESUME")
        assert {r["key"]: r["value"] for r in rows_of(adm, "SHOW STATE")}["paused"] == "yes"  # RESUME not run
        adm.execute("RESUME; SET server_check_query = 'select ''x'';'")
        assert {r["key"]: r["value"] for r in rows_of(adm, "SHOW CONFIG")}["server_check_query"] == "select 'x';"


def test_psql_runs_every_acting_command(admin_proxy, pg):
    """Each answers its command tag to psql (RELOAD and SHUTDOWN: on a pgscope process, above)."""
    proxy = admin_proxy()
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True, application_name="to-kill") as victim:
        victim.execute("select 1")
        ids = [r["id"] for r in table(proxy, pg.superuser, "SHOW CLIENTS")[1] if r["application_name"] == "to-kill"]
        for command in ("DISABLE other_db", "ENABLE other_db", "PAUSE other_db", "RESUME other_db",
                        "RECONNECT other_db", "WAIT_CLOSE other_db", "KILL other_db", "RESUME",
                        f"KILL_CLIENT {ids[0]}", "RECONNECT", "WAIT_CLOSE", "SET pool_size = 5", "SET admin_users TO "
                        f"'{pg.superuser},ops'"):
            out = subprocess.run([require("psql"), "-X", "-h", "127.0.0.1", "-p", str(proxy.port), "-U",
                                  pg.superuser, "-d", "pgscope", "-c", command], capture_output=True, text=True,
                                 timeout=30)
            assert out.returncode == 0 and out.stdout.strip() == command.split()[0], (command, out.stderr)
        with pytest.raises(psycopg.OperationalError):
            victim.execute("select 1")
    config = {r["key"]: r["value"] for r in table(proxy, pg.superuser, "SHOW CONFIG")[1]}
    assert config["pool_size"] == "5" and config["admin_users"] == f"{pg.superuser},ops"


def test_databases_per_alias_and_pause_of_one(admin_proxy, pg):
    """With a [databases] table: SHOW DATABASES and SHOW POOLS per alias (their pool modes), PAUSE of one
    alias holds its clients while the other's go on."""
    proxy = admin_proxy(databases={"alpha": {"dbname": pg.dbname, "pool_mode": "session", "pool_size": 2},
                                   "beta": {"dbname": pg.dbname, "pool_mode": "transaction", "pool_size": 3}})
    with psycopg.connect(proxy.dsn(pg.superuser, dbname="alpha"), autocommit=True) as a, \
            psycopg.connect(proxy.dsn(pg.superuser, dbname="beta"), autocommit=True) as b, \
            console(proxy, pg.superuser) as adm:
        a.execute("select 1")
        b.execute("select 1")
        dbs = {r["name"]: r for r in rows_of(adm, "SHOW DATABASES")}
        assert (dbs["alpha"]["pool_mode"], dbs["alpha"]["pool_size"], dbs["alpha"]["database"]) == \
            ("session", 2, pg.dbname)
        assert (dbs["beta"]["pool_mode"], dbs["beta"]["pool_size"]) == ("transaction", 3)
        assert dbs["alpha"]["current_client_connections"] == 1 and "pgscope" in dbs
        pools = {r["database"]: r for r in rows_of(adm, "SHOW POOLS")}
        assert pools["alpha"]["pool_mode"] == "session" and pools["beta"]["pool_mode"] == "transaction"
        a.close()  # session mode: PAUSE waits for alpha's client to leave
        in_time(proxy, pg.superuser, "PAUSE alpha")
        held = {}
        t = threading.Thread(target=lambda: held.setdefault("v", psycopg.connect(
            proxy.dsn(pg.superuser, dbname="alpha"), autocommit=True).execute("select 5").fetchone()[0]),
            daemon=True)
        t.start()
        wait_for(lambda: {r["database"]: r["cl_waiting"] for r in rows_of(adm, "SHOW POOLS")}.get("alpha"),
                 what="alpha's new client waiting")
        assert b.execute("select 6").fetchone() == (6,)  # beta goes on
        assert "v" not in held
        adm.execute("RESUME alpha")
        t.join(15)
        assert held == {"v": 5}


def test_bad_input_on_the_console_gets_errors_or_a_clean_close(admin_proxy, pg):
    from proxy.protocol import messages as m
    from tests.support.wire import WireClient, copy_data

    proxy = admin_proxy()
    w = WireClient(proxy.port, pg.superuser, "pgscope")
    w.send(m.frame(b"Q", b"SHOW \xff\xfe\0"))  # not UTF-8: an error, and the console goes on
    msgs = w.read_until(b"Z")
    assert [m.decode_error_fields(b)["C"] for t, b in msgs if t == b"E"] == ["22021"]
    w.send(m.query("SHOW 'unterminated"))
    msgs = w.read_until(b"Z")
    assert [m.decode_error_fields(b)["C"] for t, b in msgs if t == b"E"] == ["42601"]
    w.send(m.query(""))
    assert [t for t, _ in w.read_until(b"Z")] == [b"I", b"Z"]  # EmptyQueryResponse
    w.send(m.query("SHOW STATE"))
    assert [t for t, _ in w.read_until(b"Z")][-2:] == [b"C", b"Z"]  # positive control: still answering
    w.send(copy_data(b"x"))  # no COPY here: 08P01 and the connection ends
    msgs = w.read_to_eof()
    assert [m.decode_error_fields(b)["C"] for t, b in msgs if t == b"E"] == ["08P01"]
    big = WireClient(proxy.port, pg.superuser, "pgscope")
    big.send(m.query("SHOW " + "x" * 20000))  # past the console's message limit: 08P01, closed
    msgs = big.read_to_eof()
    assert [m.decode_error_fields(b)["C"] for t, b in msgs if t == b"E"] == ["08P01"]
    wait_for(lambda: not [r for r in table(proxy, pg.superuser, "SHOW CLIENTS")[1]
                          if r["database"] == "pgscope" and r["application_name"] != "psql"],
             what="both console clients gone")


def test_a_fault_in_a_command_fails_that_command_only(admin_proxy, pg, monkeypatch):
    from proxy.admin import console as console_module

    proxy = admin_proxy()
    with console(proxy, pg.superuser) as adm:
        assert rows_of(adm, "SHOW VERSION")  # positive control

        def broken(_ctx):
            raise RuntimeError("injected")
        monkeypatch.setitem(console_module.SHOWS, "VERSION", broken)
        with pytest.raises(psycopg.errors.InternalError_) as e:
            adm.execute("SHOW VERSION")
        assert "internal error in the admin console" in str(e.value) and "injected" not in str(e.value)
        assert {r["key"] for r in rows_of(adm, "SHOW STATE")} == {"active", "paused", "suspended"}
