"""The relay's sans-IO core: one client's message streams, both directions.

``from_client(data, now)`` (or ``frame_client`` then ``track``) and ``from_server(data, now)`` take
the bytes read from each side and return the bytes to forward (whole messages only; a partial message
is held until it completes).  Along the way the relay keeps what pooling needs (transaction status,
answers still owed, COPY state) and emits one ``StatementEvent`` per completed statement through ``emit``.

The caller passes ``now`` (monotonic seconds); nothing here reads a clock or touches a socket.
``Relay`` and ``RequestLedger`` are the compiled twins from _core.pyx when built (proxy.protocol.native),
else ``PyRelay`` (below) and ``PyRequestLedger`` (proxy.protocol.ledger), the pure-Python reference.
"""

from __future__ import annotations

from collections import OrderedDict
from struct import Struct
from typing import Callable

from proxy.protocol.framing import PyFramer
from proxy.protocol.hint import might_fence, worth_a_look
from proxy.protocol.ledger import PyRequestLedger
from proxy.protocol.messages import (
    B_BIND_COMPLETE, B_CLOSE_COMPLETE, B_COMMAND_COMPLETE, B_COPY_BOTH, B_COPY_IN, B_COPY_OUT, B_DATA_ROW, B_EMPTY_QUERY,
    B_ERROR, B_NO_DATA, B_PARAMETER_STATUS, B_PARSE_COMPLETE, B_PORTAL_SUSPENDED, B_READY_FOR_QUERY, B_ROW_DESCRIPTION,
    F_BIND, F_CLOSE, F_DESCRIBE, F_EXECUTE, F_FLUSH, F_FUNCTION_CALL, F_PARSE, F_QUERY, F_SYNC, F_TERMINATE,
    command_tag, error_sqlstate,
)
from proxy.protocol.native import core as _core
from proxy.protocol.records import ClientInfo
from proxy.protocol.renaming import StatementRenamer, frame, nul
from proxy.protocol.requests import (
    ANSWERED_ONE_TO_ONE, BIND, CLOSE, DESCRIBE, EXECUTE, FUNCTION_CALL, MADE_UP, PARSE, QUERY, SYNC, Request,
)

_LEN = Struct("!i").unpack_from
_SYNC = b"S\x00\x00\x00\x04"
# answers that stand for one request each, in transaction mode's full tracking
_ONE_TO_ONE_ANSWERS = frozenset((B_PARSE_COMPLETE, B_BIND_COMPLETE, B_CLOSE_COMPLETE, B_NO_DATA, B_ROW_DESCRIPTION))


def _parses(msgs: list[bytes]) -> int:
    return sum(1 for msg in msgs if msg[:1] == b"P")


class PyRelay(PyRequestLedger):
    __slots__ = ("_stmts", "_client_framer", "on_query", "fences_only", "renamer", "to_client")

    def __init__(self, client: ClientInfo, emit: Callable[[object], None] | None = None,
                 max_prepared: int = 0) -> None:
        super().__init__(client, emit)
        self._stmts: dict[str, str] = {}  # client's prepared statement name -> text
        self._client_framer = PyFramer(stop=F_TERMINATE)  # a Terminate ends the client's stream
        self.on_query: Callable[[str], None] | None = None  # pooling rules: texts they may act on (hint.py)
        self.fences_only = False  # on_query is the DROP DATABASE fence alone (session mode): hint.might_fence
        self.to_client: list[bytes] = []  # made-up answers due to the client now
        # transaction mode with max_prepared > 0: named statements renamed per server
        self.renamer: StatementRenamer | None = None
        if max_prepared > 0:
            self.renamer = StatementRenamer(self._requests, max_prepared)
            self.renamer.to_client = self.to_client

    def attach(self, server_pid: int, prepared: "OrderedDict[str, None] | None", waited: float) -> None:
        """A server is attached: its pid (for records), its statement cache, the checkout wait."""
        self.server_pid = server_pid
        self.prepared = prepared
        if self.renamer is not None:
            self.renamer.prepared = prepared
        self.pending_wait = waited

    @property
    def terminated(self) -> bool:
        """The client sent Terminate."""
        return self._client_framer.stopped

    # ------------------------------------------------------------- frontend

    def from_client(self, data: bytes, now: float) -> bytes:
        """Frame, track and return what to forward (session mode, a server always attached)."""
        self.bytes_received += len(data)
        chunk = self._client_framer.whole(data)
        return self.track(chunk, now) if chunk else chunk

    def frame_client(self, data: bytes) -> bytes:
        """The whole client messages in ``data`` (a Terminate ends them: it is never forwarded)."""
        self.bytes_received += len(data)
        return self._client_framer.whole(data)

    def track(self, data: bytes, now: float) -> bytes:
        """Note what whole client messages ask of the server; return the bytes to send.

        With a renamer and an attached server, named statements are renamed
        for that server (transaction mode).
        """
        n = len(data)
        pos = 0
        requests = self._requests
        renamer = self.renamer if self.prepared is not None else None
        out: list[bytes] | None = None  # set once a message is rewritten
        last = 0
        if n and not self._query_start:  # PgBouncer's counts: a query, maybe a transaction, begins
            self._query_start = now
            self.query_count += 1
            if not self._xact_start:
                self._xact_start = now
                self.xact_count += 1
        while pos < n:
            t = data[pos]
            (ln,) = _LEN(data, pos + 1)
            end = pos + 1 + ln
            if t == F_QUERY:
                text = data[pos + 5 : end - 1].decode("utf-8", "replace")
                requests.append(Request(QUERY, text, "", None, now))
                self.expect_rfq += 1
                if self.on_query is not None and (might_fence if self.fences_only else worth_a_look)(text):
                    self.on_query(text)
            elif t == F_BIND:
                z1 = nul(data, pos + 5, end)
                z2 = nul(data, z1 + 1, end)
                stmt = data[z1 + 1 : z2].decode("utf-8", "replace")
                self._portals[data[pos + 5 : z1].decode("utf-8", "replace")] = (stmt, data[pos + 5 : end])
                self.unsynced = True
                self.bind_count += 1
                if renamer is not None:
                    used = renamer.use(stmt, self.prepared, now) if stmt else None  # type: ignore[arg-type]
                    requests.append(Request(BIND, "", "", None, now))
                    if used is not None:
                        msgs, srvname = used
                        self.server_parse_count += _parses(msgs)
                        msgs.append(frame(b"B", data[pos + 5 : z1 + 1] + srvname + data[z2:end]))
                        if out is None:
                            out = []
                        out.append(data[last:pos])
                        out.extend(msgs)
                        last = end
            elif t == F_EXECUTE:
                z1 = nul(data, pos + 5, end)
                stmt, bind = self._portals.get(data[pos + 5 : z1].decode("utf-8", "replace"), ("", b""))
                requests.append(Request(EXECUTE, self._stmts.get(stmt, ""), stmt, bind, now))
                self.unsynced = True
            elif t == F_SYNC:
                requests.append(Request(SYNC, "", "", None, now))
                self.expect_rfq += 1
                self.unsynced = False
            elif t == F_PARSE:
                z1 = nul(data, pos + 5, end)
                z2 = nul(data, z1 + 1, end)
                name = data[pos + 5 : z1].decode("utf-8", "replace")
                text = data[z1 + 1 : z2].decode("utf-8", "replace")
                self._stmts[name] = text
                self.unsynced = True
                self.client_parse_count += 1
                if self.on_query is not None and (might_fence if self.fences_only else worth_a_look)(text):
                    self.on_query(text)
                if renamer is None or not name:
                    self.server_parse_count += 1  # forwarded as it is (named ones: see below)
                if renamer is not None:
                    if name:
                        if out is None:
                            out = []
                        out.append(data[last:pos])
                        msgs = renamer.parse(name, data[z1 + 1 : end], self.prepared, now)  # type: ignore[arg-type]
                        self.server_parse_count += _parses(msgs)
                        out.extend(msgs)
                        last = end
                    else:
                        requests.append(Request(PARSE, "", "", None, now))
            elif t == F_CLOSE:
                name = data[pos + 6 : end - 1].decode("utf-8", "replace")
                if data[pos + 5] == 0x53:  # a statement
                    self._stmts.pop(name, None)
                    if renamer is not None and name:  # never close a statement others may share
                        if out is None:
                            out = []
                        out.append(data[last:pos])
                        last = end
                        renamer.close(name, now)
                        pos = end
                        continue
                else:
                    self._portals.pop(name, None)
                self.unsynced = True
                if renamer is not None:
                    requests.append(Request(CLOSE, "", "", None, now))
            elif t == F_DESCRIBE:
                self.unsynced = True
                if renamer is not None:
                    used = None
                    if data[pos + 5] == 0x53:
                        name = data[pos + 6 : end - 1].decode("utf-8", "replace")
                        if name:
                            used = renamer.use(name, self.prepared, now)  # type: ignore[arg-type]
                    requests.append(Request(DESCRIBE, "", "", None, now))
                    if used is not None:
                        msgs, srvname = used
                        self.server_parse_count += _parses(msgs)
                        msgs.append(frame(b"D", b"S" + srvname + b"\x00"))
                        if out is None:
                            out = []
                        out.append(data[last:pos])
                        out.extend(msgs)
                        last = end
            elif t == F_FLUSH:
                self.unsynced = True
            elif t == F_FUNCTION_CALL:
                requests.append(Request(FUNCTION_CALL, "", "", None, now))
                self.expect_rfq += 1
            # CopyData/CopyDone/CopyFail and anything else: forwarded as is
            pos = end
        if out is None:
            return data
        out.append(data[last:])
        return b"".join(out)

    def answer_locally(self, data: bytes) -> bytes | None:
        """Transaction mode, no server held: answer a prepare-only batch (named Parses + Sync)
        without a server, or return None when the batch needs one (see StatementRenamer)."""
        renamer = self.renamer
        if renamer is None or not data or data[0] != 0x50 or not self.releasable or self._requests:
            return None  # (such a batch starts with a Parse)
        found = renamer.prepare_only(data)
        if found is None:
            return None
        for name, text, _ in found:
            if self.on_query is not None and (might_fence if self.fences_only else worth_a_look)(text):
                self.on_query(text)
            self._stmts[name] = text
        self.query_count += 1  # a round trip, answered here
        self.client_parse_count += len(found)
        return b"1\x00\x00\x00\x04" * len(found) + b"Z\x00\x00\x00\x05I"

    def wind_up(self, now: float) -> bytes:
        """The client is gone: what to send so that the server answers everything it owes.

        A COPY FROM STDIN in progress gets a CopyFail, an extended-protocol batch without its Sync
        gets one; the bytes returned are tracked like the client's own, so ``answered`` turns true
        once the server has answered.  The caller reads and discards the answers (``from_server``).
        """
        out = b""
        if self.copy_in:
            out += frame(b"f", b"client disconnected\x00")
        if self.unsynced:
            out += _SYNC
        self.on_query = None
        self.emit = None  # what the server still says belongs to no client
        return self.track(out, now) if out else out

    # -------------------------------------------------------------- backend

    def from_server(self, data: bytes, now: float) -> bytes:
        data = self._server_framer.whole(data)
        n = len(data)
        pos = 0
        requests = self._requests
        out: list[bytes] | None = None  # set once a message is dropped or one is added
        last = 0
        while pos < n:
            t = data[pos]
            (ln,) = _LEN(data, pos + 1)
            end = pos + 1 + ln
            if t == B_DATA_ROW:
                if requests:
                    requests[0].rows += 1
                pos = end
                continue
            if t == B_COMMAND_COMPLETE:
                word, rows = command_tag(data[pos + 5 : end])
                self._complete(now, word, rows, None)
                self.in_copy = self.copy_in = False
            elif t == B_READY_FOR_QUERY:
                self._ready(chr(data[pos + 5]), now)
            elif t == B_ERROR:
                body = data[pos + 5 : end]
                self._complete(now, "", 0, error_sqlstate(body))
                self.in_copy = self.copy_in = False
                if b"VFATAL\x00" in body or b"VPANIC\x00" in body:
                    self.server_fatal = True
            elif t == B_EMPTY_QUERY:
                self._complete(now, "", 0, None, empty=True)
            elif t == B_PORTAL_SUSPENDED:
                self._complete(now, "SELECT", -1, None)
            elif t == B_COPY_IN or t == B_COPY_OUT or t == B_COPY_BOTH:
                self.in_copy = True
                self.copy_in = t != B_COPY_OUT
            elif t in _ONE_TO_ONE_ANSWERS and requests and requests[0].kind in ANSWERED_ONE_TO_ONE \
                    and (t != B_ROW_DESCRIPTION or requests[0].kind == DESCRIBE):
                if requests.popleft().swallow:  # the answer to a message we injected
                    if out is None:
                        out = []
                    out.append(data[last:pos])
                    last = end
            elif t == B_PARAMETER_STATUS:
                pass  # forwarded; the session settings pgscope syncs are the client's own
            if requests and requests[0].kind == MADE_UP:
                if out is None:
                    out = []
                out.append(data[last:end])
                last = end
                while requests and requests[0].kind == MADE_UP:
                    out.append(requests.popleft().answer)
            pos = end
        if out is None:
            self.bytes_sent += n
            return data
        out.append(data[last:])
        data = b"".join(out)
        self.bytes_sent += len(data)
        return data


RequestLedger = _core.RequestLedger if _core is not None else PyRequestLedger
Relay = _core.Relay if _core is not None else PyRelay
