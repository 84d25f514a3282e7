"""Which server a client holds: checkout, settings sync, what waits for a server, release."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from proxy.protocol.errors import PgError
from proxy.protocol.sql import settings_sql
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
        srv.applied = dict(wanted)


class Binding:
    """One client's hold on servers of its pool.

    ``checkout`` waits for a server and syncs its settings; ``attach`` and
    ``release`` move it between the client and the pool; ``take_now`` is the
    transaction-mode fast path (an idle server whose settings already match, no
    wait, no task); ``pending`` holds the messages that wait for a server.
    """

    __slots__ = ("owner", "pool", "wanted", "server", "pending", "last")

    def __init__(self, owner: Any, pool: Any, wanted: dict[str, str]) -> None:
        self.owner = owner  # the client session: the server hands its reads to it
        self.pool = pool
        pool.clients += 1  # until end(): a drained pool (a database a reload removed) closes at 0
        self.wanted = wanted
        self.server: Any = None
        self.pending: list[bytes] = []
        self.last: Any = None  # the server of the client's previous transaction

    async def checkout(self) -> tuple[Any, float]:
        """A server with the client's settings, and how long the client waited for it."""
        srv, waited = await self.pool.acquire()
        try:
            await sync_settings(srv, self.wanted)
        except BaseException:
            srv.close("session settings failed")
            raise
        return srv, waited

    def take_now(self) -> Any:
        """An idle server whose settings match, checked out without waiting; else None."""
        srv = self.pool.take_idle_now(self.last)
        if srv is not None and srv.applied != self.wanted:
            self.pool.release(srv)
            return None
        return srv

    def attach(self, srv: Any, relay: Any, waited: float) -> None:
        self.server = srv
        srv.owner = self.owner
        relay.attach(srv.pid, srv.prepared, waited)

    def release(self) -> None:
        """Transaction mode: the transaction is over, the server goes back to the pool."""
        srv = self.server
        if srv is None:
            return
        self.server = None
        self.last = srv
        srv.tx_status = "I"
        self.pool.release(srv)

    async def attach_later(self) -> None:
        """Transaction mode, no idle server at hand: check one out while the client's messages
        wait in ``pending`` (its reading paused), then send them."""
        session = self.owner
        session._acquiring = asyncio.current_task()
        try:
            srv, waited = await self.checkout()
        except PgError as e:
            session._acquiring = None
            session.fail(e)
            return
        session._acquiring = None
        if session.state is ClientState.CLOSED:
            self.pool.release(srv)
            return
        relay = session.relay
        self.attach(srv, relay, waited)
        session._to(ClientState.ACTIVE)
        pending = b"".join(self.pending)
        self.pending.clear()
        try:
            srv.write(relay.track(pending, _monotonic()))
        except PgError as e:
            session.fail(e)
            return
        if relay.to_client:
            session._flush_made_up()
        if session.transport is not None and session.state is not ClientState.CLOSED:
            session.transport.resume_reading()
            session.reading_paused = False

    def end(self, relay: Any, reset: bool) -> None:
        """The client is gone: its server finishes what it was sent and goes back (or closes)."""
        self.pool.clients -= 1
        srv = self.server
        if srv is None:
            return
        self.server = None
        self.pool.mgr.spawn(self.pool.release_after_session(srv, relay, reset=reset))
