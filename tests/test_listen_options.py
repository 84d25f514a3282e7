"""The listening socket's PgBouncer options: so_reuseport (several pgscope processes on one port, the
kernel spreading connections over them) and listen_backlog."""

from __future__ import annotations

import subprocess

import psycopg

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
