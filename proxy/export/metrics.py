"""Prometheus exposition: one custom Collector builds every pgscope metric family at scrape time, from
the pools' state, the statement statistics and the inspection consumers' plain metric rows."""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
)

from proxy import __version__
from proxy.export.traffic import traffic_families
from proxy.inspect.consumer import MetricRows
from proxy.inspect.stats import OTHER

_WS = re.compile(r"\s+")


def query_label(text: str, limit: int) -> str:
    """Normalized text as a label value: one line, at most ``limit`` characters."""
    s = _WS.sub(" ", text).strip()
    return s if len(s) <= limit else s[: max(limit - 1, 0)] + "…"


def hist_family(name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=labels)


def add_hist(fam: HistogramMetricFamily, labels: list[str], h: Any) -> None:
    fam.add_metric(labels, h.cumulative(), sum_value=h.sum)


def metric_family(m: MetricRows) -> Metric:
    """The Prometheus family of a consumer's plain metric rows."""
    labels = list(m.labels)
    if m.kind == "histogram":
        hist = hist_family(m.name, m.help, labels)
        for values, h in m.rows:
            add_hist(hist, list(values), h)
        return hist
    fam = (CounterMetricFamily if m.kind == "counter" else GaugeMetricFamily)(m.name, m.help, labels=labels)
    for values, v in m.rows:
        fam.add_metric(list(values), v)
    return fam


LabelKey = tuple[tuple[str, str], ...]


class FingerprintFold:
    """Keeps one consumer counter family's ``fingerprint`` label to the exported fingerprints.

    A series keeps its own ``fingerprint`` label only while ``keep(labels)``
    says so (the collector keeps the fingerprints that have their own statement
    series: ``inspect.export_top_k``); every other series is summed, per value
    of the family's other labels, under ``fingerprint="_other"``.  As for the
    statement series, no exported number ever goes down: a series that gets
    its own label starts at zero and leaves in ``_other`` what ``_other`` had
    already counted of it (its value at that moment, its baseline); a series
    that loses its own label, or disappears from the consumer, adds its whole
    value to ``_other``.  The consumer's own counters are never touched.
    """

    def __init__(self) -> None:
        self.base: dict[LabelKey, float] = {}  # series with their own label -> baseline
        self.last: dict[LabelKey, float] = {}  # every series' value at the last scrape
        self.gone: dict[LabelKey, float] = {}  # other labels -> values of series that disappeared
        self.other_keys: set[LabelKey] = set()  # other labels whose _other series was exported

    def fold(self, fam: Metric, keep: Callable[[dict[str, str]], bool]) -> Metric:
        total_name = fam.name + "_total"
        cur: dict[LabelKey, float] = {}
        for smp in fam.samples:
            if smp.name == total_name:
                cur[tuple(sorted(smp.labels.items()))] = smp.value
        base, last = self.base, self.last
        for key, v in last.items():
            if key not in cur and any(k == "fingerprint" for k, _ in key):
                # gone from the consumer: what it counted stays in _other
                rest = _rest(key)
                self.gone[rest] = self.gone.get(rest, 0.0) + v
                self.other_keys.add(rest)
                base.pop(key, None)
        out = Metric(fam.name, fam.documentation, fam.type)
        other: dict[LabelKey, float] = {}
        for key, v in sorted(cur.items()):
            labels = dict(key)
            if "fingerprint" not in labels:  # not a per-fingerprint series: as it is
                out.add_sample(total_name, labels, v)
                continue
            if keep(labels):
                b = base.get(key)
                if b is None:  # promoted: _other keeps what it already counted of it
                    b = base[key] = v if key in last else 0.0
                out.add_sample(total_name, labels, v - b)
                if b:
                    rest = _rest(key)
                    other[rest] = other.get(rest, 0.0) + b
            else:
                base.pop(key, None)  # demoted (or never promoted): all of it in _other
                rest = _rest(key)
                other[rest] = other.get(rest, 0.0) + v
        self.other_keys.update(other)
        for rest in sorted(self.other_keys):
            labels = dict(rest)
            labels["fingerprint"] = OTHER
            out.add_sample(total_name, labels, other.get(rest, 0.0) + self.gone.get(rest, 0.0))
        self.last = cur
        return out


def _rest(key: LabelKey) -> LabelKey:
    return tuple(kv for kv in key if kv[0] != "fingerprint")


class PgscopeCollector:
    """Every pgscope metric family, built from live state when Prometheus scrapes.

    Nothing is counted through prometheus-client on the hot path; the relay and
    the inspection pipeline keep plain Python numbers and this collector turns
    them into metric families when Prometheus asks.

    The sources are callables (read at scrape time, never blocking): client and
    server connection counts, per-pool waiting clients, wait histograms, sizes and
    upstream login failures, clients refused by reason, failed client logins, the
    max_client_conn limit and the readiness the proxy last knew; plus, with
    inspection on, the statement statistics and every consumer's ``metric_rows()``.
    """

    def __init__(self, inspector: Any = None,
                 client_counts: Callable[[], dict[str, int]] | None = None,
                 server_counts: Callable[[], dict[tuple[str, str], dict[str, int]]] | None = None,
                 pool_waiting: Callable[[], dict[tuple[str, str], int]] | None = None,
                 pool_wait_hists: Callable[[], dict[tuple[str, str], Any]] | None = None,
                 extra: Callable[[], Iterable[Metric]] | None = None, *,
                 pool_sizes: Callable[[], dict[tuple[str, str], int]] | None = None,
                 server_connect_failures: Callable[[], dict[tuple[str, str], int]] | None = None,
                 clients_refused: Callable[[], dict[str, int]] | None = None,
                 client_auth_failures: Callable[[], int] | None = None,
                 auth_query_lookups: Callable[[], dict[str, int]] | None = None,
                 max_client_connections: Callable[[], int] | None = None,
                 ready: Callable[[], bool] | None = None,
                 pool_wait_timeouts: Callable[[], int] | None = None,
                 cancel_requests: Callable[[], int] | None = None,
                 session_state: Callable[[], dict[str, int]] | None = None,
                 clients_pinned: Callable[[], int] | None = None,
                 traffic: Callable[[], dict[str, dict[str, float]]] | None = None,
                 version: str = __version__) -> None:
        self.inspector = inspector
        self.client_counts = client_counts
        self.server_counts = server_counts
        self.pool_waiting = pool_waiting
        self.pool_wait_hists = pool_wait_hists
        self.pool_sizes = pool_sizes
        self.server_connect_failures = server_connect_failures
        self.clients_refused = clients_refused
        self.client_auth_failures = client_auth_failures
        self.auth_query_lookups = auth_query_lookups
        self.max_client_connections = max_client_connections
        self.ready = ready
        self.pool_wait_timeouts = pool_wait_timeouts
        self.cancel_requests = cancel_requests
        self.session_state = session_state
        self.clients_pinned = clients_pinned
        self.traffic = traffic
        self.version = version
        self.extra = extra
        self._exported: set[tuple[str, str, str]] = set()  # (fingerprint, db, user) with own series
        self._folds: dict[str, FingerprintFold] = {}  # consumer family name -> its fold

    def describe(self) -> list[Metric]:
        return []  # dynamic: do not let the registry call collect() at registration

    def collect(self) -> Iterable[Metric]:
        yield from self._process()
        yield from self._pool()
        if self.traffic is not None:
            yield from traffic_families(self.traffic())
        insp = self.inspector
        if insp is not None:
            yield from self._statements(insp)  # sets self._exported
            keep = self._keep_fingerprint(self._exported)
            for c in insp.consumers:
                for rows in c.metric_rows():
                    yield self._capped(metric_family(rows), keep)
        if self.extra is not None:
            yield from self.extra()

    @staticmethod
    def _keep_fingerprint(exported: set[tuple[str, str, str]]) -> Callable[[dict[str, str]], bool]:
        """Whether a consumer's series keeps its own ``fingerprint`` label: the fingerprint has its own
        statement series (for the series' db, and user, when it has those labels)."""
        fps = {k[0] for k in exported}
        fp_db = {(k[0], k[1]) for k in exported}

        def keep(labels: dict[str, str]) -> bool:
            fp = labels["fingerprint"]
            if "user" in labels and "db" in labels:
                return (fp, labels["db"], labels["user"]) in exported
            if "db" in labels:
                return (fp, labels["db"]) in fp_db
            return fp in fps
        return keep

    def _capped(self, fam: Metric, keep: Callable[[dict[str, str]], bool]) -> Metric:
        """A consumer's per-fingerprint counter family, folded (see FingerprintFold)."""
        if fam.type != "counter" or not any("fingerprint" in smp.labels for smp in fam.samples):
            return fam
        folder = self._folds.get(fam.name)
        if folder is None:
            folder = self._folds[fam.name] = FingerprintFold()
        return folder.fold(fam, keep)

    def _process(self) -> Iterable[Metric]:
        info = GaugeMetricFamily("pgscope_build_info", "pgscope's version (always 1).", labels=["version"])
        info.add_metric([self.version], 1)
        yield info
        if self.ready is not None:
            yield GaugeMetricFamily("pgscope_ready", "1 when /readyz answers ready (PostgreSQL answers a login), "
                                    "else 0; the last known state, never checked at scrape time.",
                                    value=1 if self.ready() else 0)
        if self.max_client_connections is not None:
            yield GaugeMetricFamily("pgscope_max_client_connections", "Client connections accepted at most "
                                    "(max_client_conn).", value=self.max_client_connections())
        if self.clients_refused is not None:
            c = CounterMetricFamily("pgscope_clients_refused", "Clients refused at login, by reason.",
                                    labels=["reason"])
            for reason, n in sorted(self.clients_refused().items()):
                c.add_metric([reason], n)
            yield c
        if self.client_auth_failures is not None:
            yield CounterMetricFamily("pgscope_client_auth_failures", "Client logins that failed authentication.",
                                      value=self.client_auth_failures())
        if self.auth_query_lookups is not None:
            c = CounterMetricFamily("pgscope_auth_query_lookups", "Secrets asked of auth_query, by outcome "
                                    "(cached, found, missing, failed).", labels=["outcome"])
            for outcome, n in sorted(self.auth_query_lookups().items()):
                c.add_metric([outcome], n)
            yield c
        if self.pool_wait_timeouts is not None:
            yield CounterMetricFamily("pgscope_query_wait_timeouts", "Checkouts that gave up after "
                                      "query_wait_timeout without a server (the client got 08P01).",
                                      value=self.pool_wait_timeouts())
        if self.cancel_requests is not None:
            yield CounterMetricFamily("pgscope_cancel_requests", "CancelRequests received from clients.",
                                      value=self.cancel_requests())
        if self.session_state is not None:
            c = CounterMetricFamily("pgscope_session_state_statements", "Transaction mode: statements that "
                                    "leave session state, by kind (SET, LISTEN, ADVISORY LOCK, ...).",
                                    labels=["kind"])
            for kind, n in sorted(self.session_state().items()):
                c.add_metric([kind], n)
            yield c
        if self.clients_pinned is not None:
            yield CounterMetricFamily("pgscope_clients_pinned", "Transaction mode: clients pinned to their "
                                      "server for the rest of their session (session_state_policy = pin).",
                                      value=self.clients_pinned())

    def _pool(self) -> Iterable[Metric]:
        if self.client_counts is not None:
            g = GaugeMetricFamily("pgscope_client_connections", "Client connections by state.", labels=["state"])
            for state, n in sorted(self.client_counts().items()):
                g.add_metric([state], n)
            yield g
        pool_labels = ["db", "user"]
        if self.server_counts is not None:
            g = GaugeMetricFamily("pgscope_server_connections",
                                  "Server connections per pool by state.", labels=["db", "user", "state"])
            for (db, user), states in sorted(self.server_counts().items()):
                for state, n in sorted(states.items()):
                    g.add_metric([db, user, state], n)
            yield g
        if self.pool_sizes is not None:
            g = GaugeMetricFamily("pgscope_pool_size", "Server connections a pool may open (pool_size; the reserve "
                                  "pool comes on top).", labels=pool_labels)
            for (db, user), n in sorted(self.pool_sizes().items()):
                g.add_metric([db, user], n)
            yield g
        if self.pool_waiting is not None:
            g = GaugeMetricFamily("pgscope_pool_waiting_clients", "Clients waiting for a server of the pool right now.",
                                  labels=pool_labels)
            for (db, user), n in sorted(self.pool_waiting().items()):
                g.add_metric([db, user], n)
            yield g
        if self.pool_wait_hists is not None:
            h = hist_family("pgscope_pool_wait_seconds", "Time clients waited for a server of the pool.", pool_labels)
            for (db, user), hist in sorted(self.pool_wait_hists().items()):
                add_hist(h, [db, user], hist)
            yield h
        if self.server_connect_failures is not None:
            c = CounterMetricFamily("pgscope_server_connect_failures", "Failed connections or logins to PostgreSQL, "
                                    "per database and user.", labels=pool_labels)
            for (db, user), n in sorted(self.server_connect_failures().items()):
                c.add_metric([db, user], n)
            yield c

    def _statements(self, insp: Any) -> Iterable[Metric]:
        s = insp.settings
        stats = insp.stats
        labels = ["fingerprint", "db", "user"]
        calls = CounterMetricFamily("pgscope_statement_calls", "Statements executed.", labels=labels)
        dur = CounterMetricFamily("pgscope_statement_duration_seconds",
                                  "Time spent in statements (first byte sent to CommandComplete/ErrorResponse).",
                                  labels=labels)
        rows = CounterMetricFamily("pgscope_statement_rows", "Rows returned or affected.", labels=labels)
        errs = CounterMetricFamily("pgscope_statement_errors", "Statements that ended in an error.", labels=labels)
        slow = CounterMetricFamily("pgscope_slow_statements", "Statements slower than inspect.slow_query_ms.",
                                   labels=labels)
        info = GaugeMetricFamily("pgscope_statement_info", "Normalized query text of an exported fingerprint.",
                                 labels=["fingerprint", "query"])
        top, other = stats.exported(s.export_top_k)
        self._exported = {(st.fingerprint, st.db, st.user) for st, _ in top}
        seen_info: set[str] = set()
        for st, base in top:
            lv = [st.fingerprint, st.db, st.user]
            calls.add_metric(lv, st.calls - base.calls)
            dur.add_metric(lv, st.total - base.total)
            rows.add_metric(lv, st.rows - base.rows)
            errs.add_metric(lv, st.errors - base.errors)
            slow.add_metric(lv, st.slow - base.slow)
            if st.fingerprint not in seen_info:
                seen_info.add(st.fingerprint)
                info.add_metric([st.fingerprint, query_label(st.query, s.query_label_max)], 1)
        for (db, user), t in sorted(other.items()):
            lv = [OTHER, db, user]
            calls.add_metric(lv, t.calls)
            dur.add_metric(lv, t.total)
            rows.add_metric(lv, t.rows)
            errs.add_metric(lv, t.errors)
            slow.add_metric(lv, t.slow)
        yield from (calls, dur, rows, errs, slow, info)
        h = hist_family("pgscope_query_duration_seconds", "Statement latency by database and command.",
                        ["db", "command"])
        for (db, command), hist in sorted(stats.command_hists.items()):
            add_hist(h, [db, command], hist)
        yield h
        sink = insp.sink
        yield CounterMetricFamily("pgscope_inspect_events", "Records the inspection pipeline processed.",
                                  value=insp.events_processed)
        yield CounterMetricFamily("pgscope_inspect_dropped", "Records dropped because the queue was full.",
                                  value=sink.dropped if sink is not None else 0)
        yield GaugeMetricFamily("pgscope_inspect_queue_length", "Records waiting in the queue.",
                                value=len(sink) if sink is not None else 0)
        if sink is not None:
            yield GaugeMetricFamily("pgscope_inspect_queue_capacity", "Records the queue holds at most "
                                    "(inspect.queue_size).", value=sink.maxsize)
        yield GaugeMetricFamily("pgscope_inspect_fingerprints", "(fingerprint, db, user) entries kept.",
                                value=len(stats))
        yield CounterMetricFamily("pgscope_inspect_evictions", "Entries evicted to stay under max_fingerprints.",
                                  value=stats.evictions)
        yield CounterMetricFamily("pgscope_slow_log_suppressed", "slow_statement log events left out by the rate limit.",
                                  value=insp.slow_log.suppressed)
        yield CounterMetricFamily("pgscope_inspect_errors", "Records, and consumer calls, that failed in the "
                                  "inspection pipeline.", value=insp.errors)
        fingerprinter = insp.fingerprinter
        yield CounterMetricFamily("pgscope_inspect_fingerprint_misses", "Statement texts fingerprinted (not found "
                                  "in the cache, by text or by literal shape).", value=fingerprinter.misses)
        yield CounterMetricFamily("pgscope_inspect_fingerprint_shape_hits", "Statement texts found in the "
                                  "fingerprint cache by their literal shape.", value=fingerprinter.shape_hits)


def build_registry(inspector: Any = None, client_counts=None, server_counts=None, pool_waiting=None,
                   pool_wait_hists=None, extra=None, **sources: Any) -> CollectorRegistry:
    """A registry with the pgscope collector (``sources``: its keyword-only callables) and
    prometheus-client's process and platform collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PgscopeCollector(inspector, client_counts, server_counts, pool_waiting,
                                       pool_wait_hists, extra, **sources))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry
