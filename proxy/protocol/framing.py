"""The one framer: cuts a byte stream into whole protocol messages, holding a partial tail.

Typed messages (a type byte, an int32 length that counts itself, a body) in
both directions, and the untyped startup-phase packets (an int32 length, then
the packet) before login.  Used two ways: ``whole(data)`` returns the longest
prefix of whole messages (the relay forwards those bytes as they are), and
``feed`` + ``next`` yield ``(type, body)`` one at a time (login, internal
exchanges, tests).  Any split of the stream across calls gives the same result.

``Framer`` is the compiled twin from _core.pyx when it is built (see
proxy.protocol.native), else ``PyFramer``, the pure-Python reference below.
"""

from __future__ import annotations

from struct import Struct

from proxy.protocol.errors import ProtocolViolation
from proxy.protocol.native import core as _core

MAX_MESSAGE_SIZE = 1 << 30  # PostgreSQL rejects larger messages too
MAX_STARTUP_PACKET = 10000  # PostgreSQL's own limit

_LEN = Struct("!i").unpack_from


class PyFramer:
    """Incremental framer over one direction of a connection.

    A declared length below 4 or above ``max_size`` is a protocol violation.
    With ``stop`` set to a message type, ``whole`` ends the stream at the first
    message of that type: what precedes it is returned, it and anything after
    it are dropped, and ``stopped`` turns true (a client's Terminate).
    """

    __slots__ = ("_buf", "_pos", "_need", "max_size", "stop", "stopped")

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE, stop: int = -1) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._need = 0  # whole(): bytes the held tail needs before it is worth a look
        self.max_size = max_size
        self.stop = stop
        self.stopped = False

    # ------------------------------------------------------------ relaying

    def whole(self, data: bytes) -> bytes:
        """The whole messages of what was held plus ``data``; the partial tail is kept."""
        buf = self._buf
        if buf:
            if len(buf) + len(data) < self._need:  # a message longer than this read: keep gathering
                buf += data
                return b""
            data = b"".join((buf, data))  # the held tail and the read, copied once
            self._buf = bytearray()
        n = len(data)
        pos = 0
        stop = self.stop
        max_size = self.max_size
        while n - pos >= 5:
            (ln,) = _LEN(data, pos + 1)
            if ln < 4 or ln > max_size:
                raise ProtocolViolation(f"invalid message length {ln}")
            if data[pos] == stop:
                self.stopped = True
                return data[:pos]
            end = pos + 1 + ln
            if end > n:
                self._buf = bytearray(data[pos:])
                self._need = end - pos
                return data[:pos]
            pos = end
        if pos < n:
            self._buf = bytearray(data[pos:])
            self._need = 5
            return data[:pos]
        return data

    @property
    def holding(self) -> bool:
        """Part of a message is held (``whole`` mode)."""
        return bool(self._buf)

    # ------------------------------------------------------- one at a time

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next(self) -> tuple[int, bytes] | None:
        """The next whole typed message as ``(type, body)``, or None until more is fed."""
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 5:
            return None
        (ln,) = _LEN(buf, pos + 1)
        if ln < 4 or ln > self.max_size:
            raise ProtocolViolation(f"invalid message length {ln}")
        end = pos + 1 + ln
        if end > len(buf):
            return None
        self._pos = end
        return buf[pos], bytes(buf[pos + 5 : end])

    def next_packet(self) -> bytes | None:
        """The next whole untyped startup-phase packet (length word included), or None."""
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 4:
            return None
        (ln,) = _LEN(buf, pos)
        if ln < 8 or ln > MAX_STARTUP_PACKET:
            raise ProtocolViolation("invalid length of startup packet")
        if len(buf) - pos < ln:
            return None
        self._pos = pos + ln
        return bytes(buf[pos : pos + ln])

    def messages(self) -> list[tuple[int, bytes]]:
        out = []
        while (msg := self.next()) is not None:
            out.append(msg)
        return out

    def pending(self) -> int:
        """Bytes held that do not yet make a whole message."""
        return len(self._buf) - self._pos

    def take_rest(self) -> bytes:
        rest = bytes(self._buf[self._pos :])
        self._buf = bytearray()
        self._pos = 0
        return rest


Framer = _core.Framer if _core is not None else PyFramer
