"""The listening socket's PgBouncer options: so_reuseport (several pgscope processes on one port, the
kernel spreading connections over them), peering (a cancel request sent on to the process whose
client it is), and listen_backlog."""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import time

import asyncpg
import psycopg
import pytest

from tests.support.proxy import ProxyProcess
from tests.support.tools import free_port, require


def test_so_reuseport_lets_processes_share_a_port(pg):
    port = free_port()
    args = ["--upstream", pg.dsn(), "--listen", f"127.0.0.1:{port}"]  # the last --listen counts

    def start(env=None) -> ProxyProcess:
        p = ProxyProcess(args, env=env)
        p.port = port
        return p

    first = start().wait_ready()
    try:
        # the control: without so_reuseport a second process cannot listen there
        taken = start()
        assert taken.proc.wait(30) == 1
        assert "startup_failed" in taken.logs() and "in use" in taken.logs(), taken.logs()
        taken.stop()
    finally:
        first.stop()

    env = {"PGSCOPE_SO_REUSEPORT": "true"}
    procs = [start(env) for _ in range(2)]
    for p in procs:  # (connecting to the port does not tell that this process listens yet)
        p.wait_event("listening", timeout=30)
    try:
        for _ in range(30):  # one after another: the kernel picks a process by the connection's ports
            with psycopg.connect(procs[0].dsn(pg.superuser), autocommit=True) as c:
                assert c.execute("select 1").fetchone() == (1,)
        logins = [sum(ev.get("event") == "client_login" for ev in p.events()) for p in procs]
        assert sum(logins) == 30 and min(logins) > 0, (logins, procs[1].logs()[-2000:])  # all in one: 2**-29
    finally:
        for p in procs:
            p.stop()


def test_listen_backlog(pg):
    ss = require("ss")
    p = ProxyProcess(["--upstream", pg.dsn()], env={"PGSCOPE_LISTEN_BACKLOG": "77"}).wait_ready()
    try:
        out = subprocess.run([ss, "-Hltn", f"sport = :{p.port}"], capture_output=True, text=True, timeout=30).stdout
        # a listening socket's Send-Q is its backlog
        fields = out.split()
        assert fields[0] == "LISTEN" and fields[2] == "77", out
    finally:
        p.stop()


def _cancel(path: str, pid: int, secret: int) -> None:
    """A CancelRequest, as a driver sends it, to the pgscope listening on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(struct.pack("!iiII", 16, 80877102, pid & 0xFFFFFFFF, secret & 0xFFFFFFFF))
        s.recv(1)  # the other end closes once it has it


@pytest.mark.parametrize("peering", [False, True], ids=["no-peers", "peers"])
def test_a_cancel_that_reaches_another_process(pg, tmp_path, peering):
    """With so_reuseport a cancel request lands on any process. With peer_id and peers it is sent
    on to the process whose client it is; without, that process never hears of it."""
    port = free_port()
    dirs = [tmp_path / "p1", tmp_path / "p2"]
    peers = "{" + ", ".join(f'{i} = {{host = "{d}"}}' for i, d in enumerate(dirs, 1)) + "}"
    procs = []
    for i, d in enumerate(dirs, 1):
        d.mkdir()
        env = {"PGSCOPE_SO_REUSEPORT": "true", "PGSCOPE_UNIX_SOCKET_DIR": str(d), "PGSCOPE_STATS_USERS": pg.superuser}
        if peering:
            env.update(PGSCOPE_PEER_ID=str(i), PGSCOPE_PEERS=peers)
        p = ProxyProcess(["--upstream", pg.dsn(), "--listen", f"127.0.0.1:{port}"], env=env)
        p.port = port
        procs.append(p)
    try:
        for p in procs:
            p.wait_event("listening", timeout=30)
        sockets = [str(d / f".s.PGSQL.{port}") for d in dirs]

        async def sleep_and_cancel(via: str) -> float:
            """A client of process 1 sleeps; its cancel goes in through ``via``: seconds it slept."""
            con = await asyncpg.connect(host=str(dirs[0]), port=port, user=pg.superuser, database="pgscope_test")
            try:
                pid, secret = con._protocol.backend_pid, con._protocol.backend_secret
                t0 = time.monotonic()
                task = asyncio.ensure_future(con.execute("select pg_sleep(3)"))
                await asyncio.sleep(0.3)
                await asyncio.get_running_loop().run_in_executor(None, _cancel, via, pid, secret)
                try:
                    await task
                except asyncpg.QueryCanceledError:
                    pass
                return time.monotonic() - t0
            finally:
                await con.close()

        # the control: a cancel through the client's own process stops the sleep at once
        assert asyncio.run(sleep_and_cancel(sockets[0])) < 2.5
        # through the other process: sent on to process 1 with peering, lost without
        slept = asyncio.run(sleep_and_cancel(sockets[1]))
        assert (slept < 2.5) if peering else (slept >= 3.0), slept
        # the console's SHOW PEERS lists the table
        out = subprocess.run([require("psql"), "-X", "-At", "-F", ",", "-h", str(dirs[1]), "-p", str(port), "-U",
                              pg.superuser, "-d", "pgscope", "-c", "SHOW PEERS"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        expected = [f"{i},{d},{port},0" for i, d in enumerate(dirs, 1)] if peering else []
        assert out.stdout.split() == expected, out.stdout
    finally:
        for p in procs:
            p.stop()
