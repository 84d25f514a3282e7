"""Long-held locks and idle-in-transaction clients, from the wire and from pg_locks.

From the statement stream: each client's transaction (when it began, whether
it took locks — writes, SELECT … FOR UPDATE/SHARE, LOCK, DDL, from the
pglast tree — and the statement that first took them).  A transaction that
took locks and stays open past ``inspect.lock_hold_ms`` is reported, and
again with its final duration when it ends; a client idle in a transaction
past the same bound is reported too.  A sampler on a side connection reads
``pg_stat_activity``, ``pg_locks`` and ``pg_blocking_pids()`` every
``lock_sample_interval_ms`` and maps server pids to the proxy's clients, so a
report says who holds, who waits, on which relations, for how long.  A
blocker chain is reported once, under its root, and only once the holder's
transaction (or the longest wait on it) has lasted ``lock_hold_ms``: what a
sample sees before that is kept with the transaction and shows in its report
if it gets one.  Sessions seen waiting always count in the blocked-clients
gauge, however short the hold.

The stream carries completed statements only, so a client whose statement is
still running (a long query, or one waiting on another's lock) looks as if it
had done nothing since its last one.  ``busy_since(client_id)``, when given,
says when the client's oldest request still awaiting results was sent (None
when it has none): a transaction that looks idle past ``lock_hold_ms`` is
asked about, and one with a statement in flight is "active" (or "waiting" if
the last ``pg_locks`` sample saw that statement blocked), not idle in
transaction.  Without it, every transaction quiet on the stream counts as idle.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from typing import Any, Awaitable, Callable

from pglast import parser as pg_parser
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from proxy.export.api import list_route
from proxy.export.metrics import add_hist
from proxy.hist import Hist
from proxy.protocol.records import ClientEvent, StatementEvent, TransactionEvent
from proxy.inspect.fingerprint import Fingerprinter, StatementInfo

_DDL = frozenset((
    "CreateStmt", "AlterTableStmt", "DropStmt", "IndexStmt", "TruncateStmt", "RenameStmt", "CreateTableAsStmt",
    "AlterObjectSchemaStmt", "ViewStmt", "CreateSeqStmt", "AlterSeqStmt", "CreateTrigStmt", "RuleStmt",
    "ReindexStmt", "ClusterStmt", "VacuumStmt", "GrantStmt", "CommentStmt", "CompositeTypeStmt",
))
_WRITES = frozenset(("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "LockStmt"))
LOCK_HOLD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

SAMPLE_SQL = """
SELECT a.pid, a.state, coalesce(extract(epoch FROM now() - a.xact_start), 0)::float8,
       pg_blocking_pids(a.pid)::text, a.application_name, coalesce(host(a.client_addr), ''),
       coalesce(a.client_port, 0), a.query,
       (SELECT string_agg(DISTINCT c.relname, ',') FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
         WHERE l.pid = a.pid AND c.relkind IN ('r', 'p') AND c.relnamespace <> 'pg_catalog'::regnamespace),
       coalesce(extract(epoch FROM now() - a.query_start), 0)::float8,
       extract(epoch FROM coalesce(a.xact_start, now()))::float8
FROM pg_stat_activity a
WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid() AND a.application_name <> 'pgscope-side'
  AND (a.xact_start IS NOT NULL OR cardinality(pg_blocking_pids(a.pid)) > 0)
"""


def takes_locks(text: str) -> bool:
    """Writes, SELECT … FOR UPDATE/SHARE, LOCK and DDL (from the parse tree)."""
    try:
        stmts = json.loads(pg_parser.parse_sql_json(text)).get("stmts", [])
    except Exception:
        return False
    for raw in stmts:
        stmt = raw.get("stmt", {})
        for kind, body in stmt.items():
            if kind in _WRITES or kind in _DDL:
                return True
            if kind == "SelectStmt" and (body.get("lockingClause") or body.get("intoClause")):
                return True
            if kind == "SelectStmt" and body.get("withClause"):
                ctes = body["withClause"].get("ctes", [])
                if any(any(k in _WRITES for k in c.get("CommonTableExpr", {}).get("ctequery", {}))
                       for c in ctes):
                    return True
            if kind == "ExplainStmt":
                return False
    return False


class Tx:
    __slots__ = ("client", "began", "last_end", "lock_fp", "lock_query", "locked", "reported", "report",
                 "status", "pending")

    def __init__(self, client: Any, began: float) -> None:
        self.client = client
        self.began = began
        self.last_end = began
        self.lock_fp = ""
        self.lock_query = ""
        self.locked = False
        self.reported = False
        self.report: dict | None = None
        self.status = "T"
        self.pending: dict | None = None  # what pg_locks samples saw before the hold was long enough


class LockTracker:
    wants = "in_transaction"  # statements outside a transaction block take no lasting locks
    def __init__(self, settings: Any, connect: Callable[[], Awaitable[Any]] | None = None,
                 pid_to_client: Callable[[int], Any] | None = None, fingerprinter: Fingerprinter | None = None,
                 logger: Any = None, busy_since: Callable[[int], float | None] | None = None) -> None:
        self.log = logger
        self.connect = connect
        self.pid_to_client = pid_to_client
        self.busy_since = busy_since
        self.waiting: dict[int, float] = {}  # client_id -> when the last pg_locks sample saw it blocked
        self.fingerprinter = fingerprinter or Fingerprinter(1000)
        self.txs: dict[int, Tx] = {}
        self.server_pid: dict[int, int] = {}  # client_id -> server pid of its last statement
        self.reports: deque[dict] = deque(maxlen=100)
        self.chains: dict[tuple, dict] = {}  # (root pid, its transaction's start) -> report (sampler)
        self.holds_by_db: dict[str, int] = {}
        self.hold_hist = Hist(LOCK_HOLD_BUCKETS)
        self.blocked_now = 0
        self.idle_in_tx_now = 0
        self._lock_cache: dict[str, bool] = {}
        self.wall_offset = time.time() - time.monotonic()
        self._next_sample = 0.0
        self._srv: Any = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self.sample_errors = 0
        self.reconfigure(settings)

    def reconfigure(self, settings: Any) -> None:
        self.s = settings.inspect if hasattr(settings, "inspect") else settings
        if self.reports.maxlen != self.s.locks_keep:
            self.reports = deque(self.reports, maxlen=self.s.locks_keep)

    def _takes_locks(self, info: StatementInfo, text: str) -> bool:
        v = self._lock_cache.get(info.fingerprint)
        if v is None:
            v = self._lock_cache[info.fingerprint] = takes_locks(text)
            if len(self._lock_cache) > 20000:
                self._lock_cache.clear()
        return v

    # ------------------------------------------------------------ the stream

    def feed(self, ev: Any, info: StatementInfo | None, now: float) -> None:
        t = type(ev)
        if t is StatementEvent:
            cid = ev.client.client_id
            tx = self.txs.get(cid)
            if ev.in_transaction:
                self.server_pid[cid] = ev.server_pid
                if tx is None:
                    tx = self.txs[cid] = Tx(ev.client, ev.start)
                tx.last_end = ev.end
                if not tx.locked and info is not None and ev.sqlstate is None \
                        and (info.command != "SELECT" or " FOR " in info.normalized.upper()) \
                        and self._takes_locks(info, info.text):
                    tx.locked = True
                    tx.lock_fp, tx.lock_query = info.fingerprint, info.normalized
            elif tx is not None:
                tx.last_end = ev.end
        elif t is TransactionEvent:
            cid = ev.client.client_id
            if ev.status in ("T", "E"):
                tx = self.txs.get(cid)
                if tx is None:
                    tx = self.txs[cid] = Tx(ev.client, ev.at)
                tx.status = ev.status
                tx.last_end = ev.at
            else:  # back to idle: the transaction ended
                tx = self.txs.pop(cid, None)
                if tx is not None:
                    self._ended(tx, ev.at)
        elif t is ClientEvent and not ev.connected:
            tx = self.txs.pop(ev.client.client_id, None)
            self.server_pid.pop(ev.client.client_id, None)
            if tx is not None:
                self._ended(tx, ev.at)

    def _ended(self, tx: Tx, at: float) -> None:
        held = at - tx.began
        if tx.locked:
            self.hold_hist.observe(held)
        if tx.report is not None:
            r = tx.report
            r["held_ms"] = round(held * 1000.0, 3)
            r["state"] = "ended"
            r["ended_at"] = round(at + self.wall_offset, 3)
            if self.log is not None:
                self.log.warning("lock_hold_ended", **_log_fields(r))

    def _report_hold(self, tx: Tx, now: float, state: str) -> None:
        held = now - tx.began
        c = tx.client
        r = {
            "fingerprint": tx.lock_fp or None, "query": tx.lock_query or None, "held_ms": round(held * 1000.0, 3),
            "blocked": 0, "blocked_fingerprints": [], "blocked_clients": [], "relations": [],
            "application_name": c.application_name, "client_addr": c.client_addr, "db": c.db, "user": c.user,
            "state": state, "started_at": round(tx.began + self.wall_offset, 3), "locks": tx.locked,
            "server_pid": self.server_pid.get(c.client_id, 0),
        }
        if tx.pending is not None:  # what pg_locks samples saw while the hold was still short
            pending, tx.pending = tx.pending, None
            for k in ("blocked", "blocked_fingerprints", "blocked_clients", "relations"):
                r[k] = pending[k]
        tx.report = r
        tx.reported = True
        self.reports.append(r)
        if tx.locked:
            self.holds_by_db[c.db] = self.holds_by_db.get(c.db, 0) + 1
        if self.log is not None:
            self.log.warning("lock_hold" if tx.locked else "idle_in_transaction", **_log_fields(r))

    def _busy_state(self, cid: int) -> str | None:
        """The state of a client with a statement in flight ("active", or "waiting" on a lock); None if it has none."""
        since = self.busy_since(cid)  # type: ignore[misc]
        if since is None:
            return None
        seen = self.waiting.get(cid)
        # blocked at the last sample, and the statement in flight was already running then
        return "waiting" if seen is not None and since <= seen else "active"

    def tick(self, now: float) -> None:
        bound = self.s.lock_hold_ms / 1000.0
        idle = 0
        busy_since = self.busy_since
        for tx in self.txs.values():
            is_idle = now - tx.last_end >= bound
            busy = None
            if is_idle and busy_since is not None:  # quiet on the stream: or is a statement still running?
                busy = self._busy_state(tx.client.client_id)
                if busy is not None:
                    is_idle = False
            if is_idle:
                idle += 1
            if tx.report is None:
                if tx.locked and now - tx.began >= bound:
                    self._report_hold(tx, now, "idle in transaction" if is_idle else busy or "active")
                elif is_idle:
                    self._report_hold(tx, now, "idle in transaction")
            elif tx.report["state"] != "ended":
                tx.report["held_ms"] = round((now - tx.began) * 1000.0, 3)
                if is_idle:
                    tx.report["state"] = "idle in transaction"
                elif busy is not None:
                    tx.report["state"] = busy
        self.idle_in_tx_now = idle
        interval = self.s.lock_sample_interval_ms / 1000.0
        if self.connect is not None and not self._closed and now >= self._next_sample \
                and (self._task is None or self._task.done()):
            self._next_sample = now + interval
            self._task = asyncio.get_running_loop().create_task(self._sample())

    # ------------------------------------------------------------ pg_locks sampler

    async def _sample(self) -> None:
        try:
            if self._srv is None or self._srv.closed:
                self._srv = await self.connect()  # type: ignore[misc]
            async with asyncio.timeout(5.0):
                rows, err = await self._srv.fetch(SAMPLE_SQL)
            if err is not None:
                raise err
        except Exception as e:
            self.sample_errors += 1
            if self.log is not None and self.sample_errors <= 3:
                self.log.warning("lock_sample_failed", error=getattr(e, "message", None) or repr(e))
            return
        self.absorb(rows, time.monotonic())

    async def close(self) -> None:
        """Shutdown: stop sampling (cancel a sample under way, and wait for it) and close the side connection."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._srv is not None:
            self._srv.close("shutdown")
            self._srv = None

    def absorb(self, rows: list[list[str | None]], now: float) -> None:
        """Turn one pg_stat_activity/pg_locks sample into blocker-chain reports.

        A root blocker is reported only once its transaction, or the longest
        wait on it, has lasted ``lock_hold_ms``; until then what the sample
        saw (waiters, relations) is kept and merged into the report if one is
        made later (by a later sample, or by ``tick`` for a transaction the
        stream saw take locks).  ``blocked_now`` counts every waiter.
        """
        bound = self.s.lock_hold_ms / 1000.0
        procs: dict[int, dict] = {}
        for pid, state, age, blockers, app, host, port, query, rels, *rest in rows:
            procs[int(pid)] = {  # type: ignore[arg-type]
                "state": state, "age": float(age or 0), "blockers": _int_array(blockers), "app": app or "",
                "addr": f"{host}:{port}" if host else "unix", "query": query or "", "rels": (rels or "").split(",")
                if rels else [],
                # how long its current statement has run: for a waiter, an upper bound of its wait
                "running": float(rest[0] or 0) if rest else float(age or 0),
                # when its transaction began (wall clock), which identifies the transaction
                "xact_start": float(rest[1]) if len(rest) > 1 and rest[1] is not None
                else float(round(time.time() - float(age or 0))),
            }
        blocked = [pid for pid, p in procs.items() if p["blockers"]]
        self.blocked_now = len(blocked)
        waiting: dict[int, float] = {}
        roots: dict[int, list[int]] = {}
        for pid in blocked:
            root, seen = pid, set()
            while procs.get(root, {}).get("blockers") and root not in seen:
                seen.add(root)
                root = procs[root]["blockers"][0]
            roots.setdefault(root, []).append(pid)
        for root, waiters in roots.items():
            rp = procs.get(root, {"state": "?", "age": 0.0, "app": "", "addr": "", "query": "", "rels": [],
                                  "xact_start": float(round(time.time()))})
            client = self.pid_to_client(root) if self.pid_to_client else None
            waiter_clients = []
            waiter_fps = []
            longest_wait = 0.0
            for w in waiters:
                wc = self.pid_to_client(w) if self.pid_to_client else None
                if wc is not None:
                    waiting[wc.client_id] = now
                wp = procs[w]
                longest_wait = max(longest_wait, wp["running"])
                waiter_clients.append({"application_name": wc.application_name if wc else wp["app"],
                                       "client_addr": wc.client_addr if wc else wp["addr"], "server_pid": w})
                if wp["query"]:
                    waiter_fps.append(self.fingerprinter.lookup(wp["query"]).fingerprint)
            tx = self.txs.get(client.client_id) if client is not None else None
            held = rp["age"] if tx is None else max(rp["age"], now - tx.began)
            long_enough = max(held, longest_wait) >= bound
            state = "active" if rp["state"] == "active" else "idle in transaction"
            if tx is not None:
                if tx.report is None:
                    if tx.pending is None:
                        tx.pending = _blank_chain()
                    if not long_enough:
                        _merge(tx.pending, rp, len(waiters), waiter_fps, waiter_clients)
                        continue
                    self._report_hold(tx, now, state)
                r = tx.report
            else:
                key = (root, rp["xact_start"])
                r = self.chains.get(key)
                if r is None:
                    info = self.fingerprinter.lookup(rp["query"]) if rp["query"] else None
                    r = _blank_chain()
                    r.update({
                        "fingerprint": info.fingerprint if info else None, "query": info.normalized if info else None,
                        "application_name": rp["app"], "client_addr": rp["addr"], "db": None, "user": None,
                        "state": rp["state"], "started_at": round(rp["xact_start"], 3), "locks": True,
                        "server_pid": root, "reported": False,
                    })
                    self.chains[key] = r
                if not r["reported"]:
                    _merge(r, rp, len(waiters), waiter_fps, waiter_clients)
                    if not long_enough:
                        continue
                    r["reported"] = True
                    self.reports.append(r)
                    if self.log is not None:
                        self.log.warning("lock_hold", **_log_fields(r))
                    continue
            assert r is not None
            _merge(r, rp, len(waiters), waiter_fps, waiter_clients)
        self.waiting = waiting
        if len(self.chains) > 1000:
            self.chains.clear()

    # ------------------------------------------------------------ exports

    def as_list(self, limit: int = 100) -> list[dict]:
        keys = ("fingerprint", "query", "held_ms", "blocked", "blocked_fingerprints", "blocked_clients", "relations",
                "application_name", "client_addr", "state", "started_at", "db", "user", "server_pid")
        return [{k: r.get(k) for k in keys} for r in list(self.reports)[-limit:][::-1]]

    def api_routes(self) -> dict[str, Any]:
        return {"/api/locks": list_route("locks", self.as_list)}

    def collect(self):
        c = CounterMetricFamily("pgscope_lock_holds", "Transactions that held locks past inspect.lock_hold_ms.",
                                labels=["db"])
        for db, n in sorted(self.holds_by_db.items()):
            c.add_metric([db], n)
        yield c
        from prometheus_client.core import HistogramMetricFamily

        h = HistogramMetricFamily("pgscope_lock_hold_seconds", "How long lock-taking transactions stayed open.",
                                  labels=[])
        add_hist(h, [], self.hold_hist)
        yield h
        yield GaugeMetricFamily("pgscope_blocked_clients", "Sessions waiting on another's lock (last sample).",
                                value=self.blocked_now)
        yield GaugeMetricFamily("pgscope_idle_in_transaction_clients",
                                "Clients idle inside a transaction for longer than inspect.lock_hold_ms "
                                "(no statement in flight).",
                                value=self.idle_in_tx_now)


def _blank_chain() -> dict:
    return {"held_ms": 0.0, "blocked": 0, "blocked_fingerprints": [], "blocked_clients": [], "relations": []}


def _merge(r: dict, rp: dict, n_waiters: int, waiter_fps: list[str], waiter_clients: list[dict]) -> None:
    """Add one sample's view of a root blocker (``rp``) and its waiters to a report."""
    r["held_ms"] = max(r["held_ms"], round(rp["age"] * 1000.0, 3))
    r["blocked"] = max(r["blocked"], n_waiters)
    r["blocked_fingerprints"] = sorted(set(r["blocked_fingerprints"]) | set(waiter_fps))
    known = {(c["client_addr"], c["server_pid"]) for c in r["blocked_clients"]}
    r["blocked_clients"] += [c for c in waiter_clients if (c["client_addr"], c["server_pid"]) not in known]
    r["relations"] = sorted(set(r["relations"]) | set(rp["rels"]))
    if "state" in r and r.get("state") != "ended":
        r["state"] = "active" if rp["state"] == "active" else (rp["state"] or r["state"])


def _int_array(text: str | None) -> list[int]:
    if not text or text == "{}":
        return []
    return [int(x) for x in text.strip("{}").split(",") if x]


def _log_fields(r: dict) -> dict:
    return {k: r.get(k) for k in ("fingerprint", "query", "held_ms", "blocked", "relations", "application_name",
                                  "client_addr", "state", "db")}
