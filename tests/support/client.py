"""Small client-side helpers shared by the integration tests."""

from __future__ import annotations

import asyncio

import asyncpg


def login_error(dsn: str, **kw) -> asyncpg.PostgresError:
    """The ErrorResponse a login gets (asyncpg keeps the SQLSTATE; libpq does not at connect)."""

    async def go():
        try:
            conn = await asyncpg.connect(dsn, timeout=20, **kw)
        except asyncpg.PostgresError as e:
            return e
        await conn.close()
        raise AssertionError("login unexpectedly succeeded")

    return asyncio.run(go())
