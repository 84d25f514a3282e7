"""Rows per client-visible database (alias): where it goes, its pool mode and caps, its connections.

What ``/api/databases`` answers (proxy.export.databases) and what the admin
console's SHOW DATABASES reads (proxy.admin.show), computed once here from the
settings, the pools and the sessions.  Column names follow PgBouncer's SHOW
DATABASES where it has one.
"""

from __future__ import annotations

from typing import Any, Iterable

from proxy.config_tables import FALLBACK, find, resolve


def database_rows(settings: Any, pools: Iterable[Any], sessions: Iterable[Any]) -> list[dict[str, Any]]:
    """One row per alias: the configured ones (``"*"`` included), the names ``"*"`` (or, without
    a ``databases`` table, the upstream) serves now, and removed ones still draining."""
    clients: dict[str, int] = {}
    for sess in sessions:
        info = sess.info
        if info is not None and sess.state_name != "console":  # the admin console is no database
            clients[info.db] = clients.get(info.db, 0) + 1
    servers: dict[str, int] = {}
    waiting: dict[str, int] = {}
    for p in pools:
        servers[p.db] = servers.get(p.db, 0) + p.total
        waiting[p.db] = waiting.get(p.db, 0) + p.waiting
    names = {d.alias for d in settings.databases} or {FALLBACK}
    names |= set(servers) | set(clients)
    rows = []
    for name in sorted(names):
        entry = find(settings.databases, name) if settings.databases else None
        route = resolve(settings, name, "")  # None: removed by a reload, draining
        rows.append({
            "name": name,
            "host": route.host if route else None,
            "port": route.port if route else None,
            "database": ("" if name == FALLBACK else route.dbname) if route else None,
            "force_user": (entry.user if entry is not None else "") or None,
            "pool_size": route.pool_size if route else None,
            "pool_mode": route.pool_mode if route else None,
            "max_connections": route.max_db_connections if route else None,
            "current_connections": servers.get(name, 0),
            "clients": clients.get(name, 0),
            "waiting": waiting.get(name, 0),
            "state": "active" if route is not None else "draining",
        })
    return rows
