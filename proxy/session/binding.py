"""Which server a client holds: checkout, settings sync, what waits for a server, release."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from proxy.protocol.errors import PgError
from proxy.protocol.sql import settings_sql
from proxy.session.hot import BindingCore
from proxy.session.states import ClientState

_monotonic = time.monotonic


async def sync_settings(srv: Any, wanted: dict[str, str]) -> None:
    """Make the server's session settings the client's (SET/RESET the difference)."""
    if srv.applied != wanted:
        sql = settings_sql(wanted, srv.applied)
        if sql:
            err = await srv.simple_query(sql)
            if err is not None:
                # like PostgreSQL rejecting the startup packet's parameter
                srv.applied = {}
                await srv.simple_query("RESET ALL")
                err.severity = "FATAL"
                raise err
    srv.applied = wanted  # shared (never changed in place): the hot path's test is then "is"


_shared_settings: dict[frozenset[tuple[str, str]], dict[str, str]] = {}


def shared_settings(wanted: dict[str, str]) -> dict[str, str]:
    """One dict per distinct set of session settings (up to 1024 sets): a server's ``applied`` is
    then the very dict of every client whose settings it has, and the check at each checkout an
    identity test."""
    key = frozenset(wanted.items())
    got = _shared_settings.get(key)
    if got is None:
        if len(_shared_settings) >= 1024:
            return wanted
        got = _shared_settings[key] = wanted
    return got


class Binding(BindingCore):
    """One client's hold on servers of its pool.

    ``checkout`` waits for a server and syncs its settings; ``attach`` and
    ``release`` (BindingCore's) move it between the client and the pool; ``wait`` queues for a
    full pool's next server (a callback, no task, when the pool allows);
    ``pending`` holds the messages that wait for a server.  ``release``,
    ``wait`` and what answers it (``_handed``, ``_go``) are BindingCore's
    (proxy/session/hot.py, compiled twin in _hot.pyx), and so are the fields;
    ``attach_later`` is the task they start when a server needs a round trip.
    """

    __slots__ = ()

    def __init__(self, owner: Any, pool: Any, wanted: dict[str, str]) -> None:
        self.owner = owner  # the client session: the server hands its reads to it
        self.pool = pool
        pool.clients += 1  # until end(): a drained pool (a database a reload removed) closes at 0
        self.wanted = shared_settings(wanted)
        self.server: Any = None
        self.pending: list[bytes] = []
        self.last: Any = None  # the server of the client's previous transaction
        self.handoff: Any = None  # queued in a full pool without a task (proxy.pool.handoff.Handoff)

    async def checkout(self, kicked: bool = False) -> tuple[Any, float]:
        """A server with the client's settings, and how long the client waited for it."""
        srv, waited = await self.pool.acquire(kicked)
        try:
            await sync_settings(srv, self.wanted)
        except BaseException:
            srv.close("session settings failed")
            raise
        return srv, waited

    async def attach_later(self, kicked: bool = False, srv: Any = None) -> None:
        """Check a server out (or sync ``srv``'s settings) while the client's messages wait in
        ``pending``, then send them."""
        session = self.owner
        session._acquiring = asyncio.current_task()
        waited = 0.0
        try:
            if srv is None:
                srv, waited = await self.checkout(kicked)
            else:
                try:
                    await sync_settings(srv, self.wanted)
                except BaseException:
                    srv.close("session settings failed")
                    raise
        except PgError as e:
            session._acquiring = None
            session.fail(e)
            return
        session._acquiring = None
        if session.state is ClientState.CLOSED:
            self.pool.release(srv)
            return
        self._go(srv, waited)

    def end(self, relay: Any, reset: bool) -> None:
        """The client is gone: its server finishes what it was sent and goes back (or closes)."""
        self.pool.clients -= 1
        if self.handoff is not None:  # queued for a server nobody will use: leave the queue
            self.handoff.withdraw()
            self.handoff = None
        srv = self.server
        if srv is None:
            return
        self.server = None
        self.pool.mgr.spawn(self.pool.release_after_session(srv, relay, reset=reset))
