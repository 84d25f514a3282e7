"""The pool's queue against a real PostgreSQL: one freed slot wakes exactly one waiter, in order."""

from __future__ import annotations

import asyncio

from proxy.pool.manager import PoolManager
from proxy.pool.pool import PoolConfig


async def _until(cond, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.002)


def test_freed_slots_wake_waiters_one_each_in_fifo_order(pg):
    async def main():
        # a reset that fails: a session's end then closes its server (the path that woke two)
        cfg = PoolConfig(host=pg.host, port=pg.port, pool_size=2, query_wait_timeout=30.0,
                         server_check_delay=30.0, server_reset_query="select 1/0")
        mgr = PoolManager(cfg, lambda user: pg.cluster.password)
        pool = mgr.pool("pgscope_test", pg.superuser)
        s1, _ = await pool.acquire()
        s2, _ = await pool.acquire()
        order: list[int] = []
        got: dict[int, object] = {}

        async def waiter(i: int) -> None:
            srv, _ = await pool.acquire()
            order.append(i)
            got[i] = srv

        tasks = []
        for i in range(5):  # more waiters than servers, queued in this order
            tasks.append(asyncio.get_running_loop().create_task(waiter(i)))
            await _until(lambda: len(pool.waiters) == i + 1)

        await pool.release_after_session(s1)  # reset fails: s1 is closed, its slot freed
        await _until(lambda: order == [0])
        assert len(pool.waiters) == 4 and pool.total == 2  # one woke (and connected), none requeued
        pool.release(s2)  # a server handed over: the next in line
        await _until(lambda: order == [0, 1])
        for i in range(2, 5):
            pool.release(got[i - 2])
            await _until(lambda: len(order) == i + 1)
        assert order == [0, 1, 2, 3, 4]
        pool.release(got[3])
        pool.release(got[4])
        await asyncio.gather(*tasks)
        await mgr.close()

    asyncio.run(main())
