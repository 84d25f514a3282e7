"""Puts the findings together: one FindingsBook and the consumers and hooks that fill it, attached to an
Inspector whose EXPLAIN sampler, N+1 detector and lock tracker are already there."""

from __future__ import annotations

from typing import Any

from proxy.inspect.findings import FindingsBook
from proxy.inspect.findings_plans import PlanFindings
from proxy.inspect.findings_stream import LockWaits, StatementFindings
from proxy.inspect.indexes import IndexHygiene


def add_findings(insp: Any, settings: Any, explain: Any, nplusone: Any, locks: Any, logger: Any = None) -> FindingsBook:
    """Attach every finding kind to ``insp``; returns the book (``/api/findings`` is the stream consumer's)."""
    book = FindingsBook(settings, logger)
    nplusone.findings = book  # loop
    nplusone.reconfigure(settings)
    stream = StatementFindings(settings, book, locks.sampler)  # no_where, unbounded_select, deep_offset, blocking_ddl
    stream.plans = PlanFindings(settings, book, insp.stats)  # leading_wildcard, plan_change
    insp.add_consumer(stream)
    waits = LockWaits(book, locks.sampler, insp.stats)  # lock_wait
    insp.add_consumer(waits)
    explain.lock_waits = waits
    explain.plan_findings = stream.plans
    insp.add_consumer(IndexHygiene(settings, book, explain.side, insp.stats, logger))  # unused/duplicate_index
    return book
