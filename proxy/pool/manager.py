"""All the pools: upstream connects, the janitor, database fences, the proxy's side connections."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import time
import weakref
from typing import Any, Callable

from proxy.hist import Hist
from proxy.pool import limits
from proxy.pool.pool import Pool, PoolConfig
from proxy.pool.upstream import ServerConn, tune_socket
from proxy.protocol.errors import CONNECTION_FAILURE, PgError


class PoolManager:
    def __init__(self, cfg: PoolConfig, password_for: Callable[[str], str | None],
                 log=None) -> None:
        self.cfg = cfg
        self.password_for = password_for
        self.pools: dict[tuple[str, str], Pool] = {}  # (alias, user) -> its pool
        self.retired: set[Pool] = set()  # pools of removed or moved databases, kept while they have clients
        self.wait_timeouts = 0
        self.connect_failures: dict[tuple[str, str], int] = {}  # (db, user) -> failed upstream logins
        self.log = log
        self._janitor: asyncio.Task | None = None
        self._fills: set[asyncio.Task] = set()  # min_pool_size connects under way
        self._tasks: set[asyncio.Task] = set()  # servers being taken back from departed clients
        # databases a statement under way needs without other connections (DROP DATABASE ...):
        # db -> [statements under way, event set when the last one is done]
        self.fences: dict[str, list] = {}
        self.side: weakref.WeakSet[ServerConn] = weakref.WeakSet()  # the proxy's own connections
        # the admin console's controls (proxy.pool.control): databases whose checkouts wait for
        # RESUME (None: all of them), databases refusing new clients (DISABLE)
        self.paused: set[str | None] = set()
        self.disabled: set[str] = set()

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
        for pool in self.all_pools():
            if pool.dbname == db:
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

    def pool(self, db: str, user: str, route: Any = None) -> Pool:
        """The pool of client-visible database ``db`` for ``user``; with a ``route``
        (proxy.config_tables.Route) its servers are the route's, as the route's user."""
        if route is not None:
            user = route.user
        key = (db, user)
        p = self.pools.get(key)
        if p is None:
            p = self.pools[key] = Pool(self, db, user, self.password_for(user))
            if route is not None:
                self._configure(p, route)
        return p

    def all_pools(self) -> list[Pool]:
        """Every pool, the retired ones too."""
        return [*self.pools.values(), *self.retired] if self.retired else list(self.pools.values())

    def route_cfg(self, route: Any) -> PoolConfig:
        """The manager's settings with a route's place, pool_size and pool_mode."""
        return dataclasses.replace(self.cfg, host=route.host, port=route.port, pool_size=route.pool_size,
                                   pool_mode=route.pool_mode)

    def _configure(self, pool: Pool, route: Any) -> None:
        pool.route = route
        pool.dbname = route.dbname
        pool.cfg = self.route_cfg(route)
        if route.password:
            pool.password = route.password
        pool.capped = bool(route.max_db_connections or route.max_user_connections)

    def configure(self, cfg: PoolConfig, route_of: Callable[[Pool], Any]) -> list[Pool]:
        """New settings (a reload): ``cfg`` for every pool, each pool's new route from
        ``route_of(pool)``.  A pool whose database was removed (None), whose servers are now
        elsewhere (host, port, dbname or user changed) or whose pool_mode changed retires: its
        clients keep their servers and mode and finish, new clients get a new pool.  Returns the
        pools retired."""
        self.cfg = cfg
        gone = []
        for key, pool in list(self.pools.items()):
            route = route_of(pool) if pool.route is not None else None
            if pool.route is None:
                pool.cfg = cfg
            elif route is None or route.server != pool.route.server:  # elsewhere, or another pool_mode
                del self.pools[key]
                self.retire(pool)
                gone.append(pool)
                if self.log is not None:
                    self.log.info("database_draining", db=pool.db, user=pool.user, reason="removed"
                                  if route is None else "moved" if route.place != pool.route.place else "pool_mode")
            else:
                self._configure(pool, route)
        for pool in self.retired:  # their clients go on with the new timeouts (their old place kept)
            if pool.route is not None:
                self._configure(pool, pool.route)
        return gone

    def retire(self, pool: Pool) -> None:
        """``pool`` takes no new clients: its idle servers close now; those in use go back to it
        and close when its clients have left (the janitor drops it then)."""
        pool.retired = True
        self.retired.add(pool)
        for srv in list(pool.idle):
            srv.close("database removed or moved by a reload")
        pool.idle.clear()

    async def connect(self, db: str, user: str, password: str | None,
                      params: dict[str, str] | None = None, cfg: PoolConfig | None = None,
                      alias: str | None = None) -> ServerConn:
        """A new server logged in to database ``db`` as ``user``, at ``cfg``'s host (default: the
        manager's); a failure is counted under ``alias`` (the client-visible name), else ``db``."""
        loop = asyncio.get_running_loop()
        cfg = cfg or self.cfg
        label = alias or db
        try:
            async with asyncio.timeout(cfg.server_connect_timeout):
                if cfg.host.startswith("/"):
                    _, srv = await loop.create_unix_connection(
                        lambda: ServerConn(db, user), f"{cfg.host}/.s.PGSQL.{cfg.port}")
                else:
                    _, srv = await loop.create_connection(
                        lambda: ServerConn(db, user), cfg.host, cfg.port)
                    tune_socket(srv.transport, cfg)
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
            self._connect_failed(label, user)
            raise PgError(CONNECTION_FAILURE, "server connection timed out",
                          detail=f"no answer within server_connect_timeout "
                                 f"({cfg.server_connect_timeout:g}s)") from None
        except ssl.SSLError as e:
            self._connect_failed(label, user)
            raise PgError(CONNECTION_FAILURE, "TLS handshake with server failed",
                          detail=str(e)) from None
        except OSError as e:
            self._connect_failed(label, user)
            raise PgError(CONNECTION_FAILURE, "could not connect to server",
                          detail=e.strerror or str(e)) from None
        except PgError:
            self._connect_failed(label, user)
            raise
        if self.log is not None:
            self.log.debug("server_connected", db=db, user=user, server_pid=srv.pid,
                           server_id=srv.id)
        return srv

    def _connect_failed(self, db: str, user: str) -> None:
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
            for pool in list(self.retired):
                if not (pool.clients or pool.active or pool.waiters or pool.connecting):
                    for srv in list(pool.idle):
                        srv.close("database removed or moved by a reload")
                    pool.idle.clear()
                    self.retired.discard(pool)
            for pool in list(self.pools.values()):
                try:
                    self._fill_up(pool, pool.janitor(now))
                except Exception as e:  # the janitor must never die
                    if self.log is not None:
                        self.log.error("janitor_error", error=str(e))

    def top_up(self, pool: Pool) -> None:
        """Open what ``pool`` lacks of its min_pool_size now, not at the janitor's next round.
        Not while clients wait: the freed slot woke one of them, which connects itself (a fill
        taking the slot would send it back to the end of the queue)."""
        if not pool.waiters:
            self._fill_up(pool, pool.missing())

    def _fill_up(self, pool: Pool, n: int) -> None:
        for _ in range(n):
            task = asyncio.get_running_loop().create_task(self._fill(pool))
            self._fills.add(task)
            task.add_done_callback(self._fills.discard)

    async def _fill(self, pool: Pool) -> None:
        if pool.capped and not limits.room_for(pool, evict=False):
            return  # min_pool_size does not take another pool's room under a cap
        try:
            srv = await pool._connect()
        except PgError as e:
            if self.log is not None:
                self.log.warning("min_pool_connect_failed", db=pool.db, user=pool.user,
                                 error=e.message)
            return
        pool.release(srv)

    @property
    def waiting(self) -> int:
        """Clients waiting for a server now, over every pool (retired ones included)."""
        return sum(p.waiting for p in self.all_pools())

    def waiting_by_pool(self) -> dict[tuple[str, str], int]:
        return {key: p.waiting for key, p in self.pools.items()}

    def wait_hists(self) -> dict[tuple[str, str], Hist]:
        return {key: p.wait_hist for key, p in self.pools.items()}

    def counts(self) -> dict[tuple[str, str], dict[str, int]]:
        return {
            key: {"active": len(p.active), "idle": len(p.idle), "connecting": p.connecting}
            for key, p in self.pools.items()
        }

    async def close(self) -> None:
        tasks = list(self._fills) + list(self._tasks)
        if self._janitor is not None:
            tasks.append(self._janitor)
            self._janitor = None
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in self.all_pools():
            p.close()
        for p in self.all_pools():
            for s in list(p.active):
                s.close("shutdown")
