"""The relay's sans-IO core: one client's message streams, both directions.

``from_client(data, now)`` and ``from_server(data, now)`` take the bytes read
from each side and return the bytes to forward (whole messages only; a
partial message is held until it completes).  Along the way the relay keeps
what pooling needs (transaction status, results still owed, COPY state) and
emits one ``StatementEvent`` per completed statement through ``emit``.

The caller passes ``now`` (monotonic seconds); nothing here reads a clock or
touches a socket.
"""

from __future__ import annotations

from collections import deque
from struct import Struct
from typing import Callable

from proxy.inspect.events import ClientInfo, StatementEvent, TransactionEvent
from proxy.protocol.errors import ProtocolViolation
from proxy.protocol.messages import MAX_MESSAGE_SIZE, command_tag, error_sqlstate

_LEN = Struct("!i").unpack_from

# item kinds in the queue of requests awaiting results
_Q = 0  # simple Query (may hold several statements)
_E = 1  # extended-protocol Execute
_S = 2  # Sync
_F = 3  # FunctionCall


class _Item:
    __slots__ = ("kind", "text", "stmt", "bind", "sent", "index", "rows")

    def __init__(self, kind: int, text: str, stmt: str, bind: bytes | None, sent: float) -> None:
        self.kind = kind
        self.text = text
        self.stmt = stmt
        self.bind = bind
        self.sent = sent
        self.index = 0
        self.rows = 0


class Relay:
    __slots__ = (
        "client", "emit", "emit_tx", "tx_status", "expect_rfq", "unsynced", "in_copy",
        "terminated", "server_pid", "pending_wait", "server_params", "_items", "_stmts",
        "_portals", "_frem", "_fneed", "_brem", "_bneed", "_last_done", "on_query",
    )

    def __init__(self, client: ClientInfo, emit: Callable[[object], None] | None = None) -> None:
        self.client = client
        self.emit = emit  # None: inspection off, no events are built
        self.emit_tx = emit
        self.tx_status = "I"
        self.expect_rfq = 0  # ReadyForQuery messages the server still owes
        self.unsynced = False  # extended-protocol messages sent since the last Sync
        self.in_copy = False
        self.terminated = False
        self.server_pid = 0
        self.pending_wait = 0.0
        self.server_params: dict[str, str] = {}
        self._items: deque[_Item] = deque()
        self._stmts: dict[str, str] = {}  # client's prepared statement name -> text
        self._portals: dict[str, tuple[str, bytes]] = {}  # portal -> (statement, Bind body)
        self._frem = bytearray()
        self._fneed = 0
        self._brem = bytearray()
        self._bneed = 0
        self._last_done = 0.0
        # hook for pooling rules: called with each Query/Parse text (transaction mode)
        self.on_query: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ state

    @property
    def idle(self) -> bool:
        """Nothing owed either way: the server may be given back (transaction mode)."""
        return (
            self.expect_rfq == 0
            and not self.unsynced
            and self.tx_status == "I"
            and not self.in_copy
            and not self._brem
        )

    @property
    def quiet(self) -> bool:
        """No request awaiting results (the server may sit in a transaction)."""
        return self.expect_rfq == 0 and not self.unsynced and not self.in_copy and not self._brem

    def statement_text(self, name: str) -> str | None:
        return self._stmts.get(name)

    # ------------------------------------------------------------- frontend

    def from_client(self, data: bytes, now: float) -> bytes:
        if self._frem:
            self._frem += data
            if len(self._frem) < self._fneed:
                return b""
            data = bytes(self._frem)
            self._frem = bytearray()
        n = len(data)
        pos = 0
        cut = -1  # position of a Terminate, which is never forwarded
        items = self._items
        need = 0
        while n - pos >= 5:
            t = data[pos]
            (ln,) = _LEN(data, pos + 1)
            if ln < 4 or ln > MAX_MESSAGE_SIZE:
                raise ProtocolViolation(f"invalid message length {ln}")
            end = pos + 1 + ln
            if end > n:
                need = end - pos
                break
            if t == 0x51:  # Q
                text = data[pos + 5 : end - 1].decode("utf-8", "replace")
                items.append(_Item(_Q, text, "", None, now))
                self.expect_rfq += 1
                if self.on_query is not None:
                    self.on_query(text)
            elif t == 0x42:  # Bind
                z1 = data.index(b"\x00", pos + 5)
                z2 = data.index(b"\x00", z1 + 1)
                self._portals[data[pos + 5 : z1].decode("utf-8", "replace")] = (
                    data[z1 + 1 : z2].decode("utf-8", "replace"), data[pos + 5 : end])
                self.unsynced = True
            elif t == 0x45:  # Execute
                z1 = data.index(b"\x00", pos + 5)
                stmt, bind = self._portals.get(data[pos + 5 : z1].decode("utf-8", "replace"), ("", b""))
                items.append(_Item(_E, self._stmts.get(stmt, ""), stmt, bind, now))
                self.unsynced = True
            elif t == 0x53:  # Sync
                items.append(_Item(_S, "", "", None, now))
                self.expect_rfq += 1
                self.unsynced = False
            elif t == 0x50:  # Parse
                z1 = data.index(b"\x00", pos + 5)
                z2 = data.index(b"\x00", z1 + 1)
                text = data[z1 + 1 : z2].decode("utf-8", "replace")
                self._stmts[data[pos + 5 : z1].decode("utf-8", "replace")] = text
                self.unsynced = True
                if self.on_query is not None:
                    self.on_query(text)
            elif t == 0x43:  # Close
                kind = data[pos + 5]
                name = data[pos + 6 : end - 1].decode("utf-8", "replace")
                if kind == 0x53:
                    self._stmts.pop(name, None)
                else:
                    self._portals.pop(name, None)
                self.unsynced = True
            elif t == 0x44 or t == 0x48:  # Describe, Flush
                self.unsynced = True
            elif t == 0x46:  # FunctionCall
                items.append(_Item(_F, "", "", None, now))
                self.expect_rfq += 1
            elif t == 0x58:  # Terminate
                self.terminated = True
                cut = pos
                break
            # CopyData/CopyDone/CopyFail and anything else: forwarded as is
            pos = end
        if cut >= 0:
            return data[:cut]
        if pos < n:
            self._frem = bytearray(data[pos:])
            self._fneed = need if need else 5
            return data[:pos]
        return data

    # -------------------------------------------------------------- backend

    def from_server(self, data: bytes, now: float) -> bytes:
        if self._brem:
            self._brem += data
            if len(self._brem) < self._bneed:
                return b""
            data = bytes(self._brem)
            self._brem = bytearray()
        n = len(data)
        pos = 0
        need = 0
        while n - pos >= 5:
            t = data[pos]
            (ln,) = _LEN(data, pos + 1)
            if ln < 4 or ln > MAX_MESSAGE_SIZE:
                raise ProtocolViolation(f"invalid message length {ln} from server")
            end = pos + 1 + ln
            if end > n:
                need = end - pos
                break
            if t == 0x44:  # DataRow
                if self._items:
                    self._items[0].rows += 1
            elif t == 0x43:  # CommandComplete
                word, rows = command_tag(data[pos + 5 : end])
                self._complete(now, word, rows, None)
                self.in_copy = False
            elif t == 0x5A:  # ReadyForQuery
                self._ready(chr(data[pos + 5]), now)
            elif t == 0x45:  # ErrorResponse
                self._complete(now, "", 0, error_sqlstate(data[pos + 5 : end]))
                self.in_copy = False
            elif t == 0x49:  # EmptyQueryResponse
                self._complete(now, "", 0, None, empty=True)
            elif t == 0x73:  # PortalSuspended
                self._complete(now, "SELECT", -1, None)
            elif t == 0x53:  # ParameterStatus
                z1 = data.index(b"\x00", pos + 5)
                self.server_params[data[pos + 5 : z1].decode("utf-8", "replace")] = (
                    data[z1 + 1 : end - 1].decode("utf-8", "replace"))
            elif t == 0x47 or t == 0x48 or t == 0x57:  # CopyIn/CopyOut/CopyBoth
                self.in_copy = True
            pos = end
        if pos < n:
            self._brem = bytearray(data[pos:])
            self._bneed = need if need else 5
            return data[:pos]
        return data

    def _complete(self, now: float, word: str, rows: int, sqlstate: str | None,
                  empty: bool = False) -> None:
        items = self._items
        if not items:
            return
        item = items[0]
        kind = item.kind
        if kind == _S or kind == _F:
            return
        start = item.sent if item.sent > self._last_done else self._last_done
        self._last_done = now
        if rows < 0:
            rows = item.rows
        if kind == _E:
            items.popleft()
            if sqlstate is not None:
                # the server skips the rest of the batch up to the Sync
                while items and items[0].kind == _E:
                    items.popleft()
        idx = item.index
        item.index = idx + 1
        item.rows = 0
        emit = self.emit
        if emit is None or empty:
            return
        wait = self.pending_wait
        if wait:
            self.pending_wait = 0.0
        emit(StatementEvent(
            self.client, item.text, idx, kind == _E, item.stmt, item.bind, self.server_pid,
            start, now, wait, word, rows, sqlstate, self.tx_status != "I",
        ))

    def _ready(self, status: str, now: float) -> None:
        items = self._items
        while items:
            kind = items.popleft().kind
            if kind != _E:
                break
        if self.expect_rfq > 0:
            self.expect_rfq -= 1
        self.in_copy = False
        if status != self.tx_status:
            self.tx_status = status
            if self.emit_tx is not None:
                self.emit_tx(TransactionEvent(self.client, status, now, self.server_pid))
        if status == "I" and self._portals and self.expect_rfq == 0:
            # portals die with their transaction (WITH HOLD cursors are not portals here)
            unnamed = self._portals.get("")
            self._portals.clear()
            if unnamed is not None:
                self._portals[""] = unnamed

    def reset_server_side(self) -> None:
        """Forget per-server state when a different server gets attached."""
        self._brem = bytearray()
        self._bneed = 0
        self.in_copy = False
        self.server_params = {}
