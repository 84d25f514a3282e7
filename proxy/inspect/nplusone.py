"""N+1 bursts: one client running the same SELECT over and over, row by row of a parent query."""

from __future__ import annotations

import time
from collections import deque
from operator import sub
from typing import Any

from proxy.inspect.consumer import ApiList, Consumer, MetricRows, inspect_settings
from proxy.inspect.fingerprint import StatementInfo
from proxy.inspect.slices import FIELD_END as _END, FIELD_ROWS as _ROWS, FIELD_START as _START, run_summary
from proxy.protocol.records import ClientEvent, StatementEvent

TRANSPARENT = frozenset(("BEGIN", "START", "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE"))


def _csv(value: str) -> frozenset[str]:
    return frozenset(x.strip() for x in value.split(",") if x.strip())


class Run:
    __slots__ = ("fingerprint", "query", "count", "first_start", "last_end", "total", "parent", "others",
                 "burst", "tight", "tight_total", "between", "loop", "counted")

    def __init__(self, info: StatementInfo, ev: StatementEvent, parent: tuple | None) -> None:
        self.fingerprint = info.fingerprint
        self.query = info.normalized
        self.count = 1
        self.first_start = ev.start
        self.last_end = ev.end
        self.total = ev.end - ev.start
        self.parent = parent  # (fingerprint, query, rows, end) of the statement before the loop
        self.others = 0  # other statements since the last repetition
        self.burst: dict | None = None
        # the loop finding (see NPlusOneDetector): back-to-back single-row repetitions and their time
        self.tight = 1 if ev.rows <= 1 else 0
        self.tight_total = self.total if self.tight else 0.0
        self.between: dict[str, list] = {}  # fingerprint -> [times seen between repetitions, query]
        self.loop: Any = None  # the finding of an open loop
        self.counted = 0.0  # the time already counted in it


class ClientStream:
    __slots__ = ("runs", "last_info", "last_ev")

    def __init__(self) -> None:
        self.runs: dict[str, Run] = {}  # fingerprint -> its current run (a few at most)
        # the last statement (two references: cheaper than building a record per statement)
        self.last_info: StatementInfo | None = None
        self.last_ev: Any = None


MAX_RUNS = 8


class NPlusOneDetector(Consumer):
    """N+1 bursts: one client running the same SELECT over and over, row by row of a parent query.

    Within one client's statement stream, a *run* is the same SELECT fingerprint
    repeated with at most ``nplusone_window_ms`` between repetitions and at most
    ``nplusone_max_interleave`` other statements in between (an ORM may load a
    related row inside the loop; transaction control statements do not count).
    A run is a *burst* when it reaches ``nplusone_threshold`` executions whose
    summed time is at least ``nplusone_min_total_ms`` (Sentry's thresholds) and
    it follows a *parent*: a different SELECT, run just before the loop, that
    returned at least as many rows as the threshold.  The parent is what
    separates a loop over a list query's rows from a steady workload: pgbench
    repeats its statements back to back or across transactions, but never after a
    list query that fed them.  One loop is one burst: it is extended while it runs
    and closed (logged, counted) when it ends.

    With a findings book, a run that no list query fed (the N+1 rule's parent missing, or returning
    fewer rows than the threshold) is a *loop* finding once ``inspect.loop_threshold`` repetitions
    came back to back (at most ``inspect.loop_gap_ms`` between one's end and the next's start, one
    row or none each) and took ``inspect.loop_min_total_ms`` in all: ids from a cache, a request or
    another service, looked up one by one.  A longer pause, or a repetition returning more rows,
    ends the loop.  The finding names the statement most often run between the repetitions.
    """

    feeds_batches = True

    def __init__(self, settings: Any, logger: Any = None, findings: Any = None) -> None:
        self.log = logger
        self.findings = findings  # the FindingsBook (loop findings), or None
        self.clients: dict[int, ClientStream] = {}
        self.bursts: deque[dict] = deque(maxlen=100)
        self.bursts_by_fp: dict[tuple[str, str], int] = {}
        self.statements_by_fp: dict[tuple[str, str], int] = {}
        self.wall_offset = time.time() - time.monotonic()
        self.reconfigure(settings)

    def reconfigure(self, settings: Any) -> None:
        s = self.s = inspect_settings(settings)
        self._window = s.nplusone_window_ms / 1000.0
        self._threshold = s.nplusone_threshold
        self.allow_fp = _csv(s.nplusone_allow_fingerprints)
        self.allow_apps = _csv(s.nplusone_allow_apps)
        self._loop_gap = getattr(s, "loop_gap_ms", 100.0) / 1000.0
        self._loop_threshold = getattr(s, "loop_threshold", 100)
        self._loop_min_total = getattr(s, "loop_min_total_ms", 50.0) / 1000.0
        self._loops = self.findings is not None and "loop" not in getattr(s, "findings_disabled", ())
        if self.bursts.maxlen != s.nplusone_keep:
            self.bursts = deque(self.bursts, maxlen=s.nplusone_keep)

    # ------------------------------------------------------------ the stream

    def feed(self, ev: Any, info: StatementInfo | None, now: float) -> None:
        if info is None:
            if type(ev) is ClientEvent and not ev.connected:
                st = self.clients.pop(ev.client.client_id, None)
                if st is not None:
                    for run in st.runs.values():
                        self._close(run, ev.client)
            return
        if info.first_keyword in TRANSPARENT or type(ev) is not StatementEvent:
            return
        client = ev.client
        st = self.clients.get(client.client_id)
        if st is None:
            st = self.clients[client.client_id] = ClientStream()
        fp = info.fingerprint
        runs = st.runs
        window = self._window
        run = runs.get(fp)
        # the loop goes on: the same SELECT again, soon enough after the last one, and it succeeded
        continues = run is not None and ev.start - run.last_end <= window and ev.sqlstate is None \
            and info.command == "SELECT"
        if continues and len(runs) == 1:  # the loop goes on (the common case of a steady stream, too)
            if self._loops:
                self._tight(run, client, (ev.start - run.last_end,), (ev,), ev.end - ev.start)  # type: ignore
            self._goes_on(run, client, 1, ev.end, ev.end - ev.start)  # type: ignore[arg-type]
            st.last_info = info
            st.last_ev = ev
            return
        # every other run sees one more statement in between (or too long a pause): maybe it ended
        if len(runs) > 1 or (runs and fp not in runs):
            max_interleave = self.s.nplusone_max_interleave
            for other_fp in [k for k in runs if k != fp]:
                other = runs[other_fp]
                other.others += 1
                if other.tight and len(other.between) < 8:
                    seen = other.between.get(fp)
                    if seen is None:
                        other.between[fp] = [1, info.normalized]
                    else:
                        seen[0] += 1
                if other.others > max_interleave or ev.start - other.last_end > window:
                    self._close(other, client)
                    del runs[other_fp]
        if continues:
            if self._loops:
                self._tight(run, client, (ev.start - run.last_end,), (ev,), ev.end - ev.start)  # type: ignore
            self._goes_on(run, client, 1, ev.end, ev.end - ev.start)  # type: ignore[arg-type]
        elif info.command == "SELECT" and ev.sqlstate is None:  # a new run (a loop may start here)
            if run is not None:
                self._close(run, client)
            last, last_ev = st.last_info, st.last_ev
            parent = None
            if last is not None and last.fingerprint != fp and last.command == "SELECT" \
                    and last_ev.sqlstate is None and ev.start - last_ev.end <= window:
                # (fingerprint, query, rows, end) of the statement before the loop
                parent = (last.fingerprint, last.normalized, last_ev.rows, last_ev.end)
            runs[fp] = Run(info, ev, parent)
            if len(runs) > MAX_RUNS:
                oldest = min(runs, key=lambda k: runs[k].last_end)
                self._close(runs.pop(oldest), client)
        st.last_info = info
        st.last_ev = ev

    def _goes_on(self, run: Run, client: Any, count: int, last_end: float, spent: float) -> None:
        """The loop ran ``count`` more times, the last ending at ``last_end``, ``spent`` seconds in all."""
        run.count += count
        run.last_end = last_end
        run.total += spent
        run.others = 0
        if run.parent is not None and (run.burst is not None or run.count >= self._threshold):
            self._check(run, client, count)

    def feed_batch(self, evs: list[Any], infos: list[StatementInfo], groups: dict[Any, list[int]],
                   now: float) -> None:
        """``feed`` for each statement record of a slice, in order per client.

        ``groups`` maps (statement class, client) to the record indexes (the
        inspector's grouping).  A client whose records in the slice are all one
        SELECT that only continues its one current run, with no parent (so it
        cannot become a burst), is counted in one step: the steady stream of a
        pgbench-like workload.  Everything else goes through ``feed``, one record
        at a time in that client's order, so the outcome is the same.
        """
        per_client: dict[int, list[list[int]]] = {}
        for (_, cid), idx in groups.items():
            lst = per_client.get(cid)
            if lst is None:
                per_client[cid] = [idx]
            else:
                lst.append(idx)
        feed = self.feed
        window = self._window
        rest: list[int] = []  # records that go through feed
        for parts in per_client.values():
            if len(parts) == 1:
                idx = parts[0]
                ev0 = evs[idx[0]]
                info = infos[idx[0]]
                if info.first_keyword in TRANSPARENT:
                    continue  # feed ignores these
                st = self.clients.get(ev0.client.client_id)
                run = st.runs.get(info.fingerprint) if st is not None else None
                if run is not None and run.parent is None and len(st.runs) == 1 and info.command == "SELECT":  # type: ignore[union-attr]
                    # feed's rule for a loop that goes on, over the whole group at once
                    max_gap, ok, spent, max_rows, last_end = run_summary(evs, idx, run.last_end)
                    if max_gap <= window and ok:
                        if self._loops:
                            if max_gap <= self._loop_gap and max_rows <= 1:
                                self._tight_on(run, ev0.client, len(idx), spent)
                            else:  # (the loop rule's slower branch wants each gap)
                                picked = list(map(evs.__getitem__, idx))
                                prev_ends = [run.last_end]
                                prev_ends.extend(map(_END, picked[:-1]))
                                self._tight(run, ev0.client, list(map(sub, map(_START, picked), prev_ends)), picked,
                                            spent)
                        self._goes_on(run, ev0.client, len(idx), last_end, spent)
                        st.last_info = info  # type: ignore[union-attr]
                        st.last_ev = evs[idx[-1]]  # type: ignore[union-attr]
                        continue
                rest.extend(idx)
            else:
                for idx in parts:
                    rest.extend(idx)
        if rest:
            if len(groups) > 1:
                rest.sort()  # the original order, across clients too (the bursts ring keeps it)
            for i in rest:
                feed(evs[i], infos[i], now)

    def _tight(self, run: Run, client: Any, gaps: Any, evs: Any, spent: float) -> None:
        """The loop rule over ``len(gaps)`` more repetitions ``evs`` (the gap before each, time in all)."""
        if max(gaps) <= self._loop_gap and max(map(_ROWS, evs)) <= 1:
            self._tight_on(run, client, len(gaps), spent)
            return
        # a pause or a list: the loop (if any) ended; count again from the repetitions after it
        run.loop = None
        gap, n = self._loop_gap, len(gaps)
        rows = list(map(_ROWS, evs))
        last = max(i for i in range(n) if gaps[i] > gap or rows[i] > 1)
        run.tight = n - 1 - last
        run.tight_total = spent * run.tight / n  # (the group's time, shared out)
        if run.tight:
            self._maybe_loop(run, client)

    def _tight_on(self, run: Run, client: Any, n: int, spent: float) -> None:
        """``_tight`` when all ``n`` repetitions came back to back with at most one row each."""
        tight = run.tight = run.tight + n
        total = run.tight_total = run.tight_total + spent
        f = run.loop
        if f is not None:  # an open loop goes on: its finding updated in place (the common case)
            f.impact_ms += (total - run.counted) * 1000.0
            run.counted = total
            f.last_seen = run.last_end + self.wall_offset
            d = f.detail
            d["count"] = tight
            d["total_ms"] = round(total * 1000.0, 3)
            if run.between:
                d["between"] = max(run.between.values())[1]
            return
        self._maybe_loop(run, client)

    def _maybe_loop(self, run: Run, client: Any) -> None:
        """A loop finding once the tight repetitions are enough."""
        if run.tight < self._loop_threshold or run.tight_total < self._loop_min_total:
            return
        parent = run.parent
        if parent is not None and parent[2] >= self._threshold:
            return  # fed by a list query: the N+1 rule's
        between = max(run.between.values(), default=None)
        run.loop = self.findings.add(
            "loop", fingerprint=run.fingerprint, query=run.query, db=client.db, user=client.user,
            application_name=client.application_name, impact_ms=run.tight_total * 1000.0,
            detail={"count": run.tight, "total_ms": round(run.tight_total * 1000.0, 3),
                    "between": between[1] if between else None, "client_addr": client.client_addr},
            advice="This lookup runs once per id, back to back: fetch the rows in one statement "
                   "(WHERE id = ANY($1) with the list of ids), or cache them.")
        run.counted = run.tight_total  # the time already counted in the finding

    def _qualifies(self, run: Run, client: Any) -> bool:
        s = self.s
        if run.count < s.nplusone_threshold or run.total * 1000.0 < s.nplusone_min_total_ms:
            return False
        if run.parent is None or run.parent[2] < s.nplusone_threshold:
            return False  # no list query fed this loop: a steady workload, not N+1
        if run.fingerprint in self.allow_fp or (client.application_name and client.application_name in self.allow_apps):
            return False
        return True

    def _check(self, run: Run, client: Any, added: int) -> None:
        """Open a burst once the run qualifies; count ``added`` more statements in an open one."""
        if run.burst is None:
            if not self._qualifies(run, client):
                return
            run.burst = {
                "fingerprint": run.fingerprint, "query": run.query, "db": client.db,
                "parent_fingerprint": run.parent[0], "parent_query": run.parent[1],  # type: ignore[index]
                "application_name": client.application_name, "client_addr": client.client_addr,
                "started_at": round(run.first_start + self.wall_offset, 3), "open": True,
            }
            self.bursts.append(run.burst)
            key = (run.fingerprint, client.db)
            self.bursts_by_fp[key] = self.bursts_by_fp.get(key, 0) + 1
            self.statements_by_fp[key] = self.statements_by_fp.get(key, 0) + run.count
        else:
            key = (run.fingerprint, client.db)
            self.statements_by_fp[key] = self.statements_by_fp.get(key, 0) + added
        b = run.burst
        b["count"] = run.count
        b["span_ms"] = round((run.last_end - run.first_start) * 1000.0, 3)
        b["total_ms"] = round(run.total * 1000.0, 3)

    def _close(self, run: Run, client: Any) -> None:
        b = run.burst
        if b is None or not b["open"]:
            return
        b["open"] = False
        if self.log is not None:
            self.log.warning("nplusone_burst", **{k: b[k] for k in (
                "fingerprint", "query", "count", "span_ms", "total_ms", "parent_fingerprint", "parent_query",
                "application_name", "client_addr", "db")})

    def tick(self, now: float) -> None:
        """Close loops that stopped (nothing for a window)."""
        window = self.s.nplusone_window_ms / 1000.0
        for st in self.clients.values():
            for run in st.runs.values():
                if run.burst is not None and run.burst["open"] and now - run.last_end > window:
                    self._close(run, _ClientView(run.burst))

    # ------------------------------------------------------------ exports

    def as_list(self, limit: int = 100) -> list[dict]:
        keys = ("fingerprint", "query", "count", "span_ms", "total_ms", "parent_fingerprint", "parent_query",
                "application_name", "client_addr", "started_at", "db")
        return [{k: b[k] for k in keys} for b in list(self.bursts)[-limit:][::-1]]

    def api_lists(self) -> list[ApiList]:
        return [ApiList("/api/nplusone", "bursts", self.as_list)]

    def metric_rows(self) -> list[MetricRows]:
        labels = ("fingerprint", "db")
        return [MetricRows("pgscope_nplusone_bursts", "N+1 bursts detected.", "counter", labels,
                           sorted(self.bursts_by_fp.items())),
                MetricRows("pgscope_nplusone_statements", "Statements executed inside N+1 bursts.", "counter",
                           labels, sorted(self.statements_by_fp.items()))]


class _ClientView:
    """Enough of a ClientInfo for _close when closing from tick()."""

    def __init__(self, burst: dict) -> None:
        self.application_name = burst["application_name"]
        self.client_addr = burst["client_addr"]
        self.db = burst["db"]
