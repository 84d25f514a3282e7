# The fields and C-level methods of proxy/pool/_hot.pyx's classes, for the session's core to use
# them typed (proxy/session/_hot.pyx cimports them).

from proxy.protocol._core cimport Hist

cdef class Sender:
    # a connection's transport (the ``transport`` property: setting it also keeps its bound write)
    cdef object _transport
    cdef object _send  # transport.write, looked up once per transport
    # a plain uvloop TCP or Unix transport's socket, written to straight with send() while the
    # transport holds nothing queued (put); -1 for any other transport (TLS, another loop)
    cdef int _fd
    cdef object _is_closing, _queued  # the transport type's is_closing, get_write_buffer_size (unbound)

    cdef int take_server_data(self, data) except -1  # (the session's core: its server's reads)
    cdef int put(self, data) except -1  # write to the transport (the hot path's writes)


cdef class ServerCore(Sender):
    cdef public object owner  # the client session relaying through it; None: internal mode
    cdef public bint closed
    cdef public object pool
    cdef public double created
    cdef public double last_used
    cdef public bint read_paused
    cdef public object applied  # settings SET on top of the defaults (a dict shared per set: binding.py)
    cdef public object prepared  # server-side prepared statements (an OrderedDict)
    cdef public object pid
    cdef public object tx_status

    cpdef write(self, data)


cdef class Waiter:
    # what a Handoff answers with a C call (BindingCore); other callers pass a callable
    cdef int handed(self, object srv, double waited) except -1


cdef class PoolCore:
    cdef object _cfg  # (the ``cfg`` property: setting it also copies the fields below)
    # the PoolConfig fields the hot path reads, copied when ``cfg`` is set (a PoolConfig is frozen)
    cdef readonly Py_ssize_t pool_size, reserve_pool_size
    cdef readonly double query_wait_timeout, server_lifetime, server_check_delay
    cdef readonly bint server_check_query, reset_always, round_robin
    # idle and waiters (deques) are properties: setting one also keeps the bound methods the
    # hot path calls (a deque's methods have no C API; a lookup by name costs more than the call)
    cdef object _idle, _idle_pop, _idle_append
    cdef public set active
    cdef object _waiters, _waiters_popleft, _waiters_append
    cdef public bint closed
    cdef public bint capped
    cdef public bint paused
    cdef public double retire_before
    cdef public object dbname
    cdef public object mgr
    cdef public Hist wait_hist
    cdef public dict fences  # the manager's (PoolManager.fences)
    cdef public bint retired
    cdef public Py_ssize_t connecting, waiting
    cdef public object _expiry
    cdef public double _expiry_at

    cpdef take_idle_now(self, prefer=*)
    cpdef release(self, ServerCore srv)


cdef class Handoff:
    cdef public PoolCore pool
    cdef public object deliver  # called with (server or None, seconds waited) or (PgError, -1.0)
    cdef Waiter waiter  # deliver's C twin, when deliver is a Waiter
    cdef public double t0
    cdef public double deadline  # query_wait_timeout (the pool's one timer watches the oldest)
    cdef public bint _done

    cdef _answer(self, srv, double waited)
    cpdef set_result(self, srv)


cpdef wait_nowait(PoolCore pool, deliver, Waiter waiter=*)
