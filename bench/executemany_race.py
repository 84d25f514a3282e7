"""How often asyncpg's executemany writes a whole failing batch before it hears of the error.

Run by hand, never in CI.  asyncpg's ``test_executemany_server_failure_during_writes``
as a loop: an ``executemany`` of 128 rows of 32 KiB hits a unique violation on its
second row, and the test wants asyncpg to stop generating rows before the last one.
Whether it does is a race between PostgreSQL's error and the client's writes (see
docs/driver-suites.md, "Races that the extra hop loses"); one run of the test says
little, so this runs it many times on each target, the targets taking turns in
blocks, and prints how often each one lost::

    python3 bench/executemany_race.py --rounds 20 --block 20 \\
        direct=postgresql://postgres@127.0.0.1:5432/postgres \\
        pgscope=postgresql://postgres@127.0.0.1:6432/postgres \\
        pgbouncer=postgresql://postgres@127.0.0.1:6433/postgres

Each target is LABEL=DSN; start the proxies yourself (e.g. one pgscope with
``PGSCOPE_TCP_SOCKET_BUFFER=65536`` beside one without).  Needs asyncpg.
"""

from __future__ import annotations

import argparse
import asyncio


async def once(dsn: str) -> int:
    """One executemany on a fresh connection: how many rows asyncpg had generated (128: all)."""
    import asyncpg

    con = await asyncpg.connect(dsn)
    try:
        await con.execute("DROP TABLE IF EXISTS exmany_race; CREATE TABLE exmany_race (a text, b int PRIMARY KEY)")
        pos = 0

        def rows():
            nonlocal pos
            while pos < 128:
                pos += 1
                yield ("a", 0) if pos < 3 else ("a" * 32768, pos)

        try:
            await con.executemany("INSERT INTO exmany_race VALUES ($1, $2)", rows())
        except asyncpg.UniqueViolationError:
            pass
        await con.execute("DROP TABLE exmany_race")
        return pos
    finally:
        await con.close()


async def run(targets: list[tuple[str, str]], rounds: int, block: int) -> dict[str, tuple[int, int]]:
    lost = {label: 0 for label, _ in targets}
    runs = {label: 0 for label, _ in targets}
    for r in range(rounds):
        k = r % len(targets)
        for label, dsn in targets[k:] + targets[:k]:  # the order rotates from round to round
            for _ in range(block):
                lost[label] += await once(dsn) >= 128
                runs[label] += 1
    return {label: (lost[label], runs[label]) for label, _ in targets}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="+", metavar="LABEL=DSN")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--block", type=int, default=20, help="runs per target in each round")
    opts = ap.parse_args()
    targets = [tuple(t.split("=", 1)) for t in opts.targets]
    if any(len(t) != 2 for t in targets):
        ap.error("targets are LABEL=DSN")
    for label, (lost, n) in asyncio.run(run(targets, opts.rounds, opts.block)).items():  # type: ignore[arg-type]
        print(f"{label:16s} wrote the whole batch in {lost:4d} of {n} runs ({100 * lost / n:.0f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
