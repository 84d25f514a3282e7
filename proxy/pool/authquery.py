"""auth_query: a user's password secret looked up on the server, cached with a TTL.

PgBouncer's ``auth_user``/``auth_query``: for a user that is not in the auth
file, run the query as ``auth_user`` on a side connection, the user name bound
as ``$1`` with the extended protocol (never spliced into the text).  No row:
the user does not exist (the login then fails like a wrong password, after a
full exchange).  Answers are cached per (database, user) for
``auth_query_cache_s`` (a missing user at most ``NEGATIVE_TTL_MAX``), and
logins of one user arriving together wait for one lookup.  A lookup that
cannot be done ends the login with a PgError (08006 when the server cannot be
reached, 28000 otherwise), never a hang.  Secrets are returned, never logged.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable

from proxy.pool.upstream import ServerConn, server_error
from proxy.protocol import messages as m
from proxy.protocol.errors import CONNECTION_FAILURE, INVALID_AUTHORIZATION, PgError

NEGATIVE_TTL_MAX = 5.0  # seconds a "no such user" answer is reused at most
CACHE_MAX = 10000  # (database, user) answers kept
_UNDEFINED_DATABASE = "3D000"
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")


class LookupFailed(PgError):
    """The secret could not be looked up; ``reason`` is for the proxy's log only."""

    def __init__(self, sqlstate: str, message: str, reason: str) -> None:
        super().__init__(sqlstate, message)
        self.reason = reason


def bind_text(param: str) -> bytes:
    """Bind of the unnamed statement to the unnamed portal: one text parameter, text results."""
    value = param.encode("utf-8", "surrogateescape")
    return m.frame(b"B", b"\0\0" + _I16.pack(0) + _I16.pack(1) + _I32.pack(len(value)) + value + _I16.pack(0))


def execute_unnamed() -> bytes:
    return m.frame(b"E", b"\0" + _I32.pack(0))


async def query_one_param(srv: ServerConn, sql: str, param: str) -> list[list[str | None]]:
    """Run ``sql`` with ``$1`` = ``param`` (Parse/Bind/Execute/Sync); the rows, or the server's error raised."""
    srv.write(m.parse("", sql) + bind_text(param) + execute_unnamed() + m.sync())
    rows: list[list[str | None]] = []
    err: PgError | None = None
    while True:
        t, body = await srv.recv()
        if t == m.B_DATA_ROW:
            rows.append(m.decode_data_row(body))
        elif t == m.B_ERROR and err is None:
            err = server_error(m.decode_error_fields(body))
        elif t == m.B_READY_FOR_QUERY:
            if err is not None:
                raise err
            return rows


def secret_from_rows(rows: list[list[str | None]]) -> str | None:
    """No row: no such user (None).  One (name, secret) row: the secret ("" when NULL: no password)."""
    if not rows:
        return None
    if len(rows) > 1:
        raise LookupFailed(INVALID_AUTHORIZATION, "could not look up the user's password",
                           "auth_query returned more than one row")
    if len(rows[0]) != 2:
        raise LookupFailed(INVALID_AUTHORIZATION, "could not look up the user's password",
                           f"auth_query returned {len(rows[0])} columns, not 2 (name, secret)")
    return rows[0][1] or ""


class AuthQuery:
    """Secrets by (database, user) through ``connect(db)`` (a side connection as auth_user).

    ``settings()`` gives the current Settings (auth_query, auth_query_cache_s,
    server_connect_timeout); ``clear()`` forgets every answer (on reload).
    """

    def __init__(self, connect: Callable[[str], Awaitable[ServerConn]], settings: Callable[[], Any],
                 log: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.connect = connect
        self.settings = settings
        self.log = log
        self.clock = clock
        self.cache: OrderedDict[tuple[str, str], tuple[float, str | None]] = OrderedDict()
        self.inflight: dict[tuple[str, str], asyncio.Task] = {}
        self.counts = {"cached": 0, "found": 0, "missing": 0, "failed": 0}  # lookups by outcome

    def clear(self) -> None:
        self.cache.clear()

    async def secret(self, db: str, user: str) -> str | None:
        """The user's secret, None when the user does not exist; raises LookupFailed/PgError."""
        key = (db, user)
        hit = self.cache.get(key)
        if hit is not None:
            if hit[0] > self.clock():
                self.cache.move_to_end(key)
                self.counts["cached"] += 1
                return hit[1]
            del self.cache[key]
        task = self.inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._lookup(db, user))
            self.inflight[key] = task
            task.add_done_callback(lambda t: self.inflight.pop(key, None) if self.inflight.get(key) is t else None)
        # one client giving up (a timeout, a closed socket) does not cancel the others' lookup
        return await asyncio.shield(task)

    async def _lookup(self, db: str, user: str) -> str | None:
        s = self.settings()
        try:
            secret = await self._run(db, user, s)
        except LookupFailed as e:
            self._failed(db, user, e.reason)
            raise
        except PgError as e:
            if e.sqlstate == _UNDEFINED_DATABASE:  # as PostgreSQL would say it
                self._failed(db, user, e.message)
                raise PgError(e.sqlstate, e.message) from None
            self._failed(db, user, f"{e.sqlstate}: {e.message}")
            code = CONNECTION_FAILURE if e.sqlstate.startswith("08") else INVALID_AUTHORIZATION
            raise LookupFailed(code, "could not look up the user's password", e.message) from None
        except (TimeoutError, OSError) as e:
            self._failed(db, user, f"no answer: {e!r}")
            raise LookupFailed(CONNECTION_FAILURE, "could not look up the user's password",
                               "server unreachable") from None
        self.counts["missing" if secret is None else "found"] += 1
        ttl = s.auth_query_cache_s if secret is not None else min(s.auth_query_cache_s, NEGATIVE_TTL_MAX)
        if ttl > 0:
            self.cache[(db, user)] = (self.clock() + ttl, secret)
            while len(self.cache) > CACHE_MAX:
                self.cache.popitem(last=False)
        return secret

    async def _run(self, db: str, user: str, s: Any) -> str | None:
        async with asyncio.timeout(s.server_connect_timeout):
            srv = await self.connect(db)
            try:
                rows = await query_one_param(srv, s.auth_query, user)
            finally:
                srv.close("auth_query done")
        return secret_from_rows(rows)

    def _failed(self, db: str, user: str, reason: str) -> None:
        self.counts["failed"] += 1
        if self.log is not None:
            self.log.warning("auth_query_failed", db=db, user=user, reason=reason)
