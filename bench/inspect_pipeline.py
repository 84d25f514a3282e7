#!/usr/bin/env python3
"""CPU cost of the inspection pipeline per statement, offline (no sockets, no server).

Run by hand:  python3 bench/inspect_pipeline.py [--events 200000] [--workload simple|prepared|mixed]

Builds the statement records the relay would emit for a pgbench-like stream
(10 clients; `-M simple` sends a different literal every time, `-M prepared`
the same text) and times ``Inspector.process`` over them in batches of the
size the default 200 ms flush sees, with the consumers the proxy installs.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxy.config import load_settings  # noqa: E402
from proxy.protocol.records import ClientInfo, StatementEvent, TransactionEvent  # noqa: E402
from proxy.inspect.advisor import IndexAdvisor  # noqa: E402
from proxy.inspect.explain import ExplainSampler  # noqa: E402
from proxy.inspect.findings_setup import add_findings  # noqa: E402
from proxy.inspect.inspector import Inspector  # noqa: E402
from proxy.inspect.locks import LockTracker  # noqa: E402
from proxy.inspect.nplusone import NPlusOneDetector  # noqa: E402
from proxy.inspect.pipeline import EventSink  # noqa: E402


TPCB = ("BEGIN;", "UPDATE pgbench_accounts SET abalance = abalance + {d} WHERE aid = {a};",
        "SELECT abalance FROM pgbench_accounts WHERE aid = {a};",
        "UPDATE pgbench_tellers SET tbalance = tbalance + {d} WHERE tid = {t};",
        "UPDATE pgbench_branches SET bbalance = bbalance + {d} WHERE bid = {b};",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({t}, {b}, {a}, {d}, CURRENT_TIMESTAMP);",
        "END;")


def make_tpcb(n: int) -> list:
    """pgbench's TPC-B (-M simple): 7 statements a transaction, status changes at BEGIN and END."""
    clients = [ClientInfo(i, "bench", "postgres", "pgbench", f"127.0.0.1:{5000 + i}") for i in range(10)]
    rnd = random.Random(1)
    out: list = []
    t = 1000.0
    step = 0
    while len(out) < n:
        c = clients[(step // 7) % 10]
        k = step % 7
        if k == 0:
            vals = dict(a=rnd.randint(1, 1000000), t=rnd.randint(1, 100), b=rnd.randint(1, 10),
                        d=rnd.randint(-5000, 5000))
        q = TPCB[k].format(**vals)
        out.append(StatementEvent(c, q, 0, False, "", None, 100 + c.client_id, t, t + 0.0002, 0.0,
                                  q.split()[0].rstrip(";"), 1, None, 0 < k < 7))
        if k == 0:
            out.append(TransactionEvent(c, "T", t + 0.0002, 100 + c.client_id))
        if k == 6:
            out.append(TransactionEvent(c, "I", t + 0.0002, 100 + c.client_id))
        t += 0.0003
        step += 1
    return out


def make_events(n: int, workload: str, nclients: int = 10) -> list:
    if workload == "tpcb":
        return make_tpcb(n)
    clients = [ClientInfo(i, "bench", "postgres", "pgbench", f"127.0.0.1:{5000 + i}") for i in range(nclients)]
    rnd = random.Random(1)
    out = []
    t = 1000.0
    for i in range(n):
        c = clients[rnd.randrange(nclients)]
        if workload == "prepared" or (workload == "mixed" and i % 2):
            q = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
            ext = True
        else:
            q = f"SELECT abalance FROM pgbench_accounts WHERE aid = {rnd.randint(1, 1000000)};"
            ext = False
        d = 0.0001 + rnd.random() * 0.0002
        out.append(StatementEvent(c, q, 0, ext, "", None, 100 + c.client_id, t, t + d, 0.0, "SELECT", 1,
                                  None, False))
        t += 0.00005
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200000)
    ap.add_argument("--batch", type=int, default=3600, help="records per flush (18k tps x 200 ms)")
    ap.add_argument("--workload", choices=["simple", "prepared", "mixed", "tpcb"], default="simple")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--clients", type=int, default=10, help="clients the statements come from (not tpcb)")
    args = ap.parse_args()
    settings = load_settings(None, env={}, overrides={})
    events = make_events(args.events, args.workload, args.clients)
    best = float("inf")
    for _ in range(args.repeat):
        insp = Inspector(settings.inspect, EventSink(), logger=None)
        # the consumers the proxy installs (proxy.listener.Proxy._add_consumers), without a server
        explain = ExplainSampler(settings, None, advisor=IndexAdvisor(settings, insp.stats))
        insp.add_consumer(explain)
        nplusone = NPlusOneDetector(settings)
        insp.add_consumer(nplusone)
        locks = LockTracker(settings, None, lambda pid: None, insp.fingerprinter)
        insp.add_consumer(locks)
        add_findings(insp, settings, explain, nplusone, locks)
        insp.process(events[:100], 0.0)  # warm the fingerprint cache
        t0 = time.perf_counter()
        for i in range(0, len(events), args.batch):
            insp.process(events[i:i + args.batch], 1.0)
        best = min(best, time.perf_counter() - t0)
    print(f"{args.workload}: {best / len(events) * 1e6:.3f} µs per statement (best of {args.repeat}; "
          f"{args.clients} clients, batches of {args.batch})")


if __name__ == "__main__":
    main()
