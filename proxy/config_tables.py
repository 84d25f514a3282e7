"""The ``databases`` and ``users`` tables of the settings, and the route a client's database name takes.

``[databases.ALIAS]`` names what a client may ask for in its startup packet
(``"*"``: any other name, to the same-named database); ``[users.NAME]``
overrides pool_mode and caps a user's server connections.  Both come from the
TOML file, or from ``PGSCOPE_DATABASES`` / ``PGSCOPE_USERS`` holding the same
table as a TOML inline table.  ``resolve`` turns (settings, client database,
client user) into a ``Route``: where the pool's servers connect and with what
limits; None when the name is not served (the client gets 3D000).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

FALLBACK = "*"
RESERVED = frozenset(("pgscope", "pgbouncer"))  # the admin console's virtual databases
POOL_MODES = ("session", "transaction")


@dataclass(frozen=True)
class Database:
    """One ``[databases.ALIAS]`` entry; empty/0 fields take the top-level value."""

    alias: str
    host: str = ""  # "" = upstream's host (a path: a unix socket directory)
    port: int = 0  # 0 = upstream's port
    dbname: str = ""  # "" = the alias (for "*": the name the client asked for)
    user: str = ""  # "" = the client's user; set: every client of the alias shares one pool as this user
    password: str = field(default="", repr=False)  # with user: the password pgscope logs in with
    pool_size: int = 0  # 0 = pool_size
    pool_mode: str = ""  # "" = the user's pool_mode, else pool_mode
    max_db_connections: int = 0  # server connections of every pool of this alias together (0: no cap)


@dataclass(frozen=True)
class User:
    """One ``[users.NAME]`` entry."""

    name: str
    pool_mode: str = ""  # "" = the database's, else pool_mode
    max_user_connections: int = 0  # server connections as this user over every database (0: no cap)


@dataclass(frozen=True)
class Peer:
    """One ``[peers.ID]`` entry: where the pgscope process with that peer_id takes cancel requests."""

    peer_id: str
    host: str = ""  # an address, or the directory of its Unix socket (an absolute path)
    port: int = 0  # 0 = listen's port


MAX_PEER_ID = 16383  # the top 14 bits of a cancel key's 32-bit secret


@dataclass(frozen=True)
class Route:
    """Where a pool's servers are and what bounds it: what ``resolve`` answers."""

    alias: str  # the client-visible name (the ``db`` label)
    host: str
    port: int
    dbname: str  # the database on the server
    user: str  # the user pgscope logs in as
    password: str | None = field(repr=False)  # from the entry; None: ask the credentials
    pool_size: int
    pool_mode: str
    max_db_connections: int
    max_user_connections: int

    @property
    def place(self) -> tuple[str, int, str, str]:
        """Where the servers are: host, port, database, user."""
        return self.host, self.port, self.dbname, self.user

    @property
    def server(self) -> tuple[Any, ...]:
        """What a pool's servers are: a change means the old pool's servers (and their clients' mode:
        a session-mode server is reset when its client leaves) are not the new pool's."""
        return self.place + (self.pool_mode,)


_INT_MIN = {"port": 1, "pool_size": 1, "max_db_connections": 0, "max_user_connections": 0}


def _table(value: Any) -> Mapping[str, Any]:
    if isinstance(value, str):  # the environment: a TOML inline table
        try:
            value = tomllib.loads("v = " + value)["v"]
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"expected a TOML inline table like {{app = {{port = 5433}}}}: {e}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a table, got {type(value).__name__}")
    return value


def _entry(cls: type, name: str, raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}.{name}: expected a table of settings, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, v in raw.items():
        f = known.get(key)
        if f is None or key in ("alias", "name"):
            allowed = ", ".join(k for k in known if k not in ("alias", "name"))
            raise ValueError(f'{where}.{name}: unknown key "{key}" (known: {allowed})')
        want = int if f.type == "int" else str
        if isinstance(v, bool) or not isinstance(v, want):
            raise ValueError(f"{where}.{name}.{key}: expected {'an integer' if want is int else 'a string'}, "
                             f"got {'***' if key == 'password' else repr(v)}")
        if want is int and v < _INT_MIN[key]:
            raise ValueError(f"{where}.{name}.{key}: expected a number >= {_INT_MIN[key]}, got {v}")
        if key == "port" and v > 65535:
            raise ValueError(f"{where}.{name}.port: out of range, got {v}")
        if key == "pool_mode" and v not in POOL_MODES:
            raise ValueError(f"{where}.{name}.pool_mode: expected one of {', '.join(POOL_MODES)}, got {v!r}")
        values[key] = v
    return cls(name, **values)


def parse_databases(value: Any) -> tuple[Database, ...]:
    """The ``databases`` key: alias -> settings, as a sorted tuple of ``Database``."""
    out = []
    for alias, raw in _table(value).items():
        if not alias or len(alias.encode()) > 63:
            raise ValueError(f"databases: alias {alias!r} must be 1 to 63 bytes")
        if alias in RESERVED:
            raise ValueError(f'databases.{alias}: the name is the admin console\'s')
        db = _entry(Database, alias, raw, "databases")
        if alias == FALLBACK and db.dbname:
            raise ValueError('databases."*".dbname: the fallback maps every name to the same-named database')
        if db.password and not db.user:
            raise ValueError(f"databases.{alias}.password: needs user (the user pgscope logs in as with it)")
        out.append(db)
    return tuple(sorted(out, key=lambda d: d.alias))


def parse_users(value: Any) -> tuple[User, ...]:
    """The ``users`` key: user name -> overrides, as a sorted tuple of ``User``."""
    return tuple(sorted((_entry(User, name, raw, "users") for name, raw in _table(value).items()),
                        key=lambda u: u.name))


def parse_peers(value: Any) -> tuple[Peer, ...]:
    """The ``peers`` key: peer id -> {host, port}, as a tuple of ``Peer`` sorted by id."""
    out = []
    for name, raw in _table(value).items():
        if not (name.isdigit() and 1 <= int(name) <= MAX_PEER_ID):
            raise ValueError(f"peers: {name!r} is not a peer id (1 to {MAX_PEER_ID})")
        peer = _entry(Peer, name, raw, "peers")
        if not peer.host:
            raise ValueError(f"peers.{name}.host: needed (an address, or a Unix socket directory)")
        out.append(peer)
    return tuple(sorted(out, key=lambda p: int(p.peer_id)))


def render(entries: tuple[Any, ...], redact: bool = True) -> dict[str, dict[str, Any]]:
    """A table back as plain data (``check-config``, the console's SHOW CONFIG): set fields only,
    passwords masked unless ``redact`` is false."""
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        name, *rest = fields(e)
        row = {f.name: getattr(e, f.name) for f in rest if getattr(e, f.name) not in ("", 0)}
        if redact and row.get("password"):
            row["password"] = "***"
        out[getattr(e, name.name)] = row
    return out


def find(entries: tuple[Any, ...], name: str) -> Any:
    for e in entries:
        if (e.alias if isinstance(e, Database) else e.name) == name:
            return e
    return None


def resolve(settings: Any, name: str, user: str) -> Route | None:
    """Where a client asking for database ``name`` as ``user`` is pooled; None: not served.

    Without a ``databases`` table every name goes to upstream's host, as
    before; with one, only its aliases (and any name when ``"*"`` is there).
    """
    entry = None
    if settings.databases:
        entry = find(settings.databases, name) or find(settings.databases, FALLBACK)
        if entry is None:
            return None
    server_user = (entry.user if entry is not None else "") or user
    u = find(settings.users, server_user) if settings.users else None
    mode = (u.pool_mode if u is not None else "") or (entry.pool_mode if entry is not None else "") \
        or settings.pool_mode
    if entry is None:
        return Route(name, settings.upstream_host, settings.upstream_port, name, server_user, None,
                     settings.pool_size, mode, 0, u.max_user_connections if u is not None else 0)
    return Route(name, entry.host or settings.upstream_host, entry.port or settings.upstream_port,
                 entry.dbname or name, server_user, entry.password or None, entry.pool_size or settings.pool_size,
                 mode, entry.max_db_connections, u.max_user_connections if u is not None else 0)


def check_tables(s: Any) -> str | None:
    """Rules across keys for the tables; an error text or None."""
    for db in s.databases:
        if s.server_tls_mode == "verify-full" and db.host.startswith("/"):
            return f"databases.{db.alias}.host: server_tls_mode verify-full needs a TCP host, not a unix socket"
        if db.pool_size and s.min_pool_size > db.pool_size:
            return f"databases.{db.alias}.pool_size: {db.pool_size} is less than min_pool_size {s.min_pool_size}"
    return None


def side_target(settings: Any, credentials: Any, pools: Any, db: str, user: str) -> tuple[str, str, str | None, Any]:
    """(database, user, password, pool settings or None) of a proxy's own connection for clients of
    ``db`` as ``user``: the alias's server, or for a name not served (the samplers' upstream
    database; an auth_query lookup for a name that will get 3D000 once the client has
    authenticated; a removed alias) the upstream URL's database, else ``db``, on upstream's host."""
    route = resolve(settings, db, user)
    if route is None:
        return settings.upstream_dbname or db, user, credentials.upstream_password(user), None
    return route.dbname, route.user, route.password or credentials.upstream_password(route.user), \
        pools.route_cfg(route)
