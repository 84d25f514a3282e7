"""Findings from sampled plans: leading_wildcard (LIKE '%…' on a sequential scan) and plan_change (a plan shape
that changed and made the statement slower), called by the EXPLAIN sampler after each sample."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from proxy.inspect.consumer import inspect_settings
from proxy.inspect.findings import FindingsBook
from proxy.inspect.findings_facts import like_patterns
from proxy.protocol.messages import decode_bind_params
from proxy.protocol.sql import quote_ident

MAX_SHAPES = 5000


def plan_shape(plan: Any) -> str:
    """A hash of a plan's node types and the relations and indexes they read (not its costs or rows)."""
    parts: list[str] = []
    stack = [(plan[0]["Plan"], 0)] if isinstance(plan, list) and plan else []
    while stack:
        n, depth = stack.pop()
        parts.append(f"{depth}:{n.get('Node Type')}:{n.get('Relation Name', '')}:{n.get('Index Name', '')}")
        stack.extend((k, depth + 1) for k in reversed(n.get("Plans", [])))
    return hashlib.blake2b("|".join(parts).encode(), digest_size=8).hexdigest()


def _nodes(plan: Any) -> list[dict]:
    out, stack = [], [plan[0]["Plan"]] if isinstance(plan, list) and plan else []
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(n.get("Plans", []))
    return out


def _pattern(use: Any, bind: bytes | None) -> str | None:
    if use.pattern is not None:
        return use.pattern
    if bind is None:
        return None
    try:
        _, _, values, fmts = decode_bind_params(bind)
        v = values[use.param - 1]
        return v.decode("utf-8", "replace") if v is not None and fmts[use.param - 1] == 0 else None
    except (IndexError, ValueError):
        return None


class PlanFindings:
    """leading_wildcard and plan_change, from each plan the EXPLAIN sampler takes (``sampled``).

    leading_wildcard: the statement compares a column with LIKE/ILIKE to a pattern (a literal of
    this execution's text, or its text-format Bind value) that starts with a wildcard, and the plan
    reads that column's table with a Seq Scan filtering with ``~~``: the advice is a trigram index,
    with ``CREATE EXTENSION pg_trgm`` first when the server has pg_trgm but the database not yet.
    The pattern itself is never shown.

    plan_change: per (fingerprint, db, user), the shape of the last sampled plan (``plan_shape``)
    and the statistics' calls and time when it was sampled.  When a new sample's shape differs, the
    mean before is the one up to the old shape's last sample; once ``inspect.plan_change_min_calls``
    executions followed the new sample and their mean is more than ``1 + inspect.plan_change_min_rise``
    times the mean before, the finding holds both plans (as sampled: without values).
    """

    def __init__(self, settings: Any, book: FindingsBook, stats: Any = None) -> None:
        self.book = book
        self.stats = stats
        self.shapes: dict[tuple[str, str, str], tuple] = {}  # key -> (shape, plan, calls, total then)
        self.changes: dict[tuple[str, str, str], dict] = {}  # key -> a change waiting for its verdict
        self.trgm: dict[str, str] = {}  # db -> "installed" | "available" | "unavailable"
        self.reconfigure(settings)

    def reconfigure(self, settings: Any) -> None:
        self.s = inspect_settings(settings)

    async def sampled(self, srv: Any, job: Any, plan: Any) -> None:
        """One sampled plan (already without values) of ``job`` (the EXPLAIN sampler's Job)."""
        if self.book.enabled("leading_wildcard"):
            await self._wildcard(srv, job, plan)
        if self.book.enabled("plan_change"):
            self._shape(job, plan)

    # ------------------------------------------------------------ leading_wildcard

    async def _trgm(self, srv: Any, db: str) -> str:
        known = self.trgm.get(db)
        if known is None:
            rows, err = await srv.fetch(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'), "
                "EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm')")
            if err is not None or not rows:
                return "unknown"
            known = self.trgm[db] = "installed" if rows[0][0] == "t" else (
                "available" if rows[0][1] == "t" else "unavailable")
        return known

    async def _wildcard(self, srv: Any, job: Any, plan: Any) -> None:
        uses = like_patterns(job.text)
        if not uses:
            return
        scans = [n for n in _nodes(plan) if n.get("Node Type") == "Seq Scan" and "~~" in (n.get("Filter") or "")]
        for use in uses:
            pattern = _pattern(use, job.event.bind)
            if not pattern or pattern[0] not in "%_":
                continue
            rel = use.table.split(".")[-1]
            scan = next((n for n in scans if (not rel or n.get("Relation Name") == rel)
                         and use.column in (n.get("Filter") or "")), None)
            if scan is None:
                continue
            table = use.table or scan.get("Relation Name", "")
            trgm = await self._trgm(srv, job.event.client.db)
            ident = ".".join(quote_ident(p) for p in table.split("."))
            index = f"CREATE INDEX CONCURRENTLY ON {ident} USING gin ({quote_ident(use.column)} gin_trgm_ops)"
            if trgm == "installed":
                advice = f"A pattern starting with a wildcard cannot use a b-tree index: {index};"
            elif trgm == "available":
                advice = f"A pattern starting with a wildcard cannot use a b-tree index: CREATE EXTENSION pg_trgm; {index};"
            else:
                advice = ("A pattern starting with a wildcard cannot use a b-tree index, and this server has no "
                          "pg_trgm for a trigram index: anchor the pattern ('abc%'), or use full-text search.")
            info, ev = job.info, job.event
            c = ev.client
            self.book.add("leading_wildcard", fingerprint=info.fingerprint, query=info.normalized, db=c.db,
                          user=c.user, application_name=c.application_name,
                          impact_ms=(ev.end - ev.start) * 1000.0,
                          detail={"table": table, "column": use.column, "operator": use.op,
                                  "pattern_from": "literal" if use.pattern is not None else "parameter",
                                  "scan_rows": scan.get("Plan Rows"), "pg_trgm": trgm},
                          advice=advice)
            return

    # ------------------------------------------------------------ plan_change

    def _entry(self, key: tuple[str, str, str]) -> Any:
        return self.stats.entries.get(key) if self.stats is not None else None

    def _shape(self, job: Any, plan: Any) -> None:
        c = job.event.client
        key = (job.info.fingerprint, c.db, c.user)
        shape = plan_shape(plan)
        st = self._entry(key)
        if st is None or not st.calls:
            return
        old = self.shapes.get(key)
        # with each sample, the statistics at that moment: the mean before a change is the one up to the
        # last sample of the old shape, the mean after counts from the first sample of the new one (the
        # executions in between ran under either plan, and count for neither)
        self.shapes[key] = (shape, plan, st.calls, st.total)
        if len(self.shapes) > MAX_SHAPES:
            del self.shapes[next(iter(self.shapes))]
        if old is None or old[0] == shape:
            return
        self.changes[key] = {"before_mean": old[3] / old[2], "calls": st.calls, "total": st.total,
                             "before": old[1], "after": plan, "app": c.application_name, "at": time.time()}

    def tick(self, now: float) -> None:
        """Give each noted change its verdict once enough executions followed it."""
        s = self.s
        for key, ch in list(self.changes.items()):
            st = self._entry(key)
            if st is None:
                del self.changes[key]
                continue
            calls = st.calls - ch["calls"]
            if calls < s.plan_change_min_calls:
                continue
            del self.changes[key]
            before = ch["before_mean"]
            after = (st.total - ch["total"]) / calls
            if after <= before * (1.0 + s.plan_change_min_rise):
                continue
            self.book.add("plan_change", fingerprint=key[0], query=st.query, db=key[1], user=key[2],
                          application_name=ch["app"], impact_ms=(after - before) * calls * 1000.0,
                          detail={"mean_ms_before": round(before * 1000.0, 3), "mean_ms_after": round(after * 1000.0, 3),
                                  "calls_after": calls, "changed_at": round(ch["at"], 3),
                                  "plan_before": ch["before"], "plan_after": ch["after"]},
                          advice=f"The plan changed and the mean time went from {before * 1000.0:.2f} ms to "
                                 f"{after * 1000.0:.2f} ms: compare the two plans (a dropped or unused index, stale "
                                 f"statistics: ANALYZE the tables it reads).")
