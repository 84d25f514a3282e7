"""Generate the pgscope Grafana dashboard: ``python3 deploy/grafana/dashboard.py > deploy/grafana/pgscope-dashboard.json``.

The JSON next to this file is what you import into Grafana; this script is its source, and
tests/test_deploy.py checks that the two agree and that every metric the expressions name exists
in a real pgscope scrape (and in docs/metrics.md). Standard library only.

Template variables: ``DS_PROMETHEUS`` (the Prometheus data source, a ``datasource`` variable so
the file works both imported and provisioned), ``job`` and ``instance`` (pgscope targets),
``db`` and ``user`` (what clients sent at startup).
"""

from __future__ import annotations

import json
import sys
from typing import Any

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

# Label matchers.  The statement families and the per-pool metrics carry db and user; the latency
# histogram carries db and command; client, inspection and process metrics carry only the target's
# labels.
T = 'job=~"$job", instance=~"$instance"'
TD = T + ', db=~"$db"'
TDU = TD + ', user=~"$user"'
RI = "$__rate_interval"
# process_* series are not pgscope's own names: keep only targets that also export pgscope metrics
# (a sidecar's scrape job usually holds other applications' processes too).
PGSCOPE_TARGETS = f"and on (job, instance) pgscope_client_connections{{{T}}}"


class Layout:
    """Hands out panel ids and grid positions, left to right, top to bottom (24 columns)."""

    def __init__(self) -> None:
        self.next_id = 1
        self.x = 0
        self.y = 0
        self.row_h = 0

    def id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def place(self, w: int, h: int) -> dict[str, int]:
        if self.x + w > 24:
            self.x = 0
            self.y += self.row_h
            self.row_h = 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def new_row(self) -> dict[str, int]:
        if self.x:
            self.y += self.row_h
        self.x, self.row_h = 0, 0
        pos = {"h": 1, "w": 24, "x": 0, "y": self.y}
        self.y += 1
        return pos


L = Layout()


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False, table: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "refId": ref, "expr": expr, "legendFormat": legend or "__auto",
                         "range": not instant, "instant": instant, "editorMode": "code"}
    if table:
        t["format"] = "table"
    return t


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "id": L.id(), "title": title, "collapsed": False, "panels": [], "gridPos": L.new_row()}


def timeseries(title: str, targets: list[dict[str, Any]], unit: str = "short", description: str = "",
               w: int = 8, h: int = 8, stack: bool = False, min0: bool = True) -> dict[str, Any]:
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    custom: dict[str, Any] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 20 if stack else 10,
                              "showPoints": "never", "spanNulls": False, "axisSoftMin": 0 if min0 else None,
                              "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    if not min0:
        del custom["axisSoftMin"]
    return {
        "type": "timeseries", "id": L.id(), "title": title, "description": description, "datasource": DS,
        "gridPos": L.place(w, h), "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                               "calcs": ["mean", "max", "lastNotNull"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def table(title: str, targets: list[dict[str, Any]], transformations: list[dict[str, Any]],
          overrides: list[dict[str, Any]], description: str = "", w: int = 24, h: int = 10) -> dict[str, Any]:
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    return {
        "type": "table", "id": L.id(), "title": title, "description": description, "datasource": DS,
        "gridPos": L.place(w, h), "targets": targets, "transformations": transformations,
        "fieldConfig": {"defaults": {"custom": {"align": "auto", "cellOptions": {"type": "auto"},
                                                "inspect": True, "filterable": True}},
                        "overrides": overrides},
        "options": {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}},
    }


def unit_override(column: str, unit: str, decimals: int | None = None, width: int | None = None) -> dict[str, Any]:
    props: list[dict[str, Any]] = [{"id": "unit", "value": unit}]
    if decimals is not None:
        props.append({"id": "decimals", "value": decimals})
    if width is not None:
        props.append({"id": "custom.width", "value": width})
    return {"matcher": {"id": "byName", "options": column}, "properties": props}


def quantiles(metric: str, selector: str, by: str = "") -> list[dict[str, Any]]:
    grouping = f"le, {by}" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    return [target(f"histogram_quantile({q}, sum by ({grouping}) (rate({metric}_bucket{{{selector}}}[{RI}])))",
                   f"p{int(q * 100)}{suffix}") for q in (0.5, 0.95, 0.99)]


# ------------------------------------------------------------------ top statements table

TOP_N = 20
RANGE = "$__range"


def per_fingerprint(fn: str, metric: str, extra: str = "") -> str:
    sel = TDU + (", " + extra if extra else "")
    return f"sum by (fingerprint) ({fn}({metric}{{{sel}}}[{RANGE}]))"


def with_query(inner: str, inner_other: str) -> str:
    """Add the query text from pgscope_statement_info (one series per fingerprint and target; topk
    picks one when several targets export it); the `_other` bucket has no text of its own."""
    return (f"(({inner}) * on (fingerprint) group_left (query) topk by (fingerprint) (1, pgscope_statement_info{{{T}}}))"
            f' or label_replace({inner_other}, "query", "(all other statements)", "", "")')


def column(make) -> str:
    """``make(extra_matcher)`` builds a per-fingerprint expression; the result keeps the rows of the
    TOP_N fingerprints by total time, so that every column has the same rows."""
    return with_query(make(""), make('fingerprint="_other"'))


def total_time(extra: str) -> str:
    return per_fingerprint("increase", "pgscope_statement_duration_seconds_total", extra)


def top_statements() -> dict[str, Any]:
    top = f"topk({TOP_N}, {total_time('')})"
    cols = {
        "Total time": column(total_time),
        "Calls/s": column(lambda e: per_fingerprint("rate", "pgscope_statement_calls_total", e)),
        "Mean": column(lambda e: f"1000 * {total_time(e)} / {per_fingerprint('increase', 'pgscope_statement_calls_total', e)}"),
        "Rows/s": column(lambda e: per_fingerprint("rate", "pgscope_statement_rows_total", e)),
        "Errors/s": column(lambda e: per_fingerprint("rate", "pgscope_statement_errors_total", e)),
        "Slow/s": column(lambda e: per_fingerprint("rate", "pgscope_slow_statements_total", e)),
    }
    targets = [target(f"({expr}) and on (fingerprint) {top}", ref="", instant=True, table=True)
               for expr in cols.values()]
    rename = {f"Value #{chr(ord('A') + i)}": name for i, name in enumerate(cols)}
    order = {"query": 0, "fingerprint": 1, **{f"Value #{chr(ord('A') + i)}": i + 2 for i in range(len(cols))}}
    transformations = [
        {"id": "merge", "options": {}},
        {"id": "organize", "options": {"excludeByName": {"Time": True}, "indexByName": order,
                                       "renameByName": rename}},
        {"id": "sortBy", "options": {"fields": {}, "sort": [{"field": "Total time", "desc": True}]}},
    ]
    overrides = [
        unit_override("Total time", "s", 2, 110),
        unit_override("Calls/s", "ops", 2, 100),
        unit_override("Mean", "ms", 2, 100),
        unit_override("Rows/s", "short", 2, 100),
        unit_override("Errors/s", "short", 3, 90),
        unit_override("Slow/s", "short", 3, 90),
        {"matcher": {"id": "byName", "options": "fingerprint"},
         "properties": [{"id": "custom.width", "value": 170}]},
    ]
    return table(f"Top {TOP_N} statements by total time (selected range)", targets, transformations, overrides,
                 description="Per fingerprint over the dashboard's time range: total execution time, calls/s, "
                             "mean execution time, rows/s, errors/s and slow statements/s. The query text comes "
                             "from pgscope_statement_info (normalized: no literal values). Statements outside "
                             "inspect.export_top_k are summed under `_other`.", h=12)


def index_recommendations() -> dict[str, Any]:
    t = target(f"max by (db, table, columns, method) (pgscope_index_recommendation_benefit{{{TD}}})",
               instant=True, table=True)
    return table("Index recommendations", [t],
                 [{"id": "organize", "options": {"excludeByName": {"Time": True},
                                                 "indexByName": {"db": 0, "table": 1, "columns": 2, "method": 3,
                                                                 "Value": 4},
                                                 "renameByName": {"Value": "Benefit"}}},
                  {"id": "sortBy", "options": {"fields": {}, "sort": [{"field": "Benefit", "desc": True}]}}],
                 [unit_override("Benefit", "percentunit", 0)],
                 description="Estimated cost reduction of each recommended index (from sampled EXPLAIN plans, "
                             "HypoPG-verified where `method` is hypopg). /api/recommendations has the "
                             "CREATE INDEX statement.", w=12, h=8)


# ------------------------------------------------------------------ the dashboard

def variables() -> list[dict[str, Any]]:
    def query_var(name: str, label: str, query: str, all_value: str | None) -> dict[str, Any]:
        v: dict[str, Any] = {
            "name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": "StandardVariableQuery"}, "definition": query,
            "refresh": 2, "sort": 1, "multi": True, "includeAll": True, "regex": "", "hide": 0,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [],
        }
        if all_value is not None:
            v["allValue"] = all_value
        return v

    return [
        {"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "refresh": 1, "regex": "", "hide": 0, "current": {}, "options": []},
        # No allValue for job: "All" expands to the jobs that export pgscope metrics.
        query_var("job", "job", "label_values(pgscope_client_connections, job)", None),
        query_var("instance", "instance", 'label_values(pgscope_client_connections{job=~"$job"}, instance)', ".*"),
        query_var("db", "database", f"label_values(pgscope_query_duration_seconds_count{{{T}}}, db)", ".*"),
        query_var("user", "user", f"label_values(pgscope_statement_calls_total{{{TD}}}, user)", ".*"),
    ]


def panels() -> list[dict[str, Any]]:
    p: list[dict[str, Any]] = []
    p.append(row("Statements"))
    p.append(timeseries("Statements/s by command", [
        target(f"sum by (command) (rate(pgscope_query_duration_seconds_count{{{TD}}}[{RI}]))", "{{command}}")],
        unit="ops", stack=True,
        description="Completed statements per second by command (pgscope_query_duration_seconds_count); "
                    "filtered by database, not by user (the latency histogram has no user label)."))
    p.append(timeseries("Statement latency p50 / p95 / p99",
                        quantiles("pgscope_query_duration_seconds", TD), unit="s",
                        description="From the pgscope_query_duration_seconds histogram: first byte sent to "
                                    "PostgreSQL to CommandComplete/ErrorResponse, pool wait excluded."))
    p.append(timeseries("p95 latency by command",
                        [quantiles("pgscope_query_duration_seconds", TD, "command")[1]], unit="s"))
    p.append(timeseries("Errors/s", [
        target(f"sum by (db, user) (rate(pgscope_statement_errors_total{{{TDU}}}[{RI}]))", "{{db}} / {{user}}")],
        description="Statements that ended in an ErrorResponse (pgscope_statement_errors_total)."))
    p.append(timeseries("Error ratio", [
        target(f"sum by (db, user) (rate(pgscope_statement_errors_total{{{TDU}}}[{RI}]))"
               f" / sum by (db, user) (rate(pgscope_statement_calls_total{{{TDU}}}[{RI}]))", "{{db}} / {{user}}")],
        unit="percentunit"))
    p.append(timeseries("Slow statements/s", [
        target(f"sum by (db, user) (rate(pgscope_slow_statements_total{{{TDU}}}[{RI}]))", "{{db}} / {{user}}")],
        description="Statements slower than inspect.slow_query_ms (pgscope_slow_statements_total)."))
    p.append(row("Top statements"))
    p.append(top_statements())
    p.append(timeseries("Time in statements by fingerprint (top 10)", [
        target(f"topk(10, sum by (fingerprint) (rate(pgscope_statement_duration_seconds_total{{{TDU}}}[{RI}])))",
               "{{fingerprint}}")],
        unit="s", w=12, stack=True,
        description="Seconds of execution per second, per fingerprint: the load each statement puts on "
                    "PostgreSQL. Look the fingerprint up in the table above or at /api/statements."))
    p.append(timeseries("Calls/s by fingerprint (top 10)", [
        target(f"topk(10, sum by (fingerprint) (rate(pgscope_statement_calls_total{{{TDU}}}[{RI}])))",
               "{{fingerprint}}")], unit="ops", w=12))
    p.append(row("Connections and pools"))
    p.append(timeseries("Client connections by state", [
        target(f"sum by (state) (pgscope_client_connections{{{T}}})", "{{state}}")], stack=True, w=6,
        description="login (startup and authentication), waiting (for a server), active (holding a server), "
                    "idle (transaction mode, holding none)."))
    p.append(timeseries("Server connections by pool and state", [
        target(f"sum by (db, user, state) (pgscope_server_connections{{{TDU}}})", "{{db}} / {{user}} {{state}}")],
        stack=True, w=6, description="Server connections per (database, user) pool: active, idle, connecting."))
    p.append(timeseries("Clients waiting for a server", [
        target(f"sum by (db, user) (pgscope_pool_waiting_clients{{{TDU}}})", "{{db}} / {{user}}")], w=6,
        description="pgscope_pool_waiting_clients per pool: above zero for long means the pool is too small "
                    "(pool_size) or statements hold servers too long."))
    p.append(timeseries("Pool wait p50 / p95 / p99", quantiles("pgscope_pool_wait_seconds", TDU), unit="s", w=6,
                        description="How long clients waited for a server of the selected pools (every checkout, "
                                    "including those that waited 0)."))
    p.append(timeseries("Pool usage (busy servers / pool_size)", [
        target(f"sum by (db, user) (pgscope_server_connections{{{TDU}, state!=\"idle\"}})"
               f" / sum by (db, user) (pgscope_pool_size{{{TDU}}})", "{{db}} / {{user}}")],
        unit="percentunit", w=6,
        description="Active and connecting servers of each pool as a share of pool_size (pgscope_pool_size); "
                    "the reserve pool can take it past 100%."))
    p.append(timeseries("Client connections / max_client_conn", [
        target(f"sum by (instance) (pgscope_client_connections{{{T}}})"
               f" / sum by (instance) (pgscope_max_client_connections{{{T}}})", "{{instance}}")],
        unit="percentunit", w=6,
        description="Beyond max_client_conn (pgscope_max_client_connections) new clients are refused with 53300."))
    p.append(timeseries("Refused clients, failed logins", [
        target(f"sum by (reason) (rate(pgscope_clients_refused_total{{{T}}}[{RI}]))", "refused: {{reason}}"),
        target(f"sum(rate(pgscope_client_auth_failures_total{{{T}}}[{RI}]))", "client auth failed"),
        target(f"sum by (db, user) (rate(pgscope_server_connect_failures_total{{{TDU}}}[{RI}]))",
               "upstream login failed: {{db}} / {{user}}")], unit="ops", w=6,
        description="Clients refused at login by reason (max_client_conn, draining, tls_required, replication), "
                    "client logins that failed authentication, and failed connections or logins to PostgreSQL "
                    "per pool."))
    p.append(timeseries("Ready", [
        target(f"min by (instance) (pgscope_ready{{{T}}})", "{{instance}}")], w=6,
        description="pgscope_ready: 1 while /readyz answers ready (PostgreSQL answers a login), 0 otherwise."))
    p.append(timeseries("Transactions/s and queries/s by database", [
        target(f"sum by (db) (rate(pgscope_transactions_total{{{TD}}}[{RI}]))", "{{db}} transactions"),
        target(f"sum by (db) (rate(pgscope_queries_total{{{TD}}}[{RI}]))", "{{db}} queries")], unit="ops", w=6,
        description="PgBouncer's xact_count and query_count (SHOW STATS): transactions, and client round trips "
                    "up to a ReadyForQuery, with inspection on or off."))
    p.append(timeseries("Mean transaction and query time by database", [
        target(f"sum by (db) (rate(pgscope_transaction_seconds_total{{{TD}}}[{RI}]))"
               f" / sum by (db) (rate(pgscope_transactions_total{{{TD}}}[{RI}]))", "{{db}} transaction"),
        target(f"sum by (db) (rate(pgscope_query_seconds_total{{{TD}}}[{RI}]))"
               f" / sum by (db) (rate(pgscope_queries_total{{{TD}}}[{RI}]))", "{{db}} query")], unit="s", w=6,
        description="PgBouncer's avg_xact_time and avg_query_time over the window, from when the first message "
                    "reached a server (the wait for one is in the pool wait panel)."))
    p.append(timeseries("Client traffic by database", [
        target(f"sum by (db) (rate(pgscope_client_bytes_received_total{{{TD}}}[{RI}]))", "{{db}} from clients"),
        target(f"sum by (db) (rate(pgscope_client_bytes_sent_total{{{TD}}}[{RI}]))", "{{db}} to clients")],
        unit="Bps", w=6, description="Bytes read from clients and sent to them after login (PgBouncer's "
                                     "total_received and total_sent)."))
    p.append(row("Findings, N+1 loops and locks"))
    p.append(timeseries("Findings raised in the last hour, by kind", [
        target(f"sum by (kind) (increase(pgscope_findings_total{{{TD}}}[1h]))", "{{kind}}")], stack=True, w=24,
        description="What pgscope alone sees from the wire (loops, lock waits, risky statements and migrations, "
                    "index hygiene), by kind (pgscope_findings_total). /api/findings?kind=K and the report name "
                    "the statements, their impact and the advice."))
    p.append(timeseries("N+1 bursts per minute", [
        target(f"60 * sum by (db, fingerprint) (rate(pgscope_nplusone_bursts_total{{{TD}}}[{RI}]))",
               "{{db}} {{fingerprint}}")],
        description="One SELECT looped by one client over the rows of a list query; /api/nplusone has the "
                    "query, its parent and the application."))
    p.append(timeseries("Statements inside N+1 bursts/s", [
        target(f"sum by (db, fingerprint) (rate(pgscope_nplusone_statements_total{{{TD}}}[{RI}]))",
               "{{db}} {{fingerprint}}")], unit="ops"))
    p.append(timeseries("Long lock holds per minute", [
        target(f"60 * sum by (db) (rate(pgscope_lock_holds_total{{{TD}}}[{RI}]))", "{{db}}")],
        description="Transactions that held locks past inspect.lock_hold_ms; /api/locks names the holder "
                    "and whom it blocked."))
    p.append(timeseries("Blocked and idle-in-transaction sessions", [
        target(f"sum(pgscope_blocked_clients{{{T}}})", "blocked on a lock"),
        target(f"sum(pgscope_idle_in_transaction_clients{{{T}}})", "idle in transaction")], w=6,
        description="Sessions waiting on another session's lock at the last pg_locks sample, and clients "
                    "idle inside a transaction past inspect.lock_hold_ms."))
    p.append(timeseries("Lock-taking transaction duration p50 / p95 / p99",
                        quantiles("pgscope_lock_hold_seconds", T), unit="s", w=6))
    p.append(index_recommendations())
    p.append(row("Inspection pipeline"))
    p.append(timeseries("Inspection queue length", [
        target(f"sum by (instance) (pgscope_inspect_queue_length{{{T}}})", "{{instance}}"),
        target(f"sum by (instance) (pgscope_inspect_queue_capacity{{{T}}})", "capacity {{instance}}")],
        description="Records waiting between the relay and the inspection pipeline, and the queue's capacity "
                    "(inspect.queue_size); beyond it, records are dropped."))
    p.append(timeseries("Dropped inspection records/s", [
        target(f"sum by (instance) (rate(pgscope_inspect_dropped_total{{{T}}}[{RI}]))", "{{instance}}")],
        description="Records dropped because the queue was full: traffic is unaffected, statistics undercount."))
    p.append(timeseries("Inspection throughput", [
        target(f"sum by (instance) (rate(pgscope_inspect_events_total{{{T}}}[{RI}]))", "events/s {{instance}}"),
        target(f"sum by (instance) (rate(pgscope_inspect_evictions_total{{{T}}}[{RI}]))", "evictions/s {{instance}}"),
        target(f"sum by (instance) (rate(pgscope_slow_log_suppressed_total{{{T}}}[{RI}]))",
               "slow logs suppressed/s {{instance}}")]))
    p.append(timeseries("Fingerprints kept", [
        target(f"sum by (instance) (pgscope_inspect_fingerprints{{{T}}})", "{{instance}}")],
        description="(fingerprint, db, user) entries kept, at most inspect.max_fingerprints (+10%)."))
    p.append(timeseries("EXPLAIN sampling", [
        target(f"sum(rate(pgscope_explain_samples_total{{{T}}}[{RI}]))", "sampled/s"),
        target(f"sum by (reason) (rate(pgscope_explain_skipped_total{{{T}}}[{RI}]))", "skipped/s: {{reason}}"),
        target(f"sum(rate(pgscope_explain_errors_total{{{T}}}[{RI}]))", "failed/s")], w=16))
    p.append(row("Process"))
    p.append(timeseries("CPU (cores)", [
        target(f"rate(process_cpu_seconds_total{{{T}}}[{RI}]) {PGSCOPE_TARGETS}", "{{instance}}")]))
    p.append(timeseries("Resident memory", [
        target(f"process_resident_memory_bytes{{{T}}} {PGSCOPE_TARGETS}", "{{instance}}")], unit="bytes"))
    p.append(timeseries("Open file descriptors (share of the limit)", [
        target(f"process_open_fds{{{T}}} / process_max_fds{{{T}}} {PGSCOPE_TARGETS}", "{{instance}}")],
        unit="percentunit",
        description="Every client and server connection is a file descriptor."))
    p.append(timeseries("Instances by pgscope version", [
        target(f"count by (version) (pgscope_build_info{{{T}}})", "{{version}}")], stack=True, w=24, h=6,
        description="pgscope_build_info: how many pgscope processes run each version (a rollout)."))
    return p


def dashboard() -> dict[str, Any]:
    return {
        "title": "pgscope",
        "uid": "pgscope",
        "description": "pgscope PostgreSQL proxy: statements, latency, pools, N+1 loops, locks, inspection "
                       "pipeline and process (metrics: docs/metrics.md).",
        "tags": ["pgscope", "postgresql"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
            "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": variables()},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
