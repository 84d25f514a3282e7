"""The operator's controls over the pools, for the admin console: PAUSE, RESUME, RECONNECT, KILL, WAIT_CLOSE.

As PgBouncer does them.  A paused pool (``PoolManager.paused`` names its
database, or None for all) closes its idle servers, closes each server in use
when it is released, and holds every checkout (``Pool.acquire`` waits for
``resumed``, counted as waiting, up to ``query_wait_timeout``); PAUSE returns
once the pools have no server left.  RECONNECT closes every server of the
pools as soon as it is released (``close_needed`` until then); new servers
connect as usual.  KILL pauses and closes every server at once.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Callable


async def until_resumed(pool: Any, deadline: float | None) -> None:
    """A checkout of a paused pool: wait (counted as waiting) for RESUME, or until query_wait_timeout."""
    pool.waiting += 1
    try:
        timeout = None if deadline is None else deadline - asyncio.get_running_loop().time()
        if timeout is not None and timeout <= 0:
            raise pool._wait_timeout()
        try:
            async with asyncio.timeout(timeout):
                await pool.resumed.wait()
        except TimeoutError:
            raise pool._wait_timeout() from None
    finally:
        pool.waiting -= 1


def pools_of(mgr: Any, db: str | None) -> list[Any]:
    """The pools serving client database ``db`` (None: all), retired ones included."""
    return [p for p in mgr.all_pools() if db is None or p.db == db]


def is_paused(mgr: Any, db: str | None) -> bool:
    return None in mgr.paused or (db is not None and db in mgr.paused)


def _close_idle(pool: Any, before: float, reason: str) -> None:
    keep = [srv for srv in pool.idle if srv.created >= before and not srv.closed]
    for srv in list(pool.idle):
        if srv.created < before and not srv.closed:
            srv.close(reason)
    pool.idle.clear()
    pool.idle.extend(keep)


def hold(pool: Any) -> None:
    """Pause one pool: idle servers close now, those in use when released; checkouts wait."""
    if not pool.paused:
        pool.paused = True
        pool.resumed = asyncio.Event()
    pool.retire_before = math.inf
    _close_idle(pool, math.inf, "paused")
    while pool.waiters:  # queued checkouts look again: they now wait for RESUME
        fut = pool.waiters.popleft()
        if not fut.done():
            fut.set_result(None)


def pause(mgr: Any, db: str | None) -> list[Any]:
    """PAUSE [db]: returns the pools to watch (``drained``)."""
    mgr.paused.add(db)
    pools = pools_of(mgr, db)
    for pool in pools:
        hold(pool)
    return pools


def drained(pools: list[Any]) -> bool:
    """Every server of these pools is closed (none idle, in use or connecting)."""
    return all(p.total == 0 for p in pools)


def resume(mgr: Any, db: str | None) -> None:
    """RESUME [db]: without a name, everything paused; checkouts go on."""
    if db is None:
        mgr.paused.clear()
    else:
        mgr.paused.discard(db)
    for pool in pools_of(mgr, None):
        if pool.paused and not is_paused(mgr, pool.db):
            pool.paused = False
            pool.retire_before = pool.reconnect_at
            if pool.resumed is not None:
                pool.resumed.set()


def reconnect(mgr: Any, db: str | None) -> int:
    """RECONNECT [db]: every server now open closes once released; returns how many closed at once."""
    now = time.monotonic()
    closed = 0
    for pool in pools_of(mgr, db):
        pool.reconnect_at = now
        if not pool.paused:
            pool.retire_before = now
        n = len(pool.idle)
        _close_idle(pool, now, "RECONNECT")
        closed += n - len(pool.idle)
    return closed


def close_needed(pool: Any, srv: Any) -> bool:
    """SHOW SERVERS' close_needed: the server closes when it is released."""
    return srv.created < pool.retire_before and not srv.closed


def waiting_close(mgr: Any, db: str | None) -> int:
    """Servers still marked close_needed by a RECONNECT (WAIT_CLOSE waits for none)."""
    return sum(1 for p in pools_of(mgr, db) for srv in (*p.idle, *p.active)
               if srv.created < p.reconnect_at and not srv.closed)


def kill(mgr: Any, db: str | None) -> int:
    """KILL [db]: pause, and close every server of the pools now; returns how many closed."""
    closed = 0
    for pool in pause(mgr, db):
        for srv in [*pool.idle, *pool.active]:
            if not srv.closed:
                srv.close("KILL")
                closed += 1
        pool.idle.clear()
    return closed


async def until(done: Callable[[], bool], alive: Callable[[], bool], interval: float = 0.05) -> bool:
    """Wait until ``done()``; False when ``alive()`` turned false first (the asker left)."""
    while not done():
        if not alive():
            return False
        await asyncio.sleep(interval)
    return True
