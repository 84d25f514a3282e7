# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""The relay's hot path, compiled: typed twins of Framer (framing.py), RequestLedger and Relay
(relay.py) and StatementRenamer (renaming.py).

Same public interface and behaviour as the pure-Python reference, which stays
the specification: tests/test_relay_twins.py feeds random message streams,
split at random points, through both and requires the same bytes, records and
state.  What differs is inside: cdef fields instead of slots, loops over a
``const unsigned char*`` instead of ``struct`` calls and slices, text decoded
straight from the buffer, the request queue a list with a head index, the
unnamed portal in two fields instead of a dict entry, command tags parsed
without making a bytes object.

Selected by proxy.protocol.native (``PGSCOPE_NO_EXTENSIONS=1`` switches it off).
"""

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_SIZE
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.tuple cimport PyTuple_SET_ITEM
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.stdint cimport int32_t, uint32_t, uint64_t
from libc.string cimport memchr, memcmp, memcpy

from hashlib import blake2b

from pglast.parser import parse_sql as _parse_sql

from proxy.protocol.errors import ProtocolViolation
from proxy.protocol.records import StatementEvent, TransactionEvent

# the same limits as framing.py (checked equal by tests/test_relay_twins.py)
MAX_MESSAGE_SIZE = 1 << 30
MAX_STARTUP_PACKET = 10000

# request kinds (the values of requests.py)
cdef enum:
    QUERY = 0
    EXECUTE = 1
    SYNC = 2
    FUNCTION_CALL = 3
    PARSE = 4
    BIND = 5
    CLOSE = 6
    DESCRIBE = 7
    MADE_UP = 8

cdef object _STATEMENT_EVENT = StatementEvent
cdef object _NO_WAIT = 0.0


cdef extern from "Python.h":
    PyObject* PyType_GenericAlloc(PyTypeObject* t, Py_ssize_t n)


cdef inline void _put(object t, Py_ssize_t i, object v) noexcept:
    Py_INCREF(v)
    PyTuple_SET_ITEM(t, i, v)  # (steals the reference)


cdef object _statement_event(object client, object query, Py_ssize_t idx, bint extended, object stmt,
                             object bind, object server_pid, double start, double end, double wait,
                             object word, object rows, object sqlstate, bint in_transaction):
    """StatementEvent(...) made in place: tuple.__new__ would build the tuple twice (an argument
    tuple, then the record) and a third time for its own arguments."""
    cdef object ev
    cdef object i = idx, s = start, e = end  # every allocation before the record's own
    cdef object w = _NO_WAIT if wait == 0.0 else wait  # (most records: no wait for a server)
    cdef PyObject* raw = PyType_GenericAlloc(<PyTypeObject*>_STATEMENT_EVENT, 14)
    if raw == NULL:
        raise MemoryError()
    ev = <object>raw  # (a new reference: the allocation's own is given up)
    Py_DECREF(ev)
    _put(ev, 0, client)
    _put(ev, 1, query)
    _put(ev, 2, i)
    _put(ev, 3, True if extended else False)
    _put(ev, 4, stmt)
    _put(ev, 5, bind)
    _put(ev, 6, server_pid)
    _put(ev, 7, s)
    _put(ev, 8, e)
    _put(ev, 9, w)
    _put(ev, 10, word)
    _put(ev, 11, rows)
    _put(ev, 12, sqlstate)
    _put(ev, 13, True if in_transaction else False)
    return ev


_SYNC = b"S\x00\x00\x00\x04"
_PARSE_COMPLETE = b"1\x00\x00\x00\x04"
_CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
_READY_IDLE = b"Z\x00\x00\x00\x05I"
_COPY_FAIL = b"f\x00\x00\x00\x18client disconnected\x00"
_NO_PORTAL = ("", b"")

# command tag words kept as ready-made strings: (bytes, str, rows counted)
_WORDS = tuple((w.encode(), w, w in ("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "FETCH", "MOVE", "COPY"))
               for w in ("SELECT", "INSERT", "UPDATE", "DELETE", "BEGIN", "COMMIT", "ROLLBACK", "SET", "FETCH",
                         "MERGE", "MOVE", "COPY", "START", "SAVEPOINT", "RELEASE", "PREPARE", "DECLARE",
                         "CLOSE", "CREATE", "DROP", "ALTER", "SHOW", "RESET", "DISCARD", "LISTEN", "NOTIFY"))


# ------------------------------------------------------------------ helpers

cdef inline int32_t _i32(const unsigned char* p) noexcept:
    return <int32_t>((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3])


cdef inline const unsigned char* _ptr(bytes b) noexcept:
    return <const unsigned char*>PyBytes_AS_STRING(b)


cdef inline bytes _as_bytes(object data):
    if type(data) is bytes:
        return <bytes>data
    return bytes(data)


cdef inline str _utf8(const unsigned char* p, Py_ssize_t a, Py_ssize_t b):
    """data[a:b].decode("utf-8", "replace"), an empty slice when b <= a."""
    if b <= a:
        return ""
    return PyUnicode_DecodeUTF8(<const char*>(p + a), b - a, "replace")


cdef inline Py_ssize_t _nul(const unsigned char* p, Py_ssize_t end, Py_ssize_t start) except -1:
    """renaming.nul: the NUL ending a string field within its message (p[start:end])."""
    cdef const void* hit
    if start < end:
        hit = memchr(p + start, 0, end - start)
        if hit != NULL:
            return <const unsigned char*>hit - p
    raise ProtocolViolation("invalid message format: unterminated string")


cdef inline unsigned char _byte(const unsigned char* p, Py_ssize_t n, Py_ssize_t i) except? 0:
    """data[i] for i >= 0."""
    if i >= n:
        raise IndexError("index out of range")
    return p[i]


cdef bint _contains(const unsigned char* p, Py_ssize_t n, const char* needle, Py_ssize_t m) noexcept:
    cdef Py_ssize_t i = 0
    cdef const void* hit
    while n - i >= m:
        hit = memchr(p + i, needle[0], n - i - m + 1)
        if hit == NULL:
            return False
        i = <const unsigned char*>hit - p
        if memcmp(p + i, needle, m) == 0:
            return True
        i += 1
    return False


cdef inline bint _space(unsigned char c) noexcept:
    return c == 0x20 or (0x09 <= c <= 0x0D)


cdef inline unsigned char _lower(unsigned char c) noexcept:
    return c + 32 if 0x41 <= c <= 0x5A else c


cdef inline bint _ci_at(const unsigned char* p, const char* needle, Py_ssize_t m) noexcept:
    """p[:m] is ``needle`` (lower case ASCII), ASCII case-insensitive."""
    cdef Py_ssize_t k
    for k in range(m):
        if _lower(p[k]) != <unsigned char>needle[k]:
            return False
    return True


cdef bint _any_high(const unsigned char* p, Py_ssize_t a, Py_ssize_t b) noexcept:
    """A byte outside ASCII in p[a:b] (eight at a time, one test at the end)."""
    cdef uint64_t acc = 0, w
    cdef Py_ssize_t i = a
    while i + 8 <= b:
        memcpy(&w, p + i, 8)
        acc |= w
        i += 8
    while i < b:
        acc |= p[i]
        i += 1
    return (acc & 0x8080808080808080ULL) != 0


cdef bint _ci_has(const unsigned char* p, Py_ssize_t a, Py_ssize_t b, const char* needle, Py_ssize_t m,
                  Py_ssize_t k) noexcept:
    """``needle`` (m bytes, lower case ASCII) occurs in p[a:b], ASCII case-insensitive: memchr finds
    its byte k (in either case, a rare one chosen by the caller), then the rest is compared."""
    cdef unsigned char c = <unsigned char>needle[k]
    cdef unsigned char cases[2]
    cdef int ncases = 1, j
    cdef Py_ssize_t i, stop = b - m + k + 1  # where byte k of a match can be, at most (exclusive)
    cdef const unsigned char* q
    cases[0] = c
    if 0x61 <= c <= 0x7A:
        cases[1] = c - 32
        ncases = 2
    for j in range(ncases):
        i = a + k
        while i < stop:
            q = <const unsigned char*>memchr(p + i, cases[j], stop - i)
            if q == NULL:
                break
            i = q - p
            if _ci_at(p + i - k, needle, m):
                return True
            i += 1
    return False


cdef bint _worth_a_look(const unsigned char* p, Py_ssize_t a, Py_ssize_t b, bint full) noexcept:
    """proxy.protocol.hint.worth_a_look over a statement text's UTF-8 bytes p[a:b]: the first word,
    then C library searches (memchr) for the rest.  Not ``full``:
    hint.might_fence, the first word alone."""
    cdef Py_ssize_t i, j, k, last, n
    cdef unsigned char c
    cdef unsigned char w[11]
    if b <= a:  # empty (or a malformed message's missing text)
        return False
    i = a
    while i < b and _space(p[i]):
        i += 1
    if i < b:
        c = p[i]
        if c == 0x2D or c == 0x2F or 0x1C <= c <= 0x1F or c >= 0x80:  # - / the separators str.lstrip
            return True  # strips, and outside ASCII
        j = i
        while j < b and ((0x30 <= p[j] <= 0x39) or (0x41 <= p[j] <= 0x5A) or (0x61 <= p[j] <= 0x7A)
                         or p[j] == 0x5F):
            j += 1
        n = j - i
        for k in range(n if n < 11 else 11):
            w[k] = _lower(p[i + k])
        if (n >= 4 and memcmp(w, b"drop", 4) == 0) or (n >= 5 and memcmp(w, b"alter", 5) == 0) or (
                n >= 6 and memcmp(w, b"create", 6) == 0):
            return True
        if not full:
            return False
        if n == 3:
            if memcmp(w, b"set", 3) == 0:
                return True
        elif n == 4:
            if memcmp(w, b"load", 4) == 0:
                return True
        elif n == 5:
            if memcmp(w, b"reset", 5) == 0:
                return True
        elif n == 6:
            if memcmp(w, b"listen", 6) == 0:
                return True
        elif n == 7:
            if memcmp(w, b"prepare", 7) == 0 or memcmp(w, b"discard", 7) == 0 or memcmp(w, b"declare", 7) == 0:
                return True
        elif n == 8:
            if memcmp(w, b"unlisten", 8) == 0:
                return True
        elif n == 10:
            if memcmp(w, b"deallocate", 10) == 0:
                return True
    elif not full:
        return False
    last = b - 1
    while last >= a and _space(p[last]):
        last -= 1
    if last > a and memchr(p + a, 0x3B, last - a) != NULL:
        return True  # a ; other than one final one: several statements
    return _any_high(p, a, b) or _ci_has(p, a, b, b"advisory_lock", 13, 8) or (
        _ci_has(p, a, b, b"temp", 4, 3) and _ci_has(p, a, b, b"into", 4, 2))


def worth_a_look(str text, bint full=True):
    """The compiled twin of proxy.protocol.hint.worth_a_look (``full``) and of hint.might_fence
    (not ``full``), for tests and the rare str path."""
    cdef bytes raw = text.encode("utf-8", "surrogatepass")
    return _worth_a_look(<const unsigned char*>PyBytes_AS_STRING(raw), 0, PyBytes_GET_SIZE(raw), full)


cdef bytes _frame(char tag, const unsigned char* body, Py_ssize_t n):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n + 5)
    cdef unsigned char* q = <unsigned char*>PyBytes_AS_STRING(out)
    cdef uint32_t ln = <uint32_t>(n + 4)
    q[0] = tag
    q[1] = (ln >> 24) & 0xFF
    q[2] = (ln >> 16) & 0xFF
    q[3] = (ln >> 8) & 0xFF
    q[4] = ln & 0xFF
    if n:
        memcpy(q + 5, body, n)
    return out


cdef inline bytes _frame_b(char tag, bytes body):
    return _frame(tag, _ptr(body), PyBytes_GET_SIZE(body))


cdef tuple _command_tag(const unsigned char* p, Py_ssize_t n):
    """CommandComplete body -> (word, rows), as messages.command_tag."""
    cdef Py_ssize_t wl, i, last
    cdef const void* sp
    cdef object word = None
    cdef bint counted = False
    cdef long long rows = 0
    if n and p[n - 1] == 0:
        n -= 1
    sp = memchr(p, 0x20, n)
    wl = (<const unsigned char*>sp - p) if sp != NULL else n
    for entry in _WORDS:
        wb = <bytes>(<tuple>entry)[0]
        if PyBytes_GET_SIZE(wb) == wl and memcmp(PyBytes_AS_STRING(wb), p, wl) == 0:
            word = (<tuple>entry)[1]
            counted = (<tuple>entry)[2]
            break
    if word is None:
        word = PyUnicode_DecodeASCII(<const char*>p, wl, "replace")
    if not counted or sp == NULL or wl + 1 >= n:
        return (word, 0)
    last = n  # the digits after the tag's last space
    while p[last - 1] != 0x20:
        last -= 1
    if last == n:
        return (word, 0)
    for i in range(last, n):
        if p[i] < 0x30 or p[i] > 0x39:
            return (word, 0)
    if n - last > 18:
        return (word, int(PyBytes_FromStringAndSize(<const char*>(p + last), n - last)))
    for i in range(last, n):
        rows = rows * 10 + (p[i] - 0x30)
    return (word, rows)


cdef str _error_sqlstate(const unsigned char* p, Py_ssize_t n):
    """ErrorResponse body -> SQLSTATE, as messages.error_sqlstate."""
    cdef Py_ssize_t i, a
    if n >= 1 and p[0] == 0x43:
        a = 1
    else:
        a = -1
        i = 0
        while i + 1 < n:
            if p[i] == 0 and p[i + 1] == 0x43:
                a = i + 2
                break
            i += 1
        if a < 0:
            return "XX000"
    if a >= n:
        return ""
    return PyUnicode_DecodeASCII(<const char*>(p + a), min(5, n - a), "replace")


def server_statement_name(parse_tail):
    """Server-side name for a statement: a hash of its text and parameter types."""
    return "PGS_" + blake2b(parse_tail, digest_size=10).hexdigest()


def _parses(sql):
    try:
        _parse_sql(sql)
    except Exception:
        return False
    return True


# ------------------------------------------------------------------ framer

cdef class Framer:
    """Incremental framer over one direction of a connection (see framing.PyFramer)."""


    def __init__(self, Py_ssize_t max_size=MAX_MESSAGE_SIZE, int stop=-1):
        self._buf = bytearray()
        self._pos = 0
        self._need = 0
        self.max_size = max_size
        self.stop = stop
        self.stopped = False

    def whole(self, data):
        """The whole messages of what was held plus ``data``; the partial tail is kept."""
        return self._whole(_as_bytes(data))

    cdef bytes _whole(self, bytes data):
        cdef Py_ssize_t n, pos = 0, end
        cdef int32_t ln
        cdef const unsigned char* p
        cdef Py_ssize_t held = len(self._buf), m
        cdef bytes joined
        if held:
            m = PyBytes_GET_SIZE(data)
            if held + m < self._need:  # a message longer than this read: keep gathering
                self._buf += data
                return b""
            # the held tail and the read, copied once into one bytes (was: into the buffer, then out)
            joined = PyBytes_FromStringAndSize(NULL, held + m)
            memcpy(PyBytes_AS_STRING(joined), PyByteArray_AS_STRING(self._buf), held)
            memcpy(PyBytes_AS_STRING(joined) + held, PyBytes_AS_STRING(data), m)
            data = joined
            self._buf = bytearray()
        p = _ptr(data)
        n = PyBytes_GET_SIZE(data)
        while n - pos >= 5:
            ln = _i32(p + pos + 1)
            if ln < 4 or ln > self.max_size:
                raise ProtocolViolation(f"invalid message length {ln}")
            if p[pos] == self.stop:
                self.stopped = True
                return data[:pos]
            end = pos + 1 + ln
            if end > n:
                self._buf = PyByteArray_FromStringAndSize(<const char*>(p + pos), n - pos)  # one copy
                self._need = end - pos
                return data[:pos]
            pos = end
        if pos < n:
            self._buf = PyByteArray_FromStringAndSize(<const char*>(p + pos), n - pos)
            self._need = 5
            return data[:pos]
        return data

    @property
    def holding(self):
        """Part of a message is held (``whole`` mode)."""
        return len(self._buf) > 0

    def feed(self, data):
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next(self):
        """The next whole typed message as ``(type, body)``, or None until more is fed."""
        cdef bytearray buf = self._buf
        cdef Py_ssize_t pos = self._pos, end
        cdef int32_t ln
        cdef const unsigned char* p
        if len(buf) - pos < 5:
            return None
        p = <const unsigned char*><char*>buf
        ln = _i32(p + pos + 1)
        if ln < 4 or ln > self.max_size:
            raise ProtocolViolation(f"invalid message length {ln}")
        end = pos + 1 + ln
        if end > len(buf):
            return None
        self._pos = end
        return p[pos], PyBytes_FromStringAndSize(<const char*>(p + pos + 5), end - pos - 5)

    def next_packet(self):
        """The next whole untyped startup-phase packet (length word included), or None."""
        cdef bytearray buf = self._buf
        cdef Py_ssize_t pos = self._pos
        cdef int32_t ln
        cdef const unsigned char* p
        if len(buf) - pos < 4:
            return None
        p = <const unsigned char*><char*>buf
        ln = _i32(p + pos)
        if ln < 8 or ln > MAX_STARTUP_PACKET:
            raise ProtocolViolation("invalid length of startup packet")
        if len(buf) - pos < ln:
            return None
        self._pos = pos + ln
        return PyBytes_FromStringAndSize(<const char*>(p + pos), ln)

    def messages(self):
        out = []
        while (msg := self.next()) is not None:
            out.append(msg)
        return out

    def pending(self):
        """Bytes held that do not yet make a whole message."""
        return len(self._buf) - self._pos

    def take_rest(self):
        rest = bytes(self._buf[self._pos :])
        self._buf = bytearray()
        self._pos = 0
        return rest


# ---------------------------------------------------------------- requests

@cython.freelist(32)
cdef class Request:
    """One request awaiting the server's answers (see requests.Request)."""


    def __init__(self, int kind, text, stmt, bind, double sent):
        self.kind = kind
        self.text = text
        self.stmt = stmt
        self.bind = bind
        self.sent = sent
        self.srvname = ""
        self.answer = b""


cdef inline Request _request(int kind, double now):
    cdef Request it = Request.__new__(Request)
    it.kind = kind
    it.text = ""
    it.stmt = ""
    it.sent = now
    it.srvname = ""
    it.answer = b""
    return it



# ----------------------------------------------------------- the renamer

cdef class StatementRenamer:
    """Transaction mode's named prepared statements (see renaming.StatementRenamer).

    The relay calls it with itself (whose request queue it appends to) and its
    list of outgoing chunks, so nothing is built per message beyond the bytes sent.
    """


    def __init__(self, Py_ssize_t max_prepared):
        self.defs = {}
        self.max_prepared = max_prepared
        self.to_client = []
        self.prepared = None

    cdef int parse(self, RequestLedger led, str name, bytes tail, object prepared, double now,
                   list out) except -1:
        """A named Parse: what to send in its place goes to ``out`` (maybe nothing: answered here)."""
        cdef Request it
        srvname = server_statement_name(tail)
        enc = srvname.encode()
        self.defs[name] = (srvname, tail, enc)
        if srvname in prepared:
            prepared.move_to_end(srvname)
            self.made_up(led, _PARSE_COMPLETE, now)
            return 0
        self._evict(led, prepared, now, out)
        prepared[srvname] = None
        it = _request(PARSE, now)
        it.srvname = srvname
        led._push(it)
        out.append(_frame_b(0x50, enc + b"\x00" + tail))
        led.server_parse_count += 1
        return 0

    cdef object use(self, RequestLedger led, str name, object prepared, double now, list out):
        """A Bind or Describe of the client's statement ``name``: the messages that make sure the
        server has it go to ``out``; returns its server name (bytes), None when not one of ours."""
        cdef Request it
        d = self.defs.get(name)
        if d is None:
            return None
        srvname = (<tuple>d)[0]
        enc = <bytes>(<tuple>d)[2]
        if srvname in prepared:
            prepared.move_to_end(srvname)
            return enc
        self._evict(led, prepared, now, out)
        prepared[srvname] = None
        it = _request(PARSE, now)
        it.swallow = True
        it.srvname = srvname
        led._push(it)
        out.append(_frame_b(0x50, enc + b"\x00" + <bytes>(<tuple>d)[1]))
        led.server_parse_count += 1
        return enc

    cdef int close(self, RequestLedger led, str name, double now) except -1:
        """The client's Close of a named statement: forgotten here, answered here."""
        self.defs.pop(name, None)
        self.made_up(led, _CLOSE_COMPLETE, now)
        return 0

    cdef int made_up(self, RequestLedger led, bytes msg, double now) except -1:
        """Answer a message the server never sees, in its place in the stream."""
        cdef Request it
        if not led._pending():
            self.to_client.append(msg)
            return 0
        it = _request(MADE_UP, now)
        it.answer = msg
        led._push(it)
        return 0

    cdef int _evict(self, RequestLedger led, object prepared, double now, list out) except -1:
        cdef Request it
        while len(prepared) >= self.max_prepared:
            old, _ = prepared.popitem(last=False)
            it = _request(CLOSE, now)
            it.swallow = True
            led._push(it)
            out.append(_frame_b(0x43, b"S" + old.encode() + b"\x00"))
        return 0

    def forget_server_statement(self, srvname):
        """A Parse that failed or never ran: the server does not have that statement."""
        if srvname and self.prepared is not None:
            self.prepared.pop(srvname, None)

    def prepare_only(self, data):
        """No server held: is ``data`` a batch of named Parses + Sync that needs none?
        (see renaming.StatementRenamer.prepare_only)"""
        cdef bytes b = _as_bytes(data)
        cdef const unsigned char* p = _ptr(b)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(b), pos = 0, end, z1, z2
        cdef unsigned char t
        found = []
        while pos < n:
            t = p[pos]
            if n - pos < 5:
                end = pos + 1 + int.from_bytes(b[pos + 1 : pos + 5], "big")
            else:
                end = pos + 1 + <uint32_t>_i32(p + pos + 1)
            if t == 0x53 and end == n and found:  # Sync closes the batch
                break
            if t != 0x50:
                return None
            z1 = _nul(p, end if end < n else n, pos + 5)
            z2 = _nul(p, end if end < n else n, z1 + 1)
            name = _utf8(p, pos + 5, z1)
            text = _utf8(p, z1 + 1, z2)
            if not name or not _parses(text):
                return None
            found.append((name, text, b[z1 + 1 : end]))
            pos = end
        else:
            return None
        for name, _, tail in found:
            srvname = server_statement_name(tail)
            self.defs[name] = (srvname, tail, srvname.encode())
        return found


# ---------------------------------------------------------------- ledger

cdef class RequestLedger:
    """What the server owes one client (see relay.PyRequestLedger)."""


    def __init__(self, client, emit):
        self.client = client
        self.emit = emit
        self._tx = "I"
        self._txc = 0x49
        self.expect_rfq = 0
        self.server_pid = 0
        self.pending_wait = 0.0
        self._reqs = []
        self._head = 0
        self._server_framer = Framer()
        self._last_done = 0.0
        self._named_portals = {}
        self.prepared = None

    # ------------------------------------------------------------------ state

    @property
    def tx_status(self):
        return self._tx

    @tx_status.setter
    def tx_status(self, str value):
        self._tx = value
        self._txc = ord(value) if len(value) == 1 and ord(value) < 256 else 0

    cdef bint _releasable(self):
        return (self.expect_rfq == 0 and not self.unsynced and self._txc == 0x49 and not self.in_copy
                and not len(self._server_framer._buf))

    @property
    def releasable(self):
        """Nothing owed either way and no transaction open: the server may be given back."""
        return self._releasable()

    @property
    def answered(self):
        """Every request answered (the server may still sit in a transaction)."""
        return self._answered()

    cdef bint _answered(self):
        return (self.expect_rfq == 0 and not self.unsynced and not self.in_copy
                and not len(self._server_framer._buf))

    def oldest_request_time(self):
        """When the oldest request still awaiting results was sent."""
        return self._front().sent if self._pending() else None

    @property
    def _requests(self):
        """The requests awaiting answers, oldest first (a copy; for tests)."""
        return self._reqs[self._head :]

    @property
    def _portals(self):
        """Portal -> (statement, Bind body), as the reference keeps them (a copy; for tests)."""
        d = dict(self._named_portals)
        if self._has_unnamed:
            d[""] = (self._u_stmt, self._u_bind)
        return d

    # ------------------------------------------------------------------ queue

    cdef bint _pending(self) noexcept:
        return self._head < PyList_GET_SIZE(self._reqs)

    cdef Request _front(self):
        return <Request>self._reqs[self._head]

    cdef int _push(self, Request it) except -1:
        self._reqs.append(it)
        return 0

    cdef Request _pop(self):
        cdef Request it = <Request>self._reqs[self._head]
        cdef Py_ssize_t size = PyList_GET_SIZE(self._reqs)
        self._head += 1
        if self._head >= size:
            del self._reqs[:]
            self._head = 0
        elif self._head >= 256 and 2 * self._head >= size:  # a queue that never drains
            del self._reqs[: self._head]
            self._head = 0
        else:
            self._reqs[self._head - 1] = None
        return it

    # -------------------------------------------------------------- answers

    cdef int _complete(self, double now, object word, object rows, object sqlstate, bint empty) except -1:
        cdef Request item
        cdef int kind
        cdef double start, wait
        cdef Py_ssize_t idx
        if not self._pending():
            return 0
        item = self._front()
        kind = item.kind
        if kind == SYNC or kind == FUNCTION_CALL:
            return 0
        if kind != QUERY and kind != EXECUTE:
            if sqlstate is not None and kind != MADE_UP:  # an error answers Parse/Bind/...
                self._pop()
                self._forget_parse(item)
                self._skip_to_sync()
            return 0
        start = item.sent if item.sent > self._last_done else self._last_done
        self._last_done = now
        if rows is None:
            rows = item.rows
        if kind == EXECUTE:
            self._pop()
            if sqlstate is not None:
                self._skip_to_sync()
        idx = item.index
        item.index = idx + 1
        item.rows = 0
        emit = self.emit
        if emit is None or empty:
            return 0
        wait = self.pending_wait
        if wait:
            self.pending_wait = 0.0
        emit(_statement_event(self.client, item.text, idx, kind == EXECUTE, item.stmt, item.bind, self.server_pid,
                              start, now, wait, word, rows, sqlstate, self._txc != 0x49))
        return 0

    cdef int _forget_parse(self, Request item) except -1:
        if item.srvname and self.prepared is not None:
            self.prepared.pop(item.srvname, None)  # that Parse failed or never ran
        return 0

    cdef int _skip_to_sync(self) except -1:
        """After an error the server ignores everything up to the next Sync."""
        cdef int kind
        while self._pending():
            kind = self._front().kind
            if kind == SYNC or kind == QUERY or kind == FUNCTION_CALL:
                break
            self._forget_parse(self._pop())
        return 0

    cdef int _ready(self, unsigned char status, double now) except -1:
        cdef int kind
        while self._pending():
            kind = self._pop().kind
            if kind == SYNC or kind == QUERY or kind == FUNCTION_CALL:
                break
        if self.expect_rfq > 0:
            self.expect_rfq -= 1
        if self.expect_rfq == 0:  # PgBouncer's query: client messages up to the ReadyForQuery that ends them
            if self._query_start != 0.0:
                self.query_time += now - self._query_start
                self._query_start = 0.0
            if status == 0x49 and self._xact_start != 0.0:
                self.xact_time += now - self._xact_start
                self._xact_start = 0.0
        self.in_copy = self.copy_in = False
        if status != self._txc:
            self._tx = chr(status)
            self._txc = status
            if self.emit is not None:
                self.emit(TransactionEvent(self.client, self._tx, now, self.server_pid))
        if status == 0x49 and self._named_portals and self.expect_rfq == 0:
            # portals die with their transaction (WITH HOLD cursors are not portals here)
            self._named_portals.clear()
        return 0

    # -------------------------------------------------------------- backend

    cpdef from_server(self, data, double now):
        cdef bytes buf = self._server_framer._whole(_as_bytes(data))
        cdef const unsigned char* p = _ptr(buf)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(buf), pos = 0, end, last = 0
        cdef unsigned char t
        cdef int kind
        cdef Request front
        cdef list out = None  # set once a message is dropped or one is added
        while pos < n:
            t = p[pos]
            end = pos + 1 + _i32(p + pos + 1)
            if t == 0x44:  # DataRow
                if self._pending():
                    front = self._front()
                    front.rows += 1
                pos = end
                continue
            if t == 0x43:  # CommandComplete
                word, rows = _command_tag(p + pos + 5, end - pos - 5)
                self._complete(now, word, rows, None, False)
                self.in_copy = self.copy_in = False
            elif t == 0x5A:  # ReadyForQuery
                self._ready(_byte(p, n, pos + 5), now)
            elif t == 0x45:  # ErrorResponse
                self._complete(now, "", 0, _error_sqlstate(p + pos + 5, end - pos - 5), False)
                self.in_copy = self.copy_in = False
                if _contains(p + pos + 5, end - pos - 5, b"VFATAL\x00", 7) or \
                        _contains(p + pos + 5, end - pos - 5, b"VPANIC\x00", 7):
                    self.server_fatal = True
            elif t == 0x49:  # EmptyQueryResponse
                self._complete(now, "", 0, None, True)
            elif t == 0x73:  # PortalSuspended
                self._complete(now, "SELECT", None, None, False)
            elif t == 0x47 or t == 0x48 or t == 0x57:  # CopyIn, CopyOut, CopyBoth
                self.in_copy = True
                self.copy_in = t != 0x48
            elif (t == 0x31 or t == 0x32 or t == 0x33 or t == 0x6E or t == 0x54) and self._pending():
                # ParseComplete, BindComplete, CloseComplete, NoData, RowDescription: one request each
                kind = self._front().kind
                if (kind == PARSE or kind == BIND or kind == CLOSE or kind == DESCRIBE) and \
                        (t != 0x54 or kind == DESCRIBE):
                    if self._pop().swallow:  # the answer to a message we injected
                        if out is None:
                            out = []
                        out.append(buf[last:pos])
                        last = end
            if self._pending() and self._front().kind == MADE_UP:
                if out is None:
                    out = []
                out.append(buf[last:end])
                last = end
                while self._pending() and self._front().kind == MADE_UP:
                    out.append(self._pop().answer)
            pos = end
        if out is None:
            self.bytes_sent += n
            return buf
        out.append(buf[last:])
        buf = b"".join(out)
        self.bytes_sent += PyBytes_GET_SIZE(buf)
        return buf


# ----------------------------------------------------------------- relay

cdef class Relay(RequestLedger):
    """One client's message streams, both directions (see relay.PyRelay)."""


    def __init__(self, client, emit=None, Py_ssize_t max_prepared=0):
        RequestLedger.__init__(self, client, emit)
        self._stmt_texts = {}
        self._client_framer = Framer(stop=0x58)  # a Terminate ends the client's stream
        self.on_query = None
        self.to_client = []
        self.renamer = None
        self._parse_raw = b""
        self._parse_text = ""
        if max_prepared > 0:
            self.renamer = StatementRenamer(max_prepared)
            self.renamer.to_client = self.to_client

    @property
    def _stmts(self):
        """The client's statement names -> texts (for tests)."""
        return self._stmt_texts

    cpdef attach(self, server_pid, prepared, double waited):
        """A server is attached: its pid (for records), its statement cache, the checkout wait."""
        self.server_pid = server_pid
        self.prepared = prepared
        if self.renamer is not None:
            self.renamer.prepared = prepared
        self.pending_wait = waited

    @property
    def terminated(self):
        """The client sent Terminate."""
        return self._client_framer.stopped

    # ------------------------------------------------------------- frontend

    cpdef from_client(self, data, double now):
        """Frame, track and return what to forward (session mode, a server always attached)."""
        cdef bytes b = _as_bytes(data)
        cdef bytes chunk
        self.bytes_received += PyBytes_GET_SIZE(b)
        chunk = self._client_framer._whole(b)
        return self._track(chunk, now) if PyBytes_GET_SIZE(chunk) else chunk

    cpdef frame_client(self, data):
        """The whole client messages in ``data`` (a Terminate ends them: it is never forwarded)."""
        cdef bytes b = _as_bytes(data)
        self.bytes_received += PyBytes_GET_SIZE(b)
        return self._client_framer._whole(b)

    cpdef track(self, data, double now):
        """Note what whole client messages ask of the server; return the bytes to send."""
        return self._track(_as_bytes(data), now)

    cdef str _parse_text_of(self, const unsigned char* p, Py_ssize_t a, Py_ssize_t b):
        """A Parse's text; the last one is kept, since clients send the same few again and again."""
        cdef Py_ssize_t m = b - a if b > a else 0
        if PyBytes_GET_SIZE(self._parse_raw) == m and memcmp(_ptr(self._parse_raw), p + a, m) == 0:
            return self._parse_text
        self._parse_raw = PyBytes_FromStringAndSize(<const char*>(p + a), m)
        self._parse_text = _utf8(p, a, b)
        return self._parse_text

    cdef bytes _track(self, bytes data, double now):
        cdef const unsigned char* p = _ptr(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data), pos = 0, end, z1, z2, last = 0, m
        cdef int32_t ln
        cdef unsigned char t
        cdef StatementRenamer renamer = self.renamer if self.prepared is not None else None
        cdef list out = None  # set once a message is rewritten
        cdef Request it
        cdef str text, name, stmt
        cdef object srv, bind, pb
        cdef bytes body
        if n and self._query_start == 0.0:  # PgBouncer's counts: a query, maybe a transaction, begins
            self._query_start = now
            self.query_count += 1
            if self._xact_start == 0.0:
                self._xact_start = now
                self.xact_count += 1
        while pos < n:
            if n - pos < 5:
                raise ProtocolViolation("incomplete message")
            t = p[pos]
            ln = _i32(p + pos + 1)
            if ln < 4 or ln > n - pos - 1:
                raise ProtocolViolation(f"invalid message length {ln}")
            end = pos + 1 + ln
            if t == 0x51:  # Query
                text = _utf8(p, pos + 5, end - 1)
                it = _request(QUERY, now)
                it.text = text
                self._push(it)
                self.expect_rfq += 1
                if self.on_query is not None and _worth_a_look(p, pos + 5, end - 1, not self.fences_only):
                    self.on_query(text)
            elif t == 0x42:  # Bind
                z1 = _nul(p, end, pos + 5)
                z2 = _nul(p, end, z1 + 1)
                stmt = _utf8(p, z1 + 1, z2)
                bind = data[pos + 5 : end]
                if z1 == pos + 5:
                    self._has_unnamed = True
                    self._u_stmt = stmt
                    self._u_bind = bind
                else:
                    self._named_portals[_utf8(p, pos + 5, z1)] = (stmt, bind)
                self.unsynced = True
                self.bind_count += 1
                if renamer is not None:
                    srv = None
                    if z2 > z1 + 1:
                        if out is None:
                            out = []
                        out.append(data[last:pos])
                        last = pos
                        srv = renamer.use(self, stmt, self.prepared, now, out)
                    self._push(_request(BIND, now))
                    if srv is not None:
                        out.append(_bind_renamed(p, pos, z1, z2, end, <bytes>srv))
                        last = end
            elif t == 0x45:  # Execute
                z1 = _nul(p, end, pos + 5)
                if z1 == pos + 5:
                    if self._has_unnamed:
                        stmt = self._u_stmt
                        bind = self._u_bind
                    else:
                        stmt = ""
                        bind = b""
                else:
                    pb = self._named_portals.get(_utf8(p, pos + 5, z1), _NO_PORTAL)
                    stmt = (<tuple>pb)[0]
                    bind = (<tuple>pb)[1]
                it = _request(EXECUTE, now)
                it.text = self._stmt_texts.get(stmt, "")
                it.stmt = stmt
                it.bind = bind
                self._push(it)
                self.unsynced = True
            elif t == 0x53:  # Sync
                self._push(_request(SYNC, now))
                self.expect_rfq += 1
                self.unsynced = False
            elif t == 0x50:  # Parse
                z1 = _nul(p, end, pos + 5)
                z2 = _nul(p, end, z1 + 1)
                name = _utf8(p, pos + 5, z1)
                text = self._parse_text_of(p, z1 + 1, z2)
                self._stmt_texts[name] = text
                self.unsynced = True
                self.client_parse_count += 1
                if self.on_query is not None and _worth_a_look(p, z1 + 1, z2, not self.fences_only):
                    self.on_query(text)
                if renamer is None or z1 == pos + 5:
                    self.server_parse_count += 1  # forwarded as it is (named ones: see the renamer)
                if renamer is not None:
                    if z1 > pos + 5:
                        if out is None:
                            out = []
                        out.append(data[last:pos])
                        renamer.parse(self, name, data[z1 + 1 : end], self.prepared, now, out)
                        last = end
                    else:
                        self._push(_request(PARSE, now))
            elif t == 0x43:  # Close
                name = _utf8(p, pos + 6, end - 1)
                if _byte(p, n, pos + 5) == 0x53:  # a statement
                    self._stmt_texts.pop(name, None)
                    if renamer is not None and len(name):  # never close a statement others may share
                        if out is None:
                            out = []
                        out.append(data[last:pos])
                        last = end
                        renamer.close(self, name, now)
                        pos = end
                        continue
                elif len(name):
                    self._named_portals.pop(name, None)
                else:
                    self._has_unnamed = False
                    self._u_stmt = self._u_bind = None
                self.unsynced = True
                if renamer is not None:
                    self._push(_request(CLOSE, now))
            elif t == 0x44:  # Describe
                self.unsynced = True
                if renamer is not None:
                    srv = None
                    if _byte(p, n, pos + 5) == 0x53:
                        name = _utf8(p, pos + 6, end - 1)
                        if len(name):
                            if out is None:
                                out = []
                            out.append(data[last:pos])
                            last = pos
                            srv = renamer.use(self, name, self.prepared, now, out)
                    self._push(_request(DESCRIBE, now))
                    if srv is not None:
                        m = PyBytes_GET_SIZE(<bytes>srv)
                        body = PyBytes_FromStringAndSize(NULL, m + 2)
                        (<unsigned char*>PyBytes_AS_STRING(body))[0] = 0x53
                        memcpy(PyBytes_AS_STRING(body) + 1, PyBytes_AS_STRING(<bytes>srv), m)
                        (<unsigned char*>PyBytes_AS_STRING(body))[m + 1] = 0
                        out.append(_frame(0x44, _ptr(body), m + 2))
                        last = end
            elif t == 0x48:  # Flush
                self.unsynced = True
            elif t == 0x46:  # FunctionCall
                self._push(_request(FUNCTION_CALL, now))
                self.expect_rfq += 1
            # CopyData/CopyDone/CopyFail and anything else: forwarded as is
            pos = end
        if out is None:
            return data
        out.append(data[last:])
        return b"".join(out)

    cpdef answer_locally(self, data):
        """Transaction mode, no server held: answer a prepare-only batch (named Parses + Sync)
        without a server, or return None when the batch needs one."""
        cdef bytes b = _as_bytes(data)
        renamer = self.renamer
        if renamer is None or PyBytes_GET_SIZE(b) == 0 or _ptr(b)[0] != 0x50 or not self._releasable() \
                or self._pending():
            return None  # (such a batch starts with a Parse)
        found = renamer.prepare_only(b)
        if found is None:
            return None
        for name, text, _ in found:
            if self.on_query is not None and worth_a_look(text, not self.fences_only):
                self.on_query(text)
            self._stmt_texts[name] = text
        self.query_count += 1  # a round trip, answered here
        self.client_parse_count += len(found)
        return _PARSE_COMPLETE * len(found) + _READY_IDLE

    def wind_up(self, double now):
        """The client is gone: what to send so that the server answers everything it owes
        (see relay.PyRelay.wind_up)."""
        out = b""
        if self.copy_in:
            out += _COPY_FAIL
        if self.unsynced:
            out += _SYNC
        self.on_query = None
        self.emit = None  # what the server still says belongs to no client
        return self._track(out, now) if out else out


cdef bytes _bind_renamed(const unsigned char* p, Py_ssize_t pos, Py_ssize_t z1, Py_ssize_t z2, Py_ssize_t end,
                         bytes srvname):
    """The Bind at ``pos`` with its statement name replaced: portal name and NUL, ``srvname``,
    the rest from the statement name's NUL on."""
    cdef Py_ssize_t a = z1 + 1 - (pos + 5), s = PyBytes_GET_SIZE(srvname)
    cdef Py_ssize_t c = end - z2 if end > z2 else 0
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 5 + a + s + c)
    cdef unsigned char* q = <unsigned char*>PyBytes_AS_STRING(out)
    cdef uint32_t ln = <uint32_t>(4 + a + s + c)
    q[0] = 0x42
    q[1] = (ln >> 24) & 0xFF
    q[2] = (ln >> 16) & 0xFF
    q[3] = (ln >> 8) & 0xFF
    q[4] = ln & 0xFF
    memcpy(q + 5, p + pos + 5, a)
    memcpy(q + 5 + a, PyBytes_AS_STRING(srvname), s)
    if c:
        memcpy(q + 5 + a + s, p + z2, c)
    return out


# ------------------------------------------------------------------ the record queue

cdef class EventSink:
    """The compiled twin of proxy.inspect.pipeline.PyEventSink: the relay's records, bounded.

    ``emit`` is what the relay calls for every record (a C call, no Python
    frame); the records are kept in a list from ``_head`` on.
    """


    def __init__(self, Py_ssize_t maxsize=10000):
        self._q = []
        self._head = 0
        self.maxsize = maxsize
        self.dropped = 0
        self._kick_at = -1  # queue length that triggers on_batch (-1: never)
        self.on_batch = None

    def set_batch_callback(self, Py_ssize_t batch, callback):
        self.on_batch = callback
        self._kick_at = batch - 1 if callback is not None and batch > 0 else -1

    def emit(self, event):
        cdef Py_ssize_t n = PyList_GET_SIZE(self._q) - self._head
        if n < self.maxsize:
            self._q.append(event)
            if n == self._kick_at:
                self.on_batch()
        else:
            self.dropped += 1

    def drain(self, Py_ssize_t limit=1 << 30):
        cdef list q = self._q
        cdef Py_ssize_t head = self._head, n = PyList_GET_SIZE(q)
        cdef list out
        if limit >= n - head:
            out = q[head:] if head else q
            self._q = []
            self._head = 0
            return out
        out = q[head:head + limit]
        head += limit
        if head > 4096 and head * 2 > n:  # drop what was drained, now and then
            del q[:head]
            head = 0
        self._head = head
        return out

    def __len__(self):
        return PyList_GET_SIZE(self._q) - self._head


# ------------------------------------------------------------------ histograms

from libc.stdlib cimport free, malloc


cdef class Hist:
    """The compiled twin of proxy.hist.PyHist (the same fields and methods; see there).

    Here because every layer may use it and the protocol is the bottom one; the
    pool's checkout observes into it with a C call, and observe_many (the inspection
    statistics) counts per bucket in C.
    proxy.hist.Hist subclasses it to give ``buckets`` its default.
    """

    def __cinit__(self, *args, **kwargs):
        self._bounds = NULL
        self._nb = 0

    def __init__(self, buckets):
        cdef Py_ssize_t i
        self.buckets = tuple(buckets)
        self._nb = len(self.buckets)
        free(self._bounds)
        self._bounds = <double*>malloc((self._nb + 1) * sizeof(double))
        if self._bounds == NULL:
            raise MemoryError()
        for i in range(self._nb):
            self._bounds[i] = self.buckets[i]
        self.counts = [0] * (self._nb + 1)
        self.sum = 0.0
        self.count = 0

    def __dealloc__(self):
        free(self._bounds)

    cdef Py_ssize_t _bucket(self, double value) noexcept:
        """bisect_left over the bounds: a value equal to a bound belongs to that bucket (le)."""
        cdef Py_ssize_t lo = 0, hi = self._nb, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._bounds[mid] < value:
                lo = mid + 1
            else:
                hi = mid
        return lo

    cdef int observe_c(self, double value) except -1:
        cdef Py_ssize_t i = self._bucket(value)
        self.counts[i] = self.counts[i] + 1
        self.sum += value
        self.count += 1
        return 0

    def observe(self, double value):
        self.observe_c(value)

    def observe_many(self, values, total=None):
        """Observe every value of ``values`` (``total``: their sum, if known)."""
        cdef Py_ssize_t i, n = 0
        cdef double v, s = 0.0
        cdef list counts = self.counts
        cdef long long* add = <long long*>malloc((self._nb + 1) * sizeof(long long))
        if add == NULL:
            raise MemoryError()
        try:
            for i in range(self._nb + 1):
                add[i] = 0
            for x in values:
                v = x
                add[self._bucket(v)] += 1
                s += v
                n += 1
            for i in range(self._nb + 1):
                if add[i]:
                    counts[i] = counts[i] + add[i]
        finally:
            free(add)
        self.sum += s if total is None else <double>total
        self.count += n

    def cumulative(self):
        """[(le, cumulative count)] including "+Inf", as Prometheus wants."""
        out = []
        acc = 0
        for bound, c in zip(self.buckets, self.counts):
            acc += c
            out.append((repr(float(bound)), acc))
        acc += self.counts[self._nb]
        out.append(("+Inf", acc))
        return out
