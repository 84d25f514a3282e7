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
import time

import psycopg
import pytest

from tests.support.tools import require
from tests.support.wire import wait_for

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
             "total_server_parse_count total_bind_count total_client_login_count avg_server_assignment_count "
             "avg_xact_count avg_query_count avg_recv avg_sent avg_xact_time avg_query_time avg_wait_time "
             "avg_client_parse_count avg_server_parse_count avg_bind_count avg_client_login_count",
    "STATS_TOTALS": "database server_assignment_count xact_count query_count bytes_received bytes_sent xact_time "
                    "query_time wait_time client_parse_count server_parse_count bind_count client_login_count",
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


def psql(proxy, user: str, command: str, db: str = "pgscope", check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([require("psql"), "-X", "--csv", "-h", proxy.host, "-p", str(proxy.port), "-U", user,
                          "-d", db, "-c", command], capture_output=True, text=True, timeout=60,
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

