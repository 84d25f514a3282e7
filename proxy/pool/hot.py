"""The pool's per-transaction path: a server's reads while a client owns it, a checkout that
need not wait, a release.

``ServerCore`` is the base class of ``proxy.pool.upstream.ServerConn`` and
``PoolCore`` of ``proxy.pool.pool.Pool``: the compiled twins (``_hot.pyx``,
typed fields, no Python frames) when built, else ``PyServerCore`` and
``PyPoolCore`` below, the reference.  Both run the same steps in the same
order; the pool and session tests run on both (``PGSCOPE_NO_EXTENSIONS=1``).
"""

from __future__ import annotations

import time
from typing import Any

from proxy.pool import limits
from proxy.pool.turns import LARGE_READ
from proxy.protocol.native import twins

_monotonic = time.monotonic


class PyServerCore:
    """An upstream connection's hot path.  Fields: ``owner`` (the client session relaying through
    it, or None: internal mode), ``transport``, ``closed``."""

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is not None:
            owner.server_data(data)
            if len(data) >= LARGE_READ:
                self.take_turn()  # proxy.pool.turns
            return
        self._internal_data(data)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)


class PyPoolCore:
    """A pool's checkout without waiting and its release.  Fields: ``cfg``, ``idle``, ``active``,
    ``waiters``, ``closed``, ``capped``, ``paused``, ``retire_before``, ``dbname``, ``mgr``,
    ``wait_hist``, ``fences`` (the manager's).  The compiled twin copies the settings it reads
    from ``cfg`` when ``cfg`` is set (a PoolConfig is frozen: a change is a new one, assigned)."""

    def take_idle_now(self, prefer: Any = None) -> Any:
        """A ready idle server without waiting (no health check due), or None; ``prefer`` (the
        client's previous server: its settings synced, its statements prepared) when it is idle."""
        cfg = self.cfg
        idle = self.idle
        if prefer is not None and not cfg.server_round_robin and idle and idle[-1] is not prefer \
                and prefer.pool is self:
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
            self.wait_hist.observe(0.0)
            return srv
        return None

    def release(self, srv: Any) -> None:
        """Give back a server that is clean (idle, nothing owed)."""
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
        waiters = self.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(srv)
                return
        if self.capped and limits.starved(self):  # another pool of its group waits at the cap: make room
            self._drop(srv, limits.EVICTED)
            return
        self.active.discard(srv)
        if self.cfg.server_round_robin:
            self.idle.appendleft(srv)  # taken last: the others go first, in turn
        else:
            self.idle.append(srv)


ServerCore, PoolCore = twins("proxy.pool._hot", "pool core", ServerCore=PyServerCore, PoolCore=PyPoolCore)
