"""The benchmarks run by hand (bench/), run here for a second each so that they cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_inspect_pipeline_runs():
    out = subprocess.run([sys.executable, "bench/inspect_pipeline.py", "--events", "2000", "--repeat", "1",
                          "--workload", "mixed"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    per = [float(x) for x in re.findall(r"([0-9.]+) µs per statement", out.stdout)]
    assert per and all(x > 0 for x in per), out.stdout


@pytest.mark.pgbouncer
def test_relay_tps_runs_every_target(pg):
    with pg.connect(dbname="postgres") as c:
        if not c.execute("select 1 from pg_database where datname = 'pgscope_bench'").fetchone():
            c.execute("create database pgscope_bench")
    out = subprocess.run([sys.executable, "bench/relay_tps.py", "--dsn", pg.dsn(dbname="pgscope_bench"),
                          "--seconds", "1", "--rounds", "1", "--scale", "1", "--clients", "2",
                          "--pool-size", "2", "--mode", "transaction", "--no-direct"],
                         capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rounds = dict(re.findall(r"^round 1 (.+?)\s+(\d+) tps", out.stdout, re.M))
    assert set(rounds) == {"pgscope (inspection on)", "pgscope (inspection off)", "pgbouncer"}, out.stdout
    assert all(int(v) > 0 for v in rounds.values()), out.stdout
    assert "failed" not in out.stdout, out.stdout
    # CPU per transaction for each proxy, PgBouncer's included, and the ratios to PgBouncer
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^\| (pgscope \(inspection on\)|pgbouncer) \| \d+ \| [^|]+ \| [^|]+ \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$",
        out.stdout, re.M)}
    assert set(rows) == {"pgscope (inspection on)", "pgbouncer"}, out.stdout
    assert float(rows["pgbouncer"][0]) > 0 and rows["pgbouncer"][1:] == ("1.00", "1.00"), out.stdout


def test_idle_memory_runs(pg):
    out = subprocess.run([sys.executable, "bench/idle_memory.py", "--dsn", pg.dsn(), "--clients", "60",
                          "--pool-size", "2"], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    m = re.search(r"with 60: (-?[0-9.]+) KiB per idle client", out.stdout)
    assert m is not None, out.stdout


def test_bare_passthrough_relays_and_exits_on_sigint(pg):
    """bench/bare_passthrough.py (the uvloop floor in docs/performance.md) carries a real session."""
    import signal
    import socket
    import time

    import psycopg

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "bench/bare_passthrough.py", "--listen", str(port),
                             "--upstream", f"{pg.host}:{pg.port}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:  # wait for the listening socket, not a fixed time
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.05)
        conninfo = psycopg.conninfo.make_conninfo(pg.dsn(), host="127.0.0.1", port=port)
        with psycopg.connect(conninfo, autocommit=True) as c:
            assert c.execute("select 40 + 2").fetchone() == (42,)
            assert c.info.port == port
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_executemany_race_runs(pg):
    """bench/executemany_race.py (the race in docs/driver-suites.md) runs its loop on a real PostgreSQL."""
    out = subprocess.run([sys.executable, "bench/executemany_race.py", "--rounds", "1", "--block", "2",
                          f"direct={pg.dsn()}"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert re.search(r"^direct\s+wrote the whole batch in\s+[0-2] of 2 runs", out.stdout, re.M), out.stdout
