"""The demo's driver on the proxy's event loop: runs the sample app, waits for the inspection to settle, prints the report."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from proxy.demo.app import ShopApp
from proxy.demo.schema import DBNAME, Shop


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


API_PATHS = (("statements", "/api/statements?order=total_time&limit=50", "statements"),
             ("explains", "/api/explains?limit=50", "explains"),
             ("recommendations", "/api/recommendations", "recommendations"),
             ("nplusone", "/api/nplusone", "bursts"),
             ("locks", "/api/locks", "locks"),
             ("findings", "/api/findings?limit=200", "findings"))


def collect_api(base: str) -> dict[str, Any]:
    from proxy.report import fetch

    return {name: fetch(base, path).get(key, []) for name, path, key in API_PATHS}


class Driver:
    """Runs on the proxy's event loop (``main`` of proxy.runner.serve); blocking work goes to threads."""

    def __init__(self, args: Any, cluster: Any, shop: Shop) -> None:
        self.args = args
        self.cluster = cluster
        self.shop = shop
        self.app: ShopApp | None = None
        self.reported = False
        self.failed = False

    async def main(self, proxy: Any) -> int:
        try:
            return await self._main(proxy)
        except asyncio.CancelledError:  # a signal: the proxy drains, the clients stop
            if self.app is not None:
                self.app.stop.set()
            raise
        except Exception as e:  # noqa: BLE001
            if self.app is not None:
                self.app.stop.set()
            self.failed = True
            print(f"pgscope demo: failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1

    async def _main(self, proxy: Any) -> int:
        args = self.args
        user = self.cluster.superuser
        dsn = f"postgresql://{user}@127.0.0.1:{proxy.port}/{DBNAME}"
        base = f"http://127.0.0.1:{proxy.metrics_port}"
        s = proxy.settings
        say(f"pgscope listens on 127.0.0.1:{proxy.port} (transaction pooling, {s.pool_size} server connections), "
             f"metrics and API on {base}")
        say(f"running the sample shop for {args.duration:g} s through pgscope: reports (orders by customer, "
             f"no index; an export without LIMIT; an UPDATE without WHERE), storefront (N+1 pages, OFFSET paging), "
             f"checkout + billing (a row lock and a waiter), signup (unique violations), api (prepared lookups "
             f"in a loop), search (ILIKE '%…'), dashboard (latest orders by an index), migration (a blocking "
             f"CREATE INDEX, then a DROP INDEX the dashboard needed)")
        self.app = ShopApp(dsn, args.duration)
        started = time.monotonic()
        counts = await asyncio.to_thread(self.app.run)
        total = sum(c["statements"] for c in counts.values())
        errors = sum(c["errors"] for c in counts.values())
        say(f"workload done in {time.monotonic() - started:.1f} s: {total} statements from {len(counts)} clients "
             f"({errors} failed on purpose); waiting for the inspection to settle")
        for f in self.app.failures:
            say(f"  warning: client {f}")
        await settle(proxy)
        if args.json:
            data = await asyncio.to_thread(collect_api, base)
            data["workload"] = counts
            data["proxy"] = {"dsn": dsn, "metrics_url": base + "/metrics", "api_url": base + "/api/",
                             "slow_query_ms": s.inspect.slow_query_ms}
            data["postgres"] = {"how": self.cluster.how, "version": self.shop.version, "hypopg": self.shop.hypopg,
                                "host": self.cluster.host, "port": self.cluster.port,
                                "datadir": self.cluster.datadir, "bindir": self.cluster.bindir}
            print(json.dumps(data, indent=2, default=str), flush=True)
        else:
            from proxy.report import report

            text = await asyncio.to_thread(report, base)
            print(text, end="", flush=True)
            print(f"\nPrometheus metrics were served at {base}/metrics and the JSON API under {base}/api/\n"
                  f"(statements, explains, recommendations, nplusone, locks, findings)"
                  + (": still up, see below." if args.keep else " while the demo ran; --keep keeps them up."),
                  flush=True)
        self.reported = True
        if self.failed or self.app.failures:
            return 1
        if args.keep:
            out = sys.stderr if args.json else sys.stdout
            print(f"\nThe proxy and PostgreSQL keep running until Ctrl-C:\n"
                  f"  proxy:     {dsn}   (psql '{dsn}')\n"
                  f"  metrics:   {base}/metrics\n"
                  f"  API:       {base}/api/statements\n"
                  f"  report:    pgscope report --from {base}\n"
                  f"  postgres:  {self.cluster.dsn(dbname=DBNAME)}   (direct, not through pgscope)",
                  file=out, flush=True)
            await asyncio.Event().wait()  # until a signal cancels us
        return 0


async def settle(proxy: Any, timeout: float = 20.0) -> None:
    """Wait until the relay's queue is drained and sampled EXPLAINs (and HypoPG checks) are done."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(3 * proxy.settings.inspect.flush_interval_ms / 1000.0)
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        explain = getattr(proxy, "explain", None)
        task = getattr(explain, "_task", None)
        busy = len(proxy.sink or ()) > 0 or (explain is not None and (
            bool(explain.pending) or (task is not None and not task.done())))
        if not busy:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(2 * proxy.settings.inspect.flush_interval_ms / 1000.0)
