"""Taking a server back from a client that left while the server still owed it answers.

A client may go (Terminate, or its socket closing) in any state: a query
still running, an extended-protocol batch without its Sync, a COPY under
way.  Its server is neither given back dirty nor left attached: a stand-in
owner asks the server to finish (the relay's ``wind_up``: CopyFail, Sync),
reads and discards the answers with the client's relay, so the same framing
and bookkeeping decide when nothing is owed, and then the session's usual
end follows (ROLLBACK, reset, release).  Past the deadline the server is
closed instead, which frees its slot.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from proxy.protocol.errors import ProtocolViolation


class _Discard:
    """The server's owner while it winds up: reads what it says, forwards nothing."""

    __slots__ = ("relay", "done")

    def __init__(self, relay: Any, done: asyncio.Future) -> None:
        self.relay = relay
        self.done = done

    def server_data(self, data: bytes) -> None:
        if self.done.done():
            return
        try:
            self.relay.from_server(data, time.monotonic())
        except ProtocolViolation:
            self.done.set_result(False)
            return
        if self.relay.answered:
            self.done.set_result(True)

    def server_lost(self, srv: Any) -> None:
        if not self.done.done():
            self.done.set_result(False)

    def pause_client_reading(self) -> None:
        pass

    def resume_client_reading(self) -> None:
        pass


async def wind_up(srv: Any, relay: Any, timeout: float) -> bool:
    """Bring ``srv`` to a state with nothing owed; True when done, False when the server
    closed, sent garbage or took longer than ``timeout`` seconds (the caller closes it)."""
    if srv.closed:
        return False
    if relay is None or relay.answered:
        return True
    done = asyncio.get_running_loop().create_future()
    srv.owner = _Discard(relay, done)
    if srv.read_paused:
        srv.reading_paused(False)
    out = relay.wind_up(time.monotonic())
    if out:
        srv.write(out)
    try:
        async with asyncio.timeout(timeout):
            return await done
    except TimeoutError:
        return False
    finally:
        srv.owner = None
