"""EXPLAIN sampling of slow statements, like auto_explain, on side connections of the proxy's own; the
plans are stored without values."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import deque
from typing import Any, Awaitable, Callable

from proxy.inspect.consumer import ApiList, Consumer, MetricRows
from proxy.inspect.fingerprint import StatementInfo, split
from proxy.inspect.ratelimit import TokenBucket
from proxy.inspect.scrub import scrub_plan
from proxy.protocol.messages import decode_bind_params
from proxy.protocol.records import StatementEvent
from proxy.protocol.sql import quote_literal
from proxy.protocol.statement import statement_facts

EXPLAINABLE = frozenset(("SELECT", "INSERT", "UPDATE", "DELETE"))


class Job:
    """A slow statement waiting for its EXPLAIN."""

    __slots__ = ("event", "info", "text", "queued_at")

    def __init__(self, event: StatementEvent, info: StatementInfo, text: str, queued_at: float) -> None:
        self.event = event
        self.info = info
        self.text = text
        self.queued_at = queued_at


def statement_text(ev: StatementEvent) -> str:
    """The one statement this record is about, with the client's own literals."""
    if ev.stmt_index == 0 and ";" not in ev.query:
        return ev.query
    parts = split(ev.query)
    return parts[ev.stmt_index] if ev.stmt_index < len(parts) else ev.query


class SideConnections:
    """One idle-able internal connection per (db, user), serialised by a lock."""

    def __init__(self, connect: Callable[[str, str], Awaitable[Any]]) -> None:
        self._connect = connect
        self._conns: dict[tuple[str, str], Any] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def lock(self, db: str, user: str) -> asyncio.Lock:
        return self._locks.setdefault((db, user), asyncio.Lock())

    async def get(self, db: str, user: str) -> Any:
        srv = self._conns.get((db, user))
        if srv is None or srv.closed:
            srv = self._conns[(db, user)] = await self._connect(db, user)
        return srv

    def close(self) -> None:
        for srv in self._conns.values():
            srv.close("side connection closed")
        self._conns.clear()


class Planner:
    """EXPLAIN one statement the way it ran (literals, Bind values or a generic plan)."""

    def __init__(self, timeout_ms: int) -> None:
        self.timeout_ms = timeout_ms

    async def explain(self, srv: Any, text: str, bind: bytes | None, search_path: str | None,
                      analyze: bool = False) -> tuple[Any, str]:
        """(the plan as JSON, how: "literal" | "parameters" | "generic")."""
        prefix = ["BEGIN READ ONLY", f"SET LOCAL statement_timeout = {int(self.timeout_ms)}"]
        if search_path:
            prefix.append(f"SELECT set_config('search_path', {quote_literal(search_path)}, true)")
        opts = "ANALYZE, BUFFERS, FORMAT JSON" if analyze else "FORMAT JSON"
        values: list[bytes | None] = []
        formats: list[int] = []
        if bind is not None:
            _, _, values, formats = decode_bind_params(bind)
        try:
            if not values:
                how = "literal"
                await self._ok(srv, ";".join(prefix))
                rows = await self._rows(srv, f"EXPLAIN ({opts}) {text}")
            elif all(f == 0 for f in formats):
                how = "parameters"
                prefix.append("SET LOCAL plan_cache_mode = force_custom_plan")
                prefix.append(f"PREPARE pgscope_explain AS {text}")
                await self._ok(srv, ";".join(prefix))
                args = ", ".join("NULL" if v is None else quote_literal(v.decode("utf-8", "replace"))
                                 for v in values)
                rows = await self._rows(srv, f"EXPLAIN ({opts}) EXECUTE pgscope_explain({args})")
            elif _version(srv) >= 160000:
                how = "generic"  # binary values cannot be shown as literals without their types
                await self._ok(srv, ";".join(prefix))
                rows = await self._rows(srv, f"EXPLAIN (GENERIC_PLAN, FORMAT JSON) {text}")
            else:
                # before 16: the generic plan of a prepared statement, which does not look at
                # the values, so NULLs stand in for them
                how = "generic"
                prefix.append("SET LOCAL plan_cache_mode = force_generic_plan")
                prefix.append(f"PREPARE pgscope_explain AS {text}")
                await self._ok(srv, ";".join(prefix))
                args = ", ".join("NULL" for _ in values)
                rows = await self._rows(srv, f"EXPLAIN (FORMAT JSON) EXECUTE pgscope_explain({args})")
        finally:
            if srv.tx_status != "I" and not srv.closed:
                await srv.simple_query("ROLLBACK")
            if bind is not None and not srv.closed:
                await srv.simple_query("DEALLOCATE ALL")
        return json.loads(rows[0][0]), how

    @staticmethod
    async def _ok(srv: Any, sql: str) -> None:
        err = await srv.simple_query(sql)
        if err is not None:
            raise err

    @staticmethod
    async def _rows(srv: Any, sql: str) -> list[list[str | None]]:
        rows, err = await srv.fetch(sql)
        if err is not None:
            raise err
        return rows


def _version(srv: Any) -> int:
    v = srv.params.get("server_version", "0").split()[0]
    major, _, minor = v.partition(".")
    try:
        return int(major) * 10000 + (int(minor) if minor.isdigit() else 0)
    except ValueError:
        return 0


class ExplainSampler(Consumer):
    """EXPLAIN sampling of slow statements, like auto_explain, on a side connection.

    A statement slower than ``inspect.slow_query_ms`` becomes a candidate; it is
    sampled at ``explain_sample_rate``, at most once per ``explain_cooldown_s``
    per fingerprint and ``explain_max_per_minute`` overall, so a storm of slow
    queries cannot turn into a storm of EXPLAINs.  The plan comes from a
    connection of the proxy's own with the client's database, user and
    search_path, inside a READ ONLY transaction with ``statement_timeout`` set,
    and always rolled back.  ``$n`` parameters take the values of the client's
    Bind (text format) through PREPARE / EXPLAIN EXECUTE with custom plans; binary
    parameters use ``EXPLAIN (GENERIC_PLAN)`` on PostgreSQL 16+, a forced generic
    plan of a prepared statement before.  ANALYZE only ever runs for a read-only SELECT and only when
    ``explain_analyze`` is on.  The relay never waits for any of this.

    A plan shows the values it was planned with (``Filter: (ssn = 'x'::text)``):
    before it is stored, and before the index advisor reads it, every constant in
    its expression strings is replaced by ``$n`` (``proxy.inspect.scrub``), unless
    ``inspect.log_parameters`` is on.  What is stored is all that is ever shown.
    """

    wants = "slow"  # the pipeline only shows it statements slower than slow_query_ms

    def __init__(self, settings: Any, connect: Callable[[str, str], Awaitable[Any]], logger: Any = None,
                 advisor: Any = None, rand: Callable[[], float] = random.random) -> None:
        self.settings = settings  # the whole Settings (inspect and advisor sections)
        self.side = SideConnections(connect)
        self.log = logger
        self.advisor = advisor
        self.rand = rand
        s = settings.inspect
        self.plans: deque[dict] = deque(maxlen=s.explain_keep)
        self.pending: deque[Job] = deque(maxlen=100)
        self.last_sampled: dict[str, float] = {}
        self.samples: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.errors = 0
        self.bucket = TokenBucket(s.explain_max_per_minute)  # explain_max_per_minute, overall
        self._task: asyncio.Task | None = None
        self._closed = False
        self.planner = Planner(s.explain_timeout_ms)
        # set by the proxy when findings are on: the lock wait of a statement (LockWaits) and the plan findings
        self.lock_waits: Any = None
        self.plan_findings: Any = None

    def reconfigure(self, settings: Any) -> None:
        self.settings = settings
        s = settings.inspect
        if s.explain_keep != self.plans.maxlen:
            self.plans = deque(self.plans, maxlen=s.explain_keep)
        self.planner.timeout_ms = s.explain_timeout_ms
        if self.advisor is not None:
            self.advisor.reconfigure(settings)

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    # -------------------------------------------------------- from the pipeline

    def feed(self, ev: Any, info: StatementInfo | None, now: float) -> None:
        s = self.settings.inspect
        if info is None or (ev.end - ev.start) * 1000.0 <= s.slow_query_ms or not s.explain_enabled:
            return
        if ev.sqlstate is not None or not info.parse_ok or info.command not in EXPLAINABLE:
            self._skip("not explainable")
            return
        last = self.last_sampled.get(info.fingerprint)
        if last is not None and now - last < s.explain_cooldown_s:
            self._skip("cooldown")
            return
        if self.rand() >= s.explain_sample_rate:
            self._skip("sample rate")
            return
        if not self.bucket.take(now, s.explain_max_per_minute / 60.0, float(s.explain_max_per_minute)):
            self._skip("rate limit")
            return
        self.last_sampled[info.fingerprint] = now
        if len(self.last_sampled) > 10000:
            horizon = now - s.explain_cooldown_s
            self.last_sampled = {k: v for k, v in self.last_sampled.items() if v >= horizon}
        self.pending.append(Job(ev, info, statement_text(ev), now))

    def tick(self, now: float) -> None:
        if self.pending and not self._closed and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        while self.pending:
            job = self.pending.popleft()
            try:
                await self._sample(job)
            except Exception as e:  # PgError, ServerGone, timeouts: count, log, go on
                self.errors += 1
                if self.log is not None:
                    self.log.warning("explain_failed", fingerprint=job.info.fingerprint, **self._error_fields(e))

    def _error_fields(self, e: Exception) -> dict[str, Any]:
        """What to log of a failed EXPLAIN: PostgreSQL's message may quote a value ('invalid input
        syntax for type integer: "…"'), so without log_parameters only its SQLSTATE is logged."""
        sqlstate = getattr(e, "sqlstate", None)
        if sqlstate is None:
            return {"error": repr(e)}
        if self.settings.inspect.log_parameters:
            return {"sqlstate": sqlstate, "error": getattr(e, "message", None) or repr(e)}
        return {"sqlstate": sqlstate, "error": f"{type(e).__name__} {sqlstate}"}

    async def _sample(self, job: Job) -> None:
        ev, info = job.event, job.info
        c = ev.client
        s = self.settings.inspect
        analyze = s.explain_analyze and info.first_keyword == "SELECT" and statement_facts(job.text).read_only_select
        search_path = dict(getattr(c, "settings", ()) or ()).get("search_path")
        async with self.side.lock(c.db, c.user):
            srv = await self.side.get(c.db, c.user)
            async with asyncio.timeout(s.explain_timeout_ms / 1000.0 + 5.0):
                plan, how = await self.planner.explain(srv, job.text, ev.bind, search_path, analyze)
            if not s.log_parameters:
                plan = scrub_plan(plan)  # nothing downstream sees the values (the advisor included)
            sample = {
                "fingerprint": info.fingerprint, "query": info.normalized, "db": c.db, "user": c.user,
                "plan": plan, "duration_ms": round((ev.end - ev.start) * 1000.0, 3),
                "sampled_at": round(time.time(), 3), "method": how, "analyze": analyze,
            }
            waited = self.lock_waits.lookup(ev) if self.lock_waits is not None else None
            if waited is not None:  # slow because it waited on a lock: say so, next to the plan
                sample["lock_wait"] = waited
            self.plans.append(sample)
            self.samples[info.fingerprint] = self.samples.get(info.fingerprint, 0) + 1
            if self.log is not None:
                top = plan[0]["Plan"] if plan else {}
                self.log.info("explain_sampled", fingerprint=info.fingerprint, ms=sample["duration_ms"],
                              db=c.db, user=c.user, method=how, total_cost=top.get("Total Cost"),
                              node=top.get("Node Type"))
            if self.plan_findings is not None:
                await self.plan_findings.sampled(srv, job, plan)
            # a statement slow because of a lock wait is no evidence for an index
            if self.advisor is not None and self.settings.advisor.enabled and \
                    (waited is None or waited["wait_ms"] < sample["duration_ms"] / 2):
                await self.advisor.consider(srv, job, plan, self.planner, search_path)

    async def close(self) -> None:
        """Shutdown: drop queued samples, cancel the one under way (and wait for it), close side connections."""
        self._closed = True
        self.pending.clear()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.side.close()

    # -------------------------------------------------------- exports

    def explains(self, limit: int = 100) -> list[dict]:
        return [{k: p.get(k) for k in ("fingerprint", "query", "plan", "duration_ms", "sampled_at", "db", "user",
                                       "method", "lock_wait")} for p in list(self.plans)[-limit:][::-1]]

    def api_lists(self) -> list[ApiList]:
        lists = [ApiList("/api/explains", "explains", self.explains)]
        if self.advisor is not None:
            lists.extend(self.advisor.api_lists())
        return lists

    def metric_rows(self) -> list[MetricRows]:
        rows = [
            MetricRows("pgscope_explain_samples", "EXPLAIN plans sampled.", "counter", ("fingerprint",),
                       [((fp,), n) for fp, n in sorted(self.samples.items())]),
            MetricRows("pgscope_explain_skipped", "Slow statements not sampled, by reason.", "counter", ("reason",),
                       [((reason,), n) for reason, n in sorted(self.skipped.items())]),
            MetricRows("pgscope_explain_errors", "EXPLAIN samples that failed.", "counter", (), [((), self.errors)]),
        ]
        if self.advisor is not None:
            rows.extend(self.advisor.metric_rows())
        return rows
