"""One client's connection: the asyncio Protocol shell over login, binding and the relay.

After login the hot path is two callbacks: ``data_received`` (client -> relay
-> server) and ``server_data`` (server -> relay -> client).  Everything that
can wait (login, checkout, settings, reset) runs in small tasks off that path.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
import time
from typing import Any

from proxy.pool.turns import take_turn
from proxy.pool.upstream import tune_socket
from proxy.protocol import messages as m
from proxy.protocol.errors import CONNECTION_FAILURE, PgError, ProtocolViolation
from proxy.protocol.framing import MAX_STARTUP_PACKET, Framer
from proxy.protocol.records import ClientEvent, ClientInfo
from proxy.protocol.relay import Relay
from proxy.session.binding import Binding
from proxy.session.fence import Fences
from proxy.session.handshake import admit, guarded
from proxy.session.hot import SessionCore
from proxy.session.rules import apply_verdict
from proxy.session.states import RELAYING, STATE_NAMES, ClientState, advance

_monotonic = time.monotonic
_client_ids = itertools.count(1)
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_cred(sock: Any) -> tuple[int, int | None]:
    """(process id, user id) of a Unix-socket client (SO_PEERCRED; (0, None) where the system has none)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return 0, None
    try:
        pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        return 0, None
    return pid, uid

STARTUP, AUTH, IDLE, WAITING, ACTIVE, TERMINATING, CLOSED, CONSOLE = ClientState


class ClientSession(SessionCore, asyncio.Protocol):
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.id = next(_client_ids)
        self.transport: asyncio.Transport | None = None
        self.state = STARTUP
        self.addr = "unix"
        self.unix = False  # connected through the Unix socket (unix_socket_dir)
        self.peer_uid: int | None = None  # its client's user id (SO_PEERCRED), for peer authentication
        self._in = Framer(max_size=MAX_STARTUP_PACKET)
        self._waiter: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self.binding: Binding | None = None
        self.relay: Relay | None = None
        self.info: ClientInfo | None = None
        self.transaction_mode = ctx.settings.pool_mode == "transaction"
        self.pinned = False
        self.key_pid = 0
        self.key = b""
        self.connected_at = _monotonic()
        self.last_active = self.connected_at
        self.closing = False  # drain asked: close once the transaction is over
        self.close_reason = ""
        self._cancel_sent = False
        self.tls = False
        self.reading_paused = False  # we stopped reading the client (waiting for a server, back-pressure)
        self._acquiring: asyncio.Task | None = None  # a checkout a departing client gives up
        self.fences = Fences(ctx.pools)  # databases this client's statement needs alone
        self.fence_dbs = self.fences.dbs  # (read on the hot path: one field instead of two lookups)

    @property
    def server(self) -> Any:
        b = self.binding
        return b.server if b is not None else None

    def _to(self, new: ClientState) -> None:
        self.state = advance(self.state, new)

    # ================================================================ protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        tune_socket(transport, self.ctx.settings)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.addr = f"{peer[0]}:{peer[1]}"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            self.unix = True  # "unix:PID", the client's process id, as PgBouncer shows it
            pid, self.peer_uid = peer_cred(sock)
            if pid:
                self.addr = f"unix:{pid}"
        self.ctx.sessions.add(self)
        self._task = asyncio.get_running_loop().create_task(self._login())

    def _login_data(self, data: bytes, state: ClientState) -> None:
        """Bytes before the relay runs (login, the console) or after it stopped (``data_received``,
        the hot path, is SessionCore's)."""
        if state is CLOSED or state is TERMINATING:
            return  # nothing after a Terminate counts
        self._in.feed(data)
        if self._in.pending() > MAX_STARTUP_PACKET + 8 and state is STARTUP:
            self.fail(ProtocolViolation("invalid length of startup packet"))
            return
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.close_reason:
            self.close_reason = "client closed the connection"
        self._teardown()

    def pause_writing(self) -> None:
        srv = self.server
        if srv is not None:
            srv.reading_paused(True)

    def resume_writing(self) -> None:
        srv = self.server
        if srv is not None:
            srv.reading_paused(False)

    # server-side callbacks (called by the server connection while we own it)

    def server_lost(self, srv: Any) -> None:
        b = self.binding
        if b is not None and srv is b.server:
            b.server = None
            if not self.relay.server_fatal:  # type: ignore[union-attr]
                # a server that said why (FATAL 57P01, idle_session_timeout, ...) has been
                # heard as it said it; one that just went gets PostgreSQL's own words
                self._send_error(PgError(CONNECTION_FAILURE, "server closed the connection unexpectedly",
                                         detail=srv.close_reason or None))
            self.close("server closed the connection")

    def pause_client_reading(self) -> None:
        if self.transport is not None and self.state is not CLOSED:
            self.transport.pause_reading()
            self.reading_paused = True

    def resume_client_reading(self) -> None:
        if self.transport is not None and self.state is not CLOSED and self.state is not WAITING:
            self.transport.resume_reading()
            self.reading_paused = False

    def take_turn(self) -> None:
        """A large read: the loop serves its other sockets before this client is read again."""
        if self.transport is not None and self._read_on():
            take_turn(self.transport, self._read_on)

    def _read_on(self) -> bool:
        return not self.reading_paused and self.state is not CLOSED

    # ================================================================ login

    async def _login(self) -> None:
        await guarded(self, self._log_in())  # a fault of pgscope's own: XX000, not a client left waiting

    async def _log_in(self) -> None:
        admitted = await admit(self)
        if admitted is None:
            return
        binding, srv, waited = admitted
        binding.server = srv  # held from now on: a fault before attach still gives it back (end)
        ctx = self.ctx
        settings = ctx.settings
        if self.state is CLOSED:
            await binding.pool.release_after_session(srv)
            return
        # startup answer: the server's reported parameters, our own cancel key
        out = [m.parameter_status(k, v) for k, v in srv.params.items()]
        # session mode: the server's real process id (pg_backend_pid(), NOTIFY senders and
        # pg_stat_activity agree with the driver), with a secret of pgscope's own
        self.key_pid, self.key = ctx.cancel.register(self, None if self.transaction_mode else srv.pid)
        out.append(m.backend_key_data(self.key_pid, self.key))
        out.append(m.ready_for_query(b"I"))
        relay = Relay(self.info, ctx.emit,
                      settings.max_prepared_statements if self.transaction_mode else 0)
        self.relay = relay
        ctx.counters.login(self.info.db)
        relay.on_query = self._on_query if self.transaction_mode else self.fences.check
        relay.fences_only = not self.transaction_mode
        binding.attach(srv, relay, waited)
        self._to(ACTIVE)
        self._in = None  # type: ignore[assignment]
        if ctx.emit is not None:
            ctx.emit(ClientEvent(self.info, True, _monotonic()))
        self._write(b"".join(out))
        (ctx.log.info if settings.log_connections else ctx.log.debug)(
            "client_login", client_id=self.id, client_addr=self.addr, db=self.info.db, user=self.info.user,
            application_name=self.info.application_name, tls=self.tls)
        if self.transaction_mode:
            self._release_server()

    # ========================================================== attach/release

    # ========================================================== pooling rules

    def _on_query(self, text: str) -> None:
        """Transaction mode: what a statement's text means for the server it runs on."""
        verdict = self.ctx.rules.check(text, self.pinned)
        if verdict is not None:
            apply_verdict(self, verdict)
        self.fences.check(text)

    # ================================================================ closing

    def _send_error(self, e: PgError) -> None:
        self._write(m.error_from(e))

    def fail(self, e: PgError) -> None:
        """Send an ErrorResponse and close the connection."""
        self._send_error(e)
        self.close(e.message)

    def _server_broken(self, reason: str) -> None:
        srv = self.server
        self.binding.server = None  # type: ignore[union-attr]
        if srv is not None:
            srv.close(f"protocol error from server: {reason}")
        self.fail(PgError(CONNECTION_FAILURE, "server sent invalid data", detail=reason))

    def _terminate(self) -> None:
        """Terminate: answers the server will send on its own (to a Query, a Sync) still reach
        the client, then the session ends; nothing is awaited that the server would not send
        unasked (an unsynced batch, a COPY waiting for data), and never past
        server_drain_timeout.  The server then finishes in Pool.release_after_session."""
        relay = self.relay
        if self.state is not ACTIVE or relay.expect_rfq == 0 or relay.copy_in:  # type: ignore[union-attr]
            self.close("client terminated")
            return
        self._to(TERMINATING)
        asyncio.get_running_loop().call_later(
            self.ctx.pools.cfg.server_drain_timeout, self.close, "client terminated")

    def close(self, reason: str = "") -> None:
        if self.state is CLOSED:
            return
        if reason and not self.close_reason:
            self.close_reason = reason
        if self.transport is not None:
            self.transport.close()
        self._teardown()

    def _teardown(self) -> None:
        if self.state is CLOSED:
            return
        was_relaying = self.state in RELAYING or self.state is TERMINATING
        self._to(CLOSED)
        ctx = self.ctx
        ctx.sessions.discard(self)
        if self.relay is not None and self.info is not None:
            ctx.counters.retire(self.info.db, self.relay)
        ctx.cancel.unregister(self.key_pid, self.key)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        task = self._acquiring
        if task is not None:  # queued for a server nobody will use: leave the queue
            self._acquiring = None
            if task is not asyncio.current_task():
                task.cancel()
        if self.fences.dbs:
            self.fences.lift()
        if self.binding is not None:
            self.binding.end(self.relay, reset=self.pinned)
        if was_relaying and ctx.emit is not None and self.info is not None:
            ctx.emit(ClientEvent(self.info, False, _monotonic()))
        if was_relaying:
            (ctx.log.info if ctx.settings.log_disconnections else ctx.log.debug)(
                "client_closed", client_id=self.id, client_addr=self.addr, db=self.info.db if self.info else None,
                user=self.info.user if self.info else None, reason=self.close_reason,
                connected_s=round(_monotonic() - self.connected_at, 3))

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.state]
