# cython: language_level=3
"""The compiled twin of proxy/pool/hot.py (PyServerCore, PyPoolCore): the same steps in the same order.

The hot fields are C fields of these base classes (``ServerConn`` and ``Pool``
subclass them) and the clock is read with clock_gettime (the clock behind
time.monotonic).  Keep the two in step: the pool and session tests run on both.  The fields are
declared in _hot.pxd.
"""

from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from libc.math cimport INFINITY

from bisect import bisect_left

from proxy.pool import limits


cdef inline double _monotonic() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef class ServerCore:
    """ServerConn's hot path: its reads while a client owns it, its writes."""

    def data_received(self, data):
        owner = self.owner
        if owner is not None:
            owner.server_data(data)
            return
        self._internal_data(data)

    cpdef write(self, data):
        if self.transport is not None and not self.closed:
            self.transport.write(data)


cdef class PoolCore:
    """Pool's checkout without waiting and its release."""

    cpdef take_idle_now(self, prefer=None):
        cdef ServerCore srv
        cdef double now
        cfg = self.cfg
        idle = self.idle
        if prefer is not None and idle and idle[-1] is not prefer and (<ServerCore?>prefer).pool is self:
            try:
                idle.remove(prefer)
                idle.append(prefer)
            except ValueError:  # in use by another client, or closed
                pass
        while idle:
            srv = idle[-1]
            now = _monotonic()
            if srv.closed:
                idle.pop()
                continue
            if (cfg.server_lifetime > 0 and now - srv.created > cfg.server_lifetime) or \
                    (cfg.server_check_query and now - srv.last_used > cfg.server_check_delay):
                return None  # the async path closes or checks it
            idle.pop()
            self.active.add(srv)
            h = self.wait_hist  # observe(0.0), inlined: the first bucket
            h.counts[0] += 1
            h.count += 1
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
        mgr = self.mgr
        if mgr.fences and self.dbname in mgr.fences:
            self._drop(srv, "database fenced: a statement needs it without other connections")
            return
        waiters = self.waiters
        while waiters:
            fut = waiters.popleft()
            if type(fut) is Handoff:  # (a C call; acquire's futures below)
                if not (<Handoff>fut)._done:
                    (<Handoff>fut).set_result(srv)
                    return
            elif not fut.done():
                fut.set_result(srv)
                return
        if self.capped and limits.starved(self):  # another pool of its group waits at the cap: make room
            self._drop(srv, limits.EVICTED)
            return
        self.active.discard(srv)
        self.idle.append(srv)


cdef class Handoff:
    """The compiled twin of proxy.pool.handoff.PyHandoff: a client queued for a full pool's next
    server, answered by a callback (see there)."""

    def __init__(self, PoolCore pool, deliver, double t0, double deadline):
        self.pool = pool
        self.deliver = deliver
        self.t0 = t0
        self.deadline = deadline
        self._done = False

    def done(self):
        return self._done

    def cancelled(self):
        return False

    def _finish(self):
        self._done = True
        pool = self.pool
        pool.mgr.waiting -= 1
        pool.waiting -= 1

    cpdef set_result(self, srv):
        cdef double waited = 0.0
        if self._done:
            return
        self._done = True
        pool = self.pool
        pool.mgr.waiting -= 1
        pool.waiting -= 1
        if srv is not None:
            waited = _monotonic() - self.t0
            h = pool.wait_hist  # Hist.observe, inlined
            h.counts[bisect_left(h.buckets, waited)] += 1
            h.sum += waited
            h.count += 1
        self.deliver(srv, waited)

    def withdraw(self):
        if self._done:
            return
        self._finish()
        try:
            self.pool.waiters.remove(self)
        except ValueError:
            pass

    def expire(self):
        if self._done:
            return
        self.withdraw()
        self.deliver(self.pool._wait_timeout(), -1.0)


cpdef wait_nowait(PoolCore pool, deliver):
    """The compiled twin of proxy.pool.handoff.py_wait_nowait."""
    cdef double t0, qwt
    cdef Handoff h
    cfg = pool.cfg
    if (pool.idle or pool.paused or pool.closed or pool.capped or pool.retired or cfg.reserve_pool_size > 0
            or pool.connecting + len(pool.active) < cfg.pool_size):
        return None
    t0 = _monotonic()
    qwt = cfg.query_wait_timeout
    h = Handoff(pool, deliver, t0, t0 + qwt if qwt > 0 else INFINITY)
    if qwt > 0 and (pool._expiry is None or h.deadline < pool._expiry_at):  # (lowered by SIGHUP)
        from proxy.pool.handoff import _arm
        _arm(pool, h.deadline)
    pool.waiters.append(h)
    pool.mgr.waiting += 1
    pool.waiting += 1
    return h
