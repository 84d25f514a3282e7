#!/usr/bin/env python3
"""pgbench throughput: PostgreSQL directly, through pgscope (inspection on/off) and through PgBouncer.

Run by hand, never in CI:

    python3 bench/relay_tps.py                       # throwaway PostgreSQL from the test harness
    python3 bench/relay_tps.py --dsn postgresql://postgres@127.0.0.1:5432/postgres
    python3 bench/relay_tps.py --mode transaction --clients 50 --pool-size 10

The targets run in interleaved rounds whose order rotates (A B C D, B C D A, ...)
so that a noisy machine's drift hits all of them alike; the median of the rounds
is reported.  With --fresh every proxy is started anew for each round: on this
2-core machine two identical long-lived proxies differed by up to 15% depending
on their slot, which --fresh and the rotation average out.  A second "off"
target (--variant "A/A:PGSCOPE_INSPECT_ENABLED=false") shows the noise floor.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any
from urllib.parse import urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def find(name: str) -> str | None:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/lib/postgresql/15/bin")
    return path


def start_pgscope(upstream: str, mode: str, pool_size: int, inspect: bool,
                  extra_env: dict[str, str] | None = None, root: str = ROOT,
                  max_client_conn: int = 1000) -> tuple[subprocess.Popen, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSCOPE_")}
    env["PGSCOPE_INSPECT_ENABLED"] = "true" if inspect else "false"
    env.update(extra_env or {})  # a variant's settings win
    env["PYTHONPATH"] = root
    for attempt in range(3):
        # a port found free can be taken before pgscope binds it (an ephemeral port of another
        # connection): start again on other ports, and say why if that keeps failing
        port = free_port()
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--listen", f"127.0.0.1:{port}", "--upstream", upstream,
                 "--pool-mode", mode, "--pool-size", str(pool_size), "--metrics-listen", f"127.0.0.1:{free_port()}",
                 "--log-level", "warning", "--max-client-conn", str(max_client_conn)],
                env=env, stdout=subprocess.DEVNULL, stderr=err)
            try:
                wait_port(port, proc)
                return proc, port
            except RuntimeError:
                proc.kill()
                proc.wait()
                err.seek(0)
                reason = err.read().decode(errors="replace").strip().splitlines()[-1:] or ["?"]
                print(f"pgscope did not start (attempt {attempt + 1}): {reason[0]}", file=sys.stderr)
    raise RuntimeError("pgscope did not start three times")


def start_pgbouncer(upstream: str, mode: str, pool_size: int, workdir: str) -> tuple[subprocess.Popen, int]:
    exe = find("pgbouncer")
    if exe is None:
        raise FileNotFoundError("pgbouncer")
    u = urlsplit(upstream)
    port = free_port()
    ini = os.path.join(workdir, "pgbouncer.ini")
    with open(ini, "w") as f:
        f.write(f"""[databases]
* = host={u.hostname} port={u.port or 5432}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir}/users.txt
pool_mode = {mode}
default_pool_size = {pool_size}
max_client_conn = 1000
logfile = {workdir}/pgbouncer.log
pidfile = {workdir}/pgbouncer.pid
""")
    with open(os.path.join(workdir, "users.txt"), "w") as f:
        f.write(f'"{u.username}" ""\n')
    args = [exe, ini]
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        os.chmod(workdir, 0o777)
        for p in os.listdir(workdir):
            os.chmod(os.path.join(workdir, p), 0o666)
        args = ["runuser", "-u", "postgres", "--", exe, ini]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    # the process whose CPU is measured: pgbouncer itself (not runuser); its pidfile may be
    # there but still empty for a moment
    deadline = time.monotonic() + 10
    while True:
        try:
            with open(os.path.join(workdir, "pgbouncer.pid")) as f:
                proc.cpu_pid = int(f.read().strip())  # type: ignore[attr-defined]
            break
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                proc.terminate()  # not yet in the caller's list: it would outlive the bench
                raise
            time.sleep(0.05)
    return proc, port


def server(dsn: str | None) -> tuple[str, Any]:
    """The PostgreSQL to run against: ``dsn``, or a throwaway cluster from the test harness
    (returned too, to be stopped)."""
    if dsn:
        return dsn, None
    sys.path.insert(0, ROOT)
    from tests.support.pg import start_pg

    pg = start_pg()
    return pg.dsn(), pg


def dsn_at(upstream: str, port: int) -> str:
    u = urlsplit(upstream)
    return f"postgresql://{u.username}@127.0.0.1:{port}{u.path or '/postgres'}"


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process (and its reaped children), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def pgbench(dsn: str, args: list[str], pid: int | None = None) -> tuple[float, float | None]:
    """(tps, CPU microseconds (user + system) the process ``pid`` (a proxy) spent per transaction)."""
    before = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run([find("pgbench"), *args, dsn], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    m = re.search(r"tps = ([\d.]+) \((?:without initial connection time|excluding connections establishing)\)",
                  out.stdout)
    n = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    if m is None or n is None:
        raise RuntimeError(out.stdout[-2000:])
    cpu = (cpu_seconds(pid) - before) / int(n.group(1)) * 1e6 if pid else None
    return float(m.group(1)), cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", help="an existing PostgreSQL (superuser); default: a throwaway cluster")
    ap.add_argument("--mode", default="session", choices=["session", "transaction"])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pool-size", type=int, default=20)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--protocol", default="simple", choices=["simple", "extended", "prepared"])
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--no-pgbouncer", action="store_true")
    ap.add_argument("--tpcb", action="store_true", help="TPC-B instead of -S (select only)")
    ap.add_argument("--env", action="append", default=[], metavar="PGSCOPE_KEY=VALUE",
                    help="settings for both pgscope targets (repeatable)")
    ap.add_argument("--no-direct", action="store_true", help="skip PostgreSQL directly")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
                    help="one more pgscope target (inspection on) with these settings (repeatable)")
    ap.add_argument("--fresh", action="store_true",
                    help="start each proxy anew for every round (per-process placement effects average out)")
    ap.add_argument("--compare-root", metavar="DIR", action="append", default=[],
                    help="also run pgscope (inspection on) from another source tree, e.g. a git worktree (repeatable)")
    opts = ap.parse_args()

    upstream, pg = server(opts.dsn)
    workdir = tempfile.mkdtemp(prefix="pgscope-bench-")
    procs: list[subprocess.Popen] = []
    try:
        subprocess.run([find("pgbench"), "-i", "-q", "-s", str(opts.scale), upstream],
                       check=True, capture_output=True, timeout=600)
        # name -> a function starting that target: (process or None, dsn)
        starters: dict[str, Any] = {}
        if not opts.no_direct:
            starters["postgres (direct)"] = lambda: (None, upstream)
        extra_env = dict(e.split("=", 1) for e in opts.env)

        def pgscope_starter(inspect: bool, env: dict[str, str], root: str = ROOT):
            def start():
                p, port = start_pgscope(upstream, opts.mode, opts.pool_size, inspect=inspect, extra_env=env,
                                        root=root)
                return p, dsn_at(upstream, port)
            return start

        starters["pgscope (inspection on)"] = pgscope_starter(True, extra_env)
        starters["pgscope (inspection off)"] = pgscope_starter(False, extra_env)
        for v in opts.variant:
            label, _, kvs = v.partition(":")
            venv = dict(extra_env)
            venv.update(dict(kv.split("=", 1) for kv in kvs.split(",") if kv))
            starters[f"pgscope ({label})"] = pgscope_starter(True, venv)
        for root in opts.compare_root:
            label = f"pgscope ({os.path.basename(os.path.normpath(root))}, on)"
            starters[label] = pgscope_starter(True, extra_env, os.path.abspath(root))
        if not opts.no_pgbouncer and find("pgbouncer"):
            def bouncer():
                p, port = start_pgbouncer(upstream, opts.mode, opts.pool_size, workdir)
                return p, dsn_at(upstream, port)
            starters["pgbouncer"] = bouncer
        base = ["-M", opts.protocol, "-c", str(opts.clients), "-j", str(opts.threads)]
        if not opts.tpcb:
            base.append("-S")
        args = [*base, "-T", str(opts.seconds)]
        names = list(starters)
        results: dict[str, list[float]] = {k: [] for k in names}
        cpus: dict[str, list[float]] = {k: [] for k in names}
        failed: dict[str, str] = {}
        running: dict[str, tuple[Any, str]] = {}

        def stop(proc) -> None:
            proc.send_signal(signal.SIGINT if proc.args[0] != "runuser" else signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

        def ensure(name: str) -> tuple[Any, str]:
            if name not in running:
                proc, dsn = starters[name]()
                if proc is not None:
                    procs.append(proc)
                running[name] = (proc, dsn)
                try:
                    warm = [*base, "-T", "2"]
                    if name == "pgbouncer" and opts.protocol == "prepared" and opts.mode == "transaction":
                        warm = [("extended" if a == "prepared" else a) for a in warm]
                    pgbench(dsn, warm)  # warm-up
                except RuntimeError as e:
                    failed[name] = str(e).strip().splitlines()[-1][:200]
            return running[name]

        for r in range(opts.rounds):
            # every target takes every position in turn: the first and the last of a round
            # do not see the same machine (seen here: up to 15% between positions)
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                proc, dsn = ensure(name)
                if name in failed:
                    continue
                run_args = args
                if name == "pgbouncer" and opts.protocol == "prepared" and opts.mode == "transaction":
                    # PgBouncer before 1.21 has no prepared statements in transaction mode: its
                    # extended-protocol run is the comparison (the same messages but Parse)
                    run_args = [("extended" if a == "prepared" else a) for a in args]
                tps, cpu = pgbench(dsn, run_args, getattr(proc, "cpu_pid", proc.pid) if proc is not None else None)
                results[name].append(tps)
                if cpu is not None:
                    cpus[name].append(cpu)
                print(f"round {r + 1} {name:28s} {tps:10.0f} tps" + (f"  {cpu:6.1f} µs CPU/tx" if cpu else ""),
                      flush=True)
                if opts.fresh and proc is not None:  # a new process next round
                    stop(proc)
                    procs.remove(proc)
                    del running[name]
        print()
        print(f"pgbench {' '.join(args)} ({opts.mode} pooling, pool_size {opts.pool_size}); median of {opts.rounds}")
        if "pgbouncer" in results and opts.protocol == "prepared" and opts.mode == "transaction":
            print("(pgbouncer ran -M extended: it has no prepared statements in transaction mode before 1.21)")
        direct = statistics.median(results["postgres (direct)"]) if "postgres (direct)" in results else None
        bouncer = results.get("pgbouncer") or None
        bcpu = statistics.median(cpus["pgbouncer"]) if cpus.get("pgbouncer") else None
        print("| target | tps (median) | range | vs direct | CPU µs/tx | tps / PgBouncer | CPU / PgBouncer |")
        print("|---|---|---|---|---|---|---|")
        for name, why in failed.items():
            print(f"| {name} | failed | {why} | | | | |")
        for name, vals in results.items():
            if not vals:
                continue
            med = statistics.median(vals)
            c = statistics.median(cpus[name]) if cpus[name] else None
            rel = f"{med / direct * 100:.0f}%" if direct else "-"
            vs_b = f"{med / statistics.median(bouncer):.2f}" if bouncer else "-"
            cpu_b = f"{c / bcpu:.2f}" if c is not None and bcpu else "-"
            print(f"| {name} | {med:.0f} | {min(vals):.0f}-{max(vals):.0f} | {rel} | "
                  f"{'-' if c is None else f'{c:.1f}'} | {vs_b} | {cpu_b} |")
        on, off = results.get("pgscope (inspection on)"), results.get("pgscope (inspection off)")
        if on and off:
            ratios = sorted(a / b for a, b in zip(on, off))
            print(f"inspection on / off, per round: {' '.join(f'{x:.3f}' for x in ratios)};"
                  f" median {statistics.median(ratios):.3f}")
            con, coff = cpus.get("pgscope (inspection on)"), cpus.get("pgscope (inspection off)")
            if con and coff:
                print(f"proxy CPU per transaction, on / off: {statistics.median(con) / statistics.median(coff):.3f}")
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT if p.args[0] != "runuser" else signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(workdir, ignore_errors=True)
        if pg is not None:
            pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
