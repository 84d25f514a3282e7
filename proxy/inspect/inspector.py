"""The inspection pipeline: drains the relay's record queue off the hot path, keeps the statistics,
and decides which consumer sees which record."""

from __future__ import annotations

import asyncio
import time
from itertools import compress
from typing import Any, Sequence

from proxy.inspect.consumer import Consumer
from proxy.inspect.fingerprint import Fingerprinter, StatementInfo
from proxy.inspect.slices import columns, group
from proxy.inspect.slowlog import SlowLog
from proxy.inspect.stats import ORDERS, StatsTable
from proxy.protocol.records import StatementEvent



def wanted(wants: str, n: int, slow: Sequence[int], in_transaction: Sequence[bool]) -> Sequence[bool]:
    """The one filtering rule: for each of a slice's ``n`` statements, whether a consumer that ``wants``
    them is shown it.

    ``slow``: the indexes of the slow statements; ``in_transaction``: per statement, whether a
    transaction block was open.  Every path of the pipeline routes statements through this.
    """
    if wants == "all":
        return (True,) * n
    if wants == "slow":
        shown = [False] * n
        for i in slow:
            shown[i] = True
        return shown
    if wants == "in_transaction":
        return in_transaction
    return (False,) * n


def feed_in_order(c: Consumer, shown: Sequence[bool], mixed: list[Any], infos: list[Any],
                  now: float) -> tuple[int, Exception | None]:
    """Feed ``c`` a mixed slice in order: other records all, the statements ``shown`` says (by index).

    Returns (failures, first failure)."""
    feed = c.feed
    j = 0
    failed = 0
    error: Exception | None = None
    for ev in mixed:
        try:
            if type(ev) is StatementEvent:
                if shown[j]:
                    feed(ev, infos[j], now)
                j += 1
            else:
                feed(ev, None, now)
        except Exception as e:
            failed += 1
            error = error or e
    return failed, error


class Inspector:
    """Drains the queue every ``flush_interval_ms`` (and whenever ``chunk`` records wait).

    Each statement record is fingerprinted (cached), added to the statistics
    table, logged if slow (rate-limited), then handed with its StatementInfo to
    the consumers (``proxy.inspect.consumer.Consumer``: EXPLAIN sampler, N+1
    and lock detectors), each shown the statements it ``wants``.
    """

    chunk = 1024  # records processed between two turns of the event loop (see docs/performance.md)

    def __init__(self, settings: Any, sink: Any, logger: Any = None) -> None:
        self.settings = settings
        self.sink = sink
        self.log = logger
        self.fingerprinter = Fingerprinter(settings.fingerprint_cache_size)
        self.stats = StatsTable(settings.max_fingerprints, settings.slow_query_ms)
        self.slow_log = SlowLog(settings, logger)
        self.consumers: list[Consumer] = []
        # the per-record path's routing: (slow?, in a transaction block?) -> consumers shown that statement
        self._shown: dict[tuple[bool, bool], list[Consumer]] = {}
        self.events_processed = 0
        self.errors = 0  # records, and consumer calls, that failed
        self.wall_offset = time.time() - time.monotonic()
        self._scheduled = False

    @property
    def slow_logs_suppressed(self) -> int:
        return self.slow_log.suppressed

    # ------------------------------------------------------------- plumbing

    def add_consumer(self, consumer: Consumer) -> None:
        self.consumers.append(consumer)
        self._shown = {
            (slow, in_tx): [c for c in self.consumers if wanted(c.wants, 1, (0,) if slow else (), (in_tx,))[0]]
            for slow in (False, True) for in_tx in (False, True)}

    def reconfigure(self, settings: Any, full: Any = None) -> None:
        """New [inspect] settings; consumers get ``full`` (every section) when given."""
        self.settings = settings
        self.slow_log.settings = settings
        self.fingerprinter.cache_size = settings.fingerprint_cache_size
        self.stats.reconfigure(settings.max_fingerprints, settings.slow_query_ms)
        for c in self.consumers:
            c.reconfigure(full if full is not None else settings)

    async def run(self) -> None:
        """Process records as they come (a chunk at a time) and every ``flush_interval_ms``.

        Under load the queue reaches ``chunk`` records many times a second; each
        time a callback processes that chunk on the next turn of the event loop,
        while the records are still in the CPU caches, and the relay runs in
        between (one large batch at the periodic drain would be cold, and would
        stall every client for milliseconds: a stalled proxy idles the
        application and the server too).  The periodic drain takes what is
        left and runs the consumers' ``tick``.
        """
        loop = asyncio.get_running_loop()
        self.sink.set_batch_callback(self.chunk, lambda: self._schedule(loop))
        try:
            while True:
                await asyncio.sleep(self.settings.flush_interval_ms / 1000.0)
                now = time.monotonic()
                events = self.sink.drain()
                chunk = self.chunk
                for i in range(0, len(events), chunk):
                    if i:
                        await asyncio.sleep(0)  # let the relay run between chunks
                    self._process_safely(events[i:i + chunk] if len(events) > chunk else events, now)
                self._tick(now)
        finally:
            self.sink.set_batch_callback(0, None)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._process_chunk, loop)

    def _process_chunk(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        self._process_safely(self.sink.drain(self.chunk), time.monotonic())
        if len(self.sink) >= self.chunk:  # falling behind: another slice on the next turn
            self._schedule(loop)

    def _process_safely(self, events: list[Any], now: float) -> None:
        if not events:
            return
        try:
            self.process(events, now)
        except Exception as e:  # never let inspection die
            self.errors += 1
            if self.log is not None:
                self.log.error("inspect_error", error=repr(e))

    def _tick(self, now: float) -> None:
        for c in self.consumers:
            try:
                c.tick(now)
            except Exception as e:
                self.errors += 1
                if self.log is not None:
                    self.log.error("inspect_consumer_error", consumer=type(c).__name__, error=repr(e))

    # ------------------------------------------------------------- the work

    def process(self, events: list[Any], now: float) -> None:
        """Count, fingerprint and hand to the consumers a slice of the relay's records.

        The slice's statement records go through one columnar pass
        (``_statements``): the per-record steps are C-level passes (zip, map,
        sum, min, max) and the Python work is per (statement, client) group, a
        few per slice under load.  Consumers see their records in the order
        they happened, with one exception: a consumer with ``feeds_batches``
        gets the slice's statements at once, then its other records
        (transaction status, connects, disconnects); a client's disconnect
        still comes after its statements.
        """
        if not events:
            return
        if len(set(map(type, events))) == 1 and type(events[0]) is StatementEvent:
            self._statements(events, now, None)
        else:
            self._statements([ev for ev in events if type(ev) is StatementEvent], now, events)

    def _statements(self, evs: list[Any], now: float, mixed: list[Any] | None) -> None:
        """``evs``: the statement records; ``mixed``: the whole slice when it holds others too."""
        n = len(evs)
        infos: list[Any] = []
        groups: dict[tuple[int, int], list[int]] = {}
        slow: list[int] = []
        in_tx: Any = ()
        failed = 0
        first_error: Exception | None = None
        if n:
            try:
                clients, queries, indexes, starts, ends, rows, sqlstates, in_tx, durations = columns(evs)
                infos = self.fingerprinter.lookup_many(queries, indexes)
            except Exception:  # an odd record: take them one by one, each failure counted on its own
                self.process_each(mixed if mixed is not None else evs, now)
                return
            stats = self.stats
            slow_s = stats.slow_s
            offset = self.wall_offset
            # group by (statement class, client) for the consumers, and by (statement class,
            # db, user) for the statistics: many clients running the same statements (TPC-B:
            # 7 statements, 50 clients) make one update per statement, not one per client
            groups = group(infos, clients)
            by_entry = self._by_entry(groups, clients)
            for idx in by_entry.values():
                i0 = idx[0]
                client = clients[i0]
                try:
                    if len(idx) == n:
                        d, states, nrows, last = durations, sqlstates, sum(rows), ends[-1]
                    else:
                        d = list(map(durations.__getitem__, idx))
                        states = list(map(sqlstates.__getitem__, idx))
                        nrows = sum(map(rows.__getitem__, idx))
                        last = ends[idx[-1]]
                    st = stats.entry(infos[i0], client.db, client.user, ends[i0] + offset)
                    st.add_batch(d, nrows, states, slow_s, last + offset)
                except Exception as e:
                    failed += len(idx)
                    first_error = first_error or e
            if max(durations) > slow_s:
                slow = list(compress(range(n), map(slow_s.__lt__, durations)))
            for i in slow:
                self.slow_log.statement(evs[i], infos[i], durations[i], now)
        consumer_failed = 0
        consumer_error: tuple[Any, Exception] | None = None
        for c in self.consumers:
            feed = c.feed
            try:
                if c.feeds_batches and c.wants == "all":
                    if n:
                        c.feed_batch(evs, infos, groups, now)
                    if mixed is not None:
                        for ev in mixed:
                            if type(ev) is not StatementEvent:
                                feed(ev, None, now)
                    continue
                shown = wanted(c.wants, n, slow, in_tx)
                if mixed is not None:  # in order, statements as the consumer wants them
                    k, e1 = feed_in_order(c, shown, mixed, infos, now)
                    if e1 is not None:
                        consumer_failed += k
                        consumer_error = consumer_error or (c, e1)
                    continue
                if not any(shown):  # nothing for it in this slice (the common case of a slow-only consumer)
                    continue
            except Exception as e:
                consumer_failed += 1
                consumer_error = consumer_error or (c, e)
                continue
            for i in compress(range(n), shown):
                try:
                    feed(evs[i], infos[i], now)
                except Exception as e:
                    consumer_failed += 1
                    consumer_error = consumer_error or (c, e)
        self.events_processed += len(mixed) if mixed is not None else n
        self._report(failed, first_error, consumer_failed, consumer_error)

    @staticmethod
    def _by_entry(groups: dict[tuple[int, int], list[int]],
                  clients: Sequence[Any]) -> dict[tuple[int, str, str], list[int]]:
        """The (statement class, client) groups merged by (statement class, db, user), indexes in
        record order: a few groups per slice, so this costs nothing per record."""
        by_entry: dict[tuple[int, str, str], list[int]] = {}
        merged: dict[tuple[int, str, str], list[int]] = {}  # entries of several clients' groups
        for (info_id, _), idx in groups.items():
            c = clients[idx[0]]
            key = (info_id, c.db, c.user)
            g = by_entry.get(key)
            if g is None:
                by_entry[key] = idx  # shared with groups: never changed in place
            elif key in merged:
                g.extend(idx)
            else:
                merged[key] = by_entry[key] = g + idx
        for g in merged.values():  # back to record order
            g.sort()
        return by_entry

    def _report(self, failed: int, first_error: Exception | None, consumer_failed: int,
                consumer_error: tuple[Any, Exception] | None) -> None:
        # logged once per slice, not once per record: a broken part must not flood the log
        if failed:
            self.errors += failed
            if self.log is not None:
                self.log.error("inspect_error", failed=failed, error=repr(first_error))
        if consumer_error is not None:
            self.errors += consumer_failed
            if self.log is not None:
                self.log.error("inspect_consumer_error", consumer=type(consumer_error[0]).__name__,
                               failed=consumer_failed, error=repr(consumer_error[1]))

    def process_each(self, events: list[Any], now: float) -> None:
        """The per-record path: the reference for ``process``, and what it falls back to."""
        lookup = self.fingerprinter.lookup
        stats = self.stats
        entries = stats.entries
        record = stats.record
        offset = self.wall_offset
        slow_s = stats.slow_s
        shown = self._shown
        consumers = self.consumers
        failed = consumer_failed = 0
        first_error: Exception | None = None
        consumer_error: tuple[Any, Exception] | None = None
        for ev in events:
            info: StatementInfo | None = None
            if type(ev) is StatementEvent:
                try:  # free in 3.11 unless raised; one bad record must not cost the batch
                    info = lookup(ev.query, ev.stmt_index)
                    client = ev.client
                    duration = ev.end - ev.start
                    st = entries.get((info.fingerprint, client.db, client.user))
                    if st is None:  # first time: create (and maybe evict) through the table
                        record(info, client.db, client.user, duration, ev.rows, ev.sqlstate, ev.end + offset)
                    else:
                        st.add(duration, ev.rows, ev.sqlstate, duration > slow_s, ev.end + offset)
                    if duration > slow_s:
                        self.slow_log.statement(ev, info, duration, now)
                    # consumers say which statements they need: skipping the call
                    # is most of what they would cost for the others
                    targets = shown[duration > slow_s, ev.in_transaction]
                except Exception as e:
                    failed += 1
                    first_error = first_error or e
                    continue
            else:
                targets = consumers
            for c in targets:
                try:
                    c.feed(ev, info, now)
                except Exception as e:
                    consumer_failed += 1
                    consumer_error = consumer_error or (c, e)
        self.events_processed += len(events)
        self._report(failed, first_error, consumer_failed, consumer_error)

    # ------------------------------------------------------------- reading

    def statements(self, order: str = "total_time", limit: int = 50) -> list[dict]:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}")
        return [s.as_dict() for s in self.stats.top(order, limit)]
