"""Transaction mode's named prepared statements: the client's names mapped to statements
created on demand, under a name derived from their text, on whichever server runs them.

The client's Parse is remembered (name -> server name, Parse tail) and sent
only if the attached server lacks that statement; Bind and Describe are
rewritten to the server name, preceded by an injected Parse when needed; the
client's Close is answered here (other clients may share the server's
statement); each server's cache is bounded (LRU, ``max_prepared``).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from hashlib import blake2b

from pglast.parser import parse_sql as _parse_sql

from proxy.protocol.errors import ProtocolViolation
from proxy.protocol.requests import CLOSE, MADE_UP, PARSE, Request


def nul(data: bytes, start: int, end: int) -> int:
    """The NUL ending a string field that starts at ``start``, within its message (which ends
    at ``end``): a message whose string is not terminated is refused, as PostgreSQL does."""
    i = data.find(b"\x00", start, end)
    if i < 0:
        raise ProtocolViolation("invalid message format: unterminated string")
    return i

PARSE_COMPLETE = b"1\x00\x00\x00\x04"
CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
READY_IDLE = b"Z\x00\x00\x00\x05I"


def frame(tag: bytes, body: bytes) -> bytes:
    return tag + (len(body) + 4).to_bytes(4, "big") + body


def server_statement_name(parse_tail: bytes) -> str:
    """Server-side name for a statement: a hash of its text and parameter types."""
    return "PGS_" + blake2b(parse_tail, digest_size=10).hexdigest()


def _parses(sql: str) -> bool:
    try:
        _parse_sql(sql)
    except Exception:
        return False
    return True


class StatementRenamer:
    __slots__ = ("defs", "max_prepared", "requests", "to_client", "prepared")

    def __init__(self, requests: deque[Request], max_prepared: int) -> None:
        self.defs: dict[str, tuple[str, bytes]] = {}  # client name -> (server name, Parse tail)
        self.max_prepared = max_prepared
        self.requests = requests  # the relay's queue of requests awaiting answers
        self.to_client: list[bytes] = []  # made-up answers due to the client now
        self.prepared: OrderedDict[str, None] | None = None  # the attached server's statements

    # ------------------------------------------------------------ messages

    def parse(self, name: str, tail: bytes, prepared: OrderedDict, now: float) -> list[bytes]:
        """A named Parse: what to send in its place (maybe nothing: answered here)."""
        srvname = server_statement_name(tail)
        self.defs[name] = (srvname, tail)
        if srvname in prepared:
            prepared.move_to_end(srvname)
            self.made_up(PARSE_COMPLETE, now)
            return []
        out = self._evict(prepared, now)
        prepared[srvname] = None
        it = Request(PARSE, "", "", None, now)
        it.srvname = srvname
        self.requests.append(it)
        out.append(frame(b"P", srvname.encode() + b"\x00" + tail))
        return out

    def use(self, name: str, prepared: OrderedDict, now: float) -> tuple[list[bytes], bytes] | None:
        """A Bind or Describe of the client's statement ``name``: the messages that make sure the
        server has it, and its server name; None when the name is not one of ours."""
        d = self.defs.get(name)
        if d is None:
            return None
        srvname = d[0]
        if srvname in prepared:
            prepared.move_to_end(srvname)
            return [], srvname.encode()
        msgs = self._evict(prepared, now)
        prepared[srvname] = None
        it = Request(PARSE, "", "", None, now)
        it.swallow = True
        it.srvname = srvname
        self.requests.append(it)
        msgs.append(frame(b"P", srvname.encode() + b"\x00" + d[1]))
        return msgs, srvname.encode()

    def close(self, name: str, now: float) -> None:
        """The client's Close of a named statement: forgotten here, answered here."""
        self.defs.pop(name, None)
        self.made_up(CLOSE_COMPLETE, now)

    def made_up(self, msg: bytes, now: float) -> None:
        """Answer a message the server never sees, in its place in the stream."""
        if not self.requests:
            self.to_client.append(msg)
            return
        it = Request(MADE_UP, "", "", None, now)
        it.answer = msg
        self.requests.append(it)

    def _evict(self, prepared: OrderedDict, now: float) -> list[bytes]:
        msgs = []
        while len(prepared) >= self.max_prepared:
            old, _ = prepared.popitem(last=False)
            it = Request(CLOSE, "", "", None, now)
            it.swallow = True
            self.requests.append(it)
            msgs.append(frame(b"C", b"S" + old.encode() + b"\x00"))
        return msgs

    def forget_server_statement(self, srvname: str) -> None:
        """A Parse that failed or never ran: the server does not have that statement."""
        if srvname and self.prepared is not None:
            self.prepared.pop(srvname, None)

    # -------------------------------------------------- prepare-only batches

    def prepare_only(self, data: bytes) -> list[tuple[str, str, bytes]] | None:
        """No server held: is ``data`` a batch of named Parses + Sync that needs none?

        Such a batch is answered without a server (ParseComplete for each and
        ReadyForQuery), and the first Bind or Describe creates the statements on
        whichever server serves it.  Only SQL that parses qualifies, so syntax
        errors still come from PostgreSQL.  Returns (name, text, Parse tail) of
        each Parse, remembered here, or None when the batch needs a server.
        """
        n = len(data)
        pos = 0
        found = []
        while pos < n:
            t = data[pos]
            end = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
            if t == 0x53 and end == n and found:  # Sync closes the batch
                break
            if t != 0x50:
                return None
            z1 = nul(data, pos + 5, end)
            z2 = nul(data, z1 + 1, end)
            name = data[pos + 5 : z1].decode("utf-8", "replace")
            text = data[z1 + 1 : z2].decode("utf-8", "replace")
            if not name or not _parses(text):
                return None
            found.append((name, text, data[z1 + 1 : end]))
            pos = end
        else:
            return None
        for name, _, tail in found:
            self.defs[name] = (server_statement_name(tail), tail)
        return found
