"""The pool's queue against a real PostgreSQL: one freed slot wakes exactly one waiter, in order."""

from __future__ import annotations

import asyncio
import dataclasses

from proxy.pool.handoff import wait_nowait
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


def test_handoffs_queue_with_acquires_expire_in_order_and_withdraw(pg):
    """Transaction mode's task-free waits (Handoff) share the FIFO queue with acquire's
    futures: a released server goes to the first in line whichever kind it is, a freed slot
    answers a Handoff with None (look again), query_wait_timeout answers the oldest first
    from one timer, and a client that leaves is out of the queue."""
    from proxy.protocol.errors import PgError

    async def main():
        cfg = PoolConfig(host=pg.host, port=pg.port, pool_size=1, query_wait_timeout=30.0,
                         server_check_delay=30.0)
        mgr = PoolManager(cfg, lambda user: pg.cluster.password)
        pool = mgr.pool("pgscope_test", pg.superuser)
        assert wait_nowait(pool, lambda *a: None) is None  # room to connect: acquire's job
        s1, _ = await pool.acquire()
        got: list[tuple[str, object]] = []
        h0 = wait_nowait(pool, lambda srv, waited: got.append(("h0", srv)))
        assert h0 is not None and mgr.waiting == 1
        fut_task = asyncio.get_running_loop().create_task(pool.acquire())
        await _until(lambda: len(pool.waiters) == 2)
        h2 = wait_nowait(pool, lambda srv, waited: got.append(("h2", srv)))
        wait_nowait(pool, lambda srv, waited: got.append(("h3", srv)))
        assert len(pool.waiters) == 4 and pool.waiting == 4

        pool.release(s1)  # first in line: the Handoff, answered inside release
        assert got == [("h0", s1)] and len(pool.waiters) == 3
        pool.release(s1)  # next: acquire's future
        srv, _ = await fut_task
        assert srv is s1 and got == [("h0", s1)]
        h2.withdraw()  # its client left
        assert len(pool.waiters) == 1 and pool.waiting == 1
        pool._kick()  # a freed slot: the Handoff is told to look again
        assert got == [("h0", s1), ("h3", None)] and not pool.waiters and mgr.waiting == 0

        # query_wait_timeout from the pool's one timer, oldest first
        pool.cfg = dataclasses.replace(cfg, query_wait_timeout=0.2)  # (a PoolConfig is frozen)
        late: list[object] = []
        for i in range(3):
            wait_nowait(pool, lambda srv, waited, i=i: late.append((i, srv)))
        assert pool._expiry is not None
        await _until(lambda: len(late) == 3)
        assert [i for i, _ in late] == [0, 1, 2]
        assert all(isinstance(e, PgError) and e.message == "query_wait_timeout" for _, e in late)
        assert not pool.waiters and pool.waiting == 0 and mgr.waiting == 0
        pool.release(s1)
        await mgr.close()

    asyncio.run(main())
