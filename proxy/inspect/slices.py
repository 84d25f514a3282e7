"""The per-record passes of the inspector's columnar path (``Inspector._statements``).

A slice of statement records is turned into columns, its texts are looked up
in the fingerprint cache, and its records are grouped by (statement class,
client); the N+1 detector sums up a client's run.  ``columns``, ``lookup_texts``, ``group`` and
``run_summary`` are the compiled twins
from ``_slices.pyx`` (one C loop each, no per-record Python objects but the
results) when built, else the functions below, the reference: both give the
same results (tests/test_inspect_slices.py).
"""

from __future__ import annotations

from itertools import repeat
from operator import itemgetter, sub
from typing import Any, Sequence

from proxy.protocol.native import twins
from proxy.protocol.records import StatementEvent

# the fields of a statement record, as getters (the inspection passes' columns)
FIELD_START = itemgetter(StatementEvent._fields.index("start"))
FIELD_END = itemgetter(StatementEvent._fields.index("end"))
FIELD_SQLSTATE = itemgetter(StatementEvent._fields.index("sqlstate"))
FIELD_ROWS = itemgetter(StatementEvent._fields.index("rows"))

# every ASCII digit to '0': texts that differ only in their numbers share a key
ZERO_DIGITS = bytes.maketrans(b"123456789", b"000000000")


def py_columns(evs: Sequence[Any]) -> tuple[Sequence, ...]:
    """The statement records' columns the inspector reads: (clients, queries, stmt indexes, starts,
    ends, rows, sqlstates, in_transaction, durations); sequences (lists in the compiled twin)."""
    (clients, queries, indexes, _ext, _name, _bind, _pid, starts, ends, _wait, _tag, rows, sqlstates,
     in_tx) = zip(*evs)
    return clients, queries, indexes, starts, ends, rows, sqlstates, in_tx, list(map(sub, ends, starts))


def py_lookup_texts(cache: dict, queries: Sequence[str]) -> tuple[list, int, int]:
    """Each text's cached entry: by exact text, else by its digit-zeroed UTF-8 form (None when
    neither is cached); how many were found by the zeroed form, and how many not at all.
    (None is counted with filter: ``in`` and ``count`` would call StatementInfo.__eq__ per item.)"""
    get = cache.get
    infos = list(map(get, queries))
    n = len(infos)
    missing = n - len(list(filter(None, infos)))
    if not missing:
        return infos, 0, 0
    zeroed = map(bytes.translate, map(str.encode, queries), repeat(ZERO_DIGITS))
    infos = list(map(get, queries, map(get, zeroed)))  # exact text first, else its number class
    left = n - len(list(filter(None, infos)))
    return infos, missing - left, left


def py_run_summary(evs: Sequence[Any], idx: Sequence[int], last_end: float) -> tuple[float, bool, float, int, float]:
    """Statement records ``evs[i]`` (``i`` in ``idx``, at least one) that may continue a run whose
    last statement ended at ``last_end``: the longest gap before one of them, whether none failed,
    the time spent in them, the most rows one returned, and when the last one ended."""
    picked = list(map(evs.__getitem__, idx))
    starts = list(map(FIELD_START, picked))
    ends = list(map(FIELD_END, picked))
    prev_ends = [last_end]
    prev_ends.extend(ends[:-1])
    return (max(map(sub, starts, prev_ends)), list(map(FIELD_SQLSTATE, picked)).count(None) == len(picked),
            sum(map(sub, ends, starts)), max(map(FIELD_ROWS, picked)), ends[-1])


def py_group(infos: Sequence[Any], clients: Sequence[Any]) -> dict[tuple[int, int], list[int]]:
    """Record indexes by (id(info), id(client)), groups and indexes in record order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(zip(map(id, infos), map(id, clients))):
        try:
            groups[key].append(i)
        except KeyError:  # the slice's first record of this (statement, client)
            groups[key] = [i]
    return groups


columns, lookup_texts, group, run_summary = twins(
    "proxy.inspect._slices", "inspection slice passes", columns=py_columns, lookup_texts=py_lookup_texts,
    group=py_group, run_summary=py_run_summary)
