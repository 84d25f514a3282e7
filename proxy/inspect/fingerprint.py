"""Statement identity: libpg_query fingerprints and normalized text, cached.

``fingerprint`` is ``pglast.parser.fingerprint(sql)`` (16 hex characters, the
same id pg_query tools give) and ``normalized`` is ``pglast.parser.normalize``.
A statement pglast cannot parse still gets a stable id, a hash of its
whitespace-collapsed text, and ``parse_ok = False``.  Results are cached by
(text, statement index), so a hot statement costs one dict lookup.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass

from pglast import parser as pg_parser

COMMANDS = ("SELECT", "INSERT", "UPDATE", "DELETE")
_FIRST_WORD = re.compile(r"\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*\(*\s*([A-Za-z]+)", re.S)
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class StatementInfo:
    fingerprint: str
    normalized: str
    command: str  # SELECT, INSERT, UPDATE, DELETE or OTHER
    first_keyword: str  # upper-case first word (WITH, SELECT, BEGIN, ...)
    parse_ok: bool
    text: str  # this one statement's text


def first_keyword(sql: str) -> str:
    m = _FIRST_WORD.match(sql)
    return m.group(1).upper() if m else ""


def _command(keyword: str, sql: str) -> str:
    if keyword in COMMANDS:
        return keyword
    if keyword == "WITH":  # the main statement after the CTEs decides
        upper = sql.upper()
        last = max(((upper.rfind(c), c) for c in COMMANDS), default=(-1, "OTHER"))
        return last[1] if last[0] >= 0 else "OTHER"
    if keyword in ("VALUES", "TABLE"):
        return "SELECT"
    return "OTHER"


def analyse(sql: str) -> StatementInfo:
    """Fingerprint one statement (no cache)."""
    kw = first_keyword(sql)
    try:
        fp = pg_parser.fingerprint(sql)
        normalized = pg_parser.normalize(sql)
        ok = True
    except Exception:  # pglast.parser.ParseError, and anything else: never raise
        collapsed = _SPACES.sub(" ", sql.strip())
        fp = hashlib.blake2b(collapsed.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()
        normalized = collapsed
        ok = False
    return StatementInfo(fp, normalized.strip(), _command(kw, sql), kw, ok, sql)


def split(query: str) -> tuple[str, ...]:
    """The statements of a simple-protocol query ('' → ('',))."""
    try:
        parts = pg_parser.split(query)
    except Exception:
        return (query,)
    return tuple(parts) or (query,)


class Fingerprinter:
    def __init__(self, cache_size: int = 10000) -> None:
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, int], StatementInfo] = OrderedDict()
        self._splits: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def lookup(self, query: str, index: int = 0) -> StatementInfo:
        key = (query, index)
        cache = self._cache
        info = cache.get(key)
        if info is not None:
            self.hits += 1
            return info
        self.misses += 1
        if index == 0 and ";" not in query:
            text = query
        else:
            parts = self._split(query)
            text = parts[index] if index < len(parts) else query
        info = analyse(text)
        cache[key] = info
        if len(cache) > self.cache_size:
            cache.popitem(last=False)
        return info

    def _split(self, query: str) -> tuple[str, ...]:
        parts = self._splits.get(query)
        if parts is None:
            parts = self._splits[query] = split(query)
            if len(self._splits) > self.cache_size:
                self._splits.popitem(last=False)
        return parts

    def __len__(self) -> int:
        return len(self._cache)
