"""What the findings need from a statement's parse tree (``Risk``: UPDATE/DELETE without WHERE, SELECT without
LIMIT, OFFSET, blocking DDL; ``like_patterns``: LIKE/ILIKE operands): one pglast parse per distinct text."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pglast import parser as pg_parser

# first keywords whose statements can carry a risk (anything else: no parse at all)
RISKY_KEYWORDS = frozenset(("SELECT", "WITH", "UPDATE", "DELETE", "CREATE", "ALTER", "VACUUM", "CLUSTER", "LOCK",
                            "TABLE", "VALUES", "REINDEX"))
# functions whose value differs per row: a column added with one as its DEFAULT rewrites the table
VOLATILE_DEFAULTS = frozenset(("random", "gen_random_uuid", "uuid_generate_v1", "uuid_generate_v4", "clock_timestamp",
                               "timeofday", "nextval", "txid_current", "statement_timestamp", "random_normal"))
LOCK_MODES = {5: "SHARE", 6: "SHARE ROW EXCLUSIVE", 7: "EXCLUSIVE", 8: "ACCESS EXCLUSIVE"}
_OFFSET_LITERAL = re.compile(r"\bOFFSET\s+(\d+)", re.I)


@dataclass(frozen=True, slots=True)
class Risk:
    """The risky traits of one statement text (shared by the texts of its literal shape).

    ``offset``: the OFFSET's source: 0 none, -1 a literal (read from each execution's own text), n > 0
    the Bind parameter $n.  ``ddl``: what a blocking DDL does ("CREATE INDEX", "SET NOT NULL", ...),
    with the ``lock`` it takes and its ``table``; ``order``: ORDER BY columns (for keyset advice).
    """

    no_where: bool = False
    unbounded: bool = False
    offset: int = 0
    ddl: str = ""
    lock: str = ""
    table: str = ""
    order: tuple[str, ...] = ()


UNBOUNDED = Risk(unbounded=True)  # most SELECTs: one shared instance


def _relname(rv: dict | None) -> str:
    if not rv:
        return ""
    name = rv.get("relname") or ""
    return f"{rv['schemaname']}.{name}" if rv.get("schemaname") and name else name


def _names(nodes: list | None) -> list[str]:
    return [n.get("String", {}).get("sval", "") for n in nodes or () if isinstance(n, dict)]


def statement_risk(sql: str, keyword: str) -> Risk | None:
    """The risky traits of ``sql`` (one statement), None when it has none or cannot be parsed."""
    if keyword not in RISKY_KEYWORDS:
        return None
    try:
        stmts = json.loads(pg_parser.parse_sql_json(sql)).get("stmts", [])
    except Exception:
        return None
    if len(stmts) != 1:
        return None
    return _risk(stmts[0].get("stmt", {}))


def _risk(stmt: dict) -> Risk | None:
    kind, body = next(iter(stmt.items()), ("", {}))
    if kind in ("UpdateStmt", "DeleteStmt"):
        return Risk(no_where=True, table=_relname(body.get("relation"))) if not body.get("whereClause") else None
    if kind == "SelectStmt":
        if body.get("intoClause") or body.get("lockingClause"):
            return None
        offset = body.get("limitOffset")
        if offset is not None:
            src = -1 if "A_Const" in offset else int(offset.get("ParamRef", {}).get("number", 0))
            order = tuple(c[-1] for c in (_names(s.get("SortBy", {}).get("node", {}).get("ColumnRef", {}).get("fields"))
                                          for s in body.get("sortClause") or ()) if c and c[-1])
            return Risk(offset=src, order=order, unbounded=body.get("limitCount") is None)
        if body.get("limitCount") is not None:
            return None
        return UNBOUNDED
    if kind == "IndexStmt":
        if body.get("concurrent"):
            return None
        return Risk(ddl="CREATE UNIQUE INDEX" if body.get("unique") else "CREATE INDEX", lock="SHARE",
                    table=_relname(body.get("relation")))
    if kind == "AlterTableStmt":
        return _alter(body)
    if kind == "VacuumStmt":
        full = any(o.get("DefElem", {}).get("defname") == "full" for o in body.get("options") or ())
        if full:
            rels = body.get("rels") or [{}]
            return Risk(ddl="VACUUM FULL", lock="ACCESS EXCLUSIVE",
                        table=_relname(rels[0].get("VacuumRelation", {}).get("relation")))
        return None
    if kind == "ClusterStmt":
        return Risk(ddl="CLUSTER", lock="ACCESS EXCLUSIVE", table=_relname(body.get("relation")))
    if kind == "LockStmt":
        mode = int(body.get("mode", 8))
        if mode < 5:
            return None
        rels = body.get("relations") or [{}]
        return Risk(ddl="LOCK TABLE", lock=LOCK_MODES.get(mode, "ACCESS EXCLUSIVE"),
                    table=_relname(rels[0].get("RangeVar")))
    return None


def _alter(body: dict) -> Risk | None:
    table = _relname(body.get("relation"))
    for c in body.get("cmds") or ():
        cmd = c.get("AlterTableCmd", {})
        sub = cmd.get("subtype")
        if sub == "AT_SetNotNull":
            return Risk(ddl="SET NOT NULL", lock="ACCESS EXCLUSIVE", table=table)
        if sub == "AT_AlterColumnType":
            return Risk(ddl="ALTER COLUMN TYPE", lock="ACCESS EXCLUSIVE", table=table)
        if sub == "AT_AddColumn":
            for con in (cmd.get("def") or {}).get("ColumnDef", {}).get("constraints") or ():
                con = con.get("Constraint", {})
                if con.get("contype") == "CONSTR_GENERATED":
                    return Risk(ddl="ADD COLUMN GENERATED STORED", lock="ACCESS EXCLUSIVE", table=table)
                if con.get("contype") == "CONSTR_DEFAULT" and _volatile(con.get("raw_expr")):
                    return Risk(ddl="ADD COLUMN DEFAULT volatile", lock="ACCESS EXCLUSIVE", table=table)
    return None


def _volatile(node: Any) -> bool:
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            fc = n.get("FuncCall")
            if fc is not None and (_names(fc.get("funcname")) or [""])[-1].lower() in VOLATILE_DEFAULTS:
                return True
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)
    return False


def literal_offset(text: str) -> int:
    """The OFFSET literal of one execution's own text (the last one; 0 if none)."""
    found = _OFFSET_LITERAL.findall(text)
    return int(found[-1]) if found else 0


# ------------------------------------------------------------------ LIKE / ILIKE

@dataclass(frozen=True, slots=True)
class LikeUse:
    """``column LIKE pattern`` in a statement: the pattern is a literal (``pattern``) or Bind parameter $``param``."""

    table: str
    column: str
    op: str  # LIKE or ILIKE
    pattern: str | None
    param: int


@lru_cache(maxsize=512)
def like_patterns(sql: str) -> tuple[LikeUse, ...]:
    """Every ``col LIKE/ILIKE pattern`` of a SELECT/UPDATE/DELETE (the table when it can be told)."""
    try:
        stmts = json.loads(pg_parser.parse_sql_json(sql)).get("stmts", [])
    except Exception:
        return ()
    if len(stmts) != 1:
        return ()
    stmt = stmts[0].get("stmt", {})
    body = stmt.get("SelectStmt") or stmt.get("UpdateStmt") or stmt.get("DeleteStmt")
    if not body:
        return ()
    tables: dict[str, str] = {}
    stack: list[Any] = list(body.get("fromClause") or ()) + [{"RangeVar": body["relation"]}] \
        if body.get("relation") else list(body.get("fromClause") or ())
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            rv = n.get("RangeVar")
            if rv is not None:
                tables[(rv.get("alias") or {}).get("aliasname") or rv.get("relname", "")] = _relname(rv)
                continue
            stack.extend(v for k, v in n.items() if k in ("JoinExpr", "larg", "rarg"))
    out = []
    stack = [body.get("whereClause")]
    while stack:
        n = stack.pop()
        if isinstance(n, list):
            stack.extend(n)
            continue
        if not isinstance(n, dict):
            continue
        ae = n.get("A_Expr")
        if ae is not None and ae.get("kind") in ("AEXPR_LIKE", "AEXPR_ILIKE"):
            fields = _names((ae.get("lexpr") or {}).get("ColumnRef", {}).get("fields"))
            rhs = ae.get("rexpr") or {}
            const = rhs.get("A_Const", {}).get("sval", {}).get("sval") if "A_Const" in rhs else None
            param = int(rhs.get("ParamRef", {}).get("number", 0))
            if fields and fields[-1] and (const is not None or param):
                table = tables.get(fields[-2]) if len(fields) > 1 else (
                    next(iter(tables.values())) if len(tables) == 1 else "")
                op = "ILIKE" if ae["kind"] == "AEXPR_ILIKE" else "LIKE"
                if (_names(ae.get("name")) or [""])[0].startswith("!"):
                    continue  # NOT LIKE: an index would not serve it either way
                out.append(LikeUse(table or "", fields[-1], op, const, param))
            continue
        stack.extend(n.values())
    return tuple(out)
