"""All the pools: upstream connects, the janitor, database fences, the proxy's side connections."""

from __future__ import annotations

import asyncio
import ssl
import time
import weakref
from typing import Any, Callable

from proxy.hist import Hist
from proxy.pool.pool import Pool, PoolConfig
from proxy.pool.upstream import ServerConn
from proxy.protocol.errors import CONNECTION_FAILURE, PgError


class PoolManager:
    def __init__(self, cfg: PoolConfig, password_for: Callable[[str], str | None],
                 log=None) -> None:
        self.cfg = cfg
        self.password_for = password_for
        self.pools: dict[tuple[str, str], Pool] = {}
        self.waiting = 0
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
