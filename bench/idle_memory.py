"""Idle memory per client: how much the proxy's RSS grows per logged-in, idle client.

Run by hand, never in CI:

    python3 bench/idle_memory.py                      # 5000 clients, transaction mode, a throwaway PostgreSQL
    python3 bench/idle_memory.py --clients 2000 --mode session --pool-size 2000
    python3 bench/idle_memory.py --dsn postgresql://postgres@127.0.0.1:5432/postgres

Starts ``pgscope run`` (inspection on), logs in ``--clients`` raw protocol clients
(startup packet, trust auth, up to ReadyForQuery) and has each run one query so
that every session has been through a transaction, then reads the proxy's RSS
from /proc with all of them connected and idle.  The figure is (RSS with the
clients - RSS with one client) / clients.  In transaction mode the clients share
``--pool-size`` servers, as in production; in session mode each holds one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.relay_tps import server, start_pgscope  # noqa: E402


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def startup(user: str, db: str) -> bytes:
    body = struct.pack("!i", 196608) + b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                                                 for k, v in (("user", user), ("database", db))) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


async def until_ready(reader: asyncio.StreamReader) -> None:
    while True:
        head = await reader.readexactly(5)
        body = await reader.readexactly(struct.unpack("!i", head[1:])[0] - 4)
        if head[:1] == b"E":
            raise RuntimeError(body)
        if head[:1] == b"Z":
            return


async def client(port: int, user: str, db: str, held: list) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1024)
    writer.write(startup(user, db))
    await until_ready(reader)
    q = b"select 1\0"
    writer.write(b"Q" + struct.pack("!i", len(q) + 4) + q)
    await until_ready(reader)
    held.append(writer)


async def connect_all(port: int, user: str, db: str, n: int, held: list) -> None:
    sem = asyncio.Semaphore(200)

    async def one() -> None:
        async with sem:
            await client(port, user, db, held)

    await asyncio.gather(*(one() for _ in range(n)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", help="an existing PostgreSQL (superuser); default: a throwaway cluster")
    ap.add_argument("--clients", type=int, default=5000)
    ap.add_argument("--mode", choices=("session", "transaction"), default="transaction")
    ap.add_argument("--pool-size", type=int, default=10)
    opts = ap.parse_args()
    upstream, pg = server(opts.dsn)
    from urllib.parse import urlsplit

    u = urlsplit(upstream)
    user, db = u.username or "postgres", (u.path or "/postgres").lstrip("/") or "postgres"
    proc = None
    held: list = []
    try:
        proc, port = start_pgscope(upstream, opts.mode, opts.pool_size, inspect=True,
                                   max_client_conn=opts.clients + 100)

        async def run() -> None:
            await connect_all(port, user, db, 1, held)
            time.sleep(0.5)
            base = rss_kib(proc.pid)
            await connect_all(port, user, db, opts.clients - 1, held)
            await asyncio.sleep(2.0)  # let the proxy settle (inspection batches, logs)
            full = rss_kib(proc.pid)
            per = (full - base) / (opts.clients - 1)
            print(f"{opts.mode} mode, pool_size {opts.pool_size}: RSS {base / 1024:.1f} MiB with 1 client, "
                  f"{full / 1024:.1f} MiB with {opts.clients}: {per:.2f} KiB per idle client")
            for w in held:
                w.close()

        asyncio.run(run())
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if pg is not None:
            pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
