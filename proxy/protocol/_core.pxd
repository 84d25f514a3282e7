# The compiled relay core's classes, declared for the other compiled modules (proxy/session/_hot.pyx
# cimports Relay to call it without Python attribute lookups); the code is in _core.pyx.

cdef class Framer:
    cdef bytearray _buf
    cdef Py_ssize_t _pos
    cdef Py_ssize_t _need
    cdef public Py_ssize_t max_size
    cdef public int stop
    cdef public bint stopped

    cdef bytes _whole(self, bytes data)


cdef class Request:
    cdef public int kind
    cdef public object text
    cdef public object stmt
    cdef public object bind
    cdef public double sent
    cdef public Py_ssize_t index
    cdef public Py_ssize_t rows
    cdef public bint swallow
    cdef public object srvname
    cdef public object answer


cdef class RequestLedger


cdef class StatementRenamer:
    cdef public dict defs  # client name -> (server name, Parse tail, server name encoded)
    cdef public Py_ssize_t max_prepared
    cdef public list to_client  # made-up answers due to the client now (the relay's list)
    cdef public object prepared  # the attached server's statements

    cdef int parse(self, RequestLedger led, str name, bytes tail, object prepared, double now,
                   list out) except -1
    cdef object use(self, RequestLedger led, str name, object prepared, double now, list out)
    cdef int close(self, RequestLedger led, str name, double now) except -1
    cdef int made_up(self, RequestLedger led, bytes msg, double now) except -1
    cdef int _evict(self, RequestLedger led, object prepared, double now, list out) except -1


cdef class RequestLedger:
    cdef public object client
    cdef public object emit  # None: inspection off, no records are built
    cdef str _tx
    cdef unsigned char _txc
    cdef public Py_ssize_t expect_rfq  # ReadyForQuery messages the server still owes
    cdef public bint unsynced  # extended-protocol messages sent since the last Sync
    cdef public bint in_copy
    cdef public bint copy_in  # the server waits for the client's CopyData
    cdef public bint server_fatal  # the server sent a FATAL/PANIC ErrorResponse
    cdef public object server_pid
    cdef public double pending_wait  # the checkout wait, given to the next statement's record
    cdef public object prepared  # the attached server's statements (an OrderedDict)
    # PgBouncer's SHOW STATS counts for this client (see ledger.TRAFFIC)
    cdef public long long xact_count, query_count, client_parse_count, server_parse_count, bind_count
    cdef public long long bytes_received, bytes_sent
    cdef public double xact_time, query_time  # seconds
    cdef double _query_start, _xact_start  # 0: none under way
    cdef list _reqs  # requests awaiting answers, from _head on
    cdef Py_ssize_t _head
    cdef Framer _server_framer
    cdef double _last_done
    cdef dict _named_portals  # portal -> (statement, Bind body)
    cdef bint _has_unnamed  # the unnamed portal, kept apart: it is nearly every portal
    cdef object _u_stmt
    cdef object _u_bind

    cdef bint _releasable(self)
    cdef bint _answered(self)
    cdef bint _pending(self) noexcept
    cdef Request _front(self)
    cdef int _push(self, Request it) except -1
    cdef Request _pop(self)
    cdef int _complete(self, double now, object word, object rows, object sqlstate, bint empty) except -1
    cdef int _forget_parse(self, Request item) except -1
    cdef int _skip_to_sync(self) except -1
    cdef int _ready(self, unsigned char status, double now) except -1
    cpdef from_server(self, data, double now)


cdef class Relay(RequestLedger):
    cdef dict _stmt_texts  # client's prepared statement name -> text
    cdef Framer _client_framer
    cdef public object on_query  # hook for pooling rules: each Query/Parse text they may act on (hint.py)
    cdef public bint fences_only  # on_query is the DROP DATABASE fence alone (session mode): hint.might_fence
    cdef public StatementRenamer renamer
    cdef public list to_client  # made-up answers due to the client now
    cdef bytes _parse_raw  # the last Parse text, as sent and decoded
    cdef str _parse_text

    cpdef attach(self, server_pid, prepared, double waited)
    cpdef from_client(self, data, double now)
    cpdef frame_client(self, data)
    cpdef track(self, data, double now)
    cpdef answer_locally(self, data)
    cdef str _parse_text_of(self, const unsigned char* p, Py_ssize_t a, Py_ssize_t b)
    cdef bytes _track(self, bytes data, double now)


cdef class EventSink:
    cdef list _q
    cdef Py_ssize_t _head
    cdef public Py_ssize_t maxsize
    cdef public Py_ssize_t dropped
    cdef Py_ssize_t _kick_at
    cdef public object on_batch


cdef class Hist:
    cdef public tuple buckets
    cdef public list counts  # per bucket (not cumulative), the last one +Inf
    cdef public double sum
    cdef public long long count
    cdef double* _bounds  # buckets as C doubles
    cdef Py_ssize_t _nb

    cdef Py_ssize_t _bucket(self, double value) noexcept
    cdef int observe_c(self, double value) except -1
