"""The lock tracker: transactions that hold locks too long, and clients idle in a transaction, from the
statement stream."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Awaitable, Callable

from proxy.hist import Hist
from proxy.inspect.consumer import ApiList, Consumer, MetricRows, inspect_settings
from proxy.inspect.fingerprint import Fingerprinter, StatementInfo
from proxy.inspect.pglocks import LockSampler, log_fields
from proxy.protocol.records import ClientEvent, StatementEvent, TransactionEvent
from proxy.protocol.statement import statement_facts

LOCK_HOLD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class Tx:
    """One client's open transaction, as the stream shows it."""

    __slots__ = ("client", "began", "last_end", "lock_fp", "lock_query", "locked", "lock_since", "reported",
                 "report", "status", "pending")

    def __init__(self, client: Any, began: float) -> None:
        self.client = client
        self.began = began
        self.last_end = began
        self.lock_fp = ""
        self.lock_query = ""
        self.locked = False
        # when its locks were taken: the start of its first lock-taking statement, or, when a pg_locks
        # sample saw that statement waiting for another's lock, that sample (it had not got it yet)
        self.lock_since = began
        self.reported = False
        self.report: dict | None = None
        self.status = "T"
        self.pending: dict | None = None  # what pg_locks samples saw before the hold was long enough


def held_from(tx: Tx) -> float:
    """Where a transaction's hold is counted from: its locks, or (none taken) its start."""
    return tx.lock_since if tx.locked else tx.began


class LockTracker(Consumer):
    """Long-held locks and idle-in-transaction clients, from the statement stream (the lock tracker).

    Each client's transaction is followed (when it began, whether it took locks —
    writes, SELECT … FOR UPDATE/SHARE, LOCK, DDL, from the statement's facts —
    and the statement that first took them).  A transaction that took locks and
    stays open past ``inspect.lock_hold_ms`` is reported, and again with its final
    duration when it ends; a client idle in a transaction past the same bound is
    reported too.  The pg_locks sampler (``proxy.inspect.pglocks``) adds who
    holds, who waits, on which relations, to the same reports.

    The stream carries completed statements only, so a client whose statement is
    still running (a long query, or one waiting on another's lock) looks as if it
    had done nothing since its last one.  ``busy_since(client_id)``, when given,
    says when the client's oldest request still awaiting results was sent (None
    when it has none): a transaction that looks idle past ``lock_hold_ms`` is
    asked about, and one with a statement in flight is "active" (or "waiting" if
    the last ``pg_locks`` sample saw that statement blocked), not idle in
    transaction.  Without it, every transaction quiet on the stream counts as idle.
    """

    wants = "in_transaction"  # statements outside a transaction block take no lasting locks

    def __init__(self, settings: Any, connect: Callable[[], Awaitable[Any]] | None = None,
                 pid_to_client: Callable[[int], Any] | None = None, fingerprinter: Fingerprinter | None = None,
                 logger: Any = None, busy_since: Callable[[int], float | None] | None = None,
                 other_servers: Callable[[], dict[Any, Callable[[], Awaitable[Any]]]] | None = None) -> None:
        self.log = logger
        self.busy_since = busy_since
        self.txs: dict[int, Tx] = {}
        self.server_pid: dict[int, int] = {}  # client_id -> server pid of its last statement
        self.reports: deque[dict] = deque(maxlen=100)
        self.holds_by_db: dict[str, int] = {}
        self.hold_hist = Hist(LOCK_HOLD_BUCKETS)
        self.idle_in_tx_now = 0
        self.wall_offset = time.time() - time.monotonic()
        self.fingerprinter = fingerprinter or Fingerprinter(1000)
        self.pid_to_client = pid_to_client
        # the upstream's server; with [databases] entries on other servers, one more sampler each
        # (other_servers: server -> its side connection; pid_to_client(pid, server) for those)
        self.sampler = LockSampler(self, connect, pid_to_client, self.fingerprinter, logger)
        self.other_servers = other_servers
        self.others: dict[Any, LockSampler] = {}
        self.reconfigure(settings)

    def reconfigure(self, settings: Any) -> None:
        self.s = inspect_settings(settings)
        if self.reports.maxlen != self.s.locks_keep:
            self.reports = deque(self.reports, maxlen=self.s.locks_keep)

    @property
    def samplers(self) -> list[LockSampler]:
        return [self.sampler, *self.others.values()]

    @property
    def blocked_now(self) -> int:
        """Sessions waiting on another's lock at the last pg_locks sample (of each server)."""
        return sum(x.blocked_now for x in self.samplers)

    def _sample_other_servers(self, now: float) -> None:
        """A sampler for each other server clients' databases are on (the set changes on reload)."""
        wanted = self.other_servers() if self.other_servers is not None and self.sampler.connect is not None else {}
        for key in [k for k in self.others if k not in wanted]:
            asyncio.get_running_loop().create_task(self.others.pop(key).close())
        pid_to_client = self.pid_to_client
        for key, connect in wanted.items():
            x = self.others.get(key)
            if x is None:
                mapper = (lambda pid, key=key: pid_to_client(pid, key)) if pid_to_client is not None else None
                x = self.others[key] = LockSampler(self, connect, mapper, self.fingerprinter, self.log).share(
                    self.sampler)
            x.tick(now)

    def absorb(self, rows: list[list[str | None]], now: float, taken: float | None = None) -> None:
        """Take one pg_locks sample (see LockSampler.absorb)."""
        self.sampler.absorb(rows, now, taken)

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
                        and statement_facts(info.text).takes_locks:
                    tx.locked = True
                    tx.lock_fp, tx.lock_query = info.fingerprint, info.normalized
                    waited = self.sampler.last_waiting.get(cid)
                    tx.lock_since = max(ev.start, waited) if waited is not None and waited <= ev.end else ev.start
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
            self.sampler.last_waiting.pop(ev.client.client_id, None)
            if tx is not None:
                self._ended(tx, ev.at)

    def _ended(self, tx: Tx, at: float) -> None:
        held = at - held_from(tx)
        if tx.locked:
            self.hold_hist.observe(held)
        if tx.report is not None:
            r = tx.report
            r["held_ms"] = round(held * 1000.0, 3)
            r["state"] = "ended"
            r["ended_at"] = round(at + self.wall_offset, 3)
            if self.log is not None:
                self.log.warning("lock_hold_ended", **log_fields(r))

    def report_hold(self, tx: Tx, now: float, state: str) -> None:
        """Report ``tx``, open long enough: a lock hold, or (no locks) a transaction left idle."""
        held = now - held_from(tx)
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
            self.log.warning("lock_hold" if tx.locked else "idle_in_transaction", **log_fields(r))

    def _busy_state(self, cid: int) -> str | None:
        """The state of a client with a statement in flight ("active", or "waiting" on a lock); None if it has none."""
        since = self.busy_since(cid)  # type: ignore[misc]
        if since is None:
            return None
        seen = max((t for t in (x.waiting.get(cid) for x in self.samplers) if t is not None), default=None)
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
                if tx.locked and now - tx.lock_since >= bound:
                    self.report_hold(tx, now, "idle in transaction" if is_idle else busy or "active")
                elif is_idle:
                    self.report_hold(tx, now, "idle in transaction")
            elif tx.report["state"] != "ended":
                tx.report["held_ms"] = round((now - held_from(tx)) * 1000.0, 3)
                if is_idle:
                    tx.report["state"] = "idle in transaction"
                elif busy is not None:
                    tx.report["state"] = busy
        self.idle_in_tx_now = idle
        self.sampler.tick(now)
        if self.other_servers is not None:
            self._sample_other_servers(now)

    async def close(self) -> None:
        """Shutdown: stop the pg_locks samplers."""
        for x in self.samplers:
            await x.close()

    # ------------------------------------------------------------ exports

    def as_list(self, limit: int = 100) -> list[dict]:
        keys = ("fingerprint", "query", "held_ms", "blocked", "blocked_fingerprints", "blocked_clients", "relations",
                "application_name", "client_addr", "state", "started_at", "db", "user", "server_pid")
        return [{k: r.get(k) for k in keys} for r in list(self.reports)[-limit:][::-1]]

    def api_lists(self) -> list[ApiList]:
        return [ApiList("/api/locks", "locks", self.as_list)]

    def metric_rows(self) -> list[MetricRows]:
        return [
            MetricRows("pgscope_lock_holds", "Transactions that held locks past inspect.lock_hold_ms.", "counter",
                       ("db",), [((db,), n) for db, n in sorted(self.holds_by_db.items())]),
            MetricRows("pgscope_lock_hold_seconds", "How long lock-taking transactions held their locks.", "histogram",
                       (), [((), self.hold_hist)]),
            MetricRows("pgscope_blocked_clients", "Sessions waiting on another's lock (last sample).", "gauge",
                       (), [((), self.blocked_now)]),
            MetricRows("pgscope_idle_in_transaction_clients",
                       "Clients idle inside a transaction for longer than inspect.lock_hold_ms "
                       "(no statement in flight).", "gauge", (), [((), self.idle_in_tx_now)]),
            MetricRows("pgscope_lock_sample_errors", "pg_locks samples that failed.", "counter",
                       (), [((), sum(x.errors for x in self.samplers))]),
        ]
