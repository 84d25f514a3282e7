"""``pgscope demo``: a throwaway PostgreSQL, pgscope in front of it, a small shop app through it, a report.

Steps: start a PostgreSQL of its own (proxy.throwaway: local binaries,
testcontainers or the pgserver wheel), load a shop schema (customers, orders,
no index on ``orders.customer_id``), run ``pgscope run``'s own server
(proxy.runner.run_proxy) with demo settings, drive a few seconds of
workload through it from client threads, wait for the inspection to settle,
print the report (or the API results as JSON) and remove everything.

The workload is made to show each part of the inspection:

- ``reports`` looks up a customer's orders by ``customer_id``: a sequential
  scan, slow, so its plan is sampled and an index is recommended (checked
  with HypoPG when the server has it);
- ``storefront`` renders pages ORM-style: a list query, then one SELECT per
  row (N+1 bursts);
- ``checkout`` holds a row lock across a pause while ``billing`` waits on it
  (lock reports with the blocked client);
- ``signup`` runs into unique violations (errors);
- ``api`` runs named prepared statements (through transaction pooling), one lookup at a time in a loop;
- the findings (``/api/findings``): ``reports`` also exports two months of orders without a LIMIT and
  resets promo codes without a WHERE, ``storefront`` pages the order archive with OFFSET, ``search``
  looks customers up with ``ILIKE '%…'``, ``dashboard`` reads the latest orders through
  ``orders_created_at_idx``, and ``migration`` creates an index without CONCURRENTLY in a transaction
  that stays open while signup and billing wait, then drops the dashboard's index; the schema has an
  unused index and one that repeats a unique constraint's; checkout makes billing wait on a lock.

The clients run in their own threads with psycopg, never on the proxy's
event loop; the proxy's loop only runs the proxy and the demo's driver,
which waits for the threads and the HTTP API in worker threads.

This package: the command and its settings here; proxy.demo.schema (the
database and its statements), proxy.demo.app (the clients),
proxy.demo.driver (on the proxy's loop: the run, the settling, the report).
"""

from __future__ import annotations

import signal
import sys
import time
import warnings
from typing import Any

from proxy.demo.driver import Driver, say
from proxy.demo.schema import CUSTOMERS, DBNAME, ORDERS, Shop, prepare_database


def add_arguments(p: Any) -> None:
    p.add_argument("--duration", type=float, default=10.0, metavar="SECONDS",
                   help="how long the sample app runs (default 10)")
    p.add_argument("--keep", action="store_true",
                   help="after the report, keep the proxy and PostgreSQL running until Ctrl-C")
    p.add_argument("--json", action="store_true",
                   help="print the API results (/api/statements, explains, recommendations, nplusone, locks, "
                        "findings) "
                        "as one JSON object instead of the text report")
    p.add_argument("--verbose", action="store_true", help="show the proxy's log (warnings and up) on stderr")


def demo_overrides(cluster: Any, shop: Shop, verbose: bool) -> dict[str, Any]:
    """The settings ``pgscope run`` would get from flags, for the demo."""
    return {
        "listen": "127.0.0.1:0",
        "metrics_listen": "127.0.0.1:0",
        "upstream": cluster.dsn(dbname=DBNAME),
        "pool_mode": "transaction",
        "pool_size": 4,  # six clients share four server connections
        "log_format": "console",
        "log_level": "warning" if verbose else "error",
        "shutdown_timeout": 2.0,
        "inspect": {
            "flush_interval_ms": 100,
            "slow_query_ms": shop.slow_query_ms,
            "nplusone_min_total_ms": 1.0,  # a page's 20 primary-key lookups take a few ms in all
            "lock_hold_ms": 500.0,
            "lock_sample_interval_ms": 200.0,
            "explain_cooldown_s": 1.0,  # the dashboard's plan is sampled again after the migration
            "explain_max_per_minute": 120,
            "loop_min_total_ms": 5.0,  # the api client's lookups take a tenth of a millisecond each
            "loop_threshold": 50,  # a short run on a busy laptop: the loop is seen early, and a pause
            "loop_gap_ms": 300.0,  # of the proxy (a 50,000-row export going through) does not end it
            "index_sample_interval_s": 2.0,  # the index findings within the run
        },
    }


# ---------------------------------------------------------------------- the command

def run(args: Any) -> int:
    from proxy.config import ConfigError, load_settings
    from proxy.runner import run_proxy
    from proxy.throwaway import start_postgres

    if args.duration <= 0:
        print("pgscope demo: --duration must be more than 0", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    say("pgscope demo: starting a throwaway PostgreSQL …")
    tried: list[str] = []
    try:
        with warnings.catch_warnings():  # e.g. platformdirs' XDG_RUNTIME_DIR notice from pgserver
            warnings.simplefilter("ignore")
            cluster = start_postgres(tried)
    except RuntimeError:
        print("pgscope demo: no PostgreSQL server could be started. Tried:\n"
              + "".join(f"  - {t}\n" for t in tried)
              + "Install PostgreSQL's server binaries (e.g. apt install postgresql), start Docker (with "
              "testcontainers installed), or pip install pgserver; then run pgscope demo again.",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        say("pgscope demo: interrupted")
        return 130
    code = 1
    driver: Driver | None = None
    try:
        where = {"binaries": f"local binaries in {cluster.bindir}", "pgserver": "the pgserver wheel",
                 "testcontainers": "a testcontainers container"}.get(cluster.how, cluster.how)
        say(f"PostgreSQL from {where} is up ({time.monotonic() - t0:.1f} s); loading the shop: "
             f"{CUSTOMERS:,} customers, {ORDERS:,} orders, no index on orders.customer_id …")
        t1 = time.monotonic()
        shop = prepare_database(cluster)
        say(f"loaded in {time.monotonic() - t1:.1f} s (PostgreSQL {shop.version}); a lookup of orders by customer "
             f"takes {shop.scan_ms:.0f} ms here, so inspect.slow_query_ms is {shop.slow_query_ms:g}; HypoPG "
             + ("is available: index advice is verified with hypothetical indexes" if shop.hypopg
                else "is not available: index advice is a heuristic, labelled unverified"))
        try:
            settings = load_settings(None, env={}, overrides=demo_overrides(cluster, shop, args.verbose))
        except ConfigError as e:  # pragma: no cover - the demo's own settings
            print(f"pgscope demo: configuration error: {e}", file=sys.stderr)
            return 2
        driver = Driver(args, cluster, shop)
        code = run_proxy(settings, None, None, main=driver.main)
        if not driver.reported and not driver.failed:
            say("pgscope demo: interrupted")
            code = 130
    except KeyboardInterrupt:
        say("pgscope demo: interrupted")
        code = 130
    except Exception as e:  # noqa: BLE001
        print(f"pgscope demo: failed: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the clean-up
        try:
            cluster.stop()
        finally:
            signal.signal(signal.SIGINT, previous)
        say(f"stopped pgscope and the throwaway PostgreSQL, removed its files ({time.monotonic() - t0:.1f} s in all)")
    return code


run.add_arguments = add_arguments  # type: ignore[attr-defined]
