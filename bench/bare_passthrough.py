#!/usr/bin/env python3
"""The floor of an asyncio proxy: two uvloop Protocols that forward every read, nothing else.

Run by hand, to compare pgscope against what uvloop itself costs per transaction:

    python3 bench/bare_passthrough.py --listen 6543 --upstream 127.0.0.1:5432

No framing, no pool (a server connection per client), no inspection.  Under callgrind
(valgrind --tool=callgrind python3 bench/bare_passthrough.py ...), two pgbench runs of
different lengths, differenced as bench/instructions.py does, give its user-space
instructions per transaction (docs/performance.md).  SIGINT exits at once (callgrind then
writes its counts).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, client: "Client") -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()  # type: ignore[union-attr]


class Client(asyncio.Protocol):
    upstream: tuple[str, int] = ("127.0.0.1", 5432)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server: Upstream | None = None
        self.early: list[bytes] = []
        asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        _, self.server = await asyncio.get_running_loop().create_connection(lambda: Upstream(self), *self.upstream)
        for data in self.early:
            self.server.transport.write(data)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self.server is None:
            self.early.append(data)
        else:
            self.server.transport.write(data)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.server is not None:
            self.server.transport.close()  # type: ignore[union-attr]


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, lambda: os._exit(0))
    server = await loop.create_server(Client, "127.0.0.1", port)
    await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=int, default=6543, help="port on 127.0.0.1")
    ap.add_argument("--upstream", default="127.0.0.1:5432", help="host:port of PostgreSQL")
    args = ap.parse_args()
    host, _, port = args.upstream.rpartition(":")
    Client.upstream = (host, int(port))
    uvloop.run(serve(args.listen))


if __name__ == "__main__":
    main()
