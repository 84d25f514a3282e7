#!/usr/bin/env python3
"""The relay core alone: CPU per transaction of the compiled twin against the pure-Python reference.

No sockets, no PostgreSQL: the byte streams pgbench -S makes (simple, extended
and prepared protocol; session and transaction pooling, with named statements
renamed in transaction mode) are fed through ``Relay.from_client``/``track``
and ``from_server``, as proxy/session/client.py does, one transaction per call
pair.  Run by hand:

    python3 bench/relay_core.py                 # every workload, both cores
    python3 bench/relay_core.py --tx 50000 --repeat 7 --no-emit
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import time
from collections import OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from proxy.protocol import messages as m  # noqa: E402
from proxy.protocol.records import ClientInfo  # noqa: E402
from proxy.protocol.relay import PyRelay  # noqa: E402

SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = {};"
PSQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
CLIENT = ClientInfo(1, "bench", "bench", "pgbench", "127.0.0.1:1")
ROW_DESCRIPTION = m.frame(b"T", b"\0\x01abalance\0" + struct.pack("!ihihih", 16400, 3, 23, 4, -1, 0))
ANSWER = m.frame(b"D", b"\0\x01\0\0\0\x011") + m.frame(b"C", b"SELECT 1\0") + m.frame(b"Z", b"I")


def _bind(stmt: str, value: bytes) -> bytes:
    body = b"\0" + stmt.encode() + b"\0\0\0\0\x01" + struct.pack("!i", len(value)) + value + b"\0\0"
    return m.frame(b"B", body)


DESCRIBE_PORTAL = m.frame(b"D", b"P\0")
EXECUTE = m.frame(b"E", b"\0\0\0\0\0")


def workload(protocol: str, n: int) -> tuple[list[bytes], list[bytes], bytes]:
    """(client bytes per transaction, server bytes per transaction, the client's first message)."""
    front, back = [], []
    for i in range(n):
        aid = str(1 + i * 7919 % 1000000).encode()
        if protocol == "simple":
            front.append(m.query(SQL.format(aid.decode())))
            back.append(ROW_DESCRIPTION + ANSWER)
        elif protocol == "extended":
            front.append(m.parse("", PSQL, (23,)) + _bind("", aid) + DESCRIBE_PORTAL + EXECUTE + m.sync())
            back.append(m.frame(b"1") + m.frame(b"2") + ROW_DESCRIPTION + ANSWER)
        else:  # prepared: P_0 parsed once, then Bind/Describe/Execute/Sync
            front.append(_bind("P_0", aid) + DESCRIBE_PORTAL + EXECUTE + m.sync())
            back.append(m.frame(b"2") + ROW_DESCRIPTION + ANSWER)
    first = m.parse("P_0", PSQL, (23,)) + m.sync() if protocol == "prepared" else b""
    return front, back, first


def run(cls: type, protocol: str, mode: str, n: int, emit: bool) -> float:
    """Seconds for ``n`` transactions through one relay."""
    front, back, first = workload(protocol, n)
    sink: list = []
    r = cls(CLIENT, sink.append if emit else None, 100 if mode == "transaction" else 0)
    prepared: OrderedDict = OrderedDict()
    r.attach(4242, prepared, 0.0)
    if first:  # the one-off Parse, answered
        r.from_client(first, 0.0)
        r.from_server(m.frame(b"1") + m.frame(b"Z", b"I"), 0.0)
    now = 1.0
    t0 = time.perf_counter()
    if mode == "session":
        for f, b in zip(front, back):
            r.from_client(f, now)
            r.from_server(b, now)
            if len(sink) > 4096:
                sink.clear()
    else:  # as client.py: frame, attach a server (the pool's fast path), track, answer, release
        for f, b in zip(front, back):
            chunk = r.frame_client(f)
            r.attach(4242, prepared, 0.0)
            r.track(chunk, now)
            r.from_server(b, now)
            if not r.releasable:
                raise RuntimeError("the server should be releasable after each transaction")
            if len(sink) > 4096:
                sink.clear()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tx", type=int, default=30000, help="transactions per measurement")
    ap.add_argument("--repeat", type=int, default=5, help="measurements per case (the median is shown)")
    ap.add_argument("--no-emit", action="store_true", help="inspection off: no records built")
    opts = ap.parse_args()
    try:
        from proxy.protocol import _core
    except ImportError as e:
        print(f"the compiled core is not built ({e}): pip install -e .", file=sys.stderr)
        return 1
    cores = {"pure Python": PyRelay, "compiled": _core.Relay}
    print(f"{opts.tx} pgbench -S transactions per run, median of {opts.repeat}; records "
          f"{'off' if opts.no_emit else 'on'}; µs of CPU per transaction (client + server side of the relay)")
    print("| workload | pure Python | compiled | speed-up |")
    print("|---|---|---|---|")
    for mode in ("session", "transaction"):
        for protocol in ("simple", "extended", "prepared"):
            us = {}
            for name, cls in cores.items():
                times = [run(cls, protocol, mode, opts.tx, not opts.no_emit) for _ in range(opts.repeat)]
                us[name] = statistics.median(times) / opts.tx * 1e6
            py, cy = us["pure Python"], us["compiled"]
            print(f"| {mode}, -M {protocol} | {py:.2f} | {cy:.2f} | {py / cy:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
