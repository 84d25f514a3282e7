"""The inspection pipeline: drains the relay's event queue off the hot path.

Every ``flush_interval_ms`` the queue is drained; each statement record is
fingerprinted (cached), added to the statistics table, logged if slow
(rate-limited), then handed with its StatementInfo to the consumers (EXPLAIN
sampler, N+1 and lock detectors, ...).  Consumers are small objects with
``feed(event, info, now)`` and optionally ``tick(now)``, ``api_routes()`` and
``collect()`` (extra Prometheus metric families).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from proxy.inspect.events import StatementEvent
from proxy.inspect.fingerprint import Fingerprinter, StatementInfo
from proxy.inspect.stats import ORDERS, StatsTable
from proxy.protocol.messages import decode_bind_params


class Inspector:
    chunk = 256  # records processed between two turns of the event loop

    def __init__(self, settings: Any, sink: Any, logger: Any = None) -> None:
        self.settings = settings
        self.sink = sink
        self.log = logger
        self.fingerprinter = Fingerprinter(settings.fingerprint_cache_size)
        self.stats = StatsTable(settings.max_fingerprints, settings.slow_query_ms)
        self.consumers: list[Any] = []
        self._all: list[Any] = []
        self._slow: list[Any] = []
        self._tx: list[Any] = []
        self._tx_slow: list[Any] = []
        self.events_processed = 0
        self.errors = 0
        self.wall_offset = time.time() - time.monotonic()
        self._tokens = settings.slow_log_rate
        self._tokens_at: float | None = None
        self.slow_logs_suppressed = 0
        self._pending_suppressed = 0

    # ------------------------------------------------------------- plumbing

    def add_consumer(self, consumer: Any) -> None:
        """``consumer.wants``: "all" statements (default), "slow" ones, or those "in_transaction"."""
        self.consumers.append(consumer)
        wants = {c: getattr(c, "wants", "all") for c in self.consumers}
        self._all = [c for c in self.consumers if wants[c] == "all"]
        self._slow = [c for c in self.consumers if wants[c] in ("all", "slow")]
        self._tx = [c for c in self.consumers if wants[c] in ("all", "in_transaction")]
        self._tx_slow = list(self.consumers)

    def reconfigure(self, settings: Any, full: Any = None) -> None:
        """New [inspect] settings; consumers get ``full`` (every section) when given."""
        self.settings = settings
        self.fingerprinter.cache_size = settings.fingerprint_cache_size
        self.stats.reconfigure(settings.max_fingerprints, settings.slow_query_ms)
        for c in self.consumers:
            if hasattr(c, "reconfigure"):
                c.reconfigure(full if full is not None else settings)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_interval_ms / 1000.0)
            now = time.monotonic()
            events = self.sink.drain()
            chunk = self.chunk
            for i in range(0, len(events), chunk):
                if i:
                    # Let the relay run between chunks: a whole batch at once would stall
                    # every client for its duration (milliseconds under load), and a
                    # stalled proxy idles the application and the server too.
                    await asyncio.sleep(0)
                try:
                    self.process(events[i:i + chunk] if len(events) > chunk else events, now)
                except Exception as e:  # never let inspection die
                    self.errors += 1
                    if self.log is not None:
                        self.log.error("inspect_error", error=repr(e))
            for c in self.consumers:
                tick = getattr(c, "tick", None)
                if tick is not None:
                    try:
                        r = tick(now)
                        if asyncio.iscoroutine(r):
                            await r
                    except Exception as e:
                        self.errors += 1
                        if self.log is not None:
                            self.log.error("inspect_consumer_error", consumer=type(c).__name__, error=repr(e))

    # ------------------------------------------------------------- the work

    def process(self, events: list[Any], now: float) -> None:
        lookup = self.fingerprinter.lookup
        stats = self.stats
        entries = stats.entries
        record = stats.record
        offset = self.wall_offset
        slow_s = stats.slow_s
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
                        self._log_slow(ev, info, duration, now)
                except Exception as e:
                    failed += 1
                    first_error = first_error or e
                    continue
                # consumers say which statements they need: skipping the call
                # is most of what they would cost for the others
                targets = self._all if duration <= slow_s else self._slow
                if ev.in_transaction:
                    targets = self._tx_slow if duration > slow_s else self._tx
            else:
                targets = consumers
            for c in targets:
                try:
                    c.feed(ev, info, now)
                except Exception as e:
                    consumer_failed += 1
                    consumer_error = consumer_error or (c, e)
        self.events_processed += len(events)
        # logged once per batch, not once per record: a broken part must not flood the log
        if failed:
            self.errors += failed
            if self.log is not None:
                self.log.error("inspect_error", failed=failed, error=repr(first_error))
        if consumer_error is not None:
            self.errors += consumer_failed
            if self.log is not None:
                self.log.error("inspect_consumer_error", consumer=type(consumer_error[0]).__name__,
                               failed=consumer_failed, error=repr(consumer_error[1]))

    def _log_slow(self, ev: StatementEvent, info: StatementInfo, duration: float, now: float) -> None:
        rate = self.settings.slow_log_rate
        if self._tokens_at is None:
            self._tokens_at = now
        self._tokens = min(max(rate, 1.0), self._tokens + max(now - self._tokens_at, 0.0) * rate)
        self._tokens_at = now
        if self._tokens < 1.0:
            self.slow_logs_suppressed += 1
            self._pending_suppressed += 1
            return
        self._tokens -= 1.0
        if self.log is None:
            return
        fields: dict[str, Any] = dict(
            fingerprint=info.fingerprint, ms=round(duration * 1000.0, 3), db=ev.client.db,
            user=ev.client.user, application_name=ev.client.application_name,
            client_addr=ev.client.client_addr, query=info.normalized[:1000], rows=ev.rows,
            sqlstate=ev.sqlstate, server_pid=ev.server_pid)
        if self._pending_suppressed:
            fields["suppressed"] = self._pending_suppressed
            self._pending_suppressed = 0
        if self.settings.log_parameters and ev.bind is not None:
            fields["parameters"] = bind_parameters(ev.bind)
        self.log.warning("slow_statement", **fields)

    # ------------------------------------------------------------- reading

    def statements(self, order: str = "total_time", limit: int = 50) -> list[dict]:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}")
        return [s.as_dict() for s in self.stats.top(order, limit)]


def bind_parameters(bind: bytes) -> list[str | None]:
    """Text-format Bind values as strings (binary ones described, not shown)."""
    try:
        _, _, values, fmts = decode_bind_params(bind)
    except Exception:
        return ["<undecodable>"]
    out: list[str | None] = []
    for v, f in zip(values, fmts):
        if v is None:
            out.append(None)
        elif f == 0:
            out.append(v.decode("utf-8", "replace"))
        else:
            out.append(f"<binary {len(v)} bytes>")
    return out
