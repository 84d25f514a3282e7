# The fields and C-level methods of proxy/pool/_hot.pyx's classes, for the session's core to use
# them typed (proxy/session/_hot.pyx cimports them).

cdef class ServerCore:
    cdef public object owner  # the client session relaying through it; None: internal mode
    cdef public object transport
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


cdef class PoolCore:
    cdef public object cfg
    cdef public object idle
    cdef public object active
    cdef public object waiters
    cdef public bint closed
    cdef public bint capped
    cdef public bint paused
    cdef public double retire_before
    cdef public object dbname
    cdef public object mgr
    cdef public object wait_hist

    cpdef take_idle_now(self, prefer=*)
    cpdef release(self, ServerCore srv)


cdef class Handoff:
    cdef public PoolCore pool
    cdef public object deliver  # called with (server or None, seconds waited) or (PgError, -1.0)
    cdef public double t0
    cdef public double deadline  # query_wait_timeout (the pool's one timer watches the oldest)
    cdef public bint _done

    cpdef set_result(self, srv)
