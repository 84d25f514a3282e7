"""Index hygiene findings: unused_index and duplicate_index, from pg_stat_user_indexes and pg_index sampled
rarely on a side connection per database the clients use."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from proxy.inspect.consumer import Consumer, inspect_settings
from proxy.inspect.findings import FindingsBook

SCAN_S = 5.0  # how often the statistics' databases are looked through for new ones
FIRST_SAMPLE_S = 30.0 - SCAN_S  # so a database's first sample comes at most 30 s after its first statement

# not used since the statistics were reset, not backing a constraint (primary key, unique, exclusion)
UNUSED_SQL = """
SELECT s.schemaname, s.indexrelname, s.relname, pg_relation_size(s.indexrelid)::bigint,
       (SELECT extract(epoch FROM stats_reset)::float8 FROM pg_stat_database WHERE datname = current_database())
FROM pg_stat_user_indexes s JOIN pg_index i ON i.indexrelid = s.indexrelid
WHERE s.idx_scan = 0 AND NOT i.indisunique AND NOT i.indisprimary AND NOT i.indisexclusion AND i.indisvalid
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = s.indexrelid)
  AND pg_relation_size(s.indexrelid) >= {min_bytes}
ORDER BY 4 DESC LIMIT 100
"""

# a's key columns (and their operator classes) are a prefix of b's, same access method, neither partial
# nor on expressions; a is not unique and backs no constraint (an exact twin: the newer one goes)
DUPLICATE_SQL = """
SELECT na.nspname, ca.relname, cb.relname, ct.relname, pg_relation_size(a.indexrelid)::bigint,
       pg_get_indexdef(a.indexrelid), pg_get_indexdef(b.indexrelid)
FROM pg_index a JOIN pg_index b ON b.indrelid = a.indrelid AND b.indexrelid <> a.indexrelid
JOIN pg_class ca ON ca.oid = a.indexrelid JOIN pg_class cb ON cb.oid = b.indexrelid
JOIN pg_class ct ON ct.oid = a.indrelid JOIN pg_namespace na ON na.oid = ca.relnamespace
WHERE ca.relam = cb.relam AND a.indpred IS NULL AND b.indpred IS NULL AND a.indexprs IS NULL AND b.indexprs IS NULL
  AND a.indisvalid AND b.indisvalid AND NOT a.indisunique AND NOT a.indisprimary
  AND na.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = a.indexrelid)
  AND (b.indkey::text || ' ') LIKE (a.indkey::text || ' %')
  AND (b.indclass::text || ' ') LIKE (a.indclass::text || ' %')
  AND (a.indnatts < b.indnatts OR b.indisunique OR a.indexrelid > b.indexrelid)
ORDER BY 5 DESC LIMIT 100
"""


def _size(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _ident(name: str) -> str:
    return name if name.isidentifier() and name == name.lower() else '"' + name.replace('"', '""') + '"'


class IndexHygiene(Consumer):
    """unused_index and duplicate_index, sampled per database on a side connection.

    The databases are those of the statistics table (the (fingerprint, db, user) entries, looked
    through every 5 s): each is first sampled ``min(25 s, inspect.index_sample_interval_s)`` after it
    shows up there (at most 30 s after its first statement), then every
    ``inspect.index_sample_interval_s``, as the first user seen on it.  Unused: ``idx_scan = 0`` in
    ``pg_stat_user_indexes`` since the statistics were reset (the reset time is in the detail; null:
    never reset), at least ``inspect.unused_index_min_bytes``.  Duplicate: an index whose key columns
    are a prefix of another's on the same table.  Never an index backing a constraint.
    """

    wants = "slow"  # it reads no statement (only tick matters): shown as few as the pipeline allows

    def __init__(self, settings: Any, book: FindingsBook, side: Any, stats: Any, logger: Any = None) -> None:
        self.book = book
        self.side = side  # SideConnections (the EXPLAIN sampler's)
        self.stats = stats
        self.log = logger
        self.due: dict[str, float] = {}  # db -> when its next sample is due (monotonic)
        self.users: dict[str, str] = {}
        self.samples = 0
        self.errors = 0
        self._next_scan = 0.0
        self._task: asyncio.Task | None = None
        self._closed = False
        self.reconfigure(settings)

    def reconfigure(self, settings: Any) -> None:
        self.s = inspect_settings(settings)

    def feed(self, ev: Any, info: Any, now: float) -> None:
        """Nothing from the stream: the databases come from the statistics table at ``tick``."""

    def tick(self, now: float) -> None:
        if self._closed or not (self.book.enabled("unused_index") or self.book.enabled("duplicate_index")):
            return
        if now >= self._next_scan or not self.due:  # new databases (a walk of the statistics' keys, every few
            # seconds; every tick until the first one shows up, while the table is nearly empty)
            self._next_scan = now + SCAN_S
            for (_, db, user) in list(self.stats.entries):
                if db not in self.due:
                    self.due[db] = now + min(FIRST_SAMPLE_S, self.s.index_sample_interval_s)
                    self.users[db] = user
        if (self._task is None or self._task.done()) and any(t <= now for t in self.due.values()):
            dbs = [db for db, t in self.due.items() if t <= now]
            for db in dbs:
                self.due[db] = now + self.s.index_sample_interval_s
            self._task = asyncio.get_running_loop().create_task(self._sample_all(dbs))

    async def _sample_all(self, dbs: list[str]) -> None:
        for db in dbs:
            try:
                await self.sample(db, self.users[db])
            except Exception as e:  # PgError, a lost connection: counted, logged, next time again
                self.errors += 1
                if self.log is not None:
                    self.log.warning("index_sample_failed", db=db, error=getattr(e, "message", None) or repr(e))

    async def sample(self, db: str, user: str) -> None:
        """One sample of ``db``: its unused and duplicate indexes become findings."""
        async with self.side.lock(db, user):
            srv = await self.side.get(db, user)
            async with asyncio.timeout(10.0):
                unused, err = await srv.fetch(UNUSED_SQL.format(min_bytes=int(self.s.unused_index_min_bytes)))
                if err is not None:
                    raise err
                dups, err = await srv.fetch(DUPLICATE_SQL)
                if err is not None:
                    raise err
        self.samples += 1
        now = time.time()
        if self.book.enabled("unused_index"):
            for schema, index, table, size, reset in unused:
                name = f"{_ident(schema)}.{_ident(index)}"  # type: ignore[arg-type]
                nbytes = int(size or 0)
                self._add("unused_index", db, user, name, {
                    "index": index, "schema": schema, "table": table, "size_bytes": nbytes, "idx_scan": 0,
                    "stats_reset": float(reset) if reset else None},
                    f"No scan used {name} since the statistics were "
                    f"{'reset' if reset else 'collected (never reset)'}: DROP INDEX CONCURRENTLY {name}; frees "
                    f"{_size(nbytes)} (check standbys and rare jobs first).", now)
        if self.book.enabled("duplicate_index"):
            for schema, index, other, table, size, indexdef, otherdef in dups:
                name = f"{_ident(schema)}.{_ident(index)}"  # type: ignore[arg-type]
                nbytes = int(size or 0)
                self._add("duplicate_index", db, user, name, {
                    "index": index, "schema": schema, "table": table, "size_bytes": nbytes, "covered_by": other,
                    "definition": indexdef, "covered_by_definition": otherdef},
                    f"{name} leads with the same columns as {other}, which serves its scans too: "
                    f"DROP INDEX CONCURRENTLY {name}; frees {_size(nbytes)}.", now)

    def _add(self, kind: str, db: str, user: str, name: str, detail: dict, advice: str, now: float) -> None:
        new = (kind, name, db, user, None) not in self.book.items
        self.book.add(kind, fingerprint=None, query=None, db=db, user=user, application_name=None, impact_ms=0.0,
                      detail=detail, advice=advice, count=1 if new else 0, subject=name, now=now)

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
