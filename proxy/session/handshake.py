"""The login's I/O: runs the sans-IO login generator (login.py) over a client's connection."""

from __future__ import annotations

import asyncio
import pwd
import time
from typing import Any, Callable

from proxy.config_tables import resolve
from proxy.protocol.errors import (
    CANNOT_CONNECT_NOW, INTERNAL_ERROR, PROTOCOL_VIOLATION, TOO_MANY_CONNECTIONS, PgError, ProtocolViolation,
)
from proxy.protocol.hba import Identity
from proxy.protocol.records import ClientInfo
from proxy.session.binding import Binding
from proxy.session.local import serve_local
from proxy.session.login import (
    NEED_MESSAGE, NEED_PACKET, START_TLS, AuthFailedError, CancelStep, LoginRules, LookupStep, Refused, login,
)
from proxy.session.states import ClientState

UNKNOWN_DATABASE = "3D000"  # invalid_catalog_name, as PostgreSQL's "database ... does not exist"


def pool_for(ctx: Any, db: str, user: str) -> Any:
    """The pool a logged-in client of database ``db`` uses (routed by the ``databases`` table)."""
    route = resolve(ctx.settings, db, user)
    if route is None:
        raise Refused("unknown_database", PgError(UNKNOWN_DATABASE, f'database "{db}" does not exist'))
    return ctx.pools.pool(db, user, route)


async def wait_input(session: Any) -> None:
    """Until the client sends more (``data_received`` wakes us) or goes."""
    session._waiter = asyncio.get_running_loop().create_future()
    try:
        await session._waiter
    finally:
        session._waiter = None
    if session.state is ClientState.CLOSED:
        raise ConnectionResetError


def login_method(session: Any) -> Callable[[str, str, bool], str]:
    """(database, user, tls) -> the auth method of this client's login (auth_type, or its
    auth_hba_file rule, which knows the client's address and, on the Unix socket, its user)."""
    secrets = session.ctx.secrets
    if secrets is None:
        return lambda db, user, tls: session.ctx.settings.effective_auth_type
    ip = "" if session.unix else session.addr.rsplit(":", 1)[0]
    identity = Identity(lambda: os_user(session.peer_uid), lambda: cert_name(session.transport))
    return lambda db, user, tls: secrets.login_method(unix=session.unix, ip=ip, tls=tls, db=db, user=user,
                                                      identity=identity)


def cert_name(transport: Any) -> str | None:
    """The common name of the client's certificate, verified against client_tls_ca_file (None:
    no TLS, or no certificate)."""
    cert = transport.get_extra_info("peercert") if transport is not None else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def os_user(uid: int | None) -> str | None:
    """The name of an operating-system user id (None: unknown)."""
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def with_host(application_name: str, session: Any) -> str:
    """application_name_add_host (PgBouncer's): "app - 10.1.2.3:5432", "[::1]:5432" or "unix(PID)"."""
    addr = session.addr
    if addr.startswith("unix"):
        where = f"unix({addr[5:]})" if addr.startswith("unix:") else "unix"
    else:
        host, _, port = addr.rpartition(":")
        where = f"[{host}]:{port}" if ":" in host else addr
    return f"{application_name or 'app'} - {where}"


async def drive_login(session: Any) -> Any:
    """Run the login generator with this connection's I/O; its LoginResult, or None (a cancel)."""
    ctx = session.ctx
    settings = ctx.settings
    refusal = None
    if ctx.draining:
        refusal = Refused("draining", PgError(CANNOT_CONNECT_NOW, "the database system is shutting down"))
    elif len(ctx.sessions) > settings.max_client_conn:
        refusal = Refused("max_client_conn", PgError(TOO_MANY_CONNECTIONS,
                                                     "no more connections allowed (max_client_conn)"))
    gen = login(LoginRules(ctx.client_ssl is not None and not session.unix, settings.client_tls_mode == "require",
                           session.unix, refusal, login_method(session), ctx.authenticator,
                           ctx.secrets.needs_lookup if ctx.secrets is not None else None))
    framer = session._in
    value: Any = None
    while True:
        try:
            step = gen.send(value)
        except StopIteration as stop:
            return stop.value
        value = None
        if step is NEED_PACKET:
            while (value := framer.next_packet()) is None:
                await wait_input(session)
        elif step is NEED_MESSAGE:
            while (value := framer.next()) is None:
                await wait_input(session)
        elif step is START_TLS:
            await start_tls(session)
        elif isinstance(step, CancelStep):
            await ctx.cancel.route(step.pid, step.key)
        elif isinstance(step, LookupStep):  # auth_query: a PgError here ends the login
            virtual = ctx.console is not None and ctx.console.serves(step.db)  # the console: the default database
            value = await ctx.secrets.lookup_authenticator(step.user, "" if virtual else step.db, step.method)
        else:
            if session.state is ClientState.STARTUP and step[:1] != b"N":
                session._to(ClientState.AUTH)  # past negotiation: the exchange has begun
            session._write(step)


async def start_tls(session: Any) -> None:
    if session._in.pending():
        # bytes sent in the clear after the SSLRequest would be taken as
        # coming from inside the encrypted channel (CVE-2021-23214): refuse
        raise ProtocolViolation("received unencrypted data after SSL request")
    session._write(b"S")
    loop = asyncio.get_running_loop()
    transport = await loop.start_tls(session.transport, session, session.ctx.client_ssl, server_side=True)
    if transport is None:
        raise ConnectionResetError
    session.transport = transport
    session.tls = True


async def admit(session: Any) -> tuple[Any, Any, float] | None:
    """Log the client in and check out its first server: (binding, server, seconds waited), or
    None when the session ended instead (a cancel request, a refusal, bad credentials, a
    timeout: the client has been told)."""
    ctx = session.ctx
    limit = ctx.settings.client_login_timeout
    try:
        async with asyncio.timeout(max(0.0, session.connected_at + limit - time.monotonic()) if limit > 0 else None):
            result = await drive_login(session)
            if result is None:  # a cancel request
                session.close("cancel request")
                return None
        session.info = ClientInfo(session.id, result.db, result.user, result.application_name, session.addr,
                                  tuple(result.wanted.items()))
        console = ctx.console
        if console is not None and console.serves(result.db):  # the admin console: no server
            await serve_local(session, console.open(result.user, session), wait_input)
            return None
        if result.db in ctx.pools.disabled:
            # PostgreSQL's answer for a database with datallowconn off (55000)
            raise Refused("disabled", PgError("55000", f'database "{result.db}" is not currently accepting '
                                              "connections", detail="DISABLE on the admin console"))
        # the client is who it says: find it a server
        pool = pool_for(ctx, result.db, result.user)
        session.transaction_mode = pool.cfg.pool_mode == "transaction"  # the database's or user's mode
        if result.upstream_secret is not None and ctx.secrets is not None:  # SCRAM pass-through, md5 hashes
            ctx.secrets.adopt(pool, result.user, result.upstream_secret)
        wanted = result.wanted
        if ctx.settings.application_name_add_host:
            wanted = {**wanted, "application_name": with_host(wanted.get("application_name", ""), session)}
        session.binding = binding = Binding(session, pool, wanted)
        session._acquiring = session._task
        try:
            srv, waited = await binding.checkout()
        finally:
            session._acquiring = None
    except PgError as e:
        if isinstance(e, Refused):
            ctx.counters.refuse(e.reason)
        elif isinstance(e, AuthFailedError):
            ctx.counters.auth_failures += 1
            ctx.log.warning("client_auth_failed", client_addr=session.addr, user=e.user, reason=e.detail_reason)
        session.fail(e)
        return None
    except TimeoutError:
        ctx.log.info("client_login_timeout", client_id=session.id, client_addr=session.addr, seconds=limit)
        if session.state is ClientState.STARTUP:  # no startup packet yet: closed without a word, as PostgreSQL does
            session.close("client_login_timeout")
        else:
            session.fail(PgError(PROTOCOL_VIOLATION, "client login timed out", detail="client_login_timeout"))
        return None
    except OSError as e:  # ConnectionResetError, ssl.SSLError (a server gone, 08006, is a PgError)
        session.close("client closed the connection during login" if isinstance(e, ConnectionResetError)
                      else f"client TLS/socket error during login: {e}")
        return None
    return binding, srv, waited


async def guarded(session: Any, login: Any) -> None:
    """Run the ``login`` coroutine (login, first server, startup answer); a fault of pgscope's
    own on the way ends the session with an ErrorResponse (XX000) instead of leaving the
    client waiting (the server it held goes back with the session's binding)."""
    try:
        await login
    except asyncio.CancelledError:
        raise
    except Exception as e:
        session.ctx.log.error("client_login_failed", client_id=session.id, client_addr=session.addr,
                              error=type(e).__name__)
        if session.state is not ClientState.CLOSED:
            session.fail(PgError(INTERNAL_ERROR, "internal error in pgscope during login"))
