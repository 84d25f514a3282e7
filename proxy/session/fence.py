"""Statements that PostgreSQL refuses while anyone else is connected to a database.

``DROP DATABASE x``, ``ALTER DATABASE x RENAME``, and ``CREATE DATABASE …
TEMPLATE x`` (template1 when none is named) fail with 55006 when another
session is connected to ``x``: the pool's own idle server connections would
be that session.  ``databases_to_fence(sql)`` names the databases a statement
needs alone, so the session can close the pool's idle connections to them
before forwarding it.  A cheap test of the first word keeps every other
statement at one regex match.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from typing import Any

from pglast import parser as pg_parser

# drop/alter/create first (or a comment first: then the slower check decides)
_MAYBE = re.compile(r"\s*(?:drop|alter|create|/\*|--)", re.IGNORECASE).match
_DATABASE = re.compile(r"\bdatabase\b", re.IGNORECASE).search

_cache: OrderedDict[str, tuple[str, ...]] = OrderedDict()
_CACHE_SIZE = 1000
_NONE: tuple[str, ...] = ()


def databases_to_fence(sql: str) -> tuple[str, ...]:
    """The databases ``sql`` needs no other session connected to (usually none)."""
    if _MAYBE(sql) is None or _DATABASE(sql) is None:
        return _NONE
    found = _cache.get(sql)
    if found is None:
        found = _cache[sql] = _from_tree(sql)
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return found


def _from_tree(sql: str) -> tuple[str, ...]:
    try:
        stmts = json.loads(pg_parser.parse_sql_json(sql)).get("stmts", [])
    except Exception:
        return _NONE  # PostgreSQL will reject it too
    out: list[str] = []
    for raw in stmts:
        stmt = raw.get("stmt", {})
        if "DropdbStmt" in stmt:
            out.append(stmt["DropdbStmt"]["dbname"])
        elif "RenameStmt" in stmt and stmt["RenameStmt"].get("renameType") == "OBJECT_DATABASE":
            out.append(stmt["RenameStmt"]["subname"])
        elif "CreatedbStmt" in stmt:
            template = "template1"
            for opt in stmt["CreatedbStmt"].get("options", []):
                d = opt.get("DefElem", {})
                if d.get("defname") == "template":
                    template = (d.get("arg") or {}).get("String", {}).get("sval") or template
            out.append(template)
    return tuple(dict.fromkeys(out))


class Fences:
    """The databases one client's statement under way needs alone, fenced in the pools until
    that statement has been answered (``lift``)."""

    __slots__ = ("pools", "dbs")

    def __init__(self, pools: Any) -> None:
        self.pools = pools
        self.dbs: list[str] = []

    def check(self, text: str) -> None:
        """Before ``text`` is forwarded: fence what it needs (closes the pools' idle connections)."""
        for db in databases_to_fence(text):
            if db not in self.dbs:
                self.pools.fence(db)
                self.dbs.append(db)

    def lift(self) -> None:
        dbs = self.dbs  # emptied in place: the compiled session core holds the same list
        for db in tuple(dbs):
            self.pools.unfence(db)
        dbs.clear()
