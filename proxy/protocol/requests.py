"""The relay's queue of requests awaiting the server's answers: one item per request."""

from __future__ import annotations

# item kinds
QUERY = 0  # simple Query (may hold several statements)
EXECUTE = 1  # extended-protocol Execute
SYNC = 2
FUNCTION_CALL = 3
# transaction mode with named prepared statements tracks every response
PARSE = 4  # -> ParseComplete
BIND = 5  # -> BindComplete
CLOSE = 6  # -> CloseComplete
DESCRIBE = 7  # -> RowDescription / NoData (after ParameterDescription for a statement)
MADE_UP = 8  # an answer the proxy makes up in place of a message the server never saw
ANSWERED_ONE_TO_ONE = frozenset((PARSE, BIND, CLOSE, DESCRIBE))
SYNCED = frozenset((SYNC, QUERY, FUNCTION_CALL))  # items a ReadyForQuery answers


class Request:
    __slots__ = ("kind", "text", "stmt", "bind", "sent", "index", "rows", "swallow", "srvname",
                 "answer")

    def __init__(self, kind: int, text: str, stmt: str, bind: bytes | None, sent: float) -> None:
        self.kind = kind
        self.text = text  # Query text, or the Parse text an Execute runs
        self.stmt = stmt  # the client's statement name (Execute)
        self.bind = bind  # the Bind body (Execute)
        self.sent = sent
        self.index = 0  # statements of a Query completed so far
        self.rows = 0  # DataRows so far
        self.swallow = False  # the answer is to a message the proxy injected: not the client's
        self.srvname = ""  # Parse: the server-side statement name it creates
        self.answer = b""  # MADE_UP: the message to give the client in its place
