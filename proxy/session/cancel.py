"""Cancel keys: each client's own BackendKeyData, and CancelRequests routed to the server it holds."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, Callable

from proxy.protocol import messages as m


class CancelRegistry:
    """(process id, secret) -> client session; a cancel reaches the server that client holds now.

    ``open_upstream(srv)`` opens a new connection to the PostgreSQL ``srv`` is on
    (asyncio streams) for the forwarded CancelRequest.
    """

    def __init__(self, open_upstream: Callable[[], Any], timeout: Callable[[], float], log: Any) -> None:
        self._keys: dict[tuple[int, bytes], Any] = {}
        self._open_upstream = open_upstream
        self._timeout = timeout
        self.log = log
        self.requests = 0  # CancelRequests received

    def register(self, session: Any, pid: int | None = None) -> tuple[int, bytes]:
        """A (process id, secret key) for the client's BackendKeyData: ``pid`` when given
        (session mode: the server's real one), else a made-up one; the key is always ours."""
        while True:
            p = pid if pid else secrets.randbelow(0x7FFFFFFF - 1) + 1
            key = secrets.token_bytes(4)
            if (p, key) not in self._keys:
                self._keys[(p, key)] = session
                return p, key

    def unregister(self, pid: int, key: bytes) -> None:
        if pid:
            self._keys.pop((pid, key), None)

    async def route(self, pid: int, key: bytes) -> None:
        """A CancelRequest from a client: forward it to the server that client holds, if any."""
        self.requests += 1
        session = self._keys.get((pid, key))
        if session is None:
            return  # unknown key: do nothing, say nothing
        srv = session.server
        if srv is None or srv.closed:
            return  # holds no server: nothing is running
        await self.send(srv)

    async def send(self, srv: Any) -> None:
        """Send the server's own CancelRequest over a new connection."""
        try:
            async with asyncio.timeout(self._timeout()):
                r, w = await self._open_upstream(srv)  # the server's own host
                w.write(m.cancel_request(srv.pid, srv.key))
                await w.drain()
                await r.read()  # the server closes after reading it
                w.close()
        except (OSError, TimeoutError) as e:
            self.log.warning("cancel_forward_failed", server_pid=srv.pid, error=str(e))
