"""Cancel keys: each client's own BackendKeyData, and CancelRequests routed to the server it holds."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, Awaitable, Callable

from proxy.protocol import messages as m


PEER_SHIFT = 18  # a cancel key's top 14 bits name the pgscope process (peer_id) that issued it


class CancelRegistry:
    """(process id, secret) -> client session; a cancel reaches the server that client holds now.

    ``open_upstream(srv)`` opens a new connection to the PostgreSQL ``srv`` is on
    (asyncio streams) for the forwarded CancelRequest. With peering (``peer_id()`` not 0:
    several processes share a port with so_reuseport), keys carry the issuing process's id,
    and a cancel for another process is sent on to ``open_peer(id)`` (None: an unknown peer).
    """

    def __init__(self, open_upstream: Callable[[], Any], timeout: Callable[[], float], log: Any,
                 peer_id: Callable[[], int] = lambda: 0,
                 open_peer: Callable[[int], Awaitable[Any] | None] = lambda peer: None) -> None:
        self._keys: dict[tuple[int, bytes], Any] = {}
        self._open_upstream = open_upstream
        self._timeout = timeout
        self._peer_id = peer_id
        self._open_peer = open_peer
        self.log = log
        self.requests = 0  # CancelRequests received

    def register(self, session: Any, pid: int | None = None) -> tuple[int, bytes]:
        """A (process id, secret key) for the client's BackendKeyData: ``pid`` when given
        (session mode: the server's real one), else a made-up one; the key is always ours."""
        me = self._peer_id()
        while True:
            p = pid if pid else secrets.randbelow(0x7FFFFFFF - 1) + 1
            key = ((me << PEER_SHIFT) | secrets.randbits(PEER_SHIFT)).to_bytes(4, "big") if me \
                else secrets.token_bytes(4)
            if (p, key) not in self._keys:
                self._keys[(p, key)] = session
                return p, key

    def unregister(self, pid: int, key: bytes) -> None:
        if pid:
            self._keys.pop((pid, key), None)

    async def route(self, pid: int, key: bytes) -> None:
        """A CancelRequest from a client: forward it to the server that client holds, if any (or,
        with peering, to the pgscope process whose key it is)."""
        self.requests += 1
        me = self._peer_id()
        owner = int.from_bytes(key, "big") >> PEER_SHIFT if me and len(key) == 4 else me
        if owner != me:
            await self._to_peer(owner, pid, key)
            return
        session = self._keys.get((pid, key))
        if session is None:
            return  # unknown key: do nothing, say nothing
        srv = session.server
        if srv is None or srv.closed:
            return  # holds no server: nothing is running
        await self.send(srv)

    async def _to_peer(self, peer: int, pid: int, key: bytes) -> None:
        """The CancelRequest, as it came, to the process that issued the key (PgBouncer's peering)."""
        opening = self._open_peer(peer)
        if opening is not None:  # (no such peer configured: do nothing, say nothing)
            await self._deliver(opening, pid, key, peer_id=peer)

    async def send(self, srv: Any) -> None:
        """Send the server's own CancelRequest over a new connection."""
        await self._deliver(self._open_upstream(srv), srv.pid, srv.key, server_pid=srv.pid)

    async def _deliver(self, opening: Awaitable[Any], pid: int, key: bytes, **where: Any) -> None:
        """A CancelRequest over the connection ``opening`` opens; the other end closes once it has
        read it. A failure is logged with ``where`` (server_pid, or peer_id)."""
        try:
            async with asyncio.timeout(self._timeout()):
                r, w = await opening
                w.write(m.cancel_request(pid, key))
                await w.drain()
                await r.read()
                w.close()
        except (OSError, TimeoutError) as e:
            self.log.warning("cancel_forward_failed", error=str(e), **where)
