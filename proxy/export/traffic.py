"""Per-database traffic as Prometheus counters: what the clients' relays count for PgBouncer's
``SHOW STATS`` (proxy.protocol.ledger.TRAFFIC), summed per database by the session context."""

from __future__ import annotations

from typing import Iterable

from prometheus_client.core import CounterMetricFamily

# (key in SessionContext's Counters.traffic, family, help): PgBouncer's SHOW STATS totals, per database
TRAFFIC_METRICS = (
    ("xact_count", "pgscope_transactions", "Transactions run through pgscope (PgBouncer's xact_count): from a "
     "client's first message to the ReadyForQuery with status idle that ends it; a statement outside a "
     "transaction block is one."),
    ("xact_time", "pgscope_transaction_seconds", "Seconds those transactions took (PgBouncer's xact_time), from "
     "when their first message reached a server."),
    ("query_count", "pgscope_queries", "Queries in PgBouncer's sense (query_count): a client's messages up to "
     "the ReadyForQuery that answers them (a simple Query, or an extended-protocol batch to its Sync)."),
    ("query_time", "pgscope_query_seconds", "Seconds those queries took (PgBouncer's query_time)."),
    ("bytes_received", "pgscope_client_bytes_received", "Bytes received from clients after login."),
    ("bytes_sent", "pgscope_client_bytes_sent", "Bytes sent to clients after login."),
    ("client_parse_count", "pgscope_client_parses", "Parse messages from clients."),
    ("server_parse_count", "pgscope_server_parses", "Parse messages sent to servers (in transaction mode, a "
     "named statement is prepared on each server that needs it, once)."),
    ("bind_count", "pgscope_binds", "Bind messages from clients."),
    ("client_connect_count", "pgscope_client_logins", "Client logins that succeeded."),
)


def traffic_families(by_db: dict[str, dict[str, float]]) -> Iterable[CounterMetricFamily]:
    """One counter family per TRAFFIC_METRICS row, a series per database."""
    for key, name, help_text in TRAFFIC_METRICS:
        c = CounterMetricFamily(name, help_text, labels=["db"])
        for db, t in sorted(by_db.items()):
            c.add_metric([db], t[key])
        yield c
