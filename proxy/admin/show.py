"""PgBouncer's SHOW views over pgscope's pools and clients, with PgBouncer's column names and types.

Each ``show_*`` takes the console context (``proxy.admin.console.AdminContext``)
and returns (columns, rows).  What pgscope does not count is 0 (documented in
docs/admin.md), never made up.
"""

from __future__ import annotations

import time
from typing import Any

from proxy.admin import stats
from proxy.admin.wire import columns, text
from proxy.config import KEYS, as_dict
from proxy.pool import control
from proxy.pool.databases import database_rows

CONSOLE_DBS = ("pgscope", "pgbouncer")

POOLS = columns("database user cl_active:int4 cl_waiting:int4 cl_active_cancel_req:int4 "
                "cl_waiting_cancel_req:int4 sv_active:int4 sv_active_cancel:int4 sv_being_canceled:int4 "
                "sv_idle:int4 sv_used:int4 sv_tested:int4 sv_login:int4 maxwait:int4 maxwait_us:int4 "
                "pool_mode load_balance_hosts")
SOCKETS = columns("type user database replication state addr port:int4 local_addr local_port:int4 "
                  "connect_time request_time wait:int4 wait_us:int4 close_needed:int4 ptr link "
                  "remote_pid:int4 tls application_name prepared_statements:int4 id:int4")
STATS = [("database", "text")] + [("total_" + c.replace("bytes_", ""), "numeric") for c in stats.COUNTS] + \
    [("avg_" + {"bytes_received": "recv", "bytes_sent": "sent"}.get(c, c), "numeric") for c in stats.COUNTS]
STATS_TOTALS = [("database", "text")] + [(c, "numeric") for c in stats.COUNTS]
# (PgBouncer's names: the parse and bind columns alone say avg_)
STATS_AVERAGES = [("database", "text")] + [
    ("avg_" + c if c.endswith(("parse_count", "bind_count")) else c, "numeric") for c in stats.COUNTS]
TOTALS = columns("name value:numeric")
# SHOW TOTALS's row names (PgBouncer's, from its PgStats fields)
_TOTALS_NAMES = {"bytes_received": "client_bytes", "bytes_sent": "server_bytes",
                 "client_parse_count": "ps_client_parse_count", "server_parse_count": "ps_server_parse_count",
                 "bind_count": "ps_bind_count"}
DATABASES = columns("name host port:int4 database force_user pool_size:int4 min_pool_size:int4 "
                    "reserve_pool_size:int4 server_lifetime:int4 pool_mode load_balance_hosts "
                    "max_connections:int4 current_connections:int4 max_client_connections:int4 "
                    "current_client_connections:int4 paused:int4 disabled:int4")
USERS = columns("name pool_size reserve_pool_size pool_mode max_user_connections:int4 "
                "current_connections:int4 max_user_client_connections:int4 current_client_connections:int4")
CONFIG = columns("key value default changeable")
LISTS = columns("list items:int4")
VERSION = columns("version")
PEERS = columns("peer_id:int4 host port:int4 pool_size:int4")
STATE = columns("key value")


def wall(mono: float, now_mono: float, now_wall: float) -> str:
    """A monotonic instant as PgBouncer prints times: ``YYYY-MM-DD HH:MM:SS UTC``."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now_wall - (now_mono - mono)))


def ptr(obj: Any) -> str | None:
    return None if obj is None else f"{id(obj):x}"


def _addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return text, 0
    return host.strip("[]"), int(port)


def _local(transport: Any) -> tuple[str | None, int]:
    name = transport.get_extra_info("sockname") if transport is not None else None
    if isinstance(name, tuple) and len(name) >= 2:
        return str(name[0]), int(name[1])
    return ("unix", 0) if isinstance(name, str) else (None, 0)


def _tls(transport: Any, on: bool) -> str:
    if not on or transport is None:
        return ""
    obj = transport.get_extra_info("ssl_object")
    return f"{obj.version()}/{obj.cipher()[0]}" if obj is not None else "TLS"


def _clients_by_pool(ctx: Any) -> dict[Any, list[Any]]:
    out: dict[Any, list[Any]] = {}
    for sess in ctx.sessions:
        b = sess.binding
        if b is not None:
            out.setdefault(b.pool, []).append(sess)
    return out


def _pools(ctx: Any) -> list[Any]:
    return sorted(control.pools_of(ctx.pools, None), key=lambda p: (p.db, p.user))


def show_pools(ctx: Any) -> tuple[list, list]:
    now = time.monotonic()
    by_pool = _clients_by_pool(ctx)
    rows = []
    for p in _pools(ctx):
        clients = by_pool.get(p, [])
        active = sum(1 for s in clients if s.state_name in ("active", "idle"))
        waiting = [s for s in clients if s.state_name in ("waiting", "login")]
        maxwait = max((now - s.last_active for s in waiting), default=0.0)
        used = sum(1 for srv in p.idle if now - srv.last_used > p.cfg.server_check_delay)
        rows.append((p.db, p.user, active, max(len(waiting), p.waiting), 0, 0,
                     sum(1 for srv in p.active if srv.owner is not None), 0, 0, len(p.idle) - used, used,
                     sum(1 for srv in p.active if srv.owner is None), p.connecting, int(maxwait),
                     int((maxwait % 1) * 1e6), p.cfg.pool_mode, None))
    return POOLS, rows


_CLIENT_STATE = {"console": "active", "login": "login"}


def show_clients(ctx: Any) -> tuple[list, list]:
    now, now_wall = time.monotonic(), time.time()
    rows = []
    for s in sorted(ctx.sessions, key=lambda x: x.id):
        info = s.info
        if info is None:
            continue
        host, port = _addr(s.addr)
        lhost, lport = _local(s.transport)
        state = _CLIENT_STATE.get(s.state_name, s.state_name)
        wait = now - s.last_active if state == "waiting" else 0.0
        rows.append(("C", info.user, info.db, "none", state, host, port, lhost, lport,
                     wall(s.connected_at, now, now_wall), wall(s.last_active, now, now_wall), int(wait),
                     int((wait % 1) * 1e6), 0, ptr(s), ptr(s.server), 0, _tls(s.transport, s.tls),
                     info.application_name, 0, s.id))
    return SOCKETS, rows


def show_servers(ctx: Any) -> tuple[list, list]:
    now, now_wall = time.monotonic(), time.time()
    rows = []
    for p in _pools(ctx):
        for srv in sorted((*p.active, *p.idle), key=lambda x: x.id):
            if srv.closed:
                continue
            if srv.owner is not None:
                state = "active"
            elif srv in p.active:
                state = "tested"  # being checked, reset or handed over
            else:
                state = "used" if now - srv.last_used > p.cfg.server_check_delay else "idle"
            host = p.cfg.host
            lhost, lport = _local(srv.transport)
            owner = srv.owner
            app = owner.info.application_name if owner is not None and owner.info is not None else ""
            rows.append(("S", srv.user, p.db, "none", state, "unix" if host.startswith("/") else host, p.cfg.port,
                         lhost, lport, wall(srv.created, now, now_wall), wall(srv.last_used, now, now_wall),
                         0, 0, int(control.close_needed(p, srv)), ptr(srv), ptr(owner), srv.pid,
                         _tls(srv.transport, srv.tls), app, len(srv.prepared), srv.id))
    return SOCKETS, rows


def _per_db(ctx: Any) -> tuple[dict[str, dict[str, float]], float]:
    return stats.totals(ctx.pools, ctx.traffic()), time.monotonic()


def show_stats(ctx: Any) -> tuple[list, list]:
    current, now = _per_db(ctx)
    rows = []
    for db, t in sorted(current.items()):
        avg = ctx.window.of(db, t, now)
        rows.append([db, *(int(t[c]) for c in stats.COUNTS), *(avg[c] for c in stats.COUNTS)])
    return STATS, rows


def show_stats_averages(ctx: Any) -> tuple[list, list]:
    current, now = _per_db(ctx)
    return STATS_AVERAGES, [[db, *ctx.window.of(db, t, now).values()] for db, t in sorted(current.items())]


def show_stats_totals(ctx: Any) -> tuple[list, list]:
    current, _ = _per_db(ctx)
    return STATS_TOTALS, [[db, *(int(t[c]) for c in stats.COUNTS)] for db, t in sorted(current.items())]


def show_totals(ctx: Any) -> tuple[list, list]:
    """All databases together, a row per figure: total_* then avg_* (PgBouncer's SHOW TOTALS)."""
    current, now = _per_db(ctx)
    cur, avg = ctx.window.overall(current, now)
    names = [_TOTALS_NAMES.get(c, c) for c in stats.COUNTS]
    return TOTALS, ([("total_" + n, int(cur[c])) for n, c in zip(names, stats.COUNTS)]
                    + [("avg_" + n, avg[c]) for n, c in zip(names, stats.COUNTS)])


def _servers_and_clients(ctx: Any, key: str) -> tuple[dict[str, int], dict[str, int]]:
    servers: dict[str, int] = {}
    for p in control.pools_of(ctx.pools, None):
        k = getattr(p, key)
        servers[k] = servers.get(k, 0) + p.total
    clients: dict[str, int] = {}
    for s in ctx.sessions:
        if s.info is not None and s.state_name != "console":
            k = s.info.db if key == "db" else s.info.user
            clients[k] = clients.get(k, 0) + 1
    return servers, clients


def show_databases(ctx: Any) -> tuple[list, list]:
    """The rows of /api/databases (proxy.pool.databases), in PgBouncer's columns, and the console's two."""
    s = ctx.settings()
    mgr = ctx.pools
    rows = []
    for d in database_rows(s, control.pools_of(mgr, None), ctx.sessions):
        name = d["name"]
        rows.append((name, d["host"], d["port"], d["database"], d["force_user"], d["pool_size"], s.min_pool_size,
                     s.reserve_pool_size, int(s.server_lifetime), d["pool_mode"], None, d["max_connections"],
                     d["current_connections"], 0, d["clients"], int(control.is_paused(mgr, name)),
                     int(name in mgr.disabled)))
    for name in CONSOLE_DBS:
        rows.append((name, None, s.listen_port, name, None, 0, 0, 0, 0, "statement", None, 0, 0, 0,
                     sum(1 for x in ctx.sessions if x.info is not None and x.info.db == name), 0, 0))
    return DATABASES, rows


def show_users(ctx: Any) -> tuple[list, list]:
    s = ctx.settings()
    servers, clients = _servers_and_clients(ctx, "user")
    entries = {u.name: u for u in getattr(s, "users", ())}
    rows = []
    for name in sorted(set(entries) | set(servers) | set(clients)):
        u = entries.get(name)
        rows.append((name, None, None, (u.pool_mode or None) if u is not None else None,
                     u.max_user_connections if u is not None else 0, servers.get(name, 0), 0,
                     clients.get(name, 0)))
    return USERS, rows


def _config_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return ",".join(str(x) for x in v)
    if isinstance(v, dict):
        return text(v) or ""
    return str(v)


def show_config(ctx: Any) -> tuple[list, list]:
    values, defaults = as_dict(ctx.settings()), as_dict(ctx.defaults)  # secrets masked
    return CONFIG, [(k.dotted, _config_text(values[k.dotted]), _config_text(defaults[k.dotted]),
                     "yes" if k.reloadable else "no") for k in KEYS]


def show_lists(ctx: Any) -> tuple[list, list]:
    s = ctx.settings()
    pools = control.pools_of(ctx.pools, None)
    dbs, _ = _servers_and_clients(ctx, "db")
    users, _ = _servers_and_clients(ctx, "user")
    logged = [x for x in ctx.sessions if x.info is not None]
    n_db = len(set(dbs) | {d.alias for d in getattr(s, "databases", ())}) + len(CONSOLE_DBS)
    items = [("databases", n_db), ("users", len(users)), ("peers", len(s.peers)), ("pools", len(pools)),
             ("peer_pools", 0), ("free_clients", 0), ("used_clients", len(logged)),
             ("login_clients", len(ctx.sessions) - len(logged)), ("free_servers", 0),
             ("used_servers", sum(p.total for p in pools)), ("dns_names", 0), ("dns_zones", 0),
             ("dns_queries", 0), ("dns_pending", 0)]
    return LISTS, items


def show_peers(ctx: Any) -> tuple[list, list]:
    """The ``peers`` table (cancel requests for another process's clients go there); pool_size 0:
    pgscope opens a connection per forwarded cancel and keeps none."""
    s = ctx.settings()
    return PEERS, [(int(p.peer_id), p.host, p.port or s.listen_port, 0) for p in s.peers]


def show_version(ctx: Any) -> tuple[list, list]:
    return VERSION, [(f"pgscope {ctx.version}",)]


def show_state(ctx: Any) -> tuple[list, list]:
    paused = None in ctx.pools.paused
    return STATE, [("active", "no" if paused else "yes"), ("paused", "yes" if paused else "no"),
                   ("suspended", "no")]
