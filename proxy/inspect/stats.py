"""Per-(fingerprint, database, user) statement statistics, bounded, like pg_stat_statements."""

from __future__ import annotations

import math
from itertools import repeat
from operator import mul, sub
from typing import Any, Iterator

from proxy.hist import Hist

OTHER = "_other"
ORDERS = {
    "total_time": lambda s: s.total,
    "calls": lambda s: s.calls,
    "mean_time": lambda s: s.total / s.calls if s.calls else 0.0,
}


class StatementStats:
    __slots__ = ("fingerprint", "db", "user", "query", "command", "calls", "total", "min", "max",
                 "_mean", "_m2", "rows", "errors", "errors_by_class", "slow", "first_seen", "last_seen", "hist",
                 "lock_wait")

    def __init__(self, fingerprint: str, db: str, user: str, query: str, command: str, now: float,
                 hist: Hist | None = None) -> None:
        self.hist = hist  # the (db, command) latency histogram this entry feeds
        self.fingerprint = fingerprint
        self.db = db
        self.user = user
        self.query = query
        self.command = command
        self.calls = 0
        self.total = 0.0  # seconds
        self.min = math.inf
        self.max = 0.0
        self._mean = 0.0  # Welford running mean and sum of squared deviations
        self._m2 = 0.0
        self.rows = 0
        self.errors = 0
        self.errors_by_class: dict[str, int] = {}
        self.slow = 0
        self.first_seen = now
        self.last_seen = now
        self.lock_wait = 0.0  # seconds its slow executions were seen waiting on others' locks (LockWaits)

    def add(self, duration: float, rows: int, sqlstate: str | None, slow: bool, now: float) -> None:
        """Count one execution, and observe it in the (db, command) histogram this entry feeds."""
        calls = self.calls + 1
        self.calls = calls
        self.total += duration
        if duration < self.min:
            self.min = duration
        if duration > self.max:
            self.max = duration
        mean = self._mean
        delta = duration - mean
        mean += delta / calls
        self._mean = mean
        self._m2 += delta * (duration - mean)
        if rows:
            self.rows += rows
        if sqlstate is not None:
            self.errors += 1
            cls = sqlstate[:2]
            self.errors_by_class[cls] = self.errors_by_class.get(cls, 0) + 1
        if slow:
            self.slow += 1
        self.last_seen = now
        if self.hist is not None:
            self.hist.observe(duration)

    def add_batch(self, durations: list[float], rows: int, sqlstates: Any, slow_s: float, now: float) -> None:
        """Count several executions at once (the inspector's columnar path).

        The same result as ``add`` for each, up to float rounding: the batch's
        mean and squared deviations are merged into the running ones with
        Chan et al.'s pairwise update, so the standard deviation stays exact
        and stable.  ``sqlstates`` holds one SQLSTATE or None per execution;
        ``now`` is the wall time of the last one.  Every per-value step runs in
        C (sum, min, max, map); Python work is per batch.
        """
        n = len(durations)
        if n == 0:
            return
        total = sum(durations)
        mean_b = total / n
        dev = list(map(sub, durations, repeat(mean_b, n)))
        m2_b = sum(map(mul, dev, dev))
        calls_a = self.calls
        calls = calls_a + n
        delta = mean_b - self._mean
        self._mean += delta * n / calls
        self._m2 += m2_b + delta * delta * calls_a * n / calls
        self.calls = calls
        self.total += total
        lo = min(durations)
        if lo < self.min:
            self.min = lo
        hi = max(durations)
        if hi > self.max:
            self.max = hi
        if rows:
            self.rows += rows
        errors = n - sqlstates.count(None)
        if errors:
            self.errors += errors
            by_class = self.errors_by_class
            for state in sqlstates:
                if state is not None:
                    cls = state[:2]
                    by_class[cls] = by_class.get(cls, 0) + 1
        if hi > slow_s:
            self.slow += sum(map(slow_s.__lt__, durations))
        if now > self.last_seen:
            self.last_seen = now
        h = self.hist
        if h is not None:
            h.observe_many(durations, total)

    @property
    def stddev(self) -> float:
        """Population standard deviation (as pg_stat_statements' stddev_exec_time)."""
        return math.sqrt(self._m2 / self.calls) if self.calls else 0.0

    def as_dict(self) -> dict:
        ms = 1000.0
        return {
            "fingerprint": self.fingerprint, "query": self.query, "db": self.db, "user": self.user,
            "calls": self.calls, "total_ms": round(self.total * ms, 3),
            "mean_ms": round(self.total / self.calls * ms, 3) if self.calls else 0.0,
            "min_ms": round(self.min * ms, 3) if self.calls else 0.0, "max_ms": round(self.max * ms, 3),
            "stddev_ms": round(self.stddev * ms, 3), "rows": self.rows, "errors": self.errors,
            "errors_by_class": dict(sorted(self.errors_by_class.items())), "slow": self.slow,
            "first_seen": round(self.first_seen, 3), "last_seen": round(self.last_seen, 3),
            "lock_wait_ms": round(self.lock_wait * ms, 3),
        }


class Totals:
    """Summed counters (the "_other" series)."""

    __slots__ = ("calls", "total", "rows", "errors", "slow")

    def __init__(self) -> None:
        self.calls = 0
        self.total = 0.0
        self.rows = 0
        self.errors = 0
        self.slow = 0

    def fold(self, s: "StatementStats | Totals") -> None:
        self.calls += s.calls
        self.total += s.total
        self.rows += s.rows
        self.errors += s.errors
        self.slow += s.slow


class StatsTable:
    """Per-(fingerprint, database, user) statistics, bounded, like pg_stat_statements.

    Plain Python objects updated by the inspection pipeline; the exporter reads
    them at scrape time.  At most ``max_fingerprints`` entries live at once: past
    that, the entries with the least total time are evicted (in batches, so the
    cost is amortised) and their totals folded into per-(db, user) "_other"
    counters, so that exported counters never go down.
    """

    def __init__(self, max_fingerprints: int = 5000, slow_query_ms: float = 500.0) -> None:
        self.max_fingerprints = max_fingerprints
        self.slow_s = slow_query_ms / 1000.0
        self.entries: dict[tuple[str, str, str], StatementStats] = {}
        self.evicted: dict[tuple[str, str], Totals] = {}  # (db, user) -> totals of evicted entries
        self.evictions = 0
        self.command_hists: dict[tuple[str, str], Hist] = {}
        self.exported_keys: dict[tuple[str, str, str], Totals] = {}  # key -> baseline
        self._scraped: set[tuple[str, str, str]] = set()

    def record(self, info: Any, db: str, user: str, duration_s: float, rows: int,
               sqlstate: str | None, wall_time: float) -> StatementStats:
        """Count one execution of ``info`` (a StatementInfo) by (db, user).

        ``wall_time`` is epoch seconds (first_seen / last_seen).  The inspector
        inlines the existing-entry case; this is the whole path.
        """
        st = self.entry(info, db, user, wall_time)
        st.add(duration_s, rows, sqlstate, duration_s > self.slow_s, wall_time)
        return st

    def entry(self, info: Any, db: str, user: str, wall_time: float) -> StatementStats:
        """The entry for (info's fingerprint, db, user), created (and others maybe evicted) if new."""
        key = (info.fingerprint, db, user)
        st = self.entries.get(key)
        if st is None:
            hkey = (db, info.command)
            h = self.command_hists.get(hkey)
            if h is None:
                h = self.command_hists[hkey] = Hist()
            st = self.entries[key] = StatementStats(info.fingerprint, db, user, info.normalized, info.command,
                                                    wall_time, h)
            if len(self.entries) > self.max_fingerprints + self.max_fingerprints // 10:
                self.evict(keep=key)
        return st

    def evict(self, keep: tuple[str, str, str] | None = None) -> int:
        """Drop the least-total-time entries (never ``keep``, the newest) down to max_fingerprints."""
        excess = len(self.entries) - self.max_fingerprints
        if excess <= 0:
            return 0
        victims = sorted((kv for kv in self.entries.items() if kv[0] != keep),
                         key=lambda kv: kv[1].total)[:excess]
        for key, st in victims:
            del self.entries[key]
            t = self.evicted.get((st.db, st.user))
            if t is None:
                t = self.evicted[(st.db, st.user)] = Totals()
            t.fold(st)
        self.evictions += len(victims)
        return len(victims)

    def top(self, order: str = "total_time", limit: int = 50) -> list[StatementStats]:
        key = ORDERS[order]
        return sorted(self.entries.values(), key=key, reverse=True)[:limit]

    def exported(self, top_k: int) -> tuple[list[tuple[StatementStats, Totals]], dict[tuple[str, str], Totals]]:
        """What the Prometheus collector shows: [(entry, baseline)] with their own
        series (value = entry - baseline) and the rest summed per (db, user).

        Every exported number only ever grows.  The set of entries with their
        own series changes slowly (an entry replaces the smallest exported one
        only when it has 25% more total time) and a change never takes
        anything away from ``_other``: an entry promoted out of ``_other``
        leaves what it had there as its baseline; an entry demoted or evicted
        adds its total to ``_other``.  Call it once per scrape.
        """
        entries = self.entries
        exp = self.exported_keys
        for key in [k for k in exp if k not in entries]:  # evicted meanwhile
            del exp[key]
        if top_k <= 0:
            exp.clear()
        else:
            while len(exp) > top_k:  # export_top_k was lowered: demote the smallest
                del exp[min(exp, key=lambda k: entries[k].total)]
            ranked = sorted(entries.items(), key=lambda kv: kv[1].total, reverse=True)[:top_k]
            for key, st in ranked:
                if key in exp:
                    continue
                if len(exp) >= top_k:
                    low_key = min(exp, key=lambda k: entries[k].total)
                    if st.total <= entries[low_key].total * 1.25:
                        continue
                    del exp[low_key]  # demoted: its total goes back to _other below
                base = Totals()
                if key in self._scraped:  # it was already counted in a scraped _other
                    base.fold(st)
                exp[key] = base
        self._scraped = set(entries)
        other: dict[tuple[str, str], Totals] = {}
        for k, t in self.evicted.items():
            other.setdefault(k, Totals()).fold(t)
        out: list[tuple[StatementStats, Totals]] = []
        for key, st in entries.items():
            base = exp.get(key)
            if base is None:
                other.setdefault((st.db, st.user), Totals()).fold(st)
            else:
                if base.calls:
                    other.setdefault((st.db, st.user), Totals()).fold(base)
                out.append((st, base))
        return out, other

    def reconfigure(self, max_fingerprints: int, slow_query_ms: float) -> None:
        self.max_fingerprints = max_fingerprints
        self.slow_s = slow_query_ms / 1000.0
        self.evict()

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[StatementStats]:
        return iter(self.entries.values())
