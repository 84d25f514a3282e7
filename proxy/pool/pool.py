"""Per (database, user) pools of upstream connections, and their janitor.

A server is on exactly one of a pool's lists: ``idle`` (ready to hand out),
``active`` (attached to a client or being reset/checked), or it is being
connected (``connecting`` counts those).  Waiting clients queue FIFO; a
released server goes straight to the first waiter.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from proxy.hist import Hist
from proxy.pool.reclaim import wind_up
from proxy.pool.server import ServerConn, ServerGone
from proxy.protocol.errors import CONNECTION_FAILURE, PROTOCOL_VIOLATION, PgError
from proxy.protocol import messages as m


@dataclass(slots=True)
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
    server_drain_timeout: float = 5.0
    pool_mode: str = "session"
    ssl: object | None = None  # an ssl.SSLContext for upstream TLS (server_tls_mode)
    ssl_required: bool = False


_TIMED_OUT = object()  # what a waiter's future holds when its timer fired


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(_TIMED_OUT)


class Pool:
    def __init__(self, mgr: "PoolManager", db: str, user: str, password: str | None) -> None:
        self.mgr = mgr
        self.db = db
        self.user = user
        self.password = password
        self.idle: deque[ServerConn] = deque()
        self.active: set[ServerConn] = set()
        self.connecting = 0
        self.waiters: deque[asyncio.Future] = deque()
        self.closed = False
        self.waiting = 0  # clients waiting for a server of this pool now
        self.wait_hist = Hist()  # how long checkouts of this pool waited (see PoolManager.wait_hist)

    @property
    def cfg(self) -> PoolConfig:
        return self.mgr.cfg

    @property
    def total(self) -> int:
        return len(self.idle) + len(self.active) + self.connecting

    # ------------------------------------------------------------- checkout

    async def acquire(self) -> tuple[ServerConn, float]:
        """A server for one client; returns it and the seconds waited.

        The caller observes the wait in ``PoolManager.wait_hist`` right after the
        checkout, with no await in between: the checkout points that attribute at
        this pool's histogram (as ``take_idle_now`` does).
        """
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        cfg = self.cfg
        deadline = t0 + cfg.query_wait_timeout if cfg.query_wait_timeout > 0 else None
        reserve_at = t0 + cfg.reserve_pool_timeout if cfg.reserve_pool_size > 0 else None
        kicked = False
        while True:
            if self.closed:
                raise PgError("57P01", "terminating connection due to administrator command")
            srv = await self._take_idle()
            if srv is not None:
                self.mgr.wait_hist = self.wait_hist
                return srv, loop.time() - t0
            now = loop.time()
            limit = cfg.pool_size
            if reserve_at is not None and now >= reserve_at:
                limit += cfg.reserve_pool_size
            # queue behind earlier waiters, unless a freed slot woke us
            if self.total < limit and (kicked or not self.waiters):
                srv = await self._connect()
                self.mgr.wait_hist = self.wait_hist
                return srv, loop.time() - t0
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
            self.mgr.waiting += 1
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
                self.mgr.waiting -= 1
                self.waiting -= 1
                if timer is not None:
                    timer.cancel()
            if srv is _TIMED_OUT:
                self._abandon(fut)
                continue
            if srv is not None:
                self.mgr.wait_hist = self.wait_hist
                return srv, loop.time() - t0
            kicked = True  # a slot was freed: try to connect

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

    def take_idle_now(self) -> ServerConn | None:
        """A ready idle server without waiting (no health check due), or None."""
        cfg = self.cfg
        idle = self.idle
        while idle:
            srv = idle[-1]
            now = time.monotonic()
            if srv.closed:
                idle.pop()
                continue
            if (cfg.server_lifetime > 0 and now - srv.created > cfg.server_lifetime) or \
                    (cfg.server_check_query and now - srv.last_used > cfg.server_check_delay):
                return None  # the async path closes or checks it
            idle.pop()
            self.active.add(srv)
            self.mgr.wait_hist = self.wait_hist  # the caller observes its (zero) wait right away
            return srv
        return None

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
                    self.active.discard(srv)
                    srv.close("health check interrupted")
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
            self.active.discard(srv)
            srv.close("server health check failed")
            self.mgr.log_close(srv)
            return False
        srv.last_used = time.monotonic()
        return True

    async def _connect(self) -> ServerConn:
        self.connecting += 1
        try:
            if self.mgr.fences:
                await self.mgr.wait_unfenced(self.db)
            srv = await self.mgr.connect(self.db, self.user, self.password)
        finally:
            self.connecting -= 1
        srv.pool = self
        self.active.add(srv)
        return srv

    # -------------------------------------------------------------- release

    def release(self, srv: ServerConn) -> None:
        """Give back a server that is clean (idle, nothing owed)."""
        srv.owner = None
        srv.last_used = time.monotonic()
        if srv.read_paused:
            srv.reading_paused(False)
        if srv.closed:  # the pool forgot it when it closed
            return
        if self.closed:
            self.active.discard(srv)
            srv.close("pool closed")
            return
        if self.mgr.fences and self.db in self.mgr.fences:
            self.active.discard(srv)
            srv.close("database fenced: a statement needs it without other connections")
            return
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(srv)
                return
        self.active.discard(srv)
        self.idle.append(srv)

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
        if not await wind_up(srv, relay, cfg.server_drain_timeout):
            self.active.discard(srv)
            srv.close("client left with a request in flight that did not finish in time")
            self.mgr.log_close(srv)
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
            self.active.discard(srv)
            srv.close(f"server reset failed: {getattr(e, 'message', e)}")
            self.mgr.log_close(srv)
            return
        self.release(srv)

    def forget(self, srv: ServerConn) -> None:
        """Drop a closed server from every list, and let a waiter try again (called once per
        server, when it closes: one freed slot wakes one waiter)."""
        self.active.discard(srv)
        try:
            self.idle.remove(srv)
        except ValueError:
            pass
        self._kick()

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
        cfg = self.cfg
        keep: deque[ServerConn] = deque()
        n_idle = len(self.idle)
        for srv in list(self.idle):
            if srv.closed:
                n_idle -= 1
                continue
            if cfg.server_lifetime > 0 and now - srv.created > cfg.server_lifetime:
                srv.close("server lifetime over")
                n_idle -= 1
                continue
            if (cfg.server_idle_timeout > 0 and now - srv.last_used > cfg.server_idle_timeout
                    and self.total - (len(self.idle) - n_idle) > cfg.min_pool_size):
                srv.close("server idle timeout")
                n_idle -= 1
                continue
            keep.append(srv)
        self.idle = keep
        missing = min(cfg.min_pool_size, cfg.pool_size) - self.total
        return max(0, missing)

    def close(self) -> None:
        self.closed = True
        for srv in list(self.idle):
            srv.close("pool closed")
        self.idle.clear()
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)


class PoolManager:
    def __init__(self, cfg: PoolConfig, password_for: Callable[[str], str | None],
                 log=None) -> None:
        self.cfg = cfg
        self.password_for = password_for
        self.pools: dict[tuple[str, str], Pool] = {}
        self.waiting = 0
        self.wait_timeouts = 0
        self.connect_errors = 0
        self.connect_failures: dict[tuple[str, str], int] = {}  # (db, user) -> failed upstream logins
        # Where a checkout's wait is observed: the histogram of the pool that handed out the
        # last server (Pool.acquire and Pool.take_idle_now point it there), so a caller that
        # observes right after its checkout counts the wait for the right pool at the cost of
        # a plain Hist.observe.
        self.wait_hist = Hist()
        self.log = log
        self._janitor: asyncio.Task | None = None
        self._fills: set[asyncio.Task] = set()  # min_pool_size connects under way
        self._tasks: set[asyncio.Task] = set()  # servers being taken back from departed clients
        # databases a statement under way needs without other connections (DROP DATABASE ...):
        # db -> [statements under way, event set when the last one is done]
        self.fences: dict[str, list] = {}
        self.side: weakref.WeakSet[ServerConn] = weakref.WeakSet()  # the proxy's own connections

    # ------------------------------------------------------------ fences

    def fence(self, db: str) -> int:
        """A statement needs ``db`` with no connection of ours: close the idle ones now
        (those in use are left alone), and open or keep none until ``unfence``.
        Returns how many connections were closed."""
        f = self.fences.get(db)
        if f is None:
            f = self.fences[db] = [0, asyncio.Event()]
        f[0] += 1
        closed = 0
        for pool in self.pools.values():
            if pool.db == db:
                for srv in list(pool.idle):
                    srv.close("database fenced: a statement needs it without other connections")
                    closed += 1
                pool.idle.clear()
        for srv in list(self.side):
            if srv.db == db and not srv.closed and not srv.busy:
                srv.close("database fenced: a statement needs it without other connections")
                closed += 1
        if self.log is not None:
            self.log.info("database_fenced", db=db, closed_connections=closed)
        return closed

    def unfence(self, db: str) -> None:
        f = self.fences.get(db)
        if f is None:
            return
        f[0] -= 1
        if f[0] <= 0:
            del self.fences[db]
            f[1].set()

    async def wait_unfenced(self, db: str) -> None:
        while (f := self.fences.get(db)) is not None:
            await f[1].wait()

    def spawn(self, coro: Any) -> None:
        """Run a server clean-up in the background, kept until it ends (``close`` awaits it)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def pool(self, db: str, user: str) -> Pool:
        key = (db, user)
        p = self.pools.get(key)
        if p is None:
            p = self.pools[key] = Pool(self, db, user, self.password_for(user))
        return p

    async def connect(self, db: str, user: str, password: str | None,
                      params: dict[str, str] | None = None) -> ServerConn:
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        try:
            async with asyncio.timeout(cfg.server_connect_timeout):
                if cfg.host.startswith("/"):
                    _, srv = await loop.create_unix_connection(
                        lambda: ServerConn(db, user), f"{cfg.host}/.s.PGSQL.{cfg.port}")
                else:
                    _, srv = await loop.create_connection(
                        lambda: ServerConn(db, user), cfg.host, cfg.port)
                    if cfg.ssl is not None:
                        try:
                            await srv.start_tls(cfg.ssl, cfg.host, cfg.ssl_required)
                        except BaseException:
                            srv.close("TLS negotiation failed")
                            raise
                try:
                    await srv.login(password, params)
                except BaseException:
                    srv.close("login failed")
                    raise
        except TimeoutError:
            self._connect_failed(db, user)
            raise PgError(CONNECTION_FAILURE, "server connection timed out",
                          detail=f"no answer within server_connect_timeout "
                                 f"({cfg.server_connect_timeout:g}s)") from None
        except ssl.SSLError as e:
            self._connect_failed(db, user)
            raise PgError(CONNECTION_FAILURE, "TLS handshake with server failed",
                          detail=str(e)) from None
        except OSError as e:
            self._connect_failed(db, user)
            raise PgError(CONNECTION_FAILURE, "could not connect to server",
                          detail=e.strerror or str(e)) from None
        except PgError:
            self._connect_failed(db, user)
            raise
        if self.log is not None:
            self.log.debug("server_connected", db=db, user=user, server_pid=srv.pid,
                           server_id=srv.id)
        return srv

    def _connect_failed(self, db: str, user: str) -> None:
        self.connect_errors += 1
        key = (db, user)
        self.connect_failures[key] = self.connect_failures.get(key, 0) + 1

    def log_close(self, srv: ServerConn) -> None:
        if self.log is not None:
            self.log.info("server_closed", db=srv.db, user=srv.user, server_pid=srv.pid,
                          reason=srv.close_reason)

    def start(self) -> None:
        self._janitor = asyncio.get_running_loop().create_task(self._janitor_loop())

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for pool in list(self.pools.values()):
                try:
                    missing = pool.janitor(now)
                    for _ in range(missing):
                        task = asyncio.get_running_loop().create_task(self._fill(pool))
                        self._fills.add(task)
                        task.add_done_callback(self._fills.discard)
                except Exception as e:  # the janitor must never die
                    if self.log is not None:
                        self.log.error("janitor_error", error=str(e))

    async def _fill(self, pool: Pool) -> None:
        try:
            srv = await pool._connect()
        except PgError as e:
            if self.log is not None:
                self.log.warning("min_pool_connect_failed", db=pool.db, user=pool.user,
                                 error=e.message)
            return
        pool.release(srv)

    def waiting_by_pool(self) -> dict[tuple[str, str], int]:
        return {key: p.waiting for key, p in self.pools.items()}

    def wait_hists(self) -> dict[tuple[str, str], Hist]:
        return {key: p.wait_hist for key, p in self.pools.items()}

    def counts(self) -> dict[tuple[str, str], dict[str, int]]:
        return {
            key: {"active": len(p.active), "idle": len(p.idle), "connecting": p.connecting}
            for key, p in self.pools.items()
        }

    def find_server(self, pid: int) -> ServerConn | None:
        for p in self.pools.values():
            for s in p.active:
                if s.pid == pid:
                    return s
        return None

    async def close(self) -> None:
        tasks = list(self._fills) + list(self._tasks)
        if self._janitor is not None:
            tasks.append(self._janitor)
            self._janitor = None
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in self.pools.values():
            p.close()
        for p in self.pools.values():
            for s in list(p.active):
                s.close("shutdown")


__all__ = ["Pool", "PoolConfig", "PoolManager", "ServerConn", "m"]
