"""Writes through a connection's core (``ServerCore.write``; the session's core writes the same way).

The compiled core sends a message with one send() of its own when the uvloop transport holds
nothing queued (proxy/pool/_hot.pyx, ``Sender.put``), and hands the rest to ``transport.write``.
Whatever the path, the peer must get every byte once, in the order written, also when the
socket's buffer is full, when other code writes through the transport in between, and nothing
after the transport was closed.  Both cores run the same checks.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
import uvloop

from proxy.pool import hot as pool_hot
from proxy.protocol import native
from tests.support.tools import in_ci


def _cores() -> list:
    cores = [pool_hot.PyServerCore]
    if native.COMPILED and not native.disabled():
        from proxy.pool._hot import ServerCore
        cores.append(ServerCore)
    elif in_ci() and not native.disabled():
        pytest.fail(native.why_not)
    return cores


class _Keep(asyncio.Protocol):
    def __init__(self, got: asyncio.Future) -> None:
        self.got = got

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.got.set_result(transport)


async def _pair() -> tuple[asyncio.Transport, socket.socket, asyncio.AbstractServer]:
    """A uvloop TCP transport (pgscope's side) and the blocking socket at its other end."""
    loop = asyncio.get_running_loop()
    got = loop.create_future()
    server = await loop.create_server(lambda: _Keep(got), "127.0.0.1", 0)
    peer = socket.create_connection(server.sockets[0].getsockname()[:2])
    peer.settimeout(30)  # a missing byte fails the test instead of hanging it
    transport = await got
    return transport, peer, server


def _read_all(peer: socket.socket, out: bytearray, until: int | None = None) -> None:
    while until is None or len(out) < until:
        chunk = peer.recv(1 << 16)
        if not chunk:
            return
        out += chunk


def _run(coro) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


@pytest.mark.parametrize("core", _cores(), ids=lambda c: c.__module__.rsplit(".", 1)[-1])
def test_every_byte_once_in_order_through_a_full_socket(core):
    async def main():
        transport, peer, server = await _pair()
        assert type(transport).__name__ == "TCPTransport"  # the transport the direct path is for
        conn = core()
        conn.closed = False
        conn.transport = transport
        big = bytes(range(256)) * (64 << 12)  # 64 MiB: more than the socket buffers take
        parts = [b"first", big, b"after-the-full-buffer", big[::-1], b"last"]
        conn.write(parts[0])
        conn.write(parts[1])
        assert transport.get_write_buffer_size() > 0  # the control: the rest is queued in uvloop
        got = bytearray()
        # the peer reads 1 MiB while the loop is held here: the socket has room again, and what
        # uvloop queued is still queued
        early = threading.Thread(target=_read_all, args=(peer, got, 1 << 20))
        early.start()
        early.join()
        conn.write(parts[2])  # must go behind what is queued, not straight to the socket
        transport.write(parts[3])  # another writer on the same transport in between
        conn.write(parts[4])
        want = b"".join(parts)
        reader = threading.Thread(target=_read_all, args=(peer, got, len(want)))
        reader.start()
        while reader.is_alive():
            await asyncio.sleep(0.01)  # the loop flushes what uvloop queued while the peer reads
        assert len(got) == len(want)
        assert bytes(got) == want
        assert transport.get_write_buffer_size() == 0
        conn.write(b"now straight again")
        await asyncio.get_running_loop().run_in_executor(None, _read_all, peer, got, len(want) + 18)
        assert bytes(got[len(want):]) == b"now straight again"
        transport.close()
        peer.close()
        server.close()
    _run(main())


@pytest.mark.parametrize("core", _cores(), ids=lambda c: c.__module__.rsplit(".", 1)[-1])
def test_nothing_reaches_the_socket_after_close(core):
    async def main():
        transport, peer, server = await _pair()
        conn = core()
        conn.closed = False
        conn.transport = transport
        conn.write(b"before")  # the control: a write before close arrives
        transport.close()
        conn.write(b"after")
        got = bytearray()
        await asyncio.get_running_loop().run_in_executor(None, _read_all, peer, got, None)  # to EOF
        assert bytes(got) == b"before"
        peer.close()
        server.close()
    _run(main())
