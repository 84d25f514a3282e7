"""Is PostgreSQL reachable?  The answer behind /readyz and the pgscope_ready gauge."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from proxy.protocol.errors import CANNOT_CONNECT_NOW, CONNECTION_FAILURE, SQLCLIENT_UNABLE_TO_ESTABLISH, PgError

_UNREACHABLE = (CONNECTION_FAILURE, SQLCLIENT_UNABLE_TO_ESTABLISH, CANNOT_CONNECT_NOW)


class Readiness:
    """Any server reply proves PostgreSQL reachable: a server of the pools used in the last 5 s
    answers at once; else a probe connection, its answer cached for 2 s."""

    def __init__(self, pools: Any, probe_target: Callable[[], tuple[str, str, str | None]], log: Any) -> None:
        self.pools = pools
        self.probe_target = probe_target  # () -> (db, user, password) to connect as
        self.log = log
        self._cache = (0.0, False)
        self._task: asyncio.Task | None = None
        self.closed = False
        self.stopping = False  # no longer accepting clients (SHUTDOWN WAIT_FOR_CLIENTS): not ready

    def _known(self) -> bool | None:
        if self.stopping:
            return False
        now = time.monotonic()
        at, ok = self._cache
        if now - at < 2.0:
            return ok
        for pool in self.pools.pools.values():
            for srv in list(pool.idle) + list(pool.active):
                if not srv.closed and now - srv.last_used < 5.0:
                    self._cache = (now, True)
                    return True
        return None

    async def ready(self) -> bool:
        """True once PostgreSQL answers."""
        known = self._known()
        if known is not None:
            return known
        db, user, password = self.probe_target()
        try:
            srv = await self.pools.connect(db, user, password)
            srv.close("readiness probe")
            ok = True
        except PgError as e:
            ok = e.sqlstate not in _UNREACHABLE
        self._cache = (time.monotonic(), ok)
        return ok

    def ready_now(self) -> bool:
        """What ``/readyz`` would answer, without waiting (for the ``pgscope_ready`` gauge).

        A check younger than 2 s, or a server used in the last 5 s, answers as
        ``ready()`` would; otherwise the last answer stands (not ready before the
        first one) and a check starts in the background, for the next scrape.
        """
        known = self._known()
        if known is not None:
            return known
        if not self.closed and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._check())
        return self._cache[1]

    async def _check(self) -> None:
        try:
            await self.ready()
        except Exception as e:  # ready() maps connection failures to "not ready"; anything else: log
            self.log.warning("readiness_check_failed", error=repr(e))

    async def close(self) -> None:
        self.closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
