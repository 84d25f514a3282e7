"""A small asyncio HTTP/1.1 server for /metrics, /healthz, /readyz and /api/*, closed by a bearer token
when one is set."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import ipaddress
import json
import ssl as ssl_module
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import structlog

Handler = Callable[[dict[str, str]], Any]  # -> (status, content_type, body) | object, or an awaitable of one

MAX_HEADER = 8192
HEADER_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}
JSON = "application/json"


def json_response(obj: Any, status: int = 200) -> tuple[int, str, bytes]:
    return status, JSON, json.dumps(obj, separators=(",", ":"), default=str).encode()


def _error(status: int, message: str) -> tuple[int, str, bytes]:
    return json_response({"error": message}, status)


ALWAYS_OPEN = frozenset(("/healthz", "/readyz"))  # probes never need the token
UNAUTHORIZED_HEADERS = (("WWW-Authenticate", "Bearer"),)


@dataclass(frozen=True)
class Access:
    """Who may read what: an empty token leaves everything open."""

    token: str = ""
    metrics_require_token: bool = False

    def needs_token(self, path: str) -> bool:
        if not self.token or path in ALWAYS_OPEN:
            return False
        return self.metrics_require_token or path != "/metrics"

    def allows(self, authorization: bytes | None) -> bool:
        """Whether an Authorization header's value carries the token (``Bearer <token>``)."""
        if authorization is None:
            return False
        scheme, _, credentials = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(credentials.strip(), self.token.encode())


OPEN = Access()


def _header(raw: bytes, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case) in a request head."""
    for line in raw.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip()
    return None


def _is_loopback(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address((host or "").strip("[]")).is_loopback
    except ValueError:
        return False


class ExportServer:
    """A small asyncio HTTP/1.1 server for /metrics, /healthz, /readyz and /api/*.

    GET (and HEAD) only, one request per connection (``Connection: close``).  A
    slow or hostile peer costs little: the request head is capped at 8 KiB and
    must arrive within 10 s, at most ``max_connections`` are served at once (more
    get a 503), and a request that does not parse gets a 400.

    Routes map a path to a handler that takes the query string as a dict (last
    value wins) and returns ``(status, content_type, body)``, or a bare object
    that is sent as JSON with status 200; a handler may be a coroutine function.
    A handler that raises gives a 500 with ``{"error": "internal error"}``; the
    exception is logged, never sent.

    Access: with a token set (``http_token``), every path but ``/healthz``,
    ``/readyz`` and (unless ``metrics_require_token``) ``/metrics`` answers 401
    with ``WWW-Authenticate: Bearer`` and nothing more, unless the request has
    ``Authorization: Bearer <token>`` (compared in constant time); unknown paths
    too, so a route added later is closed by default.  ``access`` is read per
    request, so a reloaded token applies at once.  With ``ssl`` the endpoint
    speaks HTTPS only.
    """

    def __init__(self, host: str, port: int, routes: dict[str, Handler], log: Any = None, *,
                 header_timeout: float = HEADER_TIMEOUT, max_connections: int = MAX_CONNECTIONS,
                 access: Callable[[], Access] | None = None, ssl: ssl_module.SSLContext | None = None) -> None:
        self.host = host
        self.port = port
        self.routes = routes  # read per request: entries added later are served
        self.log = log if log is not None else structlog.get_logger("pgscope.export")
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.access = access if access is not None else (lambda: OPEN)
        self.ssl = ssl
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task] = set()
        self.requests = 0
        self.rejected = 0
        self.unauthorized = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True,
                                                  limit=MAX_HEADER, ssl=self.ssl,
                                                  ssl_handshake_timeout=self.header_timeout if self.ssl else None)
        self.port = self._server.sockets[0].getsockname()[1]
        if not self.access().token and not _is_loopback(self.host):
            self.log.warning("http_api_open", listen=f"{self.host}:{self.port}",
                             hint="/api/* shows statements and client addresses to anyone who can connect: "
                                  "set http_token (or http_token_file)")

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._conns):  # a peer holding a connection open must not delay shutdown
            task.cancel()
        try:
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        except (TimeoutError, asyncio.TimeoutError):
            pass
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._conns) >= self.max_connections:
            self.rejected += 1
            await self._send(writer, (*_error(503, "too many connections"), False, ()))
            return
        if task is not None:
            self._conns.add(task)
        try:
            try:
                result = await self._respond(reader)
            except asyncio.CancelledError:
                writer.close()
                raise
            except Exception as e:  # a handler failed: say so, without a traceback
                self.log.error("http_handler_error", error=repr(e))
                result = (*_error(500, "internal error"), False, ())
            await self._send(writer, result)
        finally:
            if task is not None:
                self._conns.discard(task)

    async def _send(self, writer: asyncio.StreamWriter, result: tuple[int, str, bytes, bool, tuple]) -> None:
        status, ctype, body, head_only, headers = result
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
        try:
            writer.write(
                f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\nCache-Control: no-store\r\n"
                f"{extra}\r\n".encode())
            if not head_only:
                writer.write(body)
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (ConnectionError, OSError, TimeoutError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes, bool, tuple]:
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.header_timeout)
        except (asyncio.LimitOverrunError, ValueError):
            return (*_error(431, "request head too large"), False, ())
        except asyncio.IncompleteReadError:
            return (*_error(400, "bad request"), False, ())
        except (TimeoutError, asyncio.TimeoutError):
            return (*_error(408, "request head timeout"), False, ())
        except (ConnectionError, OSError):
            return (*_error(400, "bad request"), False, ())
        if len(raw) > MAX_HEADER:
            return (*_error(431, "request head too large"), False, ())
        parts = raw.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1][:1] in (b"/", b"h"):
            return (*_error(400, "bad request"), False, ())
        method = parts[0].decode("latin-1")
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return (*_error(405, "method not allowed"), False, ())
        self.requests += 1
        try:
            url = urlsplit(parts[1].decode("latin-1"))
            params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        except ValueError:
            return (*_error(400, "bad request"), False, ())
        access = self.access()
        if access.needs_token(url.path) and not access.allows(_header(raw, b"authorization")):
            self.unauthorized += 1
            return (*_error(401, "unauthorized"), head_only, UNAUTHORIZED_HEADERS)
        handler = self.routes.get(url.path)
        if handler is None:
            return (*_error(404, "not found"), head_only, ())
        result = handler(params)
        if inspect.isawaitable(result):
            result = await result
        if not (isinstance(result, tuple) and len(result) == 3 and isinstance(result[0], int)):
            result = json_response(result)
        status, ctype, body = result
        return status, ctype, body, head_only, ()
