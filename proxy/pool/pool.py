"""One (database, user) pool of upstream connections: checkout queue, release, reset, reaping.

A server is on exactly one of a pool's lists: ``idle`` (ready to hand out),
``active`` (attached to a client or being reset/checked), or it is being
connected (``connecting`` counts those).  Waiting clients queue FIFO; a
released server goes straight to the first waiter.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.hist import Hist
from proxy.pool import limits
from proxy.pool import control
from proxy.pool.hot import PoolCore
from proxy.pool.reclaim import wind_up
from proxy.pool.upstream import ServerConn, ServerGone

if TYPE_CHECKING:
    from proxy.pool.manager import PoolManager
from proxy.protocol.errors import ADMIN_SHUTDOWN, PROTOCOL_VIOLATION, PgError


@dataclass(slots=True, frozen=True)
class PoolConfig:
    host: str
    port: int
    pool_size: int = 20
    min_pool_size: int = 0
    reserve_pool_size: int = 0
    reserve_pool_timeout: float = 5.0
    query_wait_timeout: float = 120.0
    server_connect_timeout: float = 15.0
    server_lifetime: float = 3600.0
    server_idle_timeout: float = 600.0
    server_check_delay: float = 30.0
    server_check_query: str = "SELECT 1"
    server_reset_query: str = "DISCARD ALL"
    server_reset_query_always: bool = False
    server_reuse: bool = True  # session mode: False closes a server when its client leaves
    server_round_robin: bool = False  # idle servers handed out in turn (FIFO), not the last released
    server_drain_timeout: float = 5.0
    # PgBouncer's tcp_* settings for new server sockets (proxy.pool.upstream.tune_socket; 0: the kernel's)
    tcp_socket_buffer: int = 0
    tcp_keepalive: bool = True
    tcp_keepidle: int = 0
    tcp_keepintvl: int = 0
    tcp_keepcnt: int = 0
    tcp_user_timeout: int = 0
    pool_mode: str = "session"
    ssl: object | None = None  # an ssl.SSLContext for upstream TLS (server_tls_mode)
    ssl_required: bool = False


_TIMED_OUT = object()  # what a waiter's future holds when its timer fired


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(_TIMED_OUT)


def _reaped(pool: "Pool", now: float) -> deque[ServerConn]:
    """The pool's idle servers worth keeping: those past server_lifetime, or idle past
    server_idle_timeout beyond min_pool_size, are closed (the janitor's round)."""
    cfg = pool.cfg
    keep: deque[ServerConn] = deque()
    n_idle = len(pool.idle)
    for srv in list(pool.idle):
        if srv.closed:
            n_idle -= 1
            continue
        if cfg.server_lifetime > 0 and now - srv.created > cfg.server_lifetime:
            srv.close("server lifetime over")
            n_idle -= 1
            continue
        if (cfg.server_idle_timeout > 0 and now - srv.last_used > cfg.server_idle_timeout
                and pool.total - (len(pool.idle) - n_idle) > cfg.min_pool_size):
            srv.close("server idle timeout")
            n_idle -= 1
            continue
        keep.append(srv)
    return keep


class Pool(PoolCore):
    def __init__(self, mgr: "PoolManager", db: str, user: str, password: str | None) -> None:
        self.mgr = mgr
        self.db = self.dbname = db  # the client-visible name (an alias); the database on the server
        self.user = user  # the user pgscope logs in as
        self.password = password
        # its own settings and proxy.config_tables.Route (None: the manager's), set by PoolManager._configure
        self.cfg: PoolConfig = mgr.cfg
        self.route: Any = None
        self.capped = False  # under max_db_connections or max_user_connections (proxy.pool.limits)
        self.retired = False  # its database was removed or moved: serves its clients, takes no new ones
        self.clients = 0  # sessions bound to it (proxy.session.binding.Binding)
        self.fences = mgr.fences  # databases a statement under way needs alone (PoolManager.fences)
        self.idle: deque[ServerConn] = deque()
        self.active: set[ServerConn] = set()
        self.connecting = 0
        self.waiters: deque[Any] = deque()  # acquire's futures and Handoffs, first come first served
        self._expiry: asyncio.TimerHandle | None = None  # the Handoffs' query_wait_timeout
        self._expiry_at = math.inf  # when it fires (time.monotonic())
        self.closed = False
        self.waiting = 0  # clients waiting for a server of this pool now
        self.wait_hist = Hist()  # how long checkouts of this pool waited
        # operator controls (proxy.pool.control): PAUSE/KILL hold checkouts until RESUME; a server
        # created before retire_before closes when released (RECONNECT; infinity while paused)
        self.paused = bool(mgr.paused) and (None in mgr.paused or db in mgr.paused)
        self.resumed = asyncio.Event() if self.paused else None
        self.reconnect_at = 0.0
        self.retire_before = math.inf if self.paused else 0.0

    @property
    def total(self) -> int:
        return len(self.idle) + len(self.active) + self.connecting

    # ------------------------------------------------------------- checkout

    async def acquire(self, kicked: bool = False) -> tuple[ServerConn, float]:
        """A server for one client; returns it and the seconds waited (also recorded in
        this pool's ``wait_hist``).  ``kicked``: a freed slot woke this client's Handoff,
        so it connects without queueing behind the other waiters."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        cfg = self.cfg
        deadline = t0 + cfg.query_wait_timeout if cfg.query_wait_timeout > 0 else None
        reserve_at = t0 + cfg.reserve_pool_timeout if cfg.reserve_pool_size > 0 else None
        while True:
            if self.closed:
                raise PgError(ADMIN_SHUTDOWN, "terminating connection due to administrator command")
            if self.paused:
                await control.until_resumed(self, deadline)
                continue
            srv = await self._take_idle()
            if srv is not None:
                return srv, self._waited(loop.time() - t0)
            now = loop.time()
            limit = cfg.pool_size
            if reserve_at is not None and now >= reserve_at:
                limit += cfg.reserve_pool_size
            # queue behind earlier waiters, unless a freed slot woke us
            if self.total < limit and (kicked or not self.waiters) and (not self.capped or limits.room_for(self)):
                srv = await self._connect()
                return srv, self._waited(loop.time() - t0)
            kicked = False
            timeout = None
            if deadline is not None:
                timeout = deadline - now
                if timeout <= 0:
                    raise self._wait_timeout()
            if reserve_at is not None and now < reserve_at:
                timeout = reserve_at - now if timeout is None else min(timeout, reserve_at - now)
            fut = loop.create_future()
            self.waiters.append(fut)
            self.waiting += 1
            # a plain timer instead of wait_for(shield(...)): the hand-off in
            # release() then wakes this task in one loop iteration
            timer = loop.call_later(timeout, _expire, fut) if timeout is not None else None
            try:
                srv = await fut
            except asyncio.CancelledError:
                self._abandon(fut)
                raise
            finally:
                self.waiting -= 1
                if timer is not None:
                    timer.cancel()
            if srv is _TIMED_OUT:
                self._abandon(fut)
                continue
            if srv is not None:
                return srv, self._waited(loop.time() - t0)
            kicked = True  # a slot was freed: try to connect

    def _waited(self, seconds: float) -> float:
        self.wait_hist.observe(seconds)
        return seconds

    def _abandon(self, fut: asyncio.Future) -> None:
        try:
            self.waiters.remove(fut)
        except ValueError:
            pass
        if fut.done() and not fut.cancelled():
            srv = fut.result()
            if srv is not None and srv is not _TIMED_OUT:
                self.release(srv)  # handed to us as we gave up: pass it on
        else:
            fut.cancel()

    def _wait_timeout(self) -> PgError:
        self.mgr.wait_timeouts += 1
        return PgError(PROTOCOL_VIOLATION, "query_wait_timeout",
                       detail=f"no server connection became free within "
                              f"{self.cfg.query_wait_timeout:g}s (pool {self.db}/{self.user})")

    async def _take_idle(self) -> ServerConn | None:
        cfg = self.cfg
        while self.idle:
            srv = self.idle.pop()  # LIFO keeps the hot connections hot
            if srv.closed:
                continue
            now = time.monotonic()
            if cfg.server_lifetime > 0 and now - srv.created > cfg.server_lifetime:
                srv.close("server lifetime over")
                continue
            self.active.add(srv)
            if cfg.server_check_query and now - srv.last_used > cfg.server_check_delay:
                try:
                    ok = await self._check(srv)
                except BaseException:  # the checkout was given up mid-check: the exchange is cut
                    self._drop(srv, "health check interrupted")
                    raise
                if not ok:
                    continue
            return srv
        return None

    async def _check(self, srv: ServerConn) -> bool:
        try:
            err = await asyncio.wait_for(srv.simple_query(self.cfg.server_check_query),
                                         self.cfg.server_connect_timeout)
        except (asyncio.TimeoutError, ServerGone, OSError):
            err = ServerGone()
        if err is not None or srv.tx_status != "I":
            self._drop(srv, "server health check failed")
            return False
        srv.last_used = time.monotonic()
        return True

    async def _connect(self) -> ServerConn:
        self.connecting += 1
        try:
            if self.mgr.fences:
                await self.mgr.wait_unfenced(self.dbname)
            srv = await self.mgr.connect(self.dbname, self.user, self.password, cfg=self.cfg, alias=self.db)
        finally:
            self.connecting -= 1
        srv.pool = self
        self.active.add(srv)
        return srv

    # -------------------------------------------------------------- release

    async def release_after_session(self, srv: ServerConn, relay: Any = None,
                                    reset: bool = False) -> None:
        """Session end: let the server answer what it still owes (``relay``: the departed
        client's, whose answers are discarded), roll back, reset, and keep it; or close it."""
        srv.owner = None
        if srv.read_paused:
            srv.reading_paused(False)
        if srv.closed:  # the pool forgot it when it closed
            return
        cfg = self.cfg
        if not cfg.server_reuse and cfg.pool_mode == "session":
            # its process was this client's alone: close it as a direct client's closes,
            # whatever it still runs, and open a fresh spare in its place (min_pool_size)
            self._drop(srv, "client left (server_reuse = false)")
            self.mgr.top_up(self)
            return
        if not await wind_up(srv, relay, cfg.server_drain_timeout):
            self._drop(srv, "client left with a request in flight that did not finish in time")
            return
        try:
            if relay is not None and relay.tx_status != "I":
                err = await asyncio.wait_for(srv.simple_query("ROLLBACK"), cfg.server_connect_timeout)
                if err is not None:
                    raise err
            if cfg.server_reset_query and (reset or cfg.pool_mode == "session"
                                           or cfg.server_reset_query_always):
                err = await asyncio.wait_for(srv.simple_query(cfg.server_reset_query),
                                             cfg.server_connect_timeout)
                if err is not None:
                    raise err
                srv.applied = {}
                srv.prepared.clear()
        except (PgError, asyncio.TimeoutError, OSError) as e:
            self._drop(srv, f"server reset failed: {getattr(e, 'message', e)}")
            return
        self.release(srv)

    def _drop(self, srv: ServerConn, reason: str) -> None:
        """Close a server this pool handed out (its slot is freed: one waiter wakes)."""
        self.active.discard(srv)
        srv.close(reason)
        self.mgr.log_close(srv)

    def forget(self, srv: ServerConn) -> None:
        """Drop a closed server from every list, and let a waiter try again (called once per
        server, when it closes: one freed slot wakes one waiter)."""
        self.active.discard(srv)
        try:
            self.idle.remove(srv)
        except ValueError:
            pass
        self._kick()
        if self.capped:
            limits.wake_group(self)

    def _kick(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    # -------------------------------------------------------------- janitor

    def janitor(self, now: float) -> int:
        """Close idle servers past their idle timeout or lifetime; return how many
        connections to open to reach ``min_pool_size``."""
        self.idle = _reaped(self, now)
        return self.missing()

    def missing(self) -> int:
        """How many connections to open to reach ``min_pool_size`` (none while paused, or
        once closed or retired)."""
        if self.paused or self.closed or self.retired:
            return 0
        cfg = self.cfg
        return max(0, min(cfg.min_pool_size, cfg.pool_size) - self.total)

    def close(self) -> None:
        self.closed = True
        for srv in list(self.idle):
            srv.close("pool closed")
        self.idle.clear()
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
