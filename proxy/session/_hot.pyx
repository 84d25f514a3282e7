# cython: language_level=3
"""The compiled twin of proxy/session/hot.py's PySessionCore: the same steps in the same order.

The session's hot fields are C fields of this base class (``ClientSession``
subclasses it), the clock is read with clock_gettime (the clock behind
time.monotonic), and the hot path runs without Python frames.  Keep the two
in step: the session tests run on both.
"""

from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from proxy.pool._hot cimport PoolCore, Sender, ServerCore, Waiter, wait_nowait
from proxy.protocol._core cimport Relay

import asyncio

from proxy.pool import turns
from proxy.protocol.errors import PgError, ProtocolViolation
from proxy.session import states
from proxy.session.states import ClientState

cdef object IDLE = ClientState.IDLE
cdef object WAITING = ClientState.WAITING
cdef object ACTIVE = ClientState.ACTIVE
cdef object TERMINATING = ClientState.TERMINATING
cdef object CLOSED = ClientState.CLOSED
cdef Py_ssize_t WAIT_BUFFER = states.WAIT_BUFFER
cdef Py_ssize_t LARGE_READ = turns.LARGE_READ


cdef inline double _monotonic() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef class SessionCore


# Calls between these classes name the class (``BindingCore.release(b)``): a C call.  Through the
# instance (``b.release()``) a cpdef method first looks for a Python override on the subclass's
# instance, a dictionary lookup that misses whenever the instance's __dict__ changed.

cdef class BindingCore(Waiter):
    """Binding's fields and its per-transaction step (proxy/session/binding.py has the rest)."""
    cdef public SessionCore owner  # the client session: the server hands its reads to it
    cdef public PoolCore pool
    cdef public object wanted  # the client's session settings (a dict shared per set)
    cdef public ServerCore server
    cdef public list pending  # the client's messages waiting for a server
    cdef public ServerCore last  # the server of the client's previous transaction
    cdef public object handoff  # queued in a full pool without a task (proxy.pool.handoff)

    cpdef attach(self, ServerCore srv, Relay relay, double waited):
        self.server = srv
        srv.owner = self.owner
        Relay.attach(relay, srv.pid, srv.prepared, waited)

    cpdef release(self):
        cdef ServerCore srv = self.server
        if srv is None:
            return
        self.server = None
        self.last = srv
        srv.tx_status = "I"
        pool = self.pool
        if pool.reset_always:  # server_reset_query_always (and a reset query)
            # reset after every transaction, before another client can have the server
            srv.owner = None
            pool.mgr.spawn(pool.release_after_session(srv))
            return
        PoolCore.release(pool, srv)

    cpdef wait(self, srv=None):
        if srv is not None:
            asyncio.get_running_loop().create_task(self.attach_later(srv=srv))
            return
        h = wait_nowait(self.pool, None, self)  # answered by handed, a C call
        if h is None:
            asyncio.get_running_loop().create_task(self.attach_later())
        else:
            self.handoff = h

    def _handed(self, srv, double waited):
        self.handed(srv, waited)

    cdef int handed(self, object srv, double waited) except -1:
        cdef SessionCore session = self.owner
        self.handoff = None
        try:
            if srv is None:
                asyncio.get_running_loop().create_task(self.attach_later(kicked=True))
            elif waited < 0:  # a PgError: query_wait_timeout
                session.fail(srv)
            elif session.state is CLOSED:
                PoolCore.release(self.pool, srv)
            elif (<ServerCore?>srv).applied is not self.wanted and (<ServerCore>srv).applied != self.wanted:
                asyncio.get_running_loop().create_task(self.attach_later(srv=srv))  # a round trip: a task
            else:
                BindingCore._go(self, srv, waited)
        except Exception as e:  # never into the releasing client's path
            session.ctx.log.error("handoff_failed", client_id=session.id, error=repr(e))
            session.close("internal error")
        return 0

    cpdef _go(self, ServerCore srv, double waited):
        cdef SessionCore session = self.owner
        cdef Relay relay = <Relay?>session.relay
        BindingCore.attach(self, srv, relay, waited)
        session.state = ACTIVE  # WAITING -> ACTIVE (in the table; assigned directly on the hot path)
        pending = b"".join(self.pending)
        del self.pending[:]  # (list.clear would be a call by name)
        try:
            ServerCore.write(srv, Relay.track(relay, pending, _monotonic()))
        except PgError as e:
            session.fail(e)
            return
        if relay.to_client:
            SessionCore._flush_made_up(session)
        if session.reading_paused and session._transport is not None and session.state is not CLOSED:
            session._transport.resume_reading()
            session.reading_paused = False


cdef class SessionCore(Sender):
    cdef public object ctx
    cdef public object state
    cdef public object relay
    cdef public BindingCore binding
    cdef public object fences
    cdef public list fence_dbs  # fences.dbs (the same list)
    cdef public object close_reason
    cdef public bint transaction_mode
    cdef public bint pinned
    cdef public bint closing
    cdef public bint reading_paused
    cdef public double last_active

    def data_received(self, data):
        cdef object state = self.state
        cdef double now
        cdef Relay relay
        if state is ACTIVE or state is IDLE or state is WAITING:
            relay = <Relay?>self.relay
            now = _monotonic()
            self.last_active = now
            try:
                if self.transaction_mode:
                    chunk = Relay.frame_client(relay, data)
                    if chunk:
                        if state is ACTIVE:
                            Sender.put(self.binding.server, Relay.track(relay, chunk, now))
                        else:
                            answer = relay.answer_locally(chunk) if state is IDLE else None
                            if answer is not None:
                                SessionCore._write(self, answer)
                            else:
                                SessionCore._queue_for_server(self, chunk, now)
                    if relay.to_client:
                        SessionCore._flush_made_up(self)
                else:
                    out = Relay.from_client(relay, data, now)
                    if out:
                        Sender.put(self.binding.server, out)
            except PgError as e:  # protocol violation, or a refused statement
                self.fail(e)
                return
            if relay._client_framer.stopped:  # relay.terminated
                self._terminate()
            elif self.fence_dbs and self.state is IDLE:
                self.fences.lift()  # answered locally: nothing ran
            if len(data) >= LARGE_READ:
                self.take_turn()  # proxy.pool.turns
            return
        self._login_data(data, state)

    def server_data(self, data):
        SessionCore.take_server_data(self, data)

    cdef int take_server_data(self, data) except -1:
        """A read from its server (ServerCore.data_received calls this in C; see hot.py)."""
        cdef double now
        cdef Relay relay = <Relay?>self.relay
        now = _monotonic()
        self.last_active = now
        try:
            out = Relay.from_server(relay, data, now)
        except ProtocolViolation as e:
            self._server_broken(e.message)
            return 0
        if out:
            if relay._releasable() and self.state is ACTIVE and self.transaction_mode and not self.pinned \
                    and not self.fence_dbs:
                # the transaction is over: its server goes to the next client before this one's answer
                # is written (see hot.py)
                SessionCore._release_server(self)
                Sender.put(self, out)
                if self.closing:
                    self.close(self.close_reason or "shutdown")
                return 0
            Sender.put(self, out)
        if self.fence_dbs and relay._answered():
            self.fences.lift()
        if self.state is TERMINATING and (relay.expect_rfq == 0 or relay.copy_in):
            self.close("client terminated")
            return 0
        if relay._releasable():
            if self.transaction_mode and not self.pinned and self.state is ACTIVE:
                SessionCore._release_server(self)
            if self.closing:
                self.close(self.close_reason or "shutdown")
        return 0

    cpdef _release_server(self):
        if self.fence_dbs:
            self.fences.lift()
        BindingCore.release(self.binding)
        self.state = IDLE  # ACTIVE -> IDLE (in the table; assigned directly on the hot path)

    cpdef _queue_for_server(self, out, double now):
        cdef BindingCore binding = self.binding
        cdef ServerCore srv
        cdef Relay relay
        if self.state is IDLE:
            srv = PoolCore.take_idle_now(binding.pool, binding.last)
            if srv is not None:
                applied = srv.applied
                wanted = binding.wanted
                if applied is wanted or applied == wanted:
                    relay = <Relay?>self.relay  # the fast path: no task, no wait
                    BindingCore.attach(binding, srv, relay, 0.0)
                    self.state = ACTIVE  # IDLE -> ACTIVE (in the table; assigned directly on the hot path)
                    ServerCore.write(srv, Relay.track(relay, out, now))
                    return
            self.state = WAITING  # IDLE -> WAITING (in the table; assigned directly on the hot path)
            BindingCore.wait(binding, srv)
        pending = binding.pending
        pending.append(out)
        # the client keeps being read while it waits (a Terminate or a close is seen at once,
        # and no epoll change per transaction), until what waits is more than it should hold
        if len(pending) > 1 and not self.reading_paused and sum(map(len, pending)) > WAIT_BUFFER:
            self._transport.pause_reading()
            self.reading_paused = True

    cpdef _flush_made_up(self):
        cdef Relay relay = <Relay?>self.relay
        out = b"".join(relay.to_client)
        relay.to_client.clear()
        SessionCore._write(self, out)

    cpdef _write(self, data):
        transport = self._transport
        if transport is not None and not transport.is_closing():
            Sender.put(self, data)
