"""Index advice from sampled plans, proven with HypoPG hypothetical indexes."""

from __future__ import annotations

import re
import time
from typing import Any, Iterable

from proxy.inspect.consumer import ApiList, MetricRows
from proxy.protocol.sql import quote_ident, quote_literal
from proxy.protocol.statement import ColumnUse, statement_facts


# ------------------------------------------------------------------ the plan

def filters_and_sorts(cols: ColumnUse, indexed: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """(filter columns: equality first, then ranges; ORDER BY columns that are not filters), both
    without the columns an existing index already leads with."""
    filters = list(cols.eq) + [c for c in cols.range if c not in cols.eq]
    sorts = [c for c in cols.order if c not in filters]
    return [c for c in filters if c not in indexed], [c for c in sorts if c not in indexed]


def filtered_on(scan: dict, column: str) -> bool:
    """Whether a plan node's Filter mentions ``column`` (as a whole identifier)."""
    text = scan.get("Filter") or ""
    return re.search(r"(?<![\w$])" + re.escape(column) + r"(?![\w$])", text) is not None


def plan_nodes(plan: Any) -> Iterable[dict]:
    stack = [plan[0]["Plan"]] if isinstance(plan, list) and plan else []
    while stack:
        n = stack.pop()
        yield n
        stack.extend(n.get("Plans", []))


def total_cost(plan: Any) -> float:
    return float(plan[0]["Plan"]["Total Cost"])


# ------------------------------------------------------------------ the advisor

class Recommendation:
    """One index to create, with the statements it helps."""

    __slots__ = ("db", "table", "columns", "benefit", "method", "fingerprints", "created_at", "cost_before",
                 "cost_after")

    def __init__(self, db: str, table: str, columns: tuple[str, ...], benefit: float, method: str,
                 cost_before: float, cost_after: float | None) -> None:
        self.db = db
        self.table = table
        self.columns = columns
        self.benefit = benefit
        self.method = method
        self.fingerprints: set[str] = set()
        self.created_at = time.time()
        self.cost_before = cost_before
        self.cost_after = cost_after

    @property
    def create_statement(self) -> str:
        table = ".".join(quote_ident(p) for p in self.table.split("."))
        return f"CREATE INDEX CONCURRENTLY ON {table} ({', '.join(quote_ident(c) for c in self.columns)})"


class IndexAdvisor:
    """Considers each sampled plan (``consider``, from the EXPLAIN sampler) and keeps the recommendations.

    For each sampled plan: find sequential scans on tables of at least
    ``advisor.min_table_rows`` (estimated) rows; take candidate columns of that
    table from the statement's facts (``proxy.protocol.statement``): filters
    from WHERE and JOIN … ON (equality columns first, then ranges), then ORDER
    BY columns; drop those an
    existing index already leads with.  Where the server has HypoPG, create each
    candidate as a hypothetical index (single columns first, then two-column
    ones, as Dexter does), EXPLAIN again, reset, and recommend only if the
    estimated total cost falls by at least ``advisor.min_benefit``: a candidate
    led by an ORDER BY column (an index that serves the sort) is tried too, since
    the planner's cost proves or refutes it.  Without HypoPG the advice is an
    unverified heuristic and says so (``method = "heuristic"``): only a sequential
    scan with a Filter gets one, and the index is led by a filter column of that
    scan (equality first, then range), never by a column that is only sorted or
    grouped on.  Recommendations are kept per (db, table, columns) with the
    fingerprints they help.
    """

    def __init__(self, settings: Any, stats: Any = None, logger: Any = None) -> None:
        self.settings = settings
        self.stats = stats  # the StatsTable, for calls and total time per fingerprint
        self.log = logger
        self.recommendations: dict[tuple[str, str, tuple[str, ...]], Recommendation] = {}
        self.hypopg: dict[str, bool] = {}  # db -> usable (tried once)
        self.considered = 0  # plans with a sequential scan and candidate columns
        self.rejected = 0  # candidates HypoPG showed not to save advisor.min_benefit

    def reconfigure(self, settings: Any) -> None:
        self.settings = settings

    async def _has_hypopg(self, srv: Any, db: str) -> bool:
        if not self.settings.advisor.use_hypopg:
            return False
        known = self.hypopg.get(db)
        if known is not None:
            return known
        rows, err = await srv.fetch("SELECT 1 FROM pg_extension WHERE extname = 'hypopg'")
        ok = err is None and bool(rows)
        if not ok:
            err = await srv.simple_query("CREATE EXTENSION IF NOT EXISTS hypopg")
            ok = err is None
            if not ok and self.log is not None:
                self.log.info("hypopg_unavailable", db=db, error=err.message)
        self.hypopg[db] = ok
        return ok

    async def consider(self, srv: Any, job: Any, plan: Any, planner: Any, search_path: str | None) -> None:
        a = self.settings.advisor
        ev, info = job.event, job.info
        db = ev.client.db
        scans = [n for n in plan_nodes(plan) if n.get("Node Type") == "Seq Scan" and n.get("Relation Name")]
        if not scans:
            return
        by_table = statement_facts(job.text).columns
        if not by_table:
            return
        base = total_cost(plan)
        self.considered += 1
        for scan in scans:
            rel = scan["Relation Name"]
            alias_table = next((t for t in by_table if t.split(".")[-1] == rel), None)
            if alias_table is None:
                continue
            cols = by_table[alias_table]
            if not (cols.eq or cols.range or cols.order):
                continue
            reltuples, leading = await self._table_facts(srv, alias_table)
            if reltuples is None or reltuples < a.min_table_rows:
                continue
            filters, sorts = filters_and_sorts(cols, leading)
            ordered = filters + sorts
            if not ordered:
                continue  # an existing index already leads with each candidate
            if await self._has_hypopg(srv, db):
                # filters first, then sort-serving candidates: HypoPG verifies either kind
                best = await self._hypopg_best(srv, job, planner, search_path, alias_table, ordered, cols, base)
                if best is None:
                    self.rejected += 1
                    continue
                columns, after = best
                benefit = 1.0 - after / base if base > 0 else 0.0
                if benefit < a.min_benefit:
                    self.rejected += 1
                    continue
                self._record(db, alias_table, columns, benefit, "hypopg", info, base, after)
            else:
                # unverified: only a column this scan filters on may lead (equality before range);
                # a column that is only sorted or grouped on would not spare the scan
                lead = next((c for c in filters if filtered_on(scan, c)), None)
                if lead is None:
                    continue
                scan_cost = float(scan.get("Total Cost", 0.0))
                selectivity = min(1.0, float(scan.get("Plan Rows", 0)) / max(reltuples, 1.0))
                benefit = max(0.0, (scan_cost / base if base else 0.0) * (1.0 - selectivity))
                self._record(db, alias_table, (lead,), round(benefit, 3), "heuristic", info, base, None)

    async def _table_facts(self, srv: Any, table: str) -> tuple[float | None, set[str]]:
        reg = f"to_regclass({quote_literal(table)})"
        rows, err = await srv.fetch(f"SELECT reltuples::float8 FROM pg_class WHERE oid = {reg}")
        if err is not None or not rows:
            return None, set()
        reltuples = float(rows[0][0] or 0)
        if reltuples < 0:  # never analyzed (PostgreSQL 14+): estimate from the size
            rows2, _ = await srv.fetch(f"SELECT (pg_relation_size({reg}) / 8192 * 60)::float8")
            reltuples = float(rows2[0][0]) if rows2 else 0.0
        rows, err = await srv.fetch(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            f"AND a.attnum = i.indkey[0] WHERE i.indrelid = {reg} AND i.indisvalid")
        return reltuples, {r[0] for r in rows if r[0]} if err is None else set()

    async def _hypo_cost(self, srv: Any, job: Any, planner: Any, search_path: str | None, table: str,
                         columns: tuple[str, ...]) -> float | None:
        ddl = f"CREATE INDEX ON {'.'.join(quote_ident(p) for p in table.split('.'))} " \
              f"({', '.join(quote_ident(c) for c in columns)})"
        err = await srv.simple_query(f"SELECT * FROM hypopg_create_index({quote_literal(ddl)})")
        try:
            if err is not None:
                return None
            plan, _ = await planner.explain(srv, job.text, job.event.bind, search_path)
            return total_cost(plan)
        finally:
            await srv.simple_query("SELECT hypopg_reset()")

    async def _hypopg_best(self, srv, job, planner, search_path, table, ordered, cols, base):
        singles: list[tuple[float, tuple[str, ...]]] = []
        for c in ordered[:6]:
            cost = await self._hypo_cost(srv, job, planner, search_path, table, (c,))
            if cost is not None:
                singles.append((cost, (c,)))
        if not singles:
            return None
        singles.sort()
        best_cost, best_cols = singles[0]
        # two columns: an equality column first, then another candidate (Dexter's order)
        firsts = [c for c in cols.eq if c in ordered][:3] or [best_cols[0]]
        for first in firsts:
            for second in ordered[:6]:
                if second == first:
                    continue
                cost = await self._hypo_cost(srv, job, planner, search_path, table, (first, second))
                if cost is not None and cost < best_cost * 0.9:  # a wider index must earn its keep
                    best_cost, best_cols = cost, (first, second)
        if best_cost >= base:
            return None
        return best_cols, best_cost

    def _record(self, db, table, columns, benefit, method, info, before, after) -> None:
        key = (db, table, tuple(columns))
        rec = self.recommendations.get(key)
        new = rec is None
        if new:
            rec = self.recommendations[key] = Recommendation(db, table, tuple(columns), benefit, method,
                                                             before, after)
        else:
            rec.benefit = max(rec.benefit, benefit)
        rec.fingerprints.add(info.fingerprint)
        if new and self.log is not None:
            self.log.info("index_recommendation", db=db, table=table, columns=list(columns),
                          benefit=round(benefit, 3), method=method, create_statement=rec.create_statement,
                          fingerprint=info.fingerprint)

    # ------------------------------------------------------------ exports

    def _usage(self, rec: Recommendation) -> tuple[int, float]:
        calls, total = 0, 0.0
        if self.stats is not None:
            for st in self.stats.entries.values():
                if st.db == rec.db and st.fingerprint in rec.fingerprints:
                    calls += st.calls
                    total += st.total
        return calls, total

    def as_list(self, limit: int | None = None) -> list[dict]:
        out = []
        for rec in self.recommendations.values():
            calls, total = self._usage(rec)
            out.append({
                "db": rec.db, "table": rec.table, "columns": list(rec.columns),
                "create_statement": rec.create_statement, "benefit": round(rec.benefit, 3),
                "method": rec.method, "fingerprints": sorted(rec.fingerprints), "calls": calls,
                "total_ms": round(total * 1000.0, 3),
                "cost_before": rec.cost_before, "cost_after": rec.cost_after,
            })
        out.sort(key=lambda r: (r["total_ms"], r["benefit"]), reverse=True)
        return out[:limit] if limit is not None else out

    def api_lists(self) -> list[ApiList]:
        return [ApiList("/api/recommendations", "recommendations", self.as_list, takes_limit=False)]

    def metric_rows(self) -> list[MetricRows]:
        return [
            MetricRows("pgscope_index_recommendation_benefit",
                       "Estimated fraction of the statement cost an index recommendation saves (0..1).", "gauge",
                       ("db", "table", "columns", "method"),
                       [((rec.db, rec.table, ",".join(rec.columns), rec.method), rec.benefit)
                        for rec in self.recommendations.values()]),
            MetricRows("pgscope_index_advisor_plans", "Sampled plans the index advisor considered (a sequential "
                       "scan, and filter or ORDER BY columns in the statement).", "counter", (),
                       [((), self.considered)]),
            MetricRows("pgscope_index_advisor_rejected", "Candidate indexes HypoPG showed to save less than "
                       "advisor.min_benefit.", "counter", (), [((), self.rejected)]),
        ]
