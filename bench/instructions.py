"""User-space instructions per transaction of the proxy, counted by valgrind's callgrind.

Run by hand, never in CI (needs valgrind; the proxy runs about 50 times slower under it):

    python3 bench/instructions.py --dsn postgresql://postgres@127.0.0.1:5432/postgres
    python3 bench/instructions.py --dsn ... --clients 100 --tx 60 --no-inspect
    python3 bench/instructions.py --dsn ... --root /tmp/other-checkout     # an A/B against another tree

On a shared 2-core machine CPU time per transaction moves by 10-20% from run to
run with the load of the neighbours; the number of instructions the proxy
executes does not (repeated runs agree within about 1%), so a change of a few
percent in the relay's own work shows here when no throughput figure can show
it.  What it leaves out: the kernel's share (system time, the same syscalls
for every change of the Python side) and anything that costs cycles without
instructions (cache misses).  Periodic work (the janitor, the lock sampler,
the inspection flush) is counted per transaction at the slow pace callgrind
allows, so it weighs more here than at full speed; compare runs, not absolutes.

The proxy runs twice under callgrind, serving ``--tx`` / 4 and ``--tx``
transactions per client of ``pgbench -S`` (after 20 of warm-up); the
difference of the two totals, divided by the difference in transactions, is
the transactions' own cost (start-up, log-ins and shut-down cancel out).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.relay_tps import dsn_at, find, free_port, wait_port  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", required=True, help="a PostgreSQL with pgbench's tables (pgbench -i)")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--tx", type=int, default=600, help="transactions per client while counting")
    ap.add_argument("--protocol", choices=("simple", "extended", "prepared"), default="simple")
    ap.add_argument("--mode", choices=("session", "transaction"), default="transaction")
    ap.add_argument("--pool-size", type=int, default=10)
    ap.add_argument("--no-inspect", action="store_true")
    ap.add_argument("--pure", action="store_true", help="the pure-Python cores (PGSCOPE_NO_EXTENSIONS=1)")
    ap.add_argument("--root", default=ROOT, help="the source tree to run (default: this one)")
    opts = ap.parse_args()
    valgrind = find("valgrind")
    if not valgrind:
        print("valgrind (callgrind) is not installed", file=sys.stderr)
        return 2
    # two runs, the second with more transactions: the difference is the transactions' alone
    # (start-up, log-in and shut-down cancel out)
    short, long = max(1, opts.tx // 4), opts.tx
    counts = [run_once(opts, valgrind, n) for n in (short, long)]
    per = (counts[1] - counts[0]) / (opts.clients * (long - short))
    print(f"{os.path.basename(os.path.abspath(opts.root))}: {opts.mode} pooling, -M {opts.protocol}, "
          f"{opts.clients} clients, inspection {'off' if opts.no_inspect else 'on'}{', pure Python' if opts.pure else ''}: "
          f"{per:.0f} user-space instructions per transaction")
    return 0


def run_once(opts: argparse.Namespace, valgrind: str, tx: int) -> int:
    """Instructions the proxy executed in all, from start to exit, serving ``tx`` transactions
    per client (after 20 of warm-up)."""
    workdir = tempfile.mkdtemp(prefix="pgscope-cg-")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSCOPE_")}
    env["PGSCOPE_INSPECT_ENABLED"] = "false" if opts.no_inspect else "true"
    if opts.pure:
        env["PGSCOPE_NO_EXTENSIONS"] = "1"
    env["PYTHONPATH"] = os.path.abspath(opts.root)
    python = os.path.realpath(sys.executable)  # not a shim: callgrind must see the interpreter itself
    proc = subprocess.Popen(
        [valgrind, "--tool=callgrind", f"--callgrind-out-file={workdir}/cg.out",
         python, "-m", "proxy", "run", "--listen", f"127.0.0.1:{port}", "--upstream", opts.dsn,
         "--pool-mode", opts.mode, "--pool-size", str(opts.pool_size), "--metrics-listen", "",
         "--log-level", "warning", "--max-client-conn", str(opts.clients + 100)],
        env=env, cwd=os.path.abspath(opts.root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc, timeout=300)
        dsn = dsn_at(opts.dsn, port)
        bench = [find("pgbench"), "-S", "-n", "-M", opts.protocol, "-c", str(opts.clients), "-j", "1"]
        out = subprocess.run([*bench, "-t", str(20 + tx), dsn], capture_output=True, text=True, timeout=1800)
        done = opts.clients * (20 + tx)
        if f"processed: {done}/{done}" not in out.stdout:
            raise RuntimeError(out.stdout[-1500:] + out.stderr[-1500:])
        proc.terminate()  # callgrind writes its counts as the proxy exits
        proc.wait(300)
        total = 0
        for path in glob.glob(f"{workdir}/cg.out*"):
            with open(path) as f:
                for line in f:
                    if line.startswith("summary:"):
                        total += int(line.split()[1])
        return total
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
