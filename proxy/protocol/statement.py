"""Statement facts: what one SQL text's parse tree says (locks, read-only SELECT, DDL, session state,
filter and ORDER BY columns), from a single pglast parse, cached by text; pure, no I/O."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Iterator, Mapping

from pglast import parser as pg_parser

FACTS_CACHE_SIZE = 4096  # distinct texts whose facts are kept (least recently used dropped first)

_FIRST_WORD = re.compile(r"\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*\(*\s*([A-Za-z]+)", re.S)
_DDL = frozenset((
    "CreateStmt", "AlterTableStmt", "DropStmt", "IndexStmt", "TruncateStmt", "RenameStmt", "CreateTableAsStmt",
    "AlterObjectSchemaStmt", "ViewStmt", "CreateSeqStmt", "AlterSeqStmt", "CreateTrigStmt", "RuleStmt",
    "ReindexStmt", "ClusterStmt", "VacuumStmt", "GrantStmt", "CommentStmt", "CompositeTypeStmt",
))
_WRITES = frozenset(("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "LockStmt"))
_RANGE_OPS = frozenset(("<", ">", "<=", ">="))

# session state (see session_state): statements that only clear it, never a reason to pin a
# client, but the pool must forget what it believed about the server (settings, statements)
CLEARING = frozenset(("RESET", "UNLISTEN", "DEALLOCATE", "DISCARD"))
_CURSOR_OPT_HOLD = 0x0020
_SESSION_ADVISORY = frozenset(("pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock",
                               "pg_try_advisory_lock_shared"))
_SIMPLE_STATE = {"ListenStmt": "LISTEN", "UnlistenStmt": "UNLISTEN", "LoadStmt": "LOAD", "PrepareStmt": "PREPARE",
                 "DeallocateStmt": "DEALLOCATE", "DiscardStmt": "DISCARD"}


@dataclass(frozen=True, slots=True)
class ColumnUse:
    """How a statement uses one table's columns: equality filters, range filters, ORDER BY."""

    eq: tuple[str, ...] = ()
    range: tuple[str, ...] = ()
    order: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StatementFacts:
    """What the parse tree of one SQL text (one or several statements) says.

    The inspection consumers ask which statements take locks, which are read-only SELECTs and
    which columns an index could serve; the session's rules can ask which leave session state.
    """

    first_keyword: str  # upper-case first word (WITH, SELECT, BEGIN, ...), from the text
    parsed: bool  # pglast parsed it (when not, every fact below is the empty one)
    kinds: tuple[str, ...]  # parse-tree node of each statement: ("SelectStmt",), ("VariableSetStmt", ...)
    read_only_select: bool  # one plain SELECT: no CTE, no FOR UPDATE/SHARE, no SELECT INTO
    takes_locks: bool  # writes, LOCK, SELECT … FOR UPDATE/SHARE or INTO, a writing CTE, DDL
    ddl: bool  # creates, alters or drops something (CREATE, ALTER, DROP, TRUNCATE, GRANT, VACUUM, ...)
    session_state: str | None  # the session state it leaves (or clears, see CLEARING); None if none
    columns: Mapping[str, ColumnUse]  # table -> its filter and ORDER BY columns (one SELECT/UPDATE/DELETE)


def first_keyword(sql: str) -> str:
    """The upper-case first word of ``sql``, past comments and opening parentheses ('' if none)."""
    m = _FIRST_WORD.match(sql)
    return m.group(1).upper() if m else ""


_UNPARSED_COLUMNS: Mapping[str, ColumnUse] = MappingProxyType({})


@lru_cache(maxsize=FACTS_CACHE_SIZE)
def statement_facts(sql: str) -> StatementFacts:
    """The facts of ``sql`` (never raises: a text pglast cannot parse has ``parsed = False``)."""
    keyword = first_keyword(sql)
    try:
        stmts = [raw.get("stmt", {}) for raw in json.loads(pg_parser.parse_sql_json(sql)).get("stmts", [])]
    except Exception:  # pglast.parser.ParseError, and anything else: never raise
        return StatementFacts(keyword, False, (), False, False, False, None, _UNPARSED_COLUMNS)
    kinds = tuple(kind for stmt in stmts for kind in stmt)
    select = stmts[0].get("SelectStmt") if len(stmts) == 1 else None
    read_only = select is not None and not (
        select.get("lockingClause") or select.get("intoClause") or select.get("withClause"))
    return StatementFacts(
        keyword, True, kinds, read_only, _takes_locks(stmts), any(k in _DDL for k in kinds),
        _session_state(stmts), MappingProxyType(_columns(stmts[0]) if len(stmts) == 1 else {}))


# ------------------------------------------------------------------ locks

def _takes_locks(stmts: list[dict]) -> bool:
    for stmt in stmts:
        for kind, body in stmt.items():
            if kind in _WRITES or kind in _DDL:
                return True
            if kind == "SelectStmt" and (body.get("lockingClause") or body.get("intoClause")):
                return True
            if kind == "SelectStmt" and body.get("withClause"):
                ctes = body["withClause"].get("ctes", [])
                if any(any(k in _WRITES for k in c.get("CommonTableExpr", {}).get("ctequery", {}))
                       for c in ctes):
                    return True
            if kind == "ExplainStmt":  # plain EXPLAIN plans, runs nothing (and ends the look)
                return False
    return False


# ------------------------------------------------------------------ session state

def _session_state(stmts: list[dict]) -> str | None:
    """The first kind of session state a statement creates; else the strongest it clears
    (DISCARD, then RESET, else the first); None if none."""
    clearing: str | None = None
    for stmt in stmts:
        k = _state_kind(stmt)
        if k is None:
            continue
        if k not in CLEARING:
            return k
        if clearing is None or k == "DISCARD" or (k == "RESET" and clearing != "DISCARD"):
            clearing = k
    return clearing


def _state_kind(stmt: dict) -> str | None:
    for kind, body in stmt.items():
        if kind == "VariableSetStmt":
            if body.get("is_local"):
                return None
            if (body.get("name") or "").lower() in ("transaction", "transaction_isolation"):
                return None
            return "RESET" if body.get("kind") in ("VAR_RESET", "VAR_RESET_ALL") else "SET"
        simple = _SIMPLE_STATE.get(kind)
        if simple is not None:
            return simple
        if kind == "SelectStmt" and ((body.get("intoClause") or {}).get("rel") or {}).get("relpersistence") == "t":
            return "CREATE TEMP"
        if kind == "DeclareCursorStmt" and int(body.get("options", 0)) & _CURSOR_OPT_HOLD:
            return "DECLARE WITH HOLD"
        if kind in ("CreateStmt", "CreateSeqStmt", "ViewStmt", "CreateTableAsStmt"):
            rel = body.get("relation") or body.get("view") or body.get("sequence") or \
                (body.get("into") or {}).get("rel") or {}
            if rel.get("relpersistence") == "t":
                return "CREATE TEMP"
    for n in _walk(stmt):
        fc = n.get("FuncCall")
        if fc:
            names = [x.get("String", {}).get("sval", "") for x in fc.get("funcname", [])]
            if names and names[-1].lower() in _SESSION_ADVISORY:
                return "ADVISORY LOCK"
    return None


def _walk(node: Any) -> Iterator[dict]:
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            yield n
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)


# ------------------------------------------------------------------ filter and ORDER BY columns

def _colname(node: dict) -> tuple[str | None, str] | None:
    cr = node.get("ColumnRef")
    if cr is None:
        tc = node.get("TypeCast")
        return _colname(tc["arg"]) if tc and "arg" in tc else None
    fields = [f.get("String", {}).get("sval") for f in cr.get("fields", [])]
    if not fields or any(f is None for f in fields):
        return None
    if len(fields) == 1:
        return None, fields[0]
    return fields[-2], fields[-1]


def _is_value(node: dict) -> bool:
    if "A_Const" in node or "ParamRef" in node:
        return True
    tc = node.get("TypeCast")
    return bool(tc) and _is_value(tc.get("arg", {}))


def _columns(stmt: dict) -> dict[str, ColumnUse]:
    """table -> columns of one SELECT, UPDATE or DELETE: compared with a value in WHERE or JOIN … ON
    (``=`` and IN: eq; ``<``, ``>``, BETWEEN: range; under AND only), then ORDER BY."""
    body = stmt.get("SelectStmt") or stmt.get("UpdateStmt") or stmt.get("DeleteStmt")
    if body is None:
        return {}
    aliases: dict[str, str] = {}  # alias or name -> table name

    def add_range(rv: dict) -> None:
        name = rv.get("relname")
        if name:
            if rv.get("schemaname"):
                name = f"{rv['schemaname']}.{name}"
            aliases[(rv.get("alias") or {}).get("aliasname") or rv["relname"]] = name

    join_quals: list[Any] = []

    def walk_from(n: Any) -> None:
        if isinstance(n, dict):
            if "RangeVar" in n:
                add_range(n["RangeVar"])
                return
            je = n.get("JoinExpr")
            if je:
                walk_from(je.get("larg"))
                walk_from(je.get("rarg"))
                if je.get("quals"):
                    join_quals.append(je["quals"])

    for item in body.get("fromClause", []) or []:
        walk_from(item)
    if "relation" in body:  # UPDATE / DELETE
        add_range(body["relation"])
    tables = set(aliases.values())
    found: dict[str, dict[str, list[str]]] = {}

    def note(use: str, col: tuple[str | None, str] | None) -> None:
        if col is None:
            return
        qual, name = col
        table = aliases.get(qual) if qual else (next(iter(tables)) if len(tables) == 1 else None)
        if table is None:
            return
        lists = found.setdefault(table, {"eq": [], "range": [], "order": []})
        if name not in lists[use]:
            lists[use].append(name)

    def walk_where(n: Any) -> None:
        if not isinstance(n, dict):
            return
        be = n.get("BoolExpr")
        if be is not None:
            if be.get("boolop") == "AND_EXPR":
                for a in be.get("args", []):
                    walk_where(a)
            return
        ae = n.get("A_Expr")
        if ae is None:
            return
        kind = ae.get("kind")
        op = (ae.get("name") or [{}])[0].get("String", {}).get("sval")
        lhs, rhs = ae.get("lexpr", {}), ae.get("rexpr", {})
        if kind == "AEXPR_OP" and (op == "=" or op in _RANGE_OPS):
            use = "eq" if op == "=" else "range"
            if _is_value(rhs):
                note(use, _colname(lhs))
            elif _is_value(lhs):
                note(use, _colname(rhs))
        elif kind == "AEXPR_IN" and op == "=":
            note("eq", _colname(lhs))
        elif kind in ("AEXPR_BETWEEN", "AEXPR_BETWEEN_SYM"):
            note("range", _colname(lhs))

    walk_where(body.get("whereClause"))
    for quals in join_quals:  # JOIN … ON t.col = $1: a filter of t's scan too
        walk_where(quals)
    for sb in body.get("sortClause", []) or []:
        note("order", _colname(sb.get("SortBy", {}).get("node", {})))
    return {t: ColumnUse(tuple(u["eq"]), tuple(u["range"]), tuple(u["order"])) for t, u in found.items()}
