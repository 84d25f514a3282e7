"""What only pgscope knows, as result sets: SHOW QUERIES (the /api/statements rows), EXPLAINS,
NPLUSONE, LOCKS, RECOMMENDATIONS (the rows of the consumers' JSON lists, ``api_lists``).

The columns are the JSON fields (docs/metrics.md), in the same order; lists and
objects (a plan, errors_by_class, blocked_clients...) are JSON text.
"""

from __future__ import annotations

from typing import Any

from proxy.admin.wire import columns
from proxy.inspect.consumer import api_lists
from proxy.protocol.errors import PgError

QUERIES = columns("fingerprint query db user calls:int8 total_ms:float8 mean_ms:float8 min_ms:float8 "
                  "max_ms:float8 stddev_ms:float8 rows:int8 errors:int8 errors_by_class slow:int8 "
                  "first_seen:float8 last_seen:float8")
# SHOW name -> (the consumer list's key, its columns)
LISTS: dict[str, tuple[str, list]] = {
    "EXPLAINS": ("explains", columns("fingerprint query plan duration_ms:float8 sampled_at:float8 db user method")),
    "NPLUSONE": ("bursts", columns("fingerprint query count:int8 span_ms:float8 total_ms:float8 parent_fingerprint "
                                   "parent_query application_name client_addr started_at:float8 db")),
    "LOCKS": ("locks", columns("fingerprint query held_ms:float8 blocked:int8 blocked_fingerprints blocked_clients "
                               "relations application_name client_addr state started_at:float8 db user "
                               "server_pid:int4")),
    "RECOMMENDATIONS": ("recommendations", columns("db table columns create_statement benefit:float8 method "
                                                   "fingerprints calls:int8 total_ms:float8 cost_before:float8 "
                                                   "cost_after:float8")),
}
DEFAULT_LIMIT = 100
MAX_LIMIT = 10000


def _limit(args: tuple[str, ...], default: int) -> int:
    """An optional row limit (the last argument), 1..10000 as the JSON API takes it."""
    if not args:
        return default
    try:
        n = int(args[-1])
    except ValueError:
        raise PgError("22023", f"the limit must be an integer, got {args[-1]!r}", severity="ERROR") from None
    if not 1 <= n <= MAX_LIMIT:
        raise PgError("22023", f"the limit must be between 1 and {MAX_LIMIT}", severity="ERROR")
    return n


def show_queries(ctx: Any, args: tuple[str, ...]) -> tuple[list, list]:
    """SHOW QUERIES [total_time|calls|mean_time] [limit]: the top fingerprints."""
    order = "total_time"
    if args and not args[0].isdigit():
        order, args = args[0].lower(), args[1:]
    limit = _limit(args, 50)
    try:
        rows = ctx.inspector.statements(order, limit) if ctx.inspector is not None else []
    except ValueError as e:
        raise PgError("22023", str(e), severity="ERROR") from None
    return QUERIES, [[r.get(name) for name, _ in QUERIES] for r in rows]


def show_list(ctx: Any, what: str, args: tuple[str, ...]) -> tuple[list, list]:
    key, cols = LISTS[what]
    api = api_lists(ctx.inspector).get(key)
    if api is None:  # inspection off, or that part not running
        return cols, []
    rows = api.rows(_limit(args, DEFAULT_LIMIT) if api.takes_limit else None)
    return cols, [[r.get(name) for name, _ in cols] for r in rows]
