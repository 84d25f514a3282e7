"""The relay's server-side half in pure Python: what the server owes one client (``PyRequestLedger``),
and the counts each client's relay keeps for PgBouncer's ``SHOW STATS`` (``TRAFFIC``).

``proxy.protocol.relay`` builds ``PyRelay`` on it; ``_core.pyx`` has the compiled twin of both.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Callable

from proxy.protocol.framing import PyFramer
from proxy.protocol.records import ClientInfo, StatementEvent, TransactionEvent
from proxy.protocol.requests import EXECUTE, FUNCTION_CALL, MADE_UP, QUERY, SYNC, SYNCED, Request

_new_tuple = tuple.__new__

# What each client's relay counts for PgBouncer's SHOW STATS (both implementations): transactions
# and queries begun (a query: the client's messages up to the ReadyForQuery that ends them; a
# transaction: up to one with status idle), their seconds, Parse and Bind messages from the client,
# Parses sent to servers (transaction mode's renamed statements: only those a server needed), and the
# bytes read from the client and sent to it.
TRAFFIC = ("xact_count", "query_count", "xact_time", "query_time", "client_parse_count", "server_parse_count",
           "bind_count", "bytes_received", "bytes_sent")


class PyRequestLedger:
    """What the server owes one client: the requests awaiting answers, transaction and COPY
    status, and the records each completed statement makes (the relay's server-side half)."""

    __slots__ = ("client", "emit", "tx_status", "expect_rfq", "unsynced", "in_copy", "copy_in", "server_fatal",
                 "server_pid", "pending_wait", "_requests", "_server_framer", "_last_done", "_portals", "prepared",
                 *TRAFFIC, "_query_start", "_xact_start")

    def __init__(self, client: ClientInfo, emit: Callable[[object], None] | None) -> None:
        self.client = client
        self.emit = emit  # None: inspection off, no records are built
        self.tx_status = "I"
        self.expect_rfq = 0  # ReadyForQuery messages the server still owes
        self.unsynced = False  # extended-protocol messages sent since the last Sync
        self.in_copy = False
        self.copy_in = False  # the server waits for the client's CopyData (CopyInResponse seen)
        self.server_fatal = False  # the server sent a FATAL/PANIC ErrorResponse: it closes next
        self.server_pid = 0
        self.pending_wait = 0.0  # the checkout wait, given to the next statement's record
        self._requests: deque[Request] = deque()
        self._server_framer = PyFramer()
        self._last_done = 0.0
        self._portals: dict[str, tuple[str, bytes]] = {}  # portal -> (statement, Bind body)
        self.prepared: OrderedDict[str, None] | None = None  # the attached server's statements
        # PgBouncer's SHOW STATS counts for this client (TRAFFIC); 0.0: no query (transaction) under way
        self.xact_count = self.query_count = self.client_parse_count = self.server_parse_count = 0
        self.bind_count = self.bytes_received = self.bytes_sent = 0
        self.xact_time = self.query_time = 0.0
        self._query_start = self._xact_start = 0.0

    # ------------------------------------------------------------------ state

    @property
    def releasable(self) -> bool:
        """Nothing owed either way and no transaction open: the server may be given back."""
        return (
            self.expect_rfq == 0
            and not self.unsynced
            and self.tx_status == "I"
            and not self.in_copy
            and not self._server_framer.holding
        )

    @property
    def answered(self) -> bool:
        """Every request answered (the server may still sit in a transaction)."""
        return (self.expect_rfq == 0 and not self.unsynced and not self.in_copy
                and not self._server_framer.holding)

    def oldest_request_time(self) -> float | None:
        """When the oldest request still awaiting results was sent."""
        return self._requests[0].sent if self._requests else None

    def _complete(self, now: float, word: str, rows: int, sqlstate: str | None,
                  empty: bool = False) -> None:
        requests = self._requests
        if not requests:
            return
        item = requests[0]
        kind = item.kind
        if kind == SYNC or kind == FUNCTION_CALL:
            return
        if kind != QUERY and kind != EXECUTE:
            if sqlstate is not None and kind != MADE_UP:  # an error answers Parse/Bind/...
                requests.popleft()
                self._forget_parse(item)
                self._skip_to_sync()
            return
        start = item.sent if item.sent > self._last_done else self._last_done
        self._last_done = now
        if rows < 0:
            rows = item.rows
        if kind == EXECUTE:
            requests.popleft()
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
            self.client, item.text, idx, kind == EXECUTE, item.stmt, item.bind, self.server_pid,
            start, now, wait, word, rows, sqlstate, self.tx_status != "I",
        )))

    def _forget_parse(self, item: Request) -> None:
        if item.srvname and self.prepared is not None:
            self.prepared.pop(item.srvname, None)  # that Parse failed or never ran

    def _skip_to_sync(self) -> None:
        """After an error the server ignores everything up to the next Sync."""
        requests = self._requests
        while requests and requests[0].kind not in SYNCED:
            self._forget_parse(requests.popleft())

    def _ready(self, status: str, now: float) -> None:
        requests = self._requests
        while requests:
            if requests.popleft().kind in SYNCED:
                break
        if self.expect_rfq > 0:
            self.expect_rfq -= 1
        if self.expect_rfq == 0:  # PgBouncer's query: client messages up to the ReadyForQuery that ends them
            if self._query_start:
                self.query_time += now - self._query_start
                self._query_start = 0.0
            if status == "I" and self._xact_start:
                self.xact_time += now - self._xact_start
                self._xact_start = 0.0
        self.in_copy = self.copy_in = False
        if status != self.tx_status:
            self.tx_status = status
            if self.emit is not None:
                self.emit(TransactionEvent(self.client, status, now, self.server_pid))
        if status == "I" and self._portals and self.expect_rfq == 0:
            # portals die with their transaction (WITH HOLD cursors are not portals here)
            unnamed = self._portals.get("")
            self._portals.clear()
            if unnamed is not None:
                self._portals[""] = unnamed
