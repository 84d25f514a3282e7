"""PgBouncer's statistics: the counts per database since start, and their averages over the last
``stats_period`` (SHOW STATS, STATS_TOTALS, STATS_AVERAGES, TOTALS and the ``stats`` log line).

The counts come from two places: the pools (a checkout of a server, and its wait) and what each
client's relay counted (``AdminContext.traffic``, the clients that left included).  Like
PgBouncer, the averages are not since start: every ``stats_period`` the window keeps a copy of the
counts, and an average is the change since the copy before the last one, over the time since it
was taken (between one and two periods; since a second before start until the first copies).
The three times (transaction, query, wait) average per transaction, query and checkout, in µs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Iterable

from proxy.pool import control

# the counts, in PgBouncer's order (its PgStats); bytes: received from clients, sent to them.
# The names are the relays' (proxy.protocol.ledger.TRAFFIC, and the logins); the pools add the
# checkouts and their waits
COUNTS = ("server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent", "xact_time",
          "query_time", "wait_time", "client_parse_count", "server_parse_count", "bind_count",
          "client_connect_count")
_SECONDS = ("xact_time", "query_time")  # (the relays count seconds, PgBouncer shows µs)
_RATES = tuple(c for c in COUNTS if not c.endswith("_time"))
# a mean time: (its total, what it is divided by)
_MEANS = {"xact_time": "xact_count", "query_time": "query_count", "wait_time": "server_assignment_count"}


def totals(pools: Any, traffic: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per database, the COUNTS since start (times in µs)."""
    out: dict[str, dict[str, float]] = {}

    def row(db: str) -> dict[str, float]:
        r = out.get(db)
        if r is None:
            r = out[db] = dict.fromkeys(COUNTS, 0)
        return r

    for p in control.pools_of(pools, None):
        r = row(p.db)
        r["server_assignment_count"] += p.wait_hist.count
        r["wait_time"] += p.wait_hist.sum * 1e6
    for db, t in traffic.items():
        r = row(db)
        for c, v in t.items():
            if c in r:
                r[c] += v * 1e6 if c in _SECONDS else v
    return out


def summed(per_db: Iterable[dict[str, float]]) -> dict[str, float]:
    out = dict.fromkeys(COUNTS, 0)
    for t in per_db:
        for c in COUNTS:
            out[c] += t[c]
    return out


def averages(cur: dict[str, float], old: dict[str, float] | None, seconds: float) -> dict[str, int]:
    """PgBouncer's averages: the counts per second from ``old`` to ``cur`` over ``seconds``; the
    three times, mean µs per transaction, query and checkout over the same change."""
    old = old or {}
    delta = {c: max(cur[c] - old.get(c, 0), 0) for c in COUNTS}  # (a removed pool's counts go too)
    out = {c: round(delta[c] / seconds) if seconds > 0 else 0 for c in _RATES}
    for c, per in _MEANS.items():
        out[c] = round(delta[c] / delta[per]) if delta[per] else 0
    return {c: out[c] for c in COUNTS}


class StatsWindow:
    """The copies the averages start from (PgBouncer's newer_stats and older_stats)."""

    def __init__(self, now: float) -> None:
        self.older: dict[str, dict[str, float]] = {}  # per database, taken at old_stamp
        self.newer: dict[str, dict[str, float]] = {}
        self.old_stamp = now - 1.0
        self.new_stamp = now

    def refresh(self, current: dict[str, dict[str, float]], now: float) -> None:
        """Every stats_period: the last copy becomes the one averages start from."""
        self.older, self.old_stamp = self.newer, self.new_stamp
        self.newer, self.new_stamp = current, now

    def of(self, db: str, cur: dict[str, float], now: float) -> dict[str, int]:
        return averages(cur, self.older.get(db), now - self.old_stamp)

    def overall(self, current: dict[str, dict[str, float]], now: float) -> tuple[dict[str, float], dict[str, int]]:
        """All databases together: (totals, averages)."""
        cur = summed(current.values())
        return cur, averages(cur, summed(self.older.values()), now - self.old_stamp)


def log_line(avg: dict[str, int]) -> dict[str, int]:
    """The fields of the ``stats`` log event (PgBouncer's "stats: N xacts/s, ..." line)."""
    return {"xacts_per_s": avg["xact_count"], "queries_per_s": avg["query_count"],
            "client_parses_per_s": avg["client_parse_count"], "server_parses_per_s": avg["server_parse_count"],
            "binds_per_s": avg["bind_count"], "in_bytes_per_s": avg["bytes_received"], "out_bytes_per_s": avg["bytes_sent"],
            "xact_us": avg["xact_time"], "query_us": avg["query_time"], "wait_us": avg["wait_time"]}


async def keep(window: StatsWindow, current: Callable[[], dict[str, dict[str, float]]],
               settings: Callable[[], Any], log: Any) -> None:
    """The listener's task: every stats_period the window moves on, and the stats event logs the
    last period over all databases (log_stats), as PgBouncer's stats line."""
    while True:
        await asyncio.sleep(settings().stats_period)
        try:
            now = time.monotonic()
            cur = current()
            window.refresh(cur, now)
            if settings().log_stats:
                log.info("stats", **log_line(window.overall(cur, now)[1]))
        except Exception as e:  # a fault of pgscope's own: logged, and the next period tries again
            log.error("stats_failed", error=type(e).__name__)
