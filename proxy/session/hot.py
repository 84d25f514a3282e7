"""A client session's relaying hot path: the two callbacks every relayed byte goes through.

``data_received`` (client -> relay -> server) and ``server_data`` (server ->
relay -> client), with what transaction mode does per transaction on the
way: take an idle server, attach it, give it back.  ``SessionCore`` is the
base class of ``proxy.session.client.ClientSession``: the compiled twin
(``_hot.pyx``, typed fields and C calls instead of Python frames) when built,
else ``PySessionCore`` below, the reference.  Both run the same steps in the
same order; the session tests run on both (``PGSCOPE_NO_EXTENSIONS=1``).

Everything off the hot path (login, waiting for a server, closing) is the
subclass's: the core calls ``_login_data``, ``fail``, ``close``,
``_terminate``, ``_server_broken`` and ``binding.wait``.  ``BindingCore``, the base of
``proxy.session.binding.Binding``, holds the server a client has and gives it back
(``release``), or waits for one (``wait``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from proxy.pool.handoff import wait_nowait
from proxy.pool.turns import LARGE_READ
from proxy.protocol.errors import PgError, ProtocolViolation
from proxy.protocol.native import twins
from proxy.session.states import WAIT_BUFFER, ClientState

_monotonic = time.monotonic

IDLE, WAITING, ACTIVE, TERMINATING, CLOSED = (ClientState.IDLE, ClientState.WAITING, ClientState.ACTIVE,
                                              ClientState.TERMINATING, ClientState.CLOSED)


class PyBindingCore:
    """The reference of Binding's per-transaction steps: ``release``, and ``wait`` for a full pool
    with what answers it (proxy/session/binding.py has the rest).  Fields: ``owner``, ``pool``,
    ``wanted``, ``server``, ``pending``, ``last``, ``handoff``."""

    __slots__ = ("owner", "pool", "wanted", "server", "pending", "last", "handoff")

    def attach(self, srv: Any, relay: Any, waited: float) -> None:
        """``srv`` is the client's now: its reads go to the client's session."""
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
        pool = self.pool
        cfg = pool.cfg
        if cfg.server_reset_query_always and cfg.server_reset_query:
            # reset after every transaction, before another client can have the server
            srv.owner = None
            pool.mgr.spawn(pool.release_after_session(srv))
            return
        pool.release(srv)

    def wait(self, srv: Any = None) -> None:
        """Transaction mode, no server at hand that can run now (the client's messages wait in
        ``pending``): ``srv`` taken idle but with other settings is synced
        in a task; else queue in the pool for the next released server, answered by a callback
        (``_handed``); where the pool needs more than a queue (it can open a server, it is
        paused, ...) a task checks one out."""
        if srv is not None:
            asyncio.get_running_loop().create_task(self.attach_later(srv=srv))
            return
        h = wait_nowait(self.pool, self._handed)
        if h is None:
            asyncio.get_running_loop().create_task(self.attach_later())
        else:
            self.handoff = h

    def _handed(self, srv: Any, waited: float) -> None:
        """The pool's answer to ``wait`` (called inside another client's release): a server
        to use now, None to check out again (a freed slot, a PAUSE), or a PgError (``waited``
        is then negative)."""
        self.handoff = None
        session = self.owner
        try:
            if srv is None:
                asyncio.get_running_loop().create_task(self.attach_later(kicked=True))
            elif waited < 0:  # a PgError: query_wait_timeout
                session.fail(srv)
            elif session.state is CLOSED:
                self.pool.release(srv)
            elif srv.applied is not self.wanted and srv.applied != self.wanted:  # a round trip: a task
                asyncio.get_running_loop().create_task(self.attach_later(srv=srv))
            else:
                self._go(srv, waited)
        except Exception as e:  # never into the releasing client's path
            session.ctx.log.error("handoff_failed", client_id=session.id, error=repr(e))
            session.close("internal error")

    def _go(self, srv: Any, waited: float) -> None:
        """Attach ``srv`` and send it what waited."""
        session = self.owner
        relay = session.relay
        self.attach(srv, relay, waited)
        session.state = ACTIVE  # WAITING -> ACTIVE (in the table; assigned directly on the hot path)
        pending = b"".join(self.pending)
        self.pending.clear()
        try:
            srv.write(relay.track(pending, _monotonic()))
        except PgError as e:
            session.fail(e)
            return
        if relay.to_client:
            session._flush_made_up()
        if session.reading_paused and session.transport is not None and session.state is not CLOSED:
            session.transport.resume_reading()
            session.reading_paused = False


class PySessionCore:
    """The pure-Python reference of the hot path (see the module's docstring).

    The fields it reads and writes are the session's: ``ctx``, ``state``,
    ``relay``, ``binding``, ``transport``, ``fences`` (and ``fence_dbs``, its list), ``transaction_mode``,
    ``pinned``, ``closing``, ``close_reason``, ``reading_paused``, ``last_active``.
    """

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is ACTIVE or state is IDLE or state is WAITING:
            relay = self.relay
            self.last_active = now = _monotonic()
            try:
                if self.transaction_mode:
                    chunk = relay.frame_client(data)
                    if chunk:
                        if state is ACTIVE:
                            self.binding.server.transport.write(relay.track(chunk, now))
                        elif state is IDLE and (answer := relay.answer_locally(chunk)) is not None:
                            self._write(answer)
                        else:
                            self._queue_for_server(chunk, now)
                    if relay.to_client:
                        self._flush_made_up()
                else:
                    out = relay.from_client(data, now)
                    if out:
                        self.binding.server.transport.write(out)
            except PgError as e:  # protocol violation, or a refused statement
                self.fail(e)
                return
            if relay.terminated:
                self._terminate()
            elif self.fence_dbs and self.state is IDLE:
                self.fences.lift()  # answered locally: nothing ran
            if len(data) >= LARGE_READ:
                self.take_turn()  # proxy.pool.turns
            return
        self._login_data(data, state)

    def server_data(self, data: bytes) -> None:
        relay = self.relay
        self.last_active = now = _monotonic()
        try:
            out = relay.from_server(data, now)
        except ProtocolViolation as e:
            self._server_broken(e.message)
            return
        if out:
            if relay.releasable and self.state is ACTIVE and self.transaction_mode and not self.pinned \
                    and not self.fence_dbs:
                # the transaction is over: its server goes to the next client before this one's answer
                # is written (the server starts on the next query a write sooner); what follows is
                # what the steps below would do, in another order
                self._release_server()
                self.transport.write(out)
                if self.closing:
                    self.close(self.close_reason or "shutdown")
                return
            self.transport.write(out)
        if self.fence_dbs and relay.answered:
            self.fences.lift()
        if self.state is TERMINATING and (relay.expect_rfq == 0 or relay.copy_in):
            self.close("client terminated")
            return
        if relay.releasable:
            if self.transaction_mode and not self.pinned and self.state is ACTIVE:
                self._release_server()
            if self.closing:
                self.close(self.close_reason or "shutdown")

    def _release_server(self) -> None:
        if self.fence_dbs:
            self.fences.lift()
        self.binding.release()
        self.state = IDLE  # ACTIVE -> IDLE (in the table; assigned directly on the hot path)

    def _queue_for_server(self, out: bytes, now: float) -> None:
        binding = self.binding
        if self.state is IDLE:
            srv = binding.pool.take_idle_now(binding.last)
            if srv is not None and (srv.applied is binding.wanted or srv.applied == binding.wanted):
                relay = self.relay  # the fast path: no task, no wait
                binding.attach(srv, relay, 0.0)
                self.state = ACTIVE  # IDLE -> ACTIVE (in the table; assigned directly on the hot path)
                srv.write(relay.track(out, now))
                return
            self.state = WAITING  # IDLE -> WAITING (in the table; assigned directly on the hot path)
            binding.wait(srv)
        pending = binding.pending
        pending.append(out)
        # the client keeps being read while it waits (a Terminate or a close is seen at once,
        # and no epoll change per transaction), until what waits is more than it should hold
        if len(pending) > 1 and not self.reading_paused and sum(map(len, pending)) > WAIT_BUFFER:
            self.transport.pause_reading()
            self.reading_paused = True

    def _flush_made_up(self) -> None:
        relay = self.relay
        out = b"".join(relay.to_client)
        relay.to_client.clear()
        self._write(out)

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)


SessionCore, BindingCore = twins("proxy.session._hot", "session core", SessionCore=PySessionCore,
                                 BindingCore=PyBindingCore)
