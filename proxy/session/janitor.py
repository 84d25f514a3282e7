"""What the listener's janitor asks of each client about once a second: timeouts, a vanished peer."""

from __future__ import annotations

import asyncio
import select
from typing import Any

from proxy.protocol.errors import ADMIN_SHUTDOWN, IDLE_IN_TRANSACTION_TIMEOUT, IDLE_SESSION_TIMEOUT, PgError
from proxy.session.states import RELAYING, ClientState

_POLLRDHUP = getattr(select, "POLLRDHUP", 0)  # Linux: the peer closed its end


def peer_gone(transport: Any) -> bool:
    """Has the client closed its end?  Asked of the socket without reading from it, for a
    client whose reading is paused (its FIN is not read until reading resumes)."""
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


def check_timeouts(session: Any, now: float, settings: Any) -> None:
    """client_idle_timeout, idle_transaction_timeout and query_timeout for one client."""
    if session.state not in RELAYING:
        return
    relay = session.relay
    idle_for = now - session.last_active
    if relay.answered:
        if relay.tx_status == "I":
            if settings.client_idle_timeout > 0 and idle_for > settings.client_idle_timeout \
                    and session.state is not ClientState.WAITING:
                session.fail(PgError(IDLE_SESSION_TIMEOUT, "terminating connection due to idle-session timeout",
                                     detail="client_idle_timeout"))
        elif settings.idle_transaction_timeout > 0 and idle_for > settings.idle_transaction_timeout:
            session.fail(PgError(IDLE_IN_TRANSACTION_TIMEOUT,
                                 "terminating connection due to idle-in-transaction timeout",
                                 detail="idle_transaction_timeout"))
    elif settings.query_timeout > 0 and session.server is not None and not session._cancel_sent:
        started = relay.oldest_request_time()
        if started is not None and now - started > settings.query_timeout:
            session._cancel_sent = True
            session.ctx.log.info("query_timeout_cancel", client_id=session.id, server_pid=session.server.pid)
            asyncio.get_running_loop().create_task(session.ctx.cancel.send(session.server))
    if session._cancel_sent and relay.answered:
        session._cancel_sent = False


def drain(session: Any) -> None:
    """Shutdown: close the client now if between transactions, else once this one ends."""
    if session.state not in RELAYING or session.server is None or session.relay.releasable:
        session.fail(PgError(ADMIN_SHUTDOWN, "terminating connection due to administrator command"))
    else:
        session.closing = True
        session.close_reason = "shutdown"


def busy_since(session: Any) -> float | None:
    """When the client's oldest request still awaiting results was sent (monotonic); None when none is."""
    relay = session.relay
    if session.state not in RELAYING or relay is None:
        return None
    return relay.oldest_request_time()
