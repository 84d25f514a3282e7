"""Reads in turns (proxy/pool/turns.py): after a large read, a connection is read again only after
the loop has served its other sockets.

uvloop reads a stream again in the same callback while each read fills its buffer, so a fast
writer could have megabytes relayed before the loop looked at anything else; the server's
ErrorResponse that should stop a client's large batch then waited behind the batch itself
(docs/driver-suites.md).  Through a real proxy and a real PostgreSQL, in both pooling modes, a
client's and a server's large writes arrive while the proxy's loop is held, so that more than one
read's worth waits in the socket; each large read must then be the last read of that connection
in its loop turn.  The positive control: a full read with more waiting behind it, which uvloop
would have read at once.
"""

from __future__ import annotations

import asyncio
import fcntl
import termios
import threading
import time

import psycopg
import pytest

from proxy.pool.turns import LARGE_READ
from proxy.pool.upstream import ServerConn
from proxy.protocol import messages as m
from proxy.session.client import ClientSession
from tests.support.wire import WireClient

UVLOOP_READ = 256000  # uvloop's read buffer: a read of this size is full, and uvloop would read again


class _Reads:
    """Every data_received of one class (installed before the connections are made: uvloop keeps
    the protocol's bound method): its size, what still waited in the socket after it, and whether
    it came in the same loop turn as a large read of the same connection."""

    def __init__(self, monkeypatch, cls: type) -> None:
        self.log: list[tuple[int, int]] = []  # (size, bytes still waiting in the socket)
        self.same_turn: list[int] = []  # sizes of reads that followed a large read in its turn
        self.watch: object | None = None  # the connection to record (others pass through)
        self.hold = 0.0  # after the watched connection's next read, keep the loop this long
        turn_open: set[int] = set()
        original = cls.data_received
        reads = self

        def data_received(conn, data):
            if conn is not reads.watch:
                return original(conn, data)
            if id(conn) in turn_open:
                reads.same_turn.append(len(data))
            if len(data) >= LARGE_READ:
                turn_open.add(id(conn))
                asyncio.get_running_loop().call_soon(turn_open.discard, id(conn))
            original(conn, data)
            if reads.hold:  # what the peer writes meanwhile piles up in the socket
                time.sleep(reads.hold)
                reads.hold = 0.0
            sock = conn.transport.get_extra_info("socket") if conn.transport is not None else None
            waiting = _queued(sock) if sock is not None else 0
            reads.log.append((len(data), waiting))

        monkeypatch.setattr(cls, "data_received", data_received)

    def control(self) -> bool:
        """A full read with more behind it in the socket: uvloop alone would have read on."""
        return any(n == UVLOOP_READ and waiting > 0 for n, waiting in self.log)


def _queued(sock) -> int:
    buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(buf, "little")


def _query(sql: str) -> bytes:
    return m.frame(b"Q", sql.encode() + b"\x00")


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_clients_large_write_is_read_in_turns(monkeypatch, proxy_factory, pg, mode):
    reads = _Reads(monkeypatch, ClientSession)
    p = proxy_factory(pool_mode=mode)
    c = WireClient(p.port, pg.superuser, "pgscope_test")
    try:
        reads.watch = p.call(lambda: next(iter(p.proxy.sessions)))
        text = "x" * (8 << 20)
        for attempt in range(5):  # the first large writes let the kernel grow the socket's buffer
            reads.hold = 0.3
            sender = threading.Thread(target=c.send, args=(_query(f"SELECT length('{text}')"),))
            sender.start()
            answer = c.read_until(b"Z", timeout=60)
            sender.join()
            assert (b"D", b"\x00\x01\x00\x00\x00\x07" + b"8388608") in answer  # relayed whole
            if reads.control():
                break
        assert reads.control(), reads.log  # the positive control
        assert reads.same_turn == [], reads.log
    finally:
        c.close()


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_servers_large_answer_is_read_in_turns(monkeypatch, proxy_factory, pg, mode):
    reads = _Reads(monkeypatch, ServerConn)
    p = proxy_factory(pool_mode=mode, pool_size=1)
    with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as conn:
        for attempt in range(5):
            if mode == "transaction":  # the server is attached while the transaction lasts
                conn.execute("BEGIN")
            if reads.watch is None:
                conn.execute("SELECT 1")
                reads.watch = p.call(lambda: next(s.server for s in p.proxy.sessions if s.server))
            reads.hold = 0.3
            (value,) = conn.execute("SELECT repeat('y', 8 << 20)").fetchone()
            assert value == "y" * (8 << 20)  # relayed whole
            if mode == "transaction":
                conn.execute("COMMIT")
            if reads.control():
                break
        assert reads.control(), reads.log  # the positive control
        assert reads.same_turn == [], reads.log
