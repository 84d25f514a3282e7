"""One client's life: startup, authentication, pooling rules, relay, close.

The session is the client socket's asyncio Protocol.  After login the hot
path is two callbacks: ``data_received`` (client → relay core → server) and
``server_data`` (server → relay core → client).  Everything that can wait
(checkout, settings, reset) runs in small tasks off that path.
"""

from __future__ import annotations

import asyncio
import itertools
import select
import time
from typing import TYPE_CHECKING

from proxy.dbfence import databases_to_fence
from proxy.protocol.records import ClientEvent, ClientInfo
from proxy.pool.server import ServerConn, ServerGone
from proxy.protocol.sql import settings_sql
from proxy.protocol import messages as m
from proxy.protocol.auth import AuthFailed, ClientAuthenticator
from proxy.protocol.errors import (
    ADMIN_SHUTDOWN, CONNECTION_FAILURE, FEATURE_NOT_SUPPORTED, INVALID_AUTHORIZATION, PROTOCOL_VIOLATION,
    TOO_MANY_CONNECTIONS, PgError, ProtocolViolation,
)
from proxy.protocol.relay import Relay

if TYPE_CHECKING:
    from proxy.server import Proxy

_monotonic = time.monotonic
_client_ids = itertools.count(1)
_POLLRDHUP = getattr(select, "POLLRDHUP", 0)  # Linux: the peer closed its end

# startup parameters that are not session settings
_NOT_SETTINGS = frozenset(("user", "database", "options", "replication"))

STARTUP, AUTH, RELAY, CLOSED, TERMINATING = range(5)


class ClientSession(asyncio.Protocol):
    def __init__(self, proxy: "Proxy") -> None:
        self.proxy = proxy
        self.id = next(_client_ids)
        self.transport: asyncio.Transport | None = None
        self.state = STARTUP
        self.addr = "unix"
        self._inbuf = bytearray()
        self._fb: m.FrameBuffer | None = None
        self._waiter: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self.server: ServerConn | None = None
        self.pool = None
        self.relay: Relay | None = None
        self.info: ClientInfo | None = None
        self.wanted: dict[str, str] = {}
        self.transaction_mode = proxy.settings.pool_mode == "transaction"
        self.pinned = False
        self._pending: list[bytes] = []
        self._attaching = False
        self.key_pid = 0
        self.key = b""
        self.connected_at = _monotonic()
        self.last_active = self.connected_at
        self.closing = False
        self.close_reason = ""
        self._cancel_sent = False
        self.tls = False
        self.reading_paused = False  # we stopped reading the client (waiting for a server, back-pressure)
        self._acquiring: asyncio.Task | None = None  # a checkout a departing client gives up
        self._fenced: list[str] = []  # databases this client's statement needs alone
        self._refusal: PgError | None = None
        self._refusal_reason = ""

    # ================================================================ protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.addr = f"{peer[0]}:{peer[1]}"
        proxy = self.proxy
        proxy.sessions.add(self)
        # refused clients still get their SSLRequest answered and their startup
        # packet read, as PostgreSQL does, so that every client shows the error
        if proxy.draining:
            self._refusal = PgError("57P03", "the database system is shutting down")
            self._refusal_reason = "draining"
        elif len(proxy.sessions) > proxy.settings.max_client_conn:
            self._refusal = PgError(TOO_MANY_CONNECTIONS, "no more connections allowed (max_client_conn)")
            self._refusal_reason = "max_client_conn"
        self._task = asyncio.get_running_loop().create_task(self._login())

    def data_received(self, data: bytes) -> None:
        if self.state == RELAY:
            relay = self.relay
            self.last_active = now = _monotonic()
            try:
                if self.transaction_mode:
                    chunk = relay.split(data)  # type: ignore[union-attr]
                    if chunk:
                        srv = self.server
                        if srv is not None:
                            srv.transport.write(  # type: ignore[union-attr]
                                relay.track(chunk, now, srv.prepared))  # type: ignore[union-attr]
                        elif not self._attaching and (answer := relay.answer_locally(chunk)) is not None:
                            self._write(answer)
                        else:
                            self._queue_for_server(chunk)
                    if relay.to_client:  # type: ignore[union-attr]
                        self._flush_made_up()
                else:
                    out = relay.from_client(data, now)  # type: ignore[union-attr]
                    if out:
                        self.server.transport.write(out)  # type: ignore[union-attr]
            except PgError as e:  # protocol violation, or a refused statement
                self.fail(e)
                return
            if relay.terminated:  # type: ignore[union-attr]
                self._terminate()
            elif self._fenced and self.server is None:
                self._lift_fences()  # answered locally: nothing ran
            return
        if self.state == CLOSED or self.state == TERMINATING:
            return  # nothing after a Terminate counts
        if self._fb is not None:
            self._fb.feed(data)
        else:
            self._inbuf += data
            if len(self._inbuf) > m.MAX_STARTUP_PACKET + 8:
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

    # server-side callbacks (called by ServerConn while we own it)

    def server_data(self, data: bytes) -> None:
        relay = self.relay
        self.last_active = now = _monotonic()
        try:
            out = relay.from_server(data, now)  # type: ignore[union-attr]
        except ProtocolViolation as e:
            self._server_broken(e.message)
            return
        if out:
            self.transport.write(out)  # type: ignore[union-attr]
        if self._fenced and relay.quiet:  # type: ignore[union-attr]
            self._lift_fences()
        if self.state == TERMINATING and (relay.expect_rfq == 0 or relay.copy_in):  # type: ignore[union-attr]
            self.close("client terminated")
            return
        if relay.idle:  # type: ignore[union-attr]
            if self.transaction_mode and not self.pinned:
                self._release_server()
            if self.closing:
                self.close(self.close_reason or "shutdown")

    def _terminate(self) -> None:
        """Terminate: answers the server will send on its own (to a Query, a Sync) still reach
        the client, then the session ends; nothing is awaited that the server would not send
        unasked (an unsynced batch, a COPY waiting for data), and never past
        server_drain_timeout.  The server then finishes in Pool.release_after_session."""
        relay = self.relay
        if self.server is None or relay.expect_rfq == 0 or relay.copy_in:  # type: ignore[union-attr]
            self.close("client terminated")
            return
        self.state = TERMINATING
        asyncio.get_running_loop().call_later(
            self.proxy.pools.cfg.server_drain_timeout, self.close, "client terminated")

    def server_lost(self, srv: ServerConn) -> None:
        if srv is self.server:
            self.server = None
            if not self.relay.server_fatal:  # type: ignore[union-attr]
                # a server that said why (FATAL 57P01, idle_session_timeout, ...) has been
                # heard as it said it; one that just went gets PostgreSQL's own words
                self._send_error(PgError(CONNECTION_FAILURE, "server closed the connection unexpectedly",
                                         detail=srv.close_reason or None))
            self.close("server closed the connection")

    def pause_client_reading(self) -> None:
        if self.transport is not None and self.state != CLOSED:
            self.transport.pause_reading()
            self.reading_paused = True

    def resume_client_reading(self) -> None:
        if self.transport is not None and self.state != CLOSED and not self._attaching:
            self.transport.resume_reading()
            self.reading_paused = False

    def peer_gone(self) -> bool:
        """Has the client closed its end?  Asked of the socket without reading from it, for a
        client whose reading is paused (its FIN is not read until reading resumes)."""
        transport = self.transport
        if transport is None or not _POLLRDHUP:
            return False
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            p = select.poll()
            p.register(sock.fileno(), _POLLRDHUP)
            events = p.poll(0)
        except (OSError, ValueError):
            return True
        return bool(events and events[0][1] & (_POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL))

    # ================================================================ login

    async def _read_startup(self) -> bytes:
        while True:
            n = m.startup_packet_length(self._inbuf)
            if n is not None and len(self._inbuf) >= n:
                pkt = bytes(self._inbuf[:n])
                del self._inbuf[:n]
                return pkt
            await self._wait_input()

    async def _wait_input(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self.state == CLOSED:
            raise ConnectionResetError

    async def _read_message(self) -> tuple[int, bytes]:
        assert self._fb is not None
        while True:
            msg = self._fb.next()
            if msg is not None:
                return msg
            await self._wait_input()

    async def _login(self) -> None:
        proxy = self.proxy
        settings = proxy.settings
        try:
            async with asyncio.timeout(settings.server_connect_timeout + 60.0):
                pkt = await self._startup_packet()
                if pkt is None:
                    return
                if self._refusal is not None:
                    proxy.count_refusal(self._refusal_reason)
                    raise self._refusal
                params = pkt.params
                user = params["user"]
                db = params.get("database") or user
                if "replication" in params and params["replication"].lower() not in ("false", "off", "no", "0"):
                    proxy.count_refusal("replication")
                    raise PgError(FEATURE_NOT_SUPPORTED, "replication connections are not supported by pgscope")
                wanted = {k: v for k, v in params.items() if k not in _NOT_SETTINGS}
                if params.get("options"):
                    wanted.update(m.parse_options(params["options"]))
                self.wanted = wanted
                self.info = ClientInfo(self.id, db, user, params.get("application_name", ""), self.addr,
                                       tuple(wanted.items()))
                self.state = AUTH
                self._fb = m.FrameBuffer(max_size=m.MAX_STARTUP_PACKET)
                self._fb.feed(bytes(self._inbuf))
                self._inbuf = bytearray()
                if pkt.version != m.PROTOCOL_3_0 or pkt.unsupported:
                    self._write(m.negotiate_protocol_version(0, pkt.unsupported))
                await self._authenticate(user)
            # the client is who it says: find it a server
            self.pool = proxy.pools.pool(db, user)
            self._acquiring = self._task
            try:
                srv, waited = await self.pool.acquire()
            finally:
                self._acquiring = None
            proxy.pools.wait_hist.observe(waited)
            try:
                await self._prepare(srv)
            except BaseException:
                srv.owner = None
                self.pool.forget(srv)
                srv.close("session settings failed")
                raise
        except PgError as e:
            if isinstance(e, AuthFailedError):
                proxy.client_auth_failures += 1
                proxy.log.warning("client_auth_failed", client_addr=self.addr,
                                  user=self.info.user if self.info else None, reason=e.detail_reason)
            self.fail(e)
            return
        except (OSError, ServerGone) as e:  # includes ConnectionResetError and ssl.SSLError
            self.close("client closed the connection during login" if isinstance(e, (ConnectionResetError, ServerGone))
                       else f"client TLS/socket error during login: {e}")
            return
        except TimeoutError:
            self.fail(PgError(PROTOCOL_VIOLATION, "client login timed out"))
            return
        if self.state == CLOSED:
            await self.pool.release_after_session(srv)
            return
        # startup answer: the server's reported parameters, our own cancel key
        out = [m.parameter_status(k, v) for k, v in srv.params.items()]
        # session mode: the server's real process id (pg_backend_pid(), NOTIFY senders and
        # pg_stat_activity agree with the driver), with a secret of pgscope's own
        self.key_pid, self.key = proxy.register_cancel_key(
            self, None if self.transaction_mode else srv.pid)
        out.append(m.backend_key_data(self.key_pid, self.key))
        out.append(m.ready_for_query(b"I"))
        relay = Relay(self.info, proxy.sink.emit if proxy.sink is not None else None)
        self.relay = relay
        if self.transaction_mode:
            relay.on_query = self._on_query
            relay.max_prepared = proxy.settings.max_prepared_statements
        else:
            relay.on_query = self._fence_for
        self._attach(srv, waited)
        self.state = RELAY
        self._fb = None
        if proxy.sink is not None:
            proxy.sink.emit(ClientEvent(self.info, True, _monotonic()))
        self._write(b"".join(out))
        proxy.log.debug("client_login", client_id=self.id, client_addr=self.addr, db=self.info.db,
                        user=self.info.user, application_name=self.info.application_name)
        if self.transaction_mode:
            self._release_server()

    async def _start_tls(self) -> None:
        if self._inbuf:
            # bytes sent in the clear after the SSLRequest would be taken as
            # coming from inside the encrypted channel (CVE-2021-23214): refuse
            raise ProtocolViolation("received unencrypted data after SSL request")
        self._write(b"S")
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(self.transport, self, self.proxy.client_ssl,  # type: ignore[arg-type]
                                         server_side=True)
        if transport is None:
            raise ConnectionResetError
        self.transport = transport  # type: ignore[assignment]
        self.tls = True

    async def _startup_packet(self) -> m.StartupPacket | None:
        while True:
            pkt = m.parse_startup_packet(await self._read_startup())
            if pkt.kind == "ssl" and self.proxy.client_ssl is not None and not self.tls:
                await self._start_tls()
                continue
            if pkt.kind in ("ssl", "gssenc"):
                self._write(b"N")
                continue
            if pkt.kind == "startup" and not self.tls and self.addr != "unix" \
                    and self.proxy.settings.client_tls_mode == "require":
                self.proxy.count_refusal("tls_required")
                raise PgError(INVALID_AUTHORIZATION, "SSL required",
                              detail="client_tls_mode = require: connect with sslmode=require")
            if pkt.kind == "cancel":
                await self.proxy.cancel(pkt.cancel_pid, pkt.cancel_key)
                self.close("cancel request")
                return None
            return pkt

    async def _authenticate(self, user: str) -> None:
        proxy = self.proxy
        method = proxy.auth_method
        auth = ClientAuthenticator(method, user, proxy.client_secret(user))
        first = auth.start()
        self._write(first)
        while not auth.done:
            t, body = await self._read_message()
            try:
                out = auth.feed(bytes([t]), body)
            except AuthFailed as e:
                raise AuthFailedError(e) from None
            if out:
                self._write(out)

    async def _prepare(self, srv: ServerConn) -> None:
        """Make the server's session settings the client's (SET/RESET the difference)."""
        if srv.applied != self.wanted:
            sql = settings_sql(self.wanted, srv.applied)
            if sql:
                err = await srv.simple_query(sql)
                if err is not None:
                    # like PostgreSQL rejecting the startup packet's parameter
                    srv.applied = {}
                    await srv.simple_query("RESET ALL")
                    err.severity = "FATAL"
                    raise err
            srv.applied = dict(self.wanted)

    # ========================================================== attach/release

    def _attach(self, srv: ServerConn, waited: float) -> None:
        relay = self.relay
        self.server = srv
        srv.owner = self
        relay.server_pid = srv.pid  # type: ignore[union-attr]
        relay.prepared = srv.prepared  # type: ignore[union-attr]
        relay.server_params = srv.params  # type: ignore[union-attr]
        relay.pending_wait = waited  # type: ignore[union-attr]

    def _release_server(self) -> None:
        srv = self.server
        if srv is None:
            return
        if self._fenced:
            self._lift_fences()
        self.server = None
        srv.tx_status = "I"
        self.pool.release(srv)  # type: ignore[union-attr]

    def _queue_for_server(self, out: bytes) -> None:
        if not self._attaching and not self._pending:
            # fast path: an idle server whose settings already match, no task, no wait
            srv = self.pool.take_idle_now()  # type: ignore[union-attr]
            if srv is not None:
                if srv.applied == self.wanted:
                    self.proxy.pools.wait_hist.observe(0.0)
                    self._attach(srv, 0.0)
                    srv.write(self.relay.track(out, _monotonic(), srv.prepared))  # type: ignore[union-attr]
                    return
                self.pool.release(srv)  # type: ignore[union-attr]
        self._pending.append(out)
        if not self._attaching:
            self._attaching = True
            self.transport.pause_reading()  # type: ignore[union-attr]
            self.reading_paused = True
            asyncio.get_running_loop().create_task(self._attach_for_transaction())

    async def _attach_for_transaction(self) -> None:
        pool = self.pool
        self._acquiring = asyncio.current_task()
        try:
            srv, waited = await pool.acquire()  # type: ignore[union-attr]
        except PgError as e:
            self._attaching = False
            self.fail(e)
            return
        finally:
            self._acquiring = None
        self.proxy.pools.wait_hist.observe(waited)
        if self.state == CLOSED:
            pool.release(srv)  # type: ignore[union-attr]
            return
        try:
            await self._prepare(srv)
        except PgError as e:
            pool.release(srv)  # type: ignore[union-attr]
            self._attaching = False
            self.fail(e)
            return
        except ServerGone as e:
            self._attaching = False
            self.fail(e)
            return
        if self.state == CLOSED:
            pool.release(srv)  # type: ignore[union-attr]
            return
        self._attach(srv, waited)
        pending = b"".join(self._pending)
        self._pending.clear()
        self._attaching = False
        try:
            srv.write(self.relay.track(pending, _monotonic(), srv.prepared))  # type: ignore[union-attr]
        except PgError as e:
            self.fail(e)
            return
        if self.relay.to_client:  # type: ignore[union-attr]
            self._flush_made_up()
        if self.transport is not None and self.state != CLOSED:
            self.transport.resume_reading()
            self.reading_paused = False

    def _flush_made_up(self) -> None:
        out = b"".join(self.relay.to_client)  # type: ignore[union-attr]
        self.relay.to_client.clear()  # type: ignore[union-attr]
        self._write(out)

    def _on_query(self, text: str) -> None:
        """Transaction mode: pooling rules for a statement's text (session state)."""
        self.proxy.session_state.check(self, text)
        self._fence_for(text)

    def _fence_for(self, text: str) -> None:
        """DROP DATABASE x and the like: close the pool's idle connections to x first."""
        dbs = databases_to_fence(text)
        if dbs:
            pools = self.proxy.pools
            for db in dbs:
                if db not in self._fenced:
                    pools.fence(db)
                    self._fenced.append(db)

    def _lift_fences(self) -> None:
        pools = self.proxy.pools
        for db in self._fenced:
            pools.unfence(db)
        self._fenced = []

    # ================================================================ closing

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _send_error(self, e: PgError) -> None:
        self._write(m.error_from(e))

    def fail(self, e: PgError) -> None:
        """Send an ErrorResponse and close the connection."""
        self._send_error(e)
        self.close(e.message)

    def _server_broken(self, reason: str) -> None:
        srv = self.server
        self.server = None
        if srv is not None:
            srv.close(f"protocol error from server: {reason}")
        self.fail(PgError(CONNECTION_FAILURE, "server sent invalid data", detail=reason))

    def close(self, reason: str = "") -> None:
        if self.state == CLOSED:
            return
        if reason and not self.close_reason:
            self.close_reason = reason
        if self.transport is not None:
            self.transport.close()
        self._teardown()

    def _teardown(self) -> None:
        if self.state == CLOSED:
            return
        was_relaying = self.state == RELAY or self.state == TERMINATING
        self.state = CLOSED
        proxy = self.proxy
        proxy.sessions.discard(self)
        proxy.unregister_cancel_key(self)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        task = self._acquiring
        if task is not None:  # queued for a server nobody will use: leave the queue
            self._acquiring = None
            if task is not asyncio.current_task():
                task.cancel()
        if self._fenced:
            self._lift_fences()
        srv = self.server
        if srv is not None:
            self.server = None
            proxy.pools.spawn(self.pool.release_after_session(  # type: ignore[union-attr]
                srv, self.relay, reset=self.pinned))
        if was_relaying and proxy.sink is not None and self.info is not None:
            proxy.sink.emit(ClientEvent(self.info, False, _monotonic()))
        if was_relaying:
            proxy.log.debug("client_closed", client_id=self.id, client_addr=self.addr,
                            reason=self.close_reason)

    # ============================================================== timeouts

    def check_timeouts(self, now: float, settings) -> None:
        """Called about once a second by the proxy's janitor."""
        if self.state != RELAY:
            return
        relay = self.relay
        idle_for = now - self.last_active
        if relay.quiet:  # type: ignore[union-attr]
            if relay.tx_status == "I":  # type: ignore[union-attr]
                if settings.client_idle_timeout > 0 and idle_for > settings.client_idle_timeout \
                        and not self._attaching:
                    self.fail(PgError("57P05", "terminating connection due to idle-session timeout",
                                      detail="client_idle_timeout"))
            elif settings.idle_transaction_timeout > 0 and idle_for > settings.idle_transaction_timeout:
                self.fail(PgError("25P03", "terminating connection due to idle-in-transaction timeout",
                                  detail="idle_transaction_timeout"))
        elif settings.query_timeout > 0 and self.server is not None and not self._cancel_sent:
            started = relay.oldest_request_time()  # type: ignore[union-attr]
            if started is not None and now - started > settings.query_timeout:
                self._cancel_sent = True
                self.proxy.log.info("query_timeout_cancel", client_id=self.id, server_pid=self.server.pid)
                asyncio.get_running_loop().create_task(self.proxy.send_cancel(self.server))
        if self._cancel_sent and relay.quiet:  # type: ignore[union-attr]
            self._cancel_sent = False

    # ================================================================ drain

    def drain(self) -> None:
        """Shutdown: close now if between transactions, else after this one ends."""
        if self.state != RELAY:
            self.fail(PgError(ADMIN_SHUTDOWN, "terminating connection due to administrator command"))
            return
        relay = self.relay
        if self.server is None or relay.idle:  # type: ignore[union-attr]
            self.fail(PgError(ADMIN_SHUTDOWN, "terminating connection due to administrator command"))
        else:
            self.closing = True
            self.close_reason = "shutdown"

    def busy_since(self) -> float | None:
        """When the oldest request still awaiting results was sent (monotonic); None when none is."""
        relay = self.relay
        if self.state != RELAY or relay is None:
            return None
        return relay.oldest_request_time()

    @property
    def state_name(self) -> str:
        if self.state == TERMINATING:
            return "active"
        if self.state != RELAY:
            return "login"
        if self._attaching:
            return "waiting"
        return "active" if self.server is not None else "idle"


class AuthFailedError(PgError):
    """A client's failed login, as PostgreSQL reports it (no detail leaks)."""

    def __init__(self, e: AuthFailed) -> None:
        super().__init__(e.sqlstate, e.message)
        self.detail_reason = getattr(e, "reason", None)
