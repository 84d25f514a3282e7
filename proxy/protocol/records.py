"""What the relay emits: records handed from the relay to the inspect pipeline.

The relay builds one of these per completed statement and appends it to a
bounded queue (see ``proxy.inspect.pipeline.EventSink``).  They are small,
immutable and cheap to build: the relay never parses SQL, never splits
multi-statement queries and never decodes Bind parameters; consumers do that
off the hot path, with caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Who a statement came from; one shared instance per client connection."""

    client_id: int  # proxy-local id, unique for the process lifetime
    db: str
    user: str
    application_name: str
    client_addr: str  # "host:port" or "unix"
    settings: tuple[tuple[str, str], ...] = ()  # startup settings (search_path, options -c, ...)


class StatementEvent(NamedTuple):
    """One completed statement (a simple-protocol statement or an Execute).

    A NamedTuple rather than a frozen dataclass: it is built on the hot path
    for every statement, and a tuple is several times cheaper to make.

    ``query`` is the whole text the client sent (a simple Query may hold
    several statements; ``stmt_index`` says which one this record is, counted
    from 0 over the statements that produced a CommandComplete, ErrorResponse
    or EmptyQueryResponse).  For the extended protocol ``query`` is the Parse
    text and ``stmt_index`` is 0.
    """

    client: ClientInfo
    query: str
    stmt_index: int
    extended: bool  # came through Parse/Bind/Execute
    statement_name: str  # client's prepared statement name ("" = unnamed)
    bind: bytes | None  # raw Bind message body (extended only), decode lazily
    server_pid: int  # backend pid of the server that ran it (0 if unknown)
    start: float  # time.monotonic() when the statement was sent / began
    end: float  # time.monotonic() when its CommandComplete/ErrorResponse arrived
    wait: float  # seconds the client waited for a server before this statement (0 if none)
    tag: str  # command tag word: "SELECT", "INSERT", ... ("" on error)
    rows: int  # rows from the CommandComplete tag (0 if none)
    sqlstate: str | None  # None on success
    in_transaction: bool  # a transaction block was open when the statement began


@dataclass(frozen=True, slots=True)
class TransactionEvent:
    """A change of a client's transaction status, at ReadyForQuery.

    Emitted only when the status differs from the previous ReadyForQuery
    ('I' idle, 'T' in a transaction block, 'E' failed transaction block).
    """

    client: ClientInfo
    status: str
    at: float  # time.monotonic()
    server_pid: int


@dataclass(frozen=True, slots=True)
class ClientEvent:
    """A client connected (``connected=True``) or went away."""

    client: ClientInfo
    connected: bool
    at: float
