"""Findings from the statement stream: no_where, unbounded_select, deep_offset and blocking_ddl
(``StatementFindings``), and lock_wait (``LockWaits``: slow statements that waited on a lock)."""

from __future__ import annotations

from typing import Any

from proxy.inspect.consumer import Consumer, inspect_settings
from proxy.inspect.findings import FindingsBook, client_fields
from proxy.inspect.findings_facts import UNBOUNDED, literal_offset
from proxy.inspect.slices import FIELD_ROWS as _ROWS
from proxy.protocol.messages import decode_bind_params
from proxy.protocol.records import ClientEvent, StatementEvent, TransactionEvent


DDL_ADVICE = {
    "CREATE INDEX": "use CREATE INDEX CONCURRENTLY (outside a transaction block): it does not block writes",
    "CREATE UNIQUE INDEX": "use CREATE UNIQUE INDEX CONCURRENTLY, then ALTER TABLE … ADD CONSTRAINT … UNIQUE USING "
                           "INDEX",
    "ADD COLUMN DEFAULT volatile": "add the column without a default (or with a constant one), backfill it in "
                                   "batches, then SET DEFAULT",
    "ADD COLUMN GENERATED STORED": "add a plain column, backfill it in batches and keep it up to date with a "
                                   "trigger",
    "SET NOT NULL": "add CHECK (column IS NOT NULL) NOT VALID, VALIDATE CONSTRAINT it (no long lock), then SET NOT "
                    "NULL (PostgreSQL 12+ then skips the scan)",
    "ALTER COLUMN TYPE": "add a column of the new type, backfill it in batches, switch reads and writes, then drop "
                         "the old one",
    "VACUUM FULL": "rewrite the table with pg_repack or pg_squeeze, which hold the exclusive lock only briefly",
    "CLUSTER": "rewrite the table with pg_repack or pg_squeeze, which hold the exclusive lock only briefly",
    "LOCK TABLE": "lock the rows you change (SELECT … FOR UPDATE) instead of the table, or keep the transaction "
                  "that holds it short",
}


def bind_int(bind: bytes | None, n: int) -> int:
    """Bind parameter $n as an integer (text or 8/4/2-byte binary; 0 when it is not one)."""
    if bind is None or n <= 0:
        return 0
    try:
        _, _, values, fmts = decode_bind_params(bind)
        v = values[n - 1]
        if v is None:
            return 0
        return int(v) if fmts[n - 1] == 0 else int.from_bytes(v, "big", signed=True)
    except (ValueError, IndexError, TypeError):
        return 0


class StatementFindings(Consumer):
    """no_where, unbounded_select, deep_offset and blocking_ddl, from each statement's ``Risk``.

    The risk comes with the cached StatementInfo (one parse per distinct text, see
    ``proxy.inspect.findings_facts``); statements without one (most INSERTs, UPDATEs with a WHERE,
    SELECTs with a LIMIT) cost a dictionary walk per (statement, client) group of a slice.  A blocking
    DDL is judged when its lock is let go (the statement's end, or its transaction's): from the pg_locks
    samples (``blocked_by`` of the lock sampler), the clients it blocked and the longest wait.
    """

    feeds_batches = True

    def __init__(self, settings: Any, book: FindingsBook, sampler: Any = None) -> None:
        self.book = book
        self.sampler = sampler  # the LockSampler (blocked_by), or None
        self.big: dict[tuple, int] = {}  # (fingerprint, db, user, app) -> executions past unbounded_rows
        # client_id -> [(info, event)] of the DDL statements of its open transaction block
        self.pending_ddl: dict[int, list[tuple[Any, Any]]] = {}
        self.plans: Any = None  # the PlanFindings, ticked and reconfigured from here
        self.reconfigure(settings)

    def reconfigure(self, settings: Any) -> None:
        self.s = inspect_settings(settings)
        self.book.reconfigure(settings)
        if self.plans is not None:
            self.plans.reconfigure(settings)

    def api_lists(self) -> Any:
        return self.book.api_lists()

    def metric_rows(self) -> Any:
        return self.book.metric_rows()

    def feed_batch(self, evs: list[Any], infos: list[Any], groups: dict[tuple[int, int], list[int]],
                   now: float) -> None:
        bound = self.s.unbounded_rows
        for idx in groups.values():
            info = infos[idx[0]]
            risk = info.risk
            if risk is None:
                continue
            if risk is UNBOUNDED and max(map(_ROWS, map(evs.__getitem__, idx))) <= bound:
                continue  # most SELECTs: a glance at the rows, in C
            self._group(info, [evs[i] for i in idx] if len(idx) > 1 else [evs[idx[0]]])
        if self.pending_ddl:
            for ev in evs:
                if not ev.in_transaction:
                    self._after(ev)

    def _after(self, ev: Any) -> None:
        """A statement outside a transaction block: a DDL of its client's before it has let its lock go."""
        pending = self.pending_ddl.get(ev.client.client_id)
        if pending is not None and ev.start >= pending[-1][1].end:
            self._ddl_over(ev.client.client_id, ev.start)

    def feed(self, ev: Any, info: Any, now: float) -> None:
        t = type(ev)
        if t is StatementEvent:
            if not ev.in_transaction and self.pending_ddl:
                self._after(ev)
            if info is not None and info.risk is not None:
                self._group(info, [ev])
        elif (t is TransactionEvent and ev.status == "I") or (t is ClientEvent and not ev.connected):
            if ev.client.client_id in self.pending_ddl:
                self._ddl_over(ev.client.client_id, ev.at)

    def _group(self, info: Any, evs: list[Any]) -> None:
        risk = info.risk
        book = self.book
        ok = [ev for ev in evs if ev.sqlstate is None]
        if not ok:
            return
        c = ok[0].client
        if risk.no_where and book.enabled("no_where"):
            rows = list(map(_ROWS, ok))
            most = max(max(rows), book.detail_of("no_where", info.fingerprint, c).get("rows_max", 0))
            book.add("no_where", fingerprint=info.fingerprint, query=info.normalized, **client_fields(c),
                     impact_ms=sum(ev.end - ev.start for ev in ok) * 1000.0, count=len(ok),
                     detail={"table": risk.table, "command": info.command, "rows": rows[-1], "rows_max": most},
                     advice=f"{info.command} without WHERE changed {rows[-1]} rows of {risk.table or 'the table'}: "
                            f"add the WHERE clause it is missing, or use TRUNCATE if emptying the table is meant.")
        if risk.unbounded and book.enabled("unbounded_select"):
            self._unbounded(info, ok)
        if risk.offset and book.enabled("deep_offset"):
            self._offset(info, ok)
        if risk.ddl and book.enabled("blocking_ddl"):
            for ev in ok:
                if ev.in_transaction:  # its lock lasts until the transaction ends
                    self.pending_ddl.setdefault(ev.client.client_id, []).append((info, ev))
                else:
                    self._ddl(info, ev, ev.end)

    def _unbounded(self, info: Any, evs: list[Any]) -> None:
        bound = self.s.unbounded_rows
        rows = list(map(_ROWS, evs))
        if max(rows) <= bound:
            return
        big = [ev for ev, r in zip(evs, rows) if r > bound]
        c = big[0].client
        key = (info.fingerprint, c.db, c.user, c.application_name)
        seen = self.big.get(key, 0)
        n = self.big[key] = seen + len(big)
        if len(self.big) > 10000:
            self.big.clear()
        if n < self.s.unbounded_min_count:
            return
        most = max(max(rows), self.book.detail_of("unbounded_select", info.fingerprint, c).get("rows_max", 0))
        self.book.add("unbounded_select", fingerprint=info.fingerprint, query=info.normalized, **client_fields(c),
                      impact_ms=sum(ev.end - ev.start for ev in big) * 1000.0,
                      count=n if seen < self.s.unbounded_min_count else len(big),
                      detail={"rows": big[-1].rows, "rows_max": most, "threshold": bound},
                      advice=f"This SELECT has no LIMIT and returned {most} rows: page through it with a LIMIT and "
                             f"a keyset (WHERE key > last key ORDER BY key LIMIT n), or aggregate in SQL instead.")

    def _offset(self, info: Any, evs: list[Any]) -> None:
        src = info.risk.offset
        bound = self.s.deep_offset
        offsets = [literal_offset(ev.query) if src < 0 else bind_int(ev.bind, src) for ev in evs]
        deep = [(ev, o) for ev, o in zip(evs, offsets) if o > bound]
        if not deep:
            return
        c = deep[0][0].client
        # the OFFSET is one of the statement's values: shown only with inspect.log_parameters
        shown = getattr(self.s, "log_parameters", False)
        most = max([o for _, o in deep] + [self.book.detail_of("deep_offset", info.fingerprint, c).get("offset_max")
                                           or 0]) if shown else None
        order = info.risk.order
        key = ", ".join(order) if order else "the sort key"
        self.book.add("deep_offset", fingerprint=info.fingerprint, query=info.normalized, **client_fields(c),
                      impact_ms=sum(ev.end - ev.start for ev, _ in deep) * 1000.0, count=len(deep),
                      detail={"offset": deep[-1][1] if shown else None, "offset_max": most, "threshold": bound,
                              "order_by": list(order)},
                      advice=f"An OFFSET past {most if shown else bound} reads and throws away that many rows on "
                             f"every page: paginate by key instead (WHERE ({key}) > (the last page's last values) "
                             f"ORDER BY {key} LIMIT n).")

    def _ddl_over(self, client_id: int, end: float) -> None:
        for info, ev in self.pending_ddl.pop(client_id):
            self._ddl(info, ev, end)

    def _ddl(self, info: Any, ev: Any, end: float) -> None:
        risk = info.risk
        blocked, longest = 0, 0.0
        if self.sampler is not None:
            clients: set = set()
            for (pid, _), e in list(self.sampler.blocked_by.items()):
                if pid == ev.server_pid and e["last"] >= ev.start and e["first"] <= end:
                    clients |= e["clients"]
                    longest = max(longest, e["longest"])
            blocked = len(clients)
        held = end - ev.start
        if not blocked and held * 1000.0 < self.s.blocking_ddl_ms:
            return
        c = ev.client
        self.book.add("blocking_ddl", fingerprint=info.fingerprint, query=info.normalized, **client_fields(c),
                      impact_ms=longest * 1000.0 if blocked else held * 1000.0,
                      detail={"operation": risk.ddl, "lock": risk.lock, "table": risk.table,
                              "held_ms": round(held * 1000.0, 3), "blocked_clients": blocked,
                              "blocked_ms": round(longest * 1000.0, 3), "in_transaction": ev.in_transaction},
                      advice=f"{risk.ddl} took a {risk.lock} lock on {risk.table or 'the table'} for "
                             f"{held * 1000.0:.0f} ms ({blocked} client{'s' if blocked != 1 else ''} blocked): "
                             f"{DDL_ADVICE.get(risk.ddl, '')}; "
                             f"and SET lock_timeout = '2s' first, so a migration waiting for its lock does not "
                             f"queue everyone behind it.")

    def tick(self, now: float) -> None:
        """Plan changes get their verdict; a DDL whose transaction the stream never saw end (a client gone
        quiet) is judged after a minute."""
        if self.plans is not None:
            self.plans.tick(now)
        for cid in [cid for cid, ddl in self.pending_ddl.items() if now - ddl[-1][1].end > 60.0]:
            self._ddl_over(cid, now)


def wait_of(ev: Any, waits: dict[int, Any]) -> dict | None:
    """The lock wait the pg_locks samples saw during statement ``ev`` (None if none)."""
    recent = waits.get(ev.client.client_id)
    if not recent:
        return None
    for w in reversed(recent):
        if ev.start - 0.5 <= w["since"] <= ev.end and w["seen"] >= ev.start:
            since = max(w["since"], ev.start)
            return {"wait_ms": round((ev.end - since) * 1000.0, 3),
                    "seen_ms": round((min(w["seen"], ev.end) - since) * 1000.0, 3),
                    "duration_ms": round((ev.end - ev.start) * 1000.0, 3), "blocker": dict(w["blocker"])}
    return None


class LockWaits(Consumer):
    """lock_wait: a slow statement that the pg_locks samples saw waiting on another's lock.

    The wait (from when PostgreSQL says it began to wait, ``pg_locks.waitstart``, to the statement's end)
    is added to the statement's ``lock_wait_ms`` in /api/statements, and the finding names the blocker:
    its client, application_name, statement (normalized, no values) and how long its transaction had
    been open.  A wait shorter than ``inspect.lock_sample_interval_ms`` may go unseen.
    """

    wants = "slow"

    def __init__(self, book: FindingsBook, sampler: Any, stats: Any) -> None:
        self.book = book
        self.sampler = sampler
        self.stats = stats

    def lookup(self, ev: Any) -> dict | None:
        """The wait of statement ``ev``, for its slow sample (``proxy.inspect.explain``)."""
        return wait_of(ev, self.sampler.waits)

    def feed(self, ev: Any, info: Any, now: float) -> None:
        if info is None or not self.sampler.waits:
            return
        w = wait_of(ev, self.sampler.waits)
        if w is None:
            return
        c = ev.client
        st = self.stats.entries.get((info.fingerprint, c.db, c.user)) if self.stats is not None else None
        if st is not None:
            st.lock_wait += w["wait_ms"] / 1000.0
        b = w["blocker"]
        who = b.get("application_name") or b.get("client_addr") or f"server pid {b.get('server_pid')}"
        self.book.add("lock_wait", fingerprint=info.fingerprint, query=info.normalized, **client_fields(c),
                      impact_ms=w["wait_ms"], detail=w,
                      advice=f"Slow because it waited {w['wait_ms']:.0f} ms on a lock held by {who}, whose transaction "
                             f"had been open {b.get('xact_open_ms', 0):.0f} ms: keep that transaction short (no calls "
                             f"to other services while it holds locks), and SET lock_timeout to fail fast.")
