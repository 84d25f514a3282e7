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

from collections import OrderedDict, deque
from hashlib import blake2b

from pglast.parser import parse_sql as _parse_sql
from struct import Struct
from typing import Callable

from proxy.protocol.records import ClientInfo, StatementEvent, TransactionEvent

_new_tuple = tuple.__new__
from proxy.protocol.errors import ProtocolViolation
from proxy.protocol.messages import MAX_MESSAGE_SIZE, command_tag, error_sqlstate

_LEN = Struct("!i").unpack_from

# item kinds in the queue of requests awaiting results
_Q = 0  # simple Query (may hold several statements)
_E = 1  # extended-protocol Execute
_S = 2  # Sync
_F = 3  # FunctionCall
# transaction mode with named prepared statements tracks every response
_P = 4  # Parse -> ParseComplete
_B = 5  # Bind -> BindComplete
_C = 6  # Close -> CloseComplete
_D = 7  # Describe -> RowDescription / NoData
_FAKE = 8  # a response the proxy makes up in place of a message it did not send
_ANSWERED = frozenset((_P, _B, _C, _D))
_SYNCED = frozenset((_S, _Q, _F))  # items a ReadyForQuery answers


class _Item:
    __slots__ = ("kind", "text", "stmt", "bind", "sent", "index", "rows", "swallow", "srvname",
                 "fake")

    def __init__(self, kind: int, text: str, stmt: str, bind: bytes | None, sent: float) -> None:
        self.kind = kind
        self.text = text
        self.stmt = stmt
        self.bind = bind
        self.sent = sent
        self.index = 0
        self.rows = 0
        self.swallow = False
        self.srvname = ""
        self.fake = b""


def _frame(tag: bytes, body: bytes) -> bytes:
    return tag + (len(body) + 4).to_bytes(4, "big") + body


def _parses(sql: str) -> bool:
    try:
        _parse_sql(sql)
    except Exception:
        return False
    return True


def server_statement_name(parse_tail: bytes) -> str:
    """Server-side name for a statement: a hash of its text and parameter types."""
    return "PGS_" + blake2b(parse_tail, digest_size=10).hexdigest()


class Relay:
    __slots__ = (
        "client", "emit", "emit_tx", "tx_status", "expect_rfq", "unsynced", "in_copy",
        "terminated", "server_pid", "pending_wait", "server_params", "_items", "_stmts",
        "_portals", "_frem", "_fneed", "_brem", "_bneed", "_last_done", "on_query",
        "_sdef", "max_prepared", "to_client", "injected", "prepared", "copy_in", "server_fatal",
    )

    def __init__(self, client: ClientInfo, emit: Callable[[object], None] | None = None) -> None:
        self.client = client
        self.emit = emit  # None: inspection off, no events are built
        self.emit_tx = emit
        self.tx_status = "I"
        self.expect_rfq = 0  # ReadyForQuery messages the server still owes
        self.unsynced = False  # extended-protocol messages sent since the last Sync
        self.in_copy = False
        self.copy_in = False  # the server waits for the client's CopyData (CopyInResponse seen)
        self.server_fatal = False  # the server sent a FATAL/PANIC ErrorResponse: it closes next
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
        # transaction mode: client statement name -> (server name, Parse tail)
        self._sdef: dict[str, tuple[str, bytes]] = {}
        self.max_prepared = 0  # > 0 turns on per-server statement renaming
        self.to_client: list[bytes] = []  # made-up responses due to the client now
        self.injected = 0  # Parses sent on the client's behalf
        self.prepared: OrderedDict[str, None] | None = None  # attached server's cache

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

    def oldest_request_time(self) -> float | None:
        """When the oldest request still awaiting results was sent."""
        return self._items[0].sent if self._items else None

    def statement_text(self, name: str) -> str | None:
        return self._stmts.get(name)

    # ------------------------------------------------------------- frontend

    def from_client(self, data: bytes, now: float) -> bytes:
        """Session mode: frame, track and return what to forward."""
        chunk = self.split(data)
        return self.track(chunk, now, None) if chunk else chunk

    def split(self, data: bytes) -> bytes:
        """Frame client bytes: return whole messages, hold a partial tail.

        A Terminate is never forwarded: it ends the client, not the server.
        """
        if self._frem:
            self._frem += data
            if len(self._frem) < self._fneed:
                return b""
            data = bytes(self._frem)
            self._frem = bytearray()
        n = len(data)
        pos = 0
        need = 0
        while n - pos >= 5:
            (ln,) = _LEN(data, pos + 1)
            if ln < 4 or ln > MAX_MESSAGE_SIZE:
                raise ProtocolViolation(f"invalid message length {ln}")
            end = pos + 1 + ln
            if end > n:
                need = end - pos
                break
            if data[pos] == 0x58:  # Terminate
                self.terminated = True
                return data[:pos]
            pos = end
        if pos < n:
            self._frem = bytearray(data[pos:])
            self._fneed = need if need else 5
            return data[:pos]
        return data

    def track(self, data: bytes, now: float, prepared: "OrderedDict[str, None] | None") -> bytes:
        """Note what whole client messages ask of the server; return the bytes to send.

        ``prepared`` is the attached server's statement cache in transaction
        mode (named statements are then renamed per server); None otherwise.
        """
        n = len(data)
        pos = 0
        items = self._items
        ps = prepared is not None and self.max_prepared > 0
        out: list[bytes] | None = None  # set once a message is rewritten
        last = 0
        while pos < n:
            t = data[pos]
            (ln,) = _LEN(data, pos + 1)
            end = pos + 1 + ln
            if t == 0x51:  # Q
                text = data[pos + 5 : end - 1].decode("utf-8", "replace")
                items.append(_Item(_Q, text, "", None, now))
                self.expect_rfq += 1
                if self.on_query is not None:
                    self.on_query(text)
            elif t == 0x42:  # Bind
                z1 = data.index(b"\x00", pos + 5)
                z2 = data.index(b"\x00", z1 + 1)
                stmt = data[z1 + 1 : z2].decode("utf-8", "replace")
                self._portals[data[pos + 5 : z1].decode("utf-8", "replace")] = (stmt, data[pos + 5 : end])
                self.unsynced = True
                if ps:
                    repl = None
                    if stmt and stmt in self._sdef:
                        srvname = self._sdef[stmt][0]
                        repl = self._ensure(srvname, stmt, prepared, now)
                        repl.append(data[pos + 5 : z1 + 1] + srvname.encode() + data[z2 : end])
                        repl[-1] = _frame(b"B", repl[-1])
                    items.append(_Item(_B, "", "", None, now))
                    if repl is not None:
                        if out is None:
                            out = []
                        out.append(data[last:pos])
                        out.extend(repl)
                        last = end
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
                name = data[pos + 5 : z1].decode("utf-8", "replace")
                text = data[z1 + 1 : z2].decode("utf-8", "replace")
                self._stmts[name] = text
                self.unsynced = True
                if self.on_query is not None:
                    self.on_query(text)
                if ps:
                    if name:
                        tail = data[z1 + 1 : end]  # query, NUL, parameter types
                        srvname = server_statement_name(tail)
                        self._sdef[name] = (srvname, tail)
                        if out is None:
                            out = []
                        out.append(data[last:pos])
                        last = end
                        if srvname in prepared:
                            prepared.move_to_end(srvname)
                            self._fake(b"1\x00\x00\x00\x04", now)
                        else:
                            out.extend(self._evict(prepared, now))
                            prepared[srvname] = None
                            it = _Item(_P, "", "", None, now)
                            it.srvname = srvname
                            items.append(it)
                            out.append(_frame(b"P", srvname.encode() + b"\x00" + tail))
                    else:
                        items.append(_Item(_P, "", "", None, now))
            elif t == 0x43:  # Close
                kind = data[pos + 5]
                name = data[pos + 6 : end - 1].decode("utf-8", "replace")
                if kind == 0x53:
                    self._stmts.pop(name, None)
                    if ps and name:
                        # never close a statement other clients may share
                        self._sdef.pop(name, None)
                        if out is None:
                            out = []
                        out.append(data[last:pos])
                        last = end
                        self._fake(b"3\x00\x00\x00\x04", now)
                        pos = end
                        continue
                else:
                    self._portals.pop(name, None)
                self.unsynced = True
                if ps:
                    items.append(_Item(_C, "", "", None, now))
            elif t == 0x44:  # Describe
                self.unsynced = True
                if ps:
                    repl = None
                    if data[pos + 5] == 0x53:
                        name = data[pos + 6 : end - 1].decode("utf-8", "replace")
                        if name and name in self._sdef:
                            srvname = self._sdef[name][0]
                            repl = self._ensure(srvname, name, prepared, now)
                            repl.append(_frame(b"D", b"S" + srvname.encode() + b"\x00"))
                    items.append(_Item(_D, "", "", None, now))
                    if repl is not None:
                        if out is None:
                            out = []
                        out.append(data[last:pos])
                        out.extend(repl)
                        last = end
            elif t == 0x48:  # Flush
                self.unsynced = True
            elif t == 0x46:  # FunctionCall
                items.append(_Item(_F, "", "", None, now))
                self.expect_rfq += 1
            # CopyData/CopyDone/CopyFail and anything else: forwarded as is
            pos = end
        if out is None:
            return data
        out.append(data[last:])
        return b"".join(out)

    def wind_up(self, now: float) -> bytes:
        """The client is gone: what to send so that the server answers everything it owes.

        A COPY FROM STDIN in progress gets a CopyFail, an extended-protocol batch
        without its Sync gets one; the bytes returned are tracked like the
        client's own, so ``quiet`` turns true once the server has answered.
        The caller reads and discards the answers (``from_server``).
        """
        out = b""
        if self.copy_in:
            out += _frame(b"f", b"client disconnected\x00")
        if self.unsynced:
            out += b"S\x00\x00\x00\x04"
        self.on_query = None
        self.emit = self.emit_tx = None  # what the server still says belongs to no client
        return self.track(out, now, None) if out else out

    def answer_locally(self, data: bytes) -> bytes | None:
        """Transaction mode, no server held: answer a batch of named Parses + Sync.

        A prepare-only batch needs no server: remember the statements, answer
        ParseComplete for each and ReadyForQuery, and let the first Bind or
        Describe create them on whichever server serves it.  Only SQL that
        parses is answered here, so syntax errors still come from PostgreSQL.
        Returns the answer, or None when the batch needs a server.
        """
        if self.max_prepared <= 0 or not self.idle or self._items:
            return None
        n = len(data)
        pos = 0
        defs = []
        while pos < n:
            t = data[pos]
            (ln,) = _LEN(data, pos + 1)
            end = pos + 1 + ln
            if t == 0x53 and end == n and defs:  # Sync closes the batch
                break
            if t != 0x50:
                return None
            z1 = data.index(b"\x00", pos + 5)
            z2 = data.index(b"\x00", z1 + 1)
            name = data[pos + 5 : z1].decode("utf-8", "replace")
            text = data[z1 + 1 : z2].decode("utf-8", "replace")
            if not name or not _parses(text):
                return None
            defs.append((name, text, data[z1 + 1 : end]))
            pos = end
        else:
            return None
        for name, text, tail in defs:
            if self.on_query is not None:
                self.on_query(text)
            self._stmts[name] = text
            self._sdef[name] = (server_statement_name(tail), tail)
        return b"1\x00\x00\x00\x04" * len(defs) + b"Z\x00\x00\x00\x05I"

    def _ensure(self, srvname: str, name: str, prepared: "OrderedDict[str, None]",
                now: float) -> list[bytes]:
        """Messages that make sure the server has ``srvname`` (an injected Parse)."""
        if srvname in prepared:
            prepared.move_to_end(srvname)
            return []
        msgs = self._evict(prepared, now)
        prepared[srvname] = None
        it = _Item(_P, "", "", None, now)
        it.swallow = True
        it.srvname = srvname
        self._items.append(it)
        self.injected += 1
        msgs.append(_frame(b"P", srvname.encode() + b"\x00" + self._sdef[name][1]))
        return msgs

    def _evict(self, prepared: "OrderedDict[str, None]", now: float) -> list[bytes]:
        msgs = []
        while len(prepared) >= self.max_prepared:
            old, _ = prepared.popitem(last=False)
            it = _Item(_C, "", "", None, now)
            it.swallow = True
            self._items.append(it)
            msgs.append(_frame(b"C", b"S" + old.encode() + b"\x00"))
        return msgs

    def _fake(self, msg: bytes, now: float) -> None:
        """Answer a message the server never sees, in its place in the stream."""
        if not self._items:
            self.to_client.append(msg)
            return
        it = _Item(_FAKE, "", "", None, now)
        it.fake = msg
        self._items.append(it)

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
        items = self._items
        out: list[bytes] | None = None  # set once a message is dropped or one is added
        last = 0
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
                if items:
                    items[0].rows += 1
                pos = end
                continue
            if t == 0x43:  # CommandComplete
                word, rows = command_tag(data[pos + 5 : end])
                self._complete(now, word, rows, None)
                self.in_copy = self.copy_in = False
            elif t == 0x5A:  # ReadyForQuery
                self._ready(chr(data[pos + 5]), now)
            elif t == 0x45:  # ErrorResponse
                body = data[pos + 5 : end]
                self._complete(now, "", 0, error_sqlstate(body))
                self.in_copy = self.copy_in = False
                if b"VFATAL\x00" in body or b"VPANIC\x00" in body:
                    self.server_fatal = True
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
                self.copy_in = t != 0x48
            elif (t == 0x31 or t == 0x32 or t == 0x33 or t == 0x6E or t == 0x54) and items \
                    and items[0].kind in _ANSWERED and (t != 0x54 or items[0].kind == _D):
                if items.popleft().swallow:  # the answer to a message we injected
                    if out is None:
                        out = []
                    out.append(data[last:pos])
                    last = end
            if items and items[0].kind == _FAKE:
                if out is None:
                    out = []
                out.append(data[last:end])
                last = end
                while items and items[0].kind == _FAKE:
                    out.append(items.popleft().fake)
            pos = end
        if pos < n:
            self._brem = bytearray(data[pos:])
            self._bneed = need if need else 5
            if out is None:
                return data[:pos]
            out.append(data[last:pos])
            return b"".join(out)
        if out is None:
            return data
        out.append(data[last:])
        return b"".join(out)

    def _complete(self, now: float, word: str, rows: int, sqlstate: str | None,
                  empty: bool = False) -> None:
        items = self._items
        if not items:
            return
        item = items[0]
        kind = item.kind
        if kind == _S or kind == _F:
            return
        if kind != _Q and kind != _E:
            if sqlstate is not None and kind != _FAKE:  # an error answers Parse/Bind/...
                items.popleft()
                if item.srvname and self.prepared is not None:
                    self.prepared.pop(item.srvname, None)
                self._skip_to_sync()
            return
        start = item.sent if item.sent > self._last_done else self._last_done
        self._last_done = now
        if rows < 0:
            rows = item.rows
        if kind == _E:
            items.popleft()
            if sqlstate is not None:
                self._skip_to_sync()
        idx = item.index
        item.index = idx + 1
        item.rows = 0
        emit = self.emit
        if emit is None or empty:
            return
        wait = self.pending_wait
        if wait:
            self.pending_wait = 0.0
        emit(_new_tuple(StatementEvent, (  # NamedTuple fields in order, without its Python __new__
            self.client, item.text, idx, kind == _E, item.stmt, item.bind, self.server_pid,
            start, now, wait, word, rows, sqlstate, self.tx_status != "I",
        )))

    def _skip_to_sync(self) -> None:
        """After an error the server ignores everything up to the next Sync."""
        items = self._items
        while items and items[0].kind not in _SYNCED:
            it = items.popleft()
            if it.srvname and self.prepared is not None:
                self.prepared.pop(it.srvname, None)  # that Parse never ran

    def _ready(self, status: str, now: float) -> None:
        items = self._items
        while items:
            kind = items.popleft().kind
            if kind in _SYNCED:
                break
        if self.expect_rfq > 0:
            self.expect_rfq -= 1
        self.in_copy = self.copy_in = False
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
