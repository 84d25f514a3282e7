"""Sans-IO codecs for the PostgreSQL v3 wire protocol (framing: proxy.protocol.framing).

Nothing here touches a socket or a clock.  Regular messages are a type byte,
an int32 length that counts itself, and a body.  The startup-phase packets
(StartupMessage, SSLRequest, GSSENCRequest, CancelRequest) have no type byte.

The relay forwards the bytes it read; these helpers decode only the few
fields the proxy needs and build the few messages the proxy originates.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from proxy.protocol.errors import PgError, ProtocolViolation

PROTOCOL_3_0 = 3 << 16
PROTOCOL_3_2 = (3 << 16) | 2
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102


_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_H16 = struct.Struct("!h")
_II = struct.Struct("!ii")

# Frontend message types
F_BIND = 0x42  # B
F_CLOSE = 0x43  # C
F_DESCRIBE = 0x44  # D
F_EXECUTE = 0x45  # E
F_FUNCTION_CALL = 0x46  # F
F_FLUSH = 0x48  # H
F_PARSE = 0x50  # P
F_QUERY = 0x51  # Q
F_SYNC = 0x53  # S
F_TERMINATE = 0x58  # X
F_PASSWORD = 0x70  # p (PasswordMessage, SASLInitialResponse, SASLResponse, GSSResponse)

# Backend message types
B_PARSE_COMPLETE = 0x31  # 1
B_BIND_COMPLETE = 0x32  # 2
B_CLOSE_COMPLETE = 0x33  # 3
B_COMMAND_COMPLETE = 0x43  # C
B_DATA_ROW = 0x44  # D
B_ERROR = 0x45  # E
B_COPY_IN = 0x47  # G
B_COPY_OUT = 0x48  # H
B_EMPTY_QUERY = 0x49  # I
B_BACKEND_KEY = 0x4B  # K
B_AUTH = 0x52  # R
B_PARAMETER_STATUS = 0x53  # S
B_ROW_DESCRIPTION = 0x54  # T
B_COPY_BOTH = 0x57  # W
B_READY_FOR_QUERY = 0x5A  # Z
B_NO_DATA = 0x6E  # n
B_PORTAL_SUSPENDED = 0x73  # s


# --------------------------------------------------------------------------
# framing


def frame(tag: bytes, body: bytes = b"") -> bytes:
    """Build one typed message."""
    return tag + _I32.pack(len(body) + 4) + body


# --------------------------------------------------------------------------
# startup-phase packets


@dataclass(slots=True)
class StartupPacket:
    kind: str  # "startup" | "ssl" | "gssenc" | "cancel"
    version: int = 0
    params: dict[str, str] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)  # _pq_.* options
    cancel_pid: int = 0
    cancel_key: bytes = b""


def parse_startup_packet(packet: bytes) -> StartupPacket:
    """Decode one whole startup-phase packet (length prefix included)."""
    (code,) = _I32.unpack_from(packet, 4)
    if code == SSL_REQUEST_CODE and len(packet) == 8:
        return StartupPacket("ssl")
    if code == GSSENC_REQUEST_CODE and len(packet) == 8:
        return StartupPacket("gssenc")
    if code == CANCEL_REQUEST_CODE:
        if len(packet) < 16 or len(packet) > 8 + 4 + 256:
            raise ProtocolViolation("invalid length of cancel request packet")
        (pid,) = _I32.unpack_from(packet, 8)
        return StartupPacket("cancel", cancel_pid=pid, cancel_key=bytes(packet[12:]))
    major = code >> 16
    if major != 3:
        raise PgError(
            "0A000",
            f"unsupported frontend protocol {major}.{code & 0xFFFF}: "
            "server supports 3.0 to 3.0",
        )
    parts = bytes(packet[8:]).split(b"\x00")
    # the list ends with an empty name, then the split leaves a trailing b""
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"":
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    items = parts[:-2]
    if len(items) % 2:
        raise ProtocolViolation("invalid startup packet layout: odd number of strings")
    params: dict[str, str] = {}
    unsupported: list[str] = []
    for i in range(0, len(items), 2):
        k = items[i].decode("utf-8", "replace")
        v = items[i + 1].decode("utf-8", "replace")
        if k.startswith("_pq_."):
            unsupported.append(k)
        else:
            params[k] = v
    if "user" not in params or not params["user"]:
        raise PgError("28000", "no PostgreSQL user name specified in startup packet")
    return StartupPacket("startup", version=code, params=params, unsupported=unsupported)


def startup_message(params: dict[str, str], version: int = PROTOCOL_3_0) -> bytes:
    body = _I32.pack(version) + b"".join(
        k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in params.items()
    ) + b"\x00"
    return _I32.pack(len(body) + 4) + body


def cancel_request(pid: int, key: bytes) -> bytes:
    body = _I32.pack(CANCEL_REQUEST_CODE) + _I32.pack(pid) + key
    return _I32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _II.pack(8, SSL_REQUEST_CODE)


def parse_options(options: str) -> dict[str, str]:
    """Decode the ``options`` startup parameter (``-c k=v``, ``--k=v``).

    Backslash escapes a space, as libpq's PGOPTIONS does.
    """
    words: list[str] = []
    cur: list[str] = []
    esc = False
    for ch in options:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch.isspace():
            if cur:
                words.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        words.append("".join(cur))
    out: dict[str, str] = {}
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c" and i + 1 < len(words):
            kv = words[i + 1]
            i += 2
        elif w.startswith("-c"):
            kv = w[2:]
            i += 1
        elif w.startswith("--"):
            kv = w[2:]
            i += 1
        else:
            raise PgError("42601", f"invalid command-line argument for server process: {w}")
        if "=" not in kv:
            raise PgError("42601", f"-c {kv} requires a value")
        k, v = kv.split("=", 1)
        out[k.replace("-", "_")] = v
    return out


# --------------------------------------------------------------------------
# backend messages the proxy originates


def auth_ok() -> bytes:
    return b"R\x00\x00\x00\x08\x00\x00\x00\x00"


def parameter_status(name: str, value: str) -> bytes:
    return frame(b"S", name.encode() + b"\x00" + value.encode() + b"\x00")


def backend_key_data(pid: int, key: bytes) -> bytes:
    return frame(b"K", _I32.pack(pid) + key)


def ready_for_query(status: bytes = b"I") -> bytes:
    return frame(b"Z", status)


def negotiate_protocol_version(newest_minor: int, unsupported: list[str]) -> bytes:
    body = _I32.pack(newest_minor) + _I32.pack(len(unsupported)) + b"".join(
        o.encode() + b"\x00" for o in unsupported
    )
    return frame(b"v", body)


def _fields(severity: str, sqlstate: str, message: str, detail: str | None,
            hint: str | None) -> bytes:
    parts = [
        b"S" + severity.encode() + b"\x00",
        b"V" + severity.encode() + b"\x00",
        b"C" + sqlstate.encode() + b"\x00",
        b"M" + message.encode("utf-8", "replace") + b"\x00",
    ]
    if detail:
        parts.append(b"D" + detail.encode("utf-8", "replace") + b"\x00")
    if hint:
        parts.append(b"H" + hint.encode("utf-8", "replace") + b"\x00")
    return b"".join(parts) + b"\x00"


def error_response(sqlstate: str, message: str, *, severity: str = "FATAL",
                   detail: str | None = None, hint: str | None = None) -> bytes:
    return frame(b"E", _fields(severity, sqlstate, message, detail, hint))


def error_from(exc: PgError) -> bytes:
    return error_response(exc.sqlstate, exc.message, severity=exc.severity,
                          detail=exc.detail, hint=exc.hint)


def notice_response(sqlstate: str, message: str, severity: str = "WARNING", detail: str | None = None) -> bytes:
    return frame(b"N", _fields(severity, sqlstate, message, detail, None))


# --------------------------------------------------------------------------
# frontend messages the proxy originates


def query(sql: str) -> bytes:
    return frame(b"Q", sql.encode() + b"\x00")


def terminate() -> bytes:
    return b"X\x00\x00\x00\x04"


def sync() -> bytes:
    return b"S\x00\x00\x00\x04"


def parse(name: str, sql: str, param_types: tuple[int, ...] = ()) -> bytes:
    body = (name.encode() + b"\x00" + sql.encode() + b"\x00" + _H16.pack(len(param_types))
            + b"".join(_U32.pack(t) for t in param_types))
    return frame(b"P", body)


def close_statement(name: str) -> bytes:
    return frame(b"C", b"S" + name.encode() + b"\x00")


# --------------------------------------------------------------------------
# decoders for the fields the proxy needs


def cstr(body: bytes, pos: int = 0) -> tuple[str, int]:
    """Decode a NUL-terminated string at ``pos``; return it and the next position."""
    end = body.index(b"\x00", pos)
    return body[pos:end].decode("utf-8", "replace"), end + 1


def decode_error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse body → {field code: value}."""
    out: dict[str, str] = {}
    pos = 0
    n = len(body)
    while pos < n and body[pos] != 0:
        code = chr(body[pos])
        end = body.index(b"\x00", pos + 1)
        out[code] = body[pos + 1 : end].decode("utf-8", "replace")
        pos = end + 1
    return out


def error_sqlstate(body: bytes) -> str:
    """Just the SQLSTATE of an ErrorResponse body (fast path)."""
    i = body.find(b"\x00C")
    if body[:1] == b"C":
        return body[1:6].decode("ascii", "replace")
    if i < 0:
        return "XX000"
    return body[i + 2 : i + 7].decode("ascii", "replace")


def decode_parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = cstr(body)
    value, _ = cstr(body, pos)
    return name, value


_COUNTED = frozenset(("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "FETCH", "MOVE", "COPY"))


def command_tag(body: bytes) -> tuple[str, int]:
    """CommandComplete body → (command word, rows)."""
    tag = body[:-1].decode("ascii", "replace") if body.endswith(b"\x00") else body.decode("ascii", "replace")
    word, _, rest = tag.partition(" ")
    rows = 0
    if rest and word in _COUNTED:
        last = rest.rpartition(" ")[2]
        if last.isdigit():
            rows = int(last)
    return word, rows


def decode_parse(body: bytes) -> tuple[str, str, tuple[int, ...]]:
    """Parse body → (statement name, query, parameter type oids)."""
    name, pos = cstr(body)
    end = body.index(b"\x00", pos)
    sql = body[pos:end].decode("utf-8", "replace")
    pos = end + 1
    types: tuple[int, ...] = ()
    if pos + 2 <= len(body):
        (n,) = _H16.unpack_from(body, pos)
        types = struct.unpack_from(f"!{n}I", body, pos + 2) if n > 0 else ()
    return name, sql, types


def decode_bind_params(body: bytes) -> tuple[str, str, list[bytes | None], list[int]]:
    """Bind body → (portal, statement, raw parameter values, parameter format codes)."""
    portal, pos = cstr(body)
    stmt, pos = cstr(body, pos)
    (nfmt,) = _H16.unpack_from(body, pos)
    pos += 2
    fmts = list(struct.unpack_from(f"!{nfmt}h", body, pos)) if nfmt > 0 else []
    pos += 2 * nfmt
    (nparams,) = _H16.unpack_from(body, pos)
    pos += 2
    values: list[bytes | None] = []
    for _ in range(nparams):
        (ln,) = _I32.unpack_from(body, pos)
        pos += 4
        if ln < 0:
            values.append(None)
        else:
            values.append(body[pos : pos + ln])
            pos += ln
    if nfmt == 0:
        fmts = [0] * nparams
    elif nfmt == 1:
        fmts = fmts * nparams
    return portal, stmt, values, fmts


def decode_data_row(body: bytes) -> list[str | None]:
    """DataRow body → column values as text (None for NULL)."""
    (n,) = _H16.unpack_from(body, 0)
    pos = 2
    out: list[str | None] = []
    for _ in range(n):
        (ln,) = _I32.unpack_from(body, pos)
        pos += 4
        if ln < 0:
            out.append(None)
        else:
            out.append(body[pos : pos + ln].decode("utf-8", "replace"))
            pos += ln
    return out
