"""Findings: what pgscope alone sees from the wire, kept in one bounded book (``FindingsBook``) that
``/api/findings``, ``pgscope_findings_total`` and the report read; the record of one finding (``Finding``)."""

from __future__ import annotations

import time
from typing import Any, Iterable

from proxy.config_checks import FINDING_KINDS as KINDS  # every kind, in the order the docs list them
from proxy.inspect.consumer import ApiList, MetricRows, inspect_settings


class Finding:
    """One finding: a (kind, fingerprint or subject, db, user, application_name) seen ``count`` times."""

    __slots__ = ("kind", "fingerprint", "query", "db", "user", "application_name", "count", "first_seen",
                 "last_seen", "impact_ms", "detail", "advice")

    def __init__(self, kind: str, fingerprint: str | None, query: str | None, db: str, user: str | None,
                 application_name: str | None, now: float) -> None:
        self.kind = kind
        self.fingerprint = fingerprint
        self.query = query
        self.db = db
        self.user = user
        self.application_name = application_name
        self.count = 0
        self.first_seen = now
        self.last_seen = now
        self.impact_ms = 0.0
        self.detail: dict = {}
        self.advice = ""

    def as_dict(self) -> dict:
        return {"kind": self.kind, "fingerprint": self.fingerprint, "query": self.query, "db": self.db,
                "user": self.user, "application_name": self.application_name, "count": self.count,
                "first_seen": round(self.first_seen, 3), "last_seen": round(self.last_seen, 3),
                "impact_ms": round(self.impact_ms, 3), "detail": self.detail, "advice": self.advice}


class FindingsBook:
    """The findings, bounded: at most ``inspect.findings_keep``, the least recently seen dropped first.

    ``add`` counts one more occurrence of a finding (or opens it), keyed by (kind, fingerprint or
    ``subject``, db, user, application_name): its count, first and last seen (epoch seconds),
    summed impact (ms), its latest ``detail`` and ``advice``.  A kind in ``inspect.findings_disabled``
    is never added.  ``totals`` counts occurrences per (kind, db) for ``pgscope_findings_total``.
    """

    def __init__(self, settings: Any, logger: Any = None) -> None:
        self.log = logger
        self.items: dict[tuple, Finding] = {}
        self.totals: dict[tuple[str, str], int] = {}
        self.reconfigure(settings)

    def reconfigure(self, settings: Any) -> None:
        s = inspect_settings(settings)
        self.keep = s.findings_keep
        self.disabled = frozenset(s.findings_disabled)
        self._trim()

    def _trim(self) -> None:
        items = self.items
        while len(items) > self.keep:  # the least recently seen (a loop updates its finding in place)
            del items[min(items, key=lambda k: items[k].last_seen)]

    def enabled(self, kind: str) -> bool:
        return kind not in self.disabled

    def add(self, kind: str, *, fingerprint: str | None, query: str | None, db: str, user: str | None,
            application_name: str | None, impact_ms: float, detail: dict, advice: str, count: int = 1,
            subject: str | None = None, now: float | None = None) -> Finding | None:
        """Count ``count`` more occurrences (0: update the finding, count nothing); None if the kind is off."""
        if kind in self.disabled:
            return None
        wall = time.time() if now is None else now
        key = (kind, subject or fingerprint, db, user, application_name)
        f = self.items.get(key)
        if f is None:
            f = self.items[key] = Finding(kind, fingerprint, query, db, user, application_name, wall)
            if self.log is not None:
                self.log.warning("finding", kind=kind, fingerprint=fingerprint, query=query, db=db,
                                 application_name=application_name, advice=advice)
            self._trim()
        f.count += count
        f.last_seen = wall
        f.impact_ms += impact_ms
        f.detail = detail
        f.advice = advice
        if count:
            self.totals[(kind, db)] = self.totals.get((kind, db), 0) + count
        return f

    def detail_of(self, kind: str, fingerprint: str, client: Any) -> dict:
        """The detail a finding of ``client``'s already has ({} if none): to carry maxima over."""
        f = self.items.get((kind, fingerprint, client.db, client.user, client.application_name))
        return f.detail if f is not None else {}

    def rows(self, limit: int | None = 100, kind: str | None = None) -> list[dict]:
        """Newest first (by last seen), of one ``kind`` if given."""
        out = []
        for f in sorted(self.items.values(), key=lambda f: f.last_seen, reverse=True):
            if kind is None or f.kind == kind:
                out.append(f.as_dict())
                if limit is not None and len(out) >= limit:
                    break
        return out

    def api_lists(self) -> Iterable[ApiList]:
        return [ApiList("/api/findings", "findings", self.rows, params=("kind",), choices={"kind": KINDS})]

    def metric_rows(self) -> Iterable[MetricRows]:
        return [MetricRows("pgscope_findings", "Findings raised, by kind (see /api/findings).", "counter",
                           ("kind", "db"), [(k, n) for k, n in sorted(self.totals.items())])]


def client_fields(client: Any) -> dict:
    """db, user and application_name of a ClientInfo, as ``FindingsBook.add`` takes them."""
    return {"db": client.db, "user": client.user, "application_name": client.application_name}
