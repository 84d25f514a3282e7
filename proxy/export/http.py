"""A small asyncio HTTP/1.1 server for /metrics, /healthz, /readyz and /api/*.

GET (and HEAD) only, one request per connection (``Connection: close``),
headers capped at 8 KiB and 10 s, so a slow or hostile peer costs little.
Handlers take the parsed query string and return ``(status, content_type,
body)``; they may be coroutines.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

Handler = Callable[[dict[str, str]], "tuple[int, str, bytes] | Awaitable[tuple[int, str, bytes]]"]

MAX_HEADER = 8192
HEADER_TIMEOUT = 10.0
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}


def json_response(obj: Any, status: int = 200) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(obj, separators=(",", ":"), default=str).encode()


class ExportServer:
    def __init__(self, host: str, port: int, routes: dict[str, Handler], log: Any = None) -> None:
        self.host = host
        self.port = port
        self.routes = routes
        self.log = log
        self._server: asyncio.AbstractServer | None = None
        self.requests = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True,
                                                  limit=MAX_HEADER)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except (TimeoutError, asyncio.TimeoutError):
                pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, ctype, body, head = await self._respond(reader)
        except Exception as e:  # a handler failed: say so, without a traceback
            if self.log is not None:
                self.log.error("http_handler_error", error=repr(e))
            status, ctype, body, head = 500, "application/json", b'{"error":"internal error"}', False
        try:
            reason = REASONS.get(status, "OK")
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\nCache-Control: no-store\r\n\r\n".encode())
            if not head:
                writer.write(body)
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes, bool]:
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEADER_TIMEOUT)
        except (asyncio.LimitOverrunError, ValueError):
            return 431, "text/plain", b"headers too large\n", False
        except asyncio.IncompleteReadError:
            return 400, "text/plain", b"bad request\n", False
        except (TimeoutError, asyncio.TimeoutError):
            return 408, "text/plain", b"timeout\n", False
        if len(raw) > MAX_HEADER:
            return 431, "text/plain", b"headers too large\n", False
        try:
            method, target, _version = raw.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        except ValueError:
            return 400, "text/plain", b"bad request\n", False
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n", False
        self.requests += 1
        url = urlsplit(target)
        handler = self.routes.get(url.path)
        if handler is None:
            return 404, "application/json", b'{"error":"not found"}', method == "HEAD"
        params = {k: v[-1] for k, v in parse_qs(url.query).items()}
        result = handler(params)
        if inspect.isawaitable(result):
            result = await result
        status, ctype, body = result  # type: ignore[misc]
        return status, ctype, body, method == "HEAD"
