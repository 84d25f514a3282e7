"""The console's answers on the wire: result sets (PgBouncer's column types), command tags, errors."""

from __future__ import annotations

import json
import struct
from typing import Any, Iterable, Sequence

from proxy.protocol import messages as m

# PostgreSQL type OIDs and sizes of the columns the console sends
TYPES: dict[str, tuple[int, int]] = {
    "text": (25, -1), "int4": (23, 4), "int8": (20, 8), "numeric": (1700, -1), "float8": (701, 8),
}
_H = struct.Struct("!h")
_FIELD = struct.Struct("!ihihih")  # table oid, column number, type oid, size, typmod, format
_I = struct.Struct("!i")

Column = tuple[str, str]  # (name, type: a key of TYPES)


def row_description(columns: Sequence[Column]) -> bytes:
    parts = [_H.pack(len(columns))]
    for name, typ in columns:
        oid, size = TYPES[typ]
        parts.append(name.encode() + b"\0" + _FIELD.pack(0, 0, oid, size, -1, 0))
    return m.frame(b"T", b"".join(parts))


def text(value: Any) -> str | None:
    """A value in PostgreSQL's text form; lists and dicts as JSON."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"), default=str)
    if isinstance(value, float):
        return repr(round(value, 6))
    return str(value)


def data_row(values: Sequence[Any]) -> bytes:
    parts = [_H.pack(len(values))]
    for v in values:
        t = text(v)
        if t is None:
            parts.append(_I.pack(-1))
        else:
            b = t.encode()
            parts.append(_I.pack(len(b)) + b)
    return m.frame(b"D", b"".join(parts))


def command_complete(tag: str) -> bytes:
    return m.frame(b"C", tag.encode() + b"\0")


def result(columns: Sequence[Column], rows: Iterable[Sequence[Any]], tag: str = "SHOW") -> bytes:
    """RowDescription, the DataRows, CommandComplete ``tag`` (PgBouncer answers SHOW with "SHOW")."""
    return row_description(columns) + b"".join(data_row(r) for r in rows) + command_complete(tag)


def columns(spec: str) -> list[Column]:
    """``"name:type name2:type"`` (type defaults to text) as a column list."""
    out = []
    for word in spec.split():
        name, _, typ = word.partition(":")
        out.append((name, typ or "text"))
    return out
