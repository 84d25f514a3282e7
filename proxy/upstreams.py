"""Which PostgreSQL servers the clients' databases are on, for the lock samplers: the client whose
server is a given process on a given server, and a side connection to each server other than
upstream's that a ``[databases]`` entry sends clients to (proxy.inspect.locks samples each)."""

from __future__ import annotations

from typing import Any


def client_of_server_pid(proxy: Any, pid: int, server: tuple[str, int] | None = None) -> Any:
    """The ClientInfo of the client whose server is process ``pid`` on ``server`` (host, port; None:
    upstream's), or None.  Process ids are only unique per server."""
    s = proxy.settings
    where = server if server is not None else (s.upstream_host, s.upstream_port)
    for sess in proxy.sessions:
        srv = sess.server
        if srv is not None and srv.pid == pid and srv.pool is not None \
                and (srv.pool.cfg.host, srv.pool.cfg.port) == where:
            return sess.info
    return None


def other_servers(proxy: Any) -> dict[tuple[str, int], Any]:
    """(host, port) -> a function opening a side connection there (to the first alias found on it, as
    the upstream user), for every server other than upstream's in the ``[databases]`` table."""
    s = proxy.settings
    out: dict[tuple[str, int], Any] = {}
    for entry in s.databases:
        where = (entry.host or s.upstream_host, entry.port or s.upstream_port)
        if where != (s.upstream_host, s.upstream_port) and where not in out:
            db = entry.alias if entry.alias != "*" else s.upstream_dbname or "postgres"
            out[where] = lambda db=db: proxy.side_connect(db, s.upstream_user or "postgres")
    return out
