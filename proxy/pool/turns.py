"""Sockets read in turns: after a large read, the loop serves its other ready sockets first.

uvloop (libuv) reads a stream again, up to 32 times in a row, while each read fills its
256 KB buffer.  A fast writer (a bulk COPY, a large pipelined batch, a server streaming a
big result) then has up to 8 MB relayed before anything else in the process is looked at:
neither the server's ErrorResponse that would tell that client to stop writing, nor the
other clients' transactions.  Measured: an asyncpg ``executemany`` of 4 MB failing at its
second row had its whole batch relayed while PostgreSQL's error sat unread (see
docs/driver-suites.md).  PgBouncer reads one buffer per event and moves on.

So after a read of ``LARGE_READ`` bytes or more, the connection stops reading until the
loop's next turn (``call_soon``), and picks up again then unless something else paused it
meanwhile (back-pressure, a client waiting for a server): ``still_wanted`` says.  A small
read, which is every OLTP message, costs one length test on the hot path.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

LARGE_READ = 65536


def take_turn(transport: Any, still_wanted: Callable[[], bool]) -> None:
    """Stop reading ``transport`` until the loop's next turn."""
    transport.pause_reading()
    asyncio.get_running_loop().call_soon(_next_turn, transport, still_wanted)


def _next_turn(transport: Any, still_wanted: Callable[[], bool]) -> None:
    if not transport.is_closing() and still_wanted():
        transport.resume_reading()
