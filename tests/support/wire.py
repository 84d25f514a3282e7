"""A raw protocol client for tests: write any message sequence, read what comes back.

Built on the project's own message builders; it logs in with trust or
cleartext only (the proxies under test here use trust).
"""

from __future__ import annotations

import select
import socket
import struct
import time

from proxy.protocol import messages as m
from proxy.protocol.framing import Framer


def bind(portal: str, stmt: str, params: list[bytes | None]) -> bytes:
    body = portal.encode() + b"\x00" + stmt.encode() + b"\x00" + struct.pack("!h", 0)
    body += struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    body += struct.pack("!h", 0)
    return m.frame(b"B", body)


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return m.frame(b"E", portal.encode() + b"\x00" + struct.pack("!i", max_rows))


def describe_portal(portal: str = "") -> bytes:
    return m.frame(b"D", b"P" + portal.encode() + b"\x00")


def flush() -> bytes:
    return m.frame(b"H")


def copy_data(data: bytes) -> bytes:
    return m.frame(b"d", data)


def copy_done() -> bytes:
    return m.frame(b"c")


class WireClient:
    def __init__(self, port: int, user: str, dbname: str, host: str = "127.0.0.1",
                 timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.fb = Framer()
        self.key: tuple[int, bytes] | None = None
        self.sock.sendall(m.startup_message({"user": user, "database": dbname}))
        msgs = self.read_until(b"Z", timeout)
        for t, body in msgs:
            if t == b"E":
                raise RuntimeError(f"login failed: {m.decode_error_fields(body)}")
            if t == b"K":
                self.key = (int.from_bytes(body[:4], "big", signed=True), body[4:])

    @property
    def pid(self) -> int:
        assert self.key is not None
        return self.key[0]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, tag: bytes, timeout: float = 10.0) -> list[tuple[bytes, bytes]]:
        """Messages up to and including the first ``tag`` (raises on EOF or timeout)."""
        out: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + timeout
        while True:
            for t, body in self.fb.messages():
                out.append((bytes([t]), body))
                if bytes([t]) == tag:
                    return out
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {tag!r} within {timeout}s; got {[t for t, _ in out]}")
            r, _, _ = select.select([self.sock], [], [], left)
            if r:
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError(f"connection closed; got {[t for t, _ in out]}")
                self.fb.feed(data)

    def read_available(self, wait: float = 0.0) -> list[tuple[bytes, bytes]]:
        """Whatever whole messages arrive within ``wait`` seconds (maybe none)."""
        out: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + wait
        while True:
            left = max(0.0, deadline - time.monotonic())
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                break
            data = self.sock.recv(65536)
            if not data:
                break
            self.fb.feed(data)
            if left == 0.0:
                break
        for t, body in self.fb.messages():
            out.append((bytes([t]), body))
        return out

    def read_to_eof(self, timeout: float = 10.0) -> list[tuple[bytes, bytes]]:
        """Every message until the peer closes (raises TimeoutError if it does not)."""
        out: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"connection still open after {timeout}s")
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                continue
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                for t, body in self.fb.messages():
                    out.append((bytes([t]), body))
                return out
            self.fb.feed(data)

    def terminate(self) -> None:
        self.sock.sendall(m.terminate())
        self.sock.close()

    def close(self, reset: bool = False) -> None:
        if reset:  # RST instead of FIN
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def wait_for(cond, timeout: float = 15.0, what: str = "condition", interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
