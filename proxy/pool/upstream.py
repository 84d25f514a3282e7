"""One upstream PostgreSQL connection.

An asyncio Protocol with two modes.  Owned by a client session ("relay"), it
hands every read straight to that session; unowned ("internal"), it frames
what it reads so the pool can log in, reset and health-check it with short
request/response exchanges.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections import OrderedDict
from typing import Any

from proxy.pool.hot import ServerCore
from proxy.pool.turns import take_turn
from proxy.protocol import messages as m
from proxy.protocol.auth import AuthFailed, UpstreamAuthenticator
from proxy.protocol.errors import CONNECTION_FAILURE, INTERNAL_ERROR, PgError
from proxy.protocol.framing import Framer

_ids = itertools.count(1)


def server_error(fields: dict[str, str]) -> PgError:
    """An ErrorResponse from PostgreSQL as a PgError, keeping its fields."""
    return PgError(
        fields.get("C", INTERNAL_ERROR), fields.get("M", "unknown error"),
        severity=fields.get("S", "ERROR"), detail=fields.get("D"), hint=fields.get("H"),
    )


TCP_OPTIONS = ("tcp_socket_buffer", "tcp_keepalive", "tcp_keepidle", "tcp_keepintvl", "tcp_keepcnt",
               "tcp_user_timeout")


def tune_socket(transport: Any, opts: Any) -> None:
    """PgBouncer's ``tcp_*`` settings on a TCP connection's socket (a Unix socket is left alone).

    ``opts`` has the attributes named in ``TCP_OPTIONS`` (the Settings, or a PoolConfig):
    ``tcp_socket_buffer`` fixes SO_SNDBUF and SO_RCVBUF (the kernel doubles the value and no
    longer grows the buffers on its own); ``tcp_keepalive`` turns SO_KEEPALIVE on, with
    ``tcp_keepidle``/``tcp_keepintvl`` (seconds) and ``tcp_keepcnt`` (probes) where set;
    ``tcp_user_timeout`` (ms) bounds how long sent data may stay unacknowledged.  0 leaves a
    value to the kernel."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    size = opts.tcp_socket_buffer
    try:
        if size > 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        if opts.tcp_keepalive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for name, value in (("TCP_KEEPIDLE", opts.tcp_keepidle), ("TCP_KEEPINTVL", opts.tcp_keepintvl),
                                ("TCP_KEEPCNT", opts.tcp_keepcnt)):
                if value > 0 and hasattr(socket, name):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        if opts.tcp_user_timeout > 0 and hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, opts.tcp_user_timeout)
    except OSError:
        pass  # a socket closed under us: nothing to tune


class ServerGone(PgError):
    def __init__(self, message: str = "server closed the connection unexpectedly") -> None:
        super().__init__(CONNECTION_FAILURE, message)


class ServerConn(ServerCore, asyncio.Protocol):
    def __init__(self, db: str, user: str) -> None:
        self.id = next(_ids)
        self.db = db
        self.user = user
        self.transport: asyncio.Transport | None = None
        self.owner: Any = None  # the client session relaying through this server
        self.fb = Framer()
        self._waiter: asyncio.Future | None = None
        self.closed = False
        self.close_reason = ""
        self.pid = 0
        self.key = b""
        self.params: dict[str, str] = {}  # ParameterStatus values as last reported
        self.applied: dict[str, str] = {}  # settings we SET on top of the defaults
        self.prepared: OrderedDict[str, str] = OrderedDict()  # server-side prepared statements
        self.created = time.monotonic()
        self.last_used = self.created
        self.tx_status = "I"
        self.writing_paused = False
        self.pool: Any = None
        self.read_paused = False  # paused because the client cannot take more
        self.tls = False
        self._tls_answer: bytearray | None = None

    # ------------------------------------------------------------ protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _internal_data(self, data: bytes) -> None:
        """A read with no client owning the server (``data_received``, the hot path, is ServerCore's)."""
        if self._tls_answer is not None:
            self._tls_answer += data
        else:
            self.fb.feed(data)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        if not self.close_reason:
            self.close_reason = "server closed the connection"
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        owner = self.owner
        if owner is not None and not was_closed:
            owner.server_lost(self)
        if self.pool is not None and not was_closed:  # close() has told the pool already
            self.pool.forget(self)

    def pause_writing(self) -> None:
        self.writing_paused = True
        owner = self.owner
        if owner is not None:
            owner.pause_client_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        owner = self.owner
        if owner is not None:
            owner.resume_client_reading()

    @property
    def busy(self) -> bool:
        """Internal mode: an exchange (query, login, check) is waiting for the server."""
        return self._waiter is not None

    # --------------------------------------------------------- operations

    def close(self, reason: str = "") -> None:
        if reason and not self.close_reason:
            self.close_reason = reason
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                try:
                    self.transport.write(m.terminate())
                except Exception:
                    pass
                self.transport.close()
            if self.pool is not None:
                self.pool.forget(self)

    async def recv(self) -> tuple[int, bytes]:
        """Next whole message in internal mode."""
        while True:
            msg = self.fb.next()
            if msg is not None:
                return msg
            await self._more()

    async def _more(self) -> None:
        """Wait until something arrives (or the connection is gone)."""
        if self.closed:
            raise ServerGone()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def start_tls(self, ctx: Any, hostname: str | None, required: bool) -> bool:
        """SSLRequest, then the TLS handshake; False when the server declined."""
        self._tls_answer = bytearray()
        try:
            self.write(m.ssl_request())
            while not self._tls_answer:
                await self._more()
            answer = bytes(self._tls_answer)
        finally:
            self._tls_answer = None
        if answer[:1] == b"N":
            if required:
                raise PgError(CONNECTION_FAILURE, "server does not support SSL, but SSL was required")
            self.fb.feed(answer[1:])
            return False
        if answer != b"S":  # anything after 'S' was sent in the clear: refuse it
            raise PgError(CONNECTION_FAILURE, "received invalid response to SSL negotiation")
        loop = asyncio.get_running_loop()
        self.transport = await loop.start_tls(self.transport, self, ctx, server_hostname=hostname)
        self.tls = True
        return True

    async def login(self, password: str | None, params: dict[str, str] | None = None) -> None:
        """Startup and authentication, up to the first ReadyForQuery."""
        startup = {"user": self.user, "database": self.db}
        if params:
            startup.update(params)
        self.write(m.startup_message(startup))
        auth = UpstreamAuthenticator(self.user, password)
        while True:
            t, body = await self.recv()
            if t == m.B_AUTH:
                try:
                    out = auth.feed(body)
                except AuthFailed as e:
                    raise PgError(e.sqlstate, e.message) from e
                if out:
                    self.write(out)
            elif t == m.B_PARAMETER_STATUS:
                k, v = m.decode_parameter_status(body)
                self.params[k] = v
            elif t == m.B_BACKEND_KEY:
                self.pid = int.from_bytes(body[:4], "big", signed=True)
                self.key = body[4:]
            elif t == m.B_ERROR:
                raise server_error(m.decode_error_fields(body))
            elif t == m.B_READY_FOR_QUERY:
                self.tx_status = chr(body[0])
                return
            # NoticeResponse, NegotiateProtocolVersion: nothing to do

    async def simple_query(self, sql: str) -> PgError | None:
        """Run ``sql`` in internal mode; return the first error, if any."""
        return (await self.fetch(sql, keep_rows=False))[1]

    async def fetch(self, sql: str, keep_rows: bool = True) -> tuple[list[list[str | None]], PgError | None]:
        """Run ``sql`` in internal mode; (rows of the last result set as text, first error)."""
        self.write(m.query(sql))
        err: PgError | None = None
        rows: list[list[str | None]] = []
        while True:
            t, body = await self.recv()
            if t == m.B_DATA_ROW:
                if keep_rows:
                    rows.append(m.decode_data_row(body))
            elif t == m.B_ROW_DESCRIPTION:
                rows = []
            elif t == m.B_ERROR:
                if err is None:
                    err = server_error(m.decode_error_fields(body))
            elif t == m.B_PARAMETER_STATUS:
                k, v = m.decode_parameter_status(body)
                self.params[k] = v
            elif t == m.B_READY_FOR_QUERY:
                self.tx_status = chr(body[0])
                return rows, err

    def take_turn(self) -> None:
        """A large read: the loop serves its other sockets before this server is read again."""
        if self.transport is not None and self._read_on():
            take_turn(self.transport, self._read_on)

    def _read_on(self) -> bool:
        return not self.read_paused and not self.closed

    def reading_paused(self, paused: bool) -> None:
        if self.transport is None or self.closed or paused == self.read_paused:
            return
        self.read_paused = paused
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()
