"""A client the proxy answers itself, with no server: the admin console's I/O.

The listener puts a console factory in the session context (``ctx.console``);
the session knows only this small interface of it:

    serves(db)            -> bool: is ``db`` a virtual database of the proxy's?
    open(user, session)   -> an endpoint, or raises PgError (28000: not allowed)
    endpoint.greeting()   -> bytes: ParameterStatus..., ReadyForQuery
    endpoint.handle(t, b) -> awaitable bytes: the answer to one message
    endpoint.closing      -> bool: end the session after this answer

Messages are read with the login's framer; the session stays in the CONSOLE
state (no relay, no server) until the client leaves or is closed.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from proxy.protocol import messages as m
from proxy.session.states import ClientState


async def serve_local(session: Any, endpoint: Any, wait_input: Callable[[Any], Awaitable[None]]) -> None:
    """Answer the client's messages with ``endpoint`` until it terminates or the session closes
    (``wait_input``: the login's wait for more bytes; it raises ConnectionResetError once closed)."""
    session._to(ClientState.CONSOLE)
    session._write(endpoint.greeting())
    framer = session._in
    while session.state is ClientState.CONSOLE:
        msg = framer.next()
        if msg is None:
            await wait_input(session)
            continue
        t, body = msg
        if t == m.F_TERMINATE:
            session.close("client terminated")
            return
        session.last_active = time.monotonic()  # SHOW CLIENTS' request_time
        out = await endpoint.handle(t, body)
        if session.state is not ClientState.CONSOLE:
            return
        session._write(out)
        if endpoint.closing:
            session.close("console closed")
            return
