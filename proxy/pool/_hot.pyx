# cython: language_level=3
"""The compiled twin of proxy/pool/hot.py (PyServerCore, PyPoolCore): the same steps in the same order.

The hot fields are C fields of these base classes (``ServerConn`` and ``Pool``
subclass them) and the clock is read with clock_gettime (the clock behind
time.monotonic).  Keep the two in step: the pool and session tests run on both.  The fields are
declared in _hot.pxd.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from libc.math cimport INFINITY

from proxy.pool import limits
from proxy.pool import turns

cdef Py_ssize_t LARGE_READ = turns.LARGE_READ

cdef extern from "sys/socket.h" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    int MSG_NOSIGNAL

try:  # the transports whose socket put() may write to itself (see Sender.put)
    from uvloop.loop import TCPTransport as _TCP, UnixTransport as _UNIX
    _PLAIN = (_TCP, _UNIX)
except ImportError:  # pragma: no cover
    _PLAIN = ()


cdef inline double _monotonic() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef class Sender:
    """A connection's ``transport``, and its bound ``write`` kept when it is set (a write is then
    a call, not an attribute lookup and a call).  The base of ServerCore and the session's core."""

    def __cinit__(self, *args, **kwargs):
        self._fd = -1  # (no transport yet)

    @property
    def transport(self):
        return self._transport

    @transport.setter
    def transport(self, transport):
        self._transport = transport
        self._send = transport.write if transport is not None else None
        self._fd = -1
        self._is_closing = self._queued = None
        if transport is not None and type(transport) in _PLAIN:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.fileno() >= 0:
                self._fd = sock.fileno()
                # unbound: one object per transport type, shared by every connection, so that a
                # put touches no per-connection object but the transport itself
                self._is_closing = type(transport).is_closing
                self._queued = type(transport).get_write_buffer_size

    cdef int put(self, data) except -1:
        """``transport.write(data)``, in one send() of its own when it can be: a plain uvloop
        transport (``_fd``), still open on the same socket, nothing queued in it that must go
        first, ``data`` bytes.  What send() leaves (the socket's buffer full), or an error, goes
        to ``transport.write``, which queues it, applies back-pressure and reports errors as it
        always does.  Saves uvloop's write path (a list, a Python-level try-write) per message."""
        cdef Py_ssize_t n, sent
        cdef object transport
        if self._fd >= 0 and type(data) is bytes:
            n = PyBytes_GET_SIZE(data)
            transport = self._transport
            # not closing, nothing queued before these bytes.  Not closing also means the socket
            # is still this transport's: uvloop closes a connected transport's socket only after
            # close(), abort() or a fatal error set it closing (UVBaseTransport: the socket goes
            # in _call_connection_lost, which only those schedule), so the number cannot be
            # another connection's yet
            if n and not self._is_closing(transport) and self._queued(transport) == 0:
                sent = send(self._fd, PyBytes_AS_STRING(data), <size_t>n, MSG_NOSIGNAL)
                if sent == n:
                    return 0
                if sent > 0:
                    data = data[sent:]
        self._send(data)
        return 0

    cdef int take_server_data(self, data) except -1:
        """A read from the server this client session owns: the session's core overrides it, so
        that a server's read reaches its session with a C call."""
        raise NotImplementedError


cdef class ServerCore(Sender):
    """ServerConn's hot path: its reads while a client owns it, its writes."""

    def data_received(self, data):
        owner = self.owner
        if owner is not None:
            if isinstance(owner, Sender):  # the session's core
                (<Sender>owner).take_server_data(data)
            else:
                owner.server_data(data)
            if len(data) >= LARGE_READ:
                self.take_turn()  # proxy.pool.turns
            return
        self._internal_data(data)

    cpdef write(self, data):
        if self._send is not None and not self.closed:
            Sender.put(self, data)


cdef class Waiter:
    """What a Handoff can answer with a C call instead of calling ``deliver``."""

    cdef int handed(self, object srv, double waited) except -1:
        raise NotImplementedError


cdef class PoolCore:
    """Pool's checkout without waiting and its release."""

    @property
    def cfg(self):
        return self._cfg

    @cfg.setter
    def cfg(self, cfg):
        self._cfg = cfg
        self.pool_size = cfg.pool_size
        self.reserve_pool_size = cfg.reserve_pool_size
        self.query_wait_timeout = cfg.query_wait_timeout
        self.server_lifetime = cfg.server_lifetime
        self.server_check_delay = cfg.server_check_delay
        self.server_check_query = bool(cfg.server_check_query)
        self.reset_always = bool(cfg.server_reset_query_always and cfg.server_reset_query)
        self.round_robin = bool(cfg.server_round_robin)

    @property
    def idle(self):
        return self._idle

    @idle.setter
    def idle(self, idle):
        self._idle = idle
        self._idle_pop = idle.pop
        self._idle_append = idle.append

    @property
    def waiters(self):
        return self._waiters

    @waiters.setter
    def waiters(self, waiters):
        self._waiters = waiters
        self._waiters_popleft = waiters.popleft
        self._waiters_append = waiters.append

    cpdef take_idle_now(self, prefer=None):
        cdef ServerCore srv
        cdef double now
        idle = self._idle
        if prefer is not None and not self.round_robin and idle and idle[-1] is not prefer \
                and (<ServerCore?>prefer).pool is self:
            try:
                idle.remove(prefer)
                idle.append(prefer)
            except ValueError:  # in use by another client, or closed
                pass
        while idle:
            srv = idle[-1]
            now = _monotonic()
            if srv.closed:
                self._idle_pop()
                continue
            if (self.server_lifetime > 0 and now - srv.created > self.server_lifetime) or \
                    (self.server_check_query and now - srv.last_used > self.server_check_delay):
                return None  # the async path closes or checks it
            self._idle_pop()
            self.active.add(srv)
            self.wait_hist.observe_c(0.0)
            return srv
        return None

    cpdef release(self, ServerCore srv):
        srv.owner = None
        srv.last_used = _monotonic()
        if srv.read_paused:
            srv.reading_paused(False)
        if srv.closed:  # the pool forgot it when it closed
            return
        if self.closed:
            self._drop(srv, "pool closed")
            return
        if srv.created < self.retire_before:
            self._drop(srv, "paused" if self.paused else "RECONNECT: closed once released")
            return
        if self.fences and self.dbname in self.fences:
            self._drop(srv, "database fenced: a statement needs it without other connections")
            return
        waiters = self._waiters
        while waiters:
            fut = self._waiters_popleft()
            if type(fut) is Handoff:  # (a C call; acquire's futures below)
                if not (<Handoff>fut)._done:
                    Handoff.set_result(<Handoff>fut, srv)
                    return
            elif not fut.done():
                fut.set_result(srv)
                return
        if self.capped and limits.starved(self):  # another pool of its group waits at the cap: make room
            self._drop(srv, limits.EVICTED)
            return
        self.active.discard(srv)
        if self.round_robin:
            self._idle.appendleft(srv)  # taken last: the others go first, in turn
        else:
            self._idle_append(srv)


cdef class Handoff:
    """The compiled twin of proxy.pool.handoff.PyHandoff: a client queued for a full pool's next
    server, answered by a callback (see there), or by a C call to ``waiter`` when it has one."""

    def __init__(self, PoolCore pool, deliver, double t0, double deadline, Waiter waiter=None):
        self.pool = pool
        self.deliver = deliver
        self.waiter = waiter
        self.t0 = t0
        self.deadline = deadline
        self._done = False

    def done(self):
        return self._done

    def cancelled(self):
        return False

    cdef _answer(self, srv, double waited):
        if self.waiter is not None:
            self.waiter.handed(srv, waited)
        else:
            self.deliver(srv, waited)

    cpdef set_result(self, srv):
        cdef double waited = 0.0
        cdef PoolCore pool = self.pool
        if self._done:
            return
        self._done = True
        pool.waiting -= 1
        if srv is not None:
            waited = _monotonic() - self.t0
            pool.wait_hist.observe_c(waited)
        self._answer(srv, waited)

    def withdraw(self):
        if self._done:
            return
        self._done = True
        self.pool.waiting -= 1
        try:
            self.pool.waiters.remove(self)
        except ValueError:
            pass

    def expire(self):
        if self._done:
            return
        self.withdraw()
        self._answer(self.pool._wait_timeout(), -1.0)


cpdef wait_nowait(PoolCore pool, deliver, Waiter waiter=None):
    """The compiled twin of proxy.pool.handoff.py_wait_nowait; a ``waiter`` is answered with a C
    call instead of ``deliver`` (which may then be None)."""
    cdef double t0, qwt
    cdef Handoff h
    if (pool._idle or pool.paused or pool.closed or pool.capped or pool.retired or pool.reserve_pool_size > 0
            or pool.connecting + len(pool.active) < pool.pool_size):
        return None
    t0 = _monotonic()
    qwt = pool.query_wait_timeout
    h = Handoff.__new__(Handoff)  # (the fields set in C: __init__ would parse its arguments)
    h.pool = pool
    h.deliver = deliver
    h.waiter = waiter
    h.t0 = t0
    h.deadline = t0 + qwt if qwt > 0 else INFINITY
    if qwt > 0 and (pool._expiry is None or h.deadline < pool._expiry_at):  # (lowered by SIGHUP)
        from proxy.pool.handoff import _arm
        _arm(pool, h.deadline)
    pool._waiters_append(h)
    pool.waiting += 1
    return h
