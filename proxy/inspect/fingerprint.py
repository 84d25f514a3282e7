"""Statement identity: libpg_query fingerprints and normalized text of each statement record, cached by
text and by literal shape."""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from itertools import compress, repeat
from operator import is_
from typing import Any

from pglast import parser as pg_parser

from proxy.inspect.findings_facts import Risk, statement_risk
from proxy.inspect.scrub import scrub_sql
from proxy.inspect.slices import ZERO_DIGITS, lookup_texts
from proxy.protocol.statement import first_keyword

COMMANDS = ("SELECT", "INSERT", "UPDATE", "DELETE")
_SPACES = re.compile(r"\s+")
# Candidate literal constants: integers and decimals not glued to a word, '$'
# or '.', and plain single-quoted strings not glued to a word (so E'..', B'..',
# X'..', U&'..' are left alone).  A regex cannot know about quoted identifiers,
# comments or dollar quotes, so a shape built with it is verified (see
# ``_shape_is_safe``) before it is stored.  Keyed on the shape, statements with
# inline literals (ORMs without server-side parameters, pgbench -M simple) hit.
_LITERALS = re.compile(r"(?<![\w$.'])(?:\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\w.])|'(?:[^']|'')*')")
_MAIN_TOKENS = {"SELECT": "SELECT", "VALUES": "SELECT", "TABLE": "SELECT", "INSERT": "INSERT",
                "UPDATE": "UPDATE", "DELETE_P": "DELETE", "MERGE": "OTHER"}
_MARK = "\x00"  # what a literal becomes in a shape: never part of a query text
_CONST_TOKENS = frozenset(("ICONST", "FCONST", "SCONST"))
_COMMENT_TOKENS = frozenset(("SQL_COMMENT", "C_COMMENT"))


@dataclass(frozen=True, slots=True)
class StatementInfo:
    fingerprint: str
    normalized: str
    command: str  # SELECT, INSERT, UPDATE, DELETE or OTHER
    first_keyword: str  # upper-case first word (WITH, SELECT, BEGIN, ...)
    parse_ok: bool
    text: str  # this one statement's text (for a literal-shape hit: the first text of that shape seen)
    risk: Risk | None = None  # what the findings watch for in it (no WHERE, no LIMIT, OFFSET, blocking DDL)


def _command(keyword: str, sql: str) -> str:
    if keyword in COMMANDS:
        return keyword
    if keyword == "WITH":  # the main statement after the CTEs decides: the first one outside parentheses
        try:
            tokens = pg_parser.scan(sql)
        except Exception:
            return "OTHER"
        depth = 0
        for tok in tokens:
            name = tok.name
            if name == "ASCII_40":
                depth += 1
            elif name == "ASCII_41":
                depth -= 1
            elif depth == 0 and name in _MAIN_TOKENS:
                return _MAIN_TOKENS[name]
        return "OTHER"
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
        # shown in logs, the API and a label: constants found by PostgreSQL's lexer become $n,
        # and what it cannot read (an unterminated quote, as in a truncated pg_stat_activity.query) is cut
        normalized = scrub_sql(collapsed)
        ok = False
    return StatementInfo(fp, normalized.strip(), _command(kw, sql), kw, ok, sql, statement_risk(sql, kw) if ok else None)


def split(query: str) -> tuple[str, ...]:
    """The statements of a simple-protocol query ('' → ('',))."""
    try:
        parts = pg_parser.split(query)
    except Exception:
        return (query,)
    return tuple(parts) or (query,)


def _shape_is_safe(query: str, info: StatementInfo) -> bool:
    """Whether texts sharing ``query``'s literal shape share ``info`` (see the module doc).

    Runs on a cache miss only (a scan and one more fingerprint, some 10 µs).
    """
    spans = [(m.start(), m.end() - 1, m.group()[0] == "'") for m in _LITERALS.finditer(query)]
    if not spans:
        return False
    try:
        tokens = pg_parser.scan(query)
    except Exception:
        return False
    i, n = 0, len(tokens)
    pieces = []
    prev = 0
    for start, end, is_string in spans:
        while i < n and tokens[i].end < start:
            i += 1
        if i == n:
            return False
        tok = tokens[i]
        if not (tok.start == start and tok.end == end and tok.name in _CONST_TOKENS) and not (
                not is_string and tok.name in _COMMENT_TOKENS and tok.start <= start and end <= tok.end):
            return False
        # a variant with every value changed: 5 -> 51, 'ab' -> 'abx'
        pieces.append(query[prev:end] + ("x'" if is_string else query[end] + "1"))
        prev = end + 1
    pieces.append(query[prev:])
    variant = "".join(pieces)
    try:
        if ";" in variant:
            parts = pg_parser.split(variant)
            variant = parts[0] if parts else variant
        return pg_parser.fingerprint(variant) == info.fingerprint
    except Exception:
        return False


_DIGITS = frozenset("0123456789")


class Fingerprinter:
    """Statement identity: libpg_query fingerprints and normalized text, cached.

    ``fingerprint`` is ``pglast.parser.fingerprint(sql)`` (16 hex characters, the
    same id pg_query tools give) and ``normalized`` is ``pglast.parser.normalize``.
    A statement pglast cannot parse still gets a stable id, a hash of its
    whitespace-collapsed text, and ``parse_ok = False``.  Results are cached by
    (text, statement index), so a hot statement costs one dict lookup.

    Texts with inline literals are also cached by their *shape* (the text with
    number and plain string constants replaced by a NUL, which no query text can
    hold, so a shape never equals a real text).  A shape is stored only after it
    was checked on the text that produced it: every replaced span must be one
    constant token of PostgreSQL's lexer (``pglast.parser.scan``; a number inside
    a comment is allowed), and a variant with every constant changed must have
    the same fingerprint (so constants the fingerprint keeps, such as ``FETCH 5``
    or ``NOTIFY ch, 'x'``, never share a shape).  Texts that differ only in those
    constants lex the same way, so they share the fingerprint and normalized text.
    """

    def __init__(self, cache_size: int = 10000) -> None:
        self.cache_size = cache_size
        # exact text (index 0), (text, index), or a literal-free shape -> info; FIFO-bounded
        self._cache: dict[Any, StatementInfo] = {}
        self._splits: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self.shape_hits = 0
        self.misses = 0

    def lookup(self, query: str, index: int = 0) -> StatementInfo:
        if index:
            return self._lookup_multi(query, index)
        cache = self._cache
        info = cache.get(query)  # prepared statements and repeated texts
        if info is not None:
            return info
        quoted = "'" in query
        zeroed = None
        if not quoted:
            # Fast path for inline numbers: every digit turned into '0' (bytes.translate,
            # ~0.1 µs).  Such keys are stored only for classes whose digit runs are all
            # numeric literals: texts equal after zeroing have digits at the same places
            # among the same other characters, so the regex below matches them at the
            # same spans.  A text without digits never equals a stored key (those hold a '0').
            zeroed = query.encode("utf-8", "surrogateescape").translate(ZERO_DIGITS)
            info = cache.get(zeroed)
            if info is not None:
                self.shape_hits += 1
                return info
        return self._miss(query, quoted, zeroed)

    def lookup_many(self, queries: tuple[str, ...] | list[str], indexes: Any = None) -> list[StatementInfo]:
        """``lookup`` for each text (``indexes``: statement indexes, all 0 if None).

        Hits cost C-level work only: one dict pass by exact text and, for texts
        that missed, one pass by their digit-zeroed form; what is left goes
        through ``lookup`` one by one.
        """
        if indexes is not None and any(indexes):
            return list(map(self.lookup, queries, indexes))
        infos, by_shape, left = lookup_texts(self._cache, queries)  # exact text first, else its number class
        self.shape_hits += by_shape
        if left:
            lookup = self.lookup
            for i in compress(range(len(infos)), map(is_, infos, repeat(None))):
                infos[i] = lookup(queries[i])
        return infos

    def _miss(self, query: str, quoted: bool, zeroed: bytes | None) -> StatementInfo:
        cache = self._cache
        digits = not _DIGITS.isdisjoint(query)
        if not (quoted or digits):
            shape = None
        else:
            shape = _LITERALS.sub(_MARK, query)
            info = cache.get(shape)
            if info is not None:
                self.shape_hits += 1
                if zeroed is not None and digits and _DIGITS.isdisjoint(shape):
                    cache[zeroed] = info
                return info
        self.misses += 1
        text = query if ";" not in query else (self._split(query)[0])
        info = analyse(text)
        if shape is not None and not (info.parse_ok and _shape_is_safe(query, info)):
            shape = None
        self._store(query, shape, info)
        if shape is not None and zeroed is not None and digits and _DIGITS.isdisjoint(shape):
            cache[zeroed] = info
        return info

    def _lookup_multi(self, query: str, index: int) -> StatementInfo:
        key = (query, index)
        cache = self._cache
        info = cache.get(key)
        if info is not None:
            return info
        self.misses += 1
        parts = self._split(query)
        info = analyse(parts[index] if index < len(parts) else query)
        self._store(key, None, info)
        return info

    def _store(self, key: Any, shape: Any, info: StatementInfo) -> None:
        cache = self._cache
        if shape is None:
            cache[key] = info
        else:
            cache[shape] = info  # only the shape: one-off literal texts would flood the cache
        while len(cache) > self.cache_size:
            del cache[next(iter(cache))]

    def _split(self, query: str) -> tuple[str, ...]:
        parts = self._splits.get(query)
        if parts is None:
            parts = self._splits[query] = split(query)
            if len(self._splits) > self.cache_size:
                self._splits.popitem(last=False)
        return parts

    def __len__(self) -> int:
        return len(self._cache)
