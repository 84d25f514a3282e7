"""asyncpg through the proxy: prepared statements, executemany, cursors, pools, cancellation."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(params=["session", "transaction"])
def any_mode_proxy(request, proxy_factory):
    return proxy_factory(pool_mode=request.param, pool_size=10 if request.param == "transaction" else 60)


def test_prepared_executemany_cursor(any_mode_proxy, pg):
    proxy = any_mode_proxy

    async def main():
        conn = await asyncpg.connect(proxy.dsn(pg.superuser))
        try:
            stmt = await conn.prepare("select $1::int * 3")
            assert [await stmt.fetchval(i) for i in range(5)] == [0, 3, 6, 9, 12]
            await conn.execute("create table if not exists ap_items(id int, v text)")
            await conn.execute("truncate ap_items")
            await conn.executemany("insert into ap_items values ($1, $2)", [(i, f"v{i}") for i in range(500)])
            assert await conn.fetchval("select count(*) from ap_items") == 500
            async with conn.transaction():
                got = [r["id"] async for r in conn.cursor("select id from ap_items order by id", prefetch=50)]
            assert got == list(range(500))
            async with conn.transaction():
                cur = await conn.cursor("select id from ap_items order by id")
                assert len(await cur.fetch(7)) == 7
            for _ in range(30):  # asyncpg's statement cache at work
                assert await conn.fetchval("select $1::text || 'x'", "a") == "ax"
        finally:
            await conn.close()

    run(main())


def test_pool_of_50_connections(any_mode_proxy, pg):
    proxy = any_mode_proxy

    async def main():
        pool = await asyncpg.create_pool(proxy.dsn(pg.superuser), min_size=50, max_size=50)
        try:
            async def one(i):
                async with pool.acquire() as c:
                    return await c.fetchval("select $1::int + 1", i)
            res = await asyncio.gather(*(one(i) for i in range(500)))
            assert res == [i + 1 for i in range(500)]
        finally:
            await pool.close()

    run(main())


def test_cancellation_by_timeout(any_mode_proxy, pg):
    proxy = any_mode_proxy

    async def main():
        conn = await asyncpg.connect(proxy.dsn(pg.superuser))
        try:
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("select pg_sleep(30)", timeout=0.5)
            assert asyncio.get_running_loop().time() - t0 < 10
            # the connection is usable: the cancel reached the right server
            assert await conn.fetchval("select 5") == 5
        finally:
            await conn.close()

    run(main())
    # and the server is not still sleeping
    with pg.connect() as admin:
        n = admin.execute("select count(*) from pg_stat_activity where query = 'select pg_sleep(30)' "
                          "and state = 'active'").fetchone()[0]
    assert n == 0
