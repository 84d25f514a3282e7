"""The pg_locks sampler: who blocks whom, read from PostgreSQL on a side connection and added to the
lock tracker's reports."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from proxy.inspect.fingerprint import Fingerprinter

if TYPE_CHECKING:
    from proxy.inspect.locks import LockTracker

SAMPLE_SQL = """
SELECT a.pid, a.state, coalesce(extract(epoch FROM now() - a.xact_start), 0)::float8,
       pg_blocking_pids(a.pid)::text, a.application_name, coalesce(host(a.client_addr), ''),
       coalesce(a.client_port, 0), a.query,
       (SELECT string_agg(DISTINCT c.relname, ',') FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
         WHERE l.pid = a.pid AND c.relkind IN ('r', 'p') AND c.relnamespace <> 'pg_catalog'::regnamespace),
       coalesce(extract(epoch FROM now() - a.query_start), 0)::float8,
       extract(epoch FROM coalesce(a.xact_start, now()))::float8,
       (SELECT extract(epoch FROM min((to_jsonb(l) ->> 'waitstart')::timestamptz))::float8
          FROM pg_locks l WHERE l.pid = a.pid AND NOT l.granted)
FROM pg_stat_activity a
WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid() AND a.application_name <> 'pgscope-side'
  AND (a.xact_start IS NOT NULL OR cardinality(pg_blocking_pids(a.pid)) > 0)
"""


class LockSampler:
    """Samples on its side connection when ``tick`` says it is time; ``absorb`` turns a sample into reports.

    Every ``inspect.lock_sample_interval_ms`` it reads ``pg_stat_activity``,
    ``pg_locks`` and ``pg_blocking_pids()``, maps server pids to the proxy's
    clients, and turns each blocker chain into a report of the lock tracker
    (``proxy.inspect.locks``): under its root, and only once the holder's
    transaction (or the longest wait on it) has lasted ``lock_hold_ms``; what a
    sample sees before that is kept with the transaction and shows in its report
    if it gets one.  Sessions seen waiting always count in ``blocked_now``,
    however short the hold.
    """

    def __init__(self, tracker: LockTracker, connect: Callable[[], Awaitable[Any]] | None,
                 pid_to_client: Callable[[int], Any] | None, fingerprinter: Fingerprinter, logger: Any = None) -> None:
        self.tracker = tracker
        self.connect = connect  # None: never samples (absorb still takes samples given to it)
        self.pid_to_client = pid_to_client
        self.fingerprinter = fingerprinter
        self.log = logger
        self.chains: dict[tuple, dict] = {}  # (root pid, its transaction's start) -> report
        self.waiting: dict[int, float] = {}  # client_id -> when the last sample saw it blocked
        # client_id -> the last sample that saw it blocked, kept until it disconnects: the lock tracker
        # counts a lock hold from after the wait that preceded it
        self.last_waiting: dict[int, float] = {}
        self.blocked_now = 0  # sessions waiting on another's lock at the last sample
        # for the findings (lock_wait, blocking_ddl): each proxy client's recent waits, and who each
        # server pid blocked (see note_waits)
        self.waits: dict[int, deque[dict]] = {}
        self.blocked_by: dict[tuple[int, float], dict] = {}  # (server pid, its transaction's start) -> waits
        self.errors = 0  # samples that failed
        self.conn: Any = None  # the side connection
        self._next_sample = 0.0
        self._task: asyncio.Task | None = None
        self._closed = False

    def share(self, main: LockSampler) -> LockSampler:
        """Keep what the findings and the tracker read across servers in ``main``'s dicts (keyed by proxy
        client, or by server pid and transaction start); this one samples another server."""
        self.waits, self.blocked_by, self.last_waiting = main.waits, main.blocked_by, main.last_waiting
        return self

    def tick(self, now: float) -> None:
        """Start a sample when one is due (and none is under way)."""
        if self.connect is not None and not self._closed and now >= self._next_sample \
                and (self._task is None or self._task.done()):
            self._next_sample = now + self.tracker.s.lock_sample_interval_ms / 1000.0
            self._task = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        try:
            if self.conn is None or self.conn.closed:
                self.conn = await self.connect()  # type: ignore[misc]
            taken = time.monotonic()  # the sample's snapshot is at this time or later
            async with asyncio.timeout(5.0):
                rows, err = await self.conn.fetch(SAMPLE_SQL)
            if err is not None:
                raise err
        except Exception as e:
            self.errors += 1
            if self.log is not None and self.errors <= 3:
                self.log.warning("lock_sample_failed", error=getattr(e, "message", None) or repr(e))
            return
        self.absorb(rows, time.monotonic(), taken)

    async def close(self) -> None:
        """Stop sampling (cancel a sample under way, and wait for it) and close the side connection."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.conn is not None:
            self.conn.close("shutdown")
            self.conn = None

    def absorb(self, rows: list[list[str | None]], now: float, taken: float | None = None) -> None:
        """Turn one pg_stat_activity/pg_locks sample into blocker-chain reports.

        ``now`` is when the sample arrived, ``taken`` (when given) when its query was sent.

        A root blocker is reported only once its transaction, or the longest
        wait on it, has lasted ``lock_hold_ms``; until then what the sample
        saw (waiters, relations) is kept and merged into the report if one is
        made later (by a later sample, or by ``tick`` for a transaction the
        stream saw take locks).  ``blocked_now`` counts every waiter.
        """
        bound = self.tracker.s.lock_hold_ms / 1000.0
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
                "waitstart": float(rest[2]) if len(rest) > 2 and rest[2] is not None else None,
            }
        blocked = [pid for pid, p in procs.items() if p["blockers"]]
        self.blocked_now = len(blocked)
        self.note_waits(procs, blocked, now)
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
            tx = self.tracker.txs.get(client.client_id) if client is not None else None
            held = rp["age"] if tx is None else max(rp["age"], now - tx.began)
            long_enough = max(held, longest_wait) >= bound
            state = "active" if rp["state"] == "active" else "idle in transaction"
            if tx is not None:
                if tx.report is None:
                    if tx.pending is None:
                        tx.pending = blank_chain()
                    if not long_enough:
                        merge_sample(tx.pending, rp, len(waiters), waiter_fps, waiter_clients)
                        continue
                    self.tracker.report_hold(tx, now, state)
                r = tx.report
            else:
                key = (root, rp["xact_start"])
                r = self.chains.get(key)
                if r is None:
                    info = self.fingerprinter.lookup(rp["query"]) if rp["query"] else None
                    r = blank_chain()
                    r.update({
                        "fingerprint": info.fingerprint if info else None, "query": info.normalized if info else None,
                        "application_name": rp["app"], "client_addr": rp["addr"], "db": None, "user": None,
                        "state": rp["state"], "started_at": round(rp["xact_start"], 3), "locks": True,
                        "server_pid": root, "reported": False,
                    })
                    self.chains[key] = r
                if not r["reported"]:
                    merge_sample(r, rp, len(waiters), waiter_fps, waiter_clients)
                    if not long_enough:
                        continue
                    r["reported"] = True
                    self.tracker.reports.append(r)
                    if self.log is not None:
                        self.log.warning("lock_hold", **log_fields(r))
                    continue
            assert r is not None
            merge_sample(r, rp, len(waiters), waiter_fps, waiter_clients)
        self.waiting = waiting
        if taken is not None and taken < now:  # still waiting at the snapshot, so at ``taken`` too
            waiting = dict.fromkeys(waiting, taken)
        self.last_waiting.update(waiting)
        if len(self.chains) > 1000:
            self.chains.clear()


    def note_waits(self, procs: dict[int, dict], blocked: list[int], now: float) -> None:
        """Keep, for the findings, each waiting client's wait (since when, its direct blocker: client,
        application_name, statement normalized without values, how long its transaction had been open) and,
        per blocking server pid, the clients it blocked and the longest wait seen."""
        offset = time.time() - now
        for w in blocked:
            wp = procs[w]
            since = wp["waitstart"] - offset if wp["waitstart"] is not None else now - wp["running"]
            b = wp["blockers"][0]
            bp = procs.get(b)
            wc = self.pid_to_client(w) if self.pid_to_client else None
            for pid in wp["blockers"]:
                key = (pid, procs[pid]["xact_start"] if pid in procs else 0.0)  # one blocking transaction
                e = self.blocked_by.get(key)
                if e is None:
                    e = self.blocked_by[key] = {"first": now, "last": now, "clients": set(), "longest": 0.0}
                e["last"] = now
                e["clients"].add(wc.client_addr if wc is not None else f"pid {w}")
                e["longest"] = max(e["longest"], now - since)
            if wc is None:
                continue
            bc = self.pid_to_client(b) if self.pid_to_client else None
            recent = self.waits.get(wc.client_id)
            if recent is None:
                recent = self.waits[wc.client_id] = deque(maxlen=4)
            if recent and abs(recent[-1]["since"] - since) < 0.001:  # the same wait, seen again
                recent[-1]["seen"] = now
                if bp:
                    recent[-1]["blocker"]["xact_open_ms"] = round(bp["age"] * 1000.0, 3)
                continue
            query = bp["query"] if bp else ""
            recent.append({"since": since, "seen": now, "blocker": {
                "server_pid": b, "application_name": bc.application_name if bc else (bp or {}).get("app", ""),
                "client_addr": bc.client_addr if bc else (bp or {}).get("addr", ""),
                "query": self.fingerprinter.lookup(query).normalized if query else None,
                "xact_open_ms": round((bp or {}).get("age", 0.0) * 1000.0, 3), "state": (bp or {}).get("state")}})
        if len(self.blocked_by) > 1000 or len(self.waits) > 10000:
            horizon = now - 600.0  # (in place: the samplers of other servers share these dicts)
            for k in [k for k, v in self.blocked_by.items() if v["last"] < horizon]:
                del self.blocked_by[k]
            for k in [k for k, v in self.waits.items() if not v or v[-1]["seen"] < horizon]:
                del self.waits[k]


def blank_chain() -> dict:
    """The report fields a sample fills in, before any sample."""
    return {"held_ms": 0.0, "blocked": 0, "blocked_fingerprints": [], "blocked_clients": [], "relations": []}


def merge_sample(r: dict, rp: dict, n_waiters: int, waiter_fps: list[str], waiter_clients: list[dict]) -> None:
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


def log_fields(r: dict) -> dict:
    """The fields of a lock report that go to the log."""
    return {k: r.get(k) for k in ("fingerprint", "query", "held_ms", "blocked", "relations", "application_name",
                                  "client_addr", "state", "db")}
