"""``pgscope report --from http://HOST:PORT``: a terminal report from a running proxy's API.

Everything it prints comes from the API, which only holds normalized texts and
plans without values (see docs/configuration.md), so the report shows none
either.  ``token`` is sent as ``Authorization: Bearer`` (the proxy's
``http_token``); ``ca_file`` verifies an HTTPS endpoint signed by a private CA.
"""

from __future__ import annotations

import json
import shutil
import ssl
import textwrap
import urllib.error
import urllib.request
from typing import Any


def fetch(base: str, path: str, timeout: float = 10.0, token: str | None = None,
          ca_file: str | None = None) -> Any:
    req = urllib.request.Request(base.rstrip("/") + path)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
        return json.loads(r.read())


def costliest_node(plan: Any) -> dict | None:
    """The plan node with the highest own cost (its total minus its children's)."""
    if not plan:
        return None
    best, best_cost = None, -1.0
    stack = [plan[0]["Plan"]]
    while stack:
        n = stack.pop()
        kids = n.get("Plans", [])
        own = float(n.get("Total Cost", 0.0)) - sum(float(k.get("Total Cost", 0.0)) for k in kids)
        if own > best_cost:
            best, best_cost = n, own
        stack.extend(kids)
    return best


def _cut(s: str, n: int) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


def render(statements: list[dict], explains: list[dict], recommendations: list[dict], width: int = 100,
           extra: dict[str, list[dict]] | None = None) -> str:
    out: list[str] = []
    pairs = {(s["db"], s["user"]) for s in statements}
    one_pair = len(pairs) == 1
    if one_pair:
        db, user = next(iter(pairs))
        out.append(f"Top statements by total time (database {db}, user {user})")
        qw = max(30, width - 47)
        out.append(f"{'calls':>8} {'total ms':>11} {'mean ms':>9} {'rows':>9} {'err':>4}  query")
    else:
        out.append("Top statements by total time")
        qw = max(30, width - 62)
        out.append(f"{'calls':>8} {'total ms':>11} {'mean ms':>9} {'rows':>9} {'err':>4}  {'db/user':<14} query")
    for s in statements:
        who = "" if one_pair else f"{_cut(s['db'] + '/' + s['user'], 14):<14} "
        out.append(f"{s['calls']:>8} {s['total_ms']:>11.1f} {s['mean_ms']:>9.2f} {s['rows']:>9} {s['errors']:>4}  "
                   f"{who}{_cut(s['query'], qw)}")
    if not statements:
        out.append("  (none yet)")
    out.append("")
    out.append("Slow statements and their plans")
    seen = set()
    for e in explains:
        if e["fingerprint"] in seen:
            continue
        seen.add(e["fingerprint"])
        out.append(f"  {e['duration_ms']:>9.1f} ms  {_cut(e['query'], width - 16)}")
        waited = e.get("lock_wait")
        if waited:  # slow because of a lock: the plan is not to blame
            b = waited.get("blocker") or {}
            out.append(f"               waited {waited['wait_ms']:.0f} ms on a lock held by {_who(b)}: "
                       f"{_cut(b.get('query') or '?', max(20, width - 60))}")
            continue
        node = costliest_node(e.get("plan")) or {}
        where = node.get("Relation Name") or node.get("Index Name") or ""
        detail = node.get("Filter") or node.get("Index Cond") or node.get("Sort Key") or ""
        out.append(f"               costliest: {node.get('Node Type', '?')} {where} {_cut(str(detail), 60)}".rstrip())
    if not explains:
        out.append("  (none sampled)")
    out.append("")
    out.append("Index recommendations")
    for r in recommendations:
        how = "verified with HypoPG" if r["method"] == "hypopg" else "unverified estimate, no HypoPG on the server"
        n = len(r.get("fingerprints") or ())
        out.append(f"  {r['create_statement']};")
        out.append(f"      {r['benefit'] * 100:.1f}% cheaper ({how}); helps {n} statement{'s' if n != 1 else ''}: "
                   f"{r['calls']} calls, {r['total_ms']:.1f} ms so far")
    if not recommendations:
        out.append("  (none)")
    for title, rows in (extra or {}).items():
        out.append("")
        out.append(title)
        for row in rows:
            out.append("  " + row if isinstance(row, str) else "  " + json.dumps(row))
        if not rows:
            out.append("  (none)")
    return "\n".join(out) + "\n"


def nplusone_lines(bursts: list[dict], width: int = 100) -> list[str]:
    """One entry per loop shape (client, repeated query, list query before it), most statements first."""
    groups: dict[tuple, dict] = {}
    for b in bursts:
        who = b.get("application_name") or b.get("client_addr") or "?"
        g = groups.setdefault((who, b["fingerprint"], b.get("parent_fingerprint")), {
            "who": who, "query": b["query"], "parent": b.get("parent_query"), "loops": 0, "count": 0,
            "total_ms": 0.0, "max": 0})
        g["loops"] += 1
        g["count"] += b["count"]
        g["total_ms"] += b["total_ms"]
        g["max"] = max(g["max"], b["count"])
    out = []
    for g in sorted(groups.values(), key=lambda g: g["count"], reverse=True):
        loops = f"{g['loops']} loops" if g["loops"] != 1 else "1 loop"
        out.append(f"{g['who']}: {loops}, {g['count']} queries ({g['total_ms']:.1f} ms), up to {g['max']} per loop")
        out.append(f"    repeated:  {_cut(g['query'], width - 17)}")
        out.append(f"    after:     {_cut(g['parent'] or '-', width - 17)}")
    return out


def lock_lines(locks: list[dict], width: int = 100) -> list[str]:
    out = []
    for lk in locks:
        who = lk.get("application_name") or lk.get("client_addr") or "?"
        waiters = sorted({c.get("application_name") or c.get("client_addr") or "?" for c in lk.get("blocked_clients") or ()})
        on = f" on {', '.join(lk['relations'])}" if lk.get("relations") else ""
        blocked = f", blocking {lk['blocked']} ({', '.join(waiters)})" if lk.get("blocked") else ""
        out.append(f"{lk['held_ms']:>7.0f} ms  {who} ({lk['state']}){on}{blocked}")
        out.append(f"            {_cut(lk.get('query') or '(no lock-taking statement seen)', width - 14)}")
    return out


def _who(c: dict) -> str:
    return c.get("application_name") or c.get("client_addr") or (f"server pid {c['server_pid']}"
                                                                 if c.get("server_pid") else "?")


def _finding_detail(f: dict) -> str:
    """The one line of a finding's detail the report shows, per kind."""
    d = f.get("detail") or {}
    kind = f["kind"]
    if kind == "loop":
        return f"{d.get('count')} times back to back ({d.get('total_ms', 0):.1f} ms); between: {d.get('between') or '-'}"
    if kind == "lock_wait":
        b = d.get("blocker") or {}
        return (f"waited {d.get('wait_ms', 0):.0f} ms of {d.get('duration_ms', 0):.0f} ms on {_who(b)} "
                f"(its transaction open {b.get('xact_open_ms', 0):.0f} ms): {b.get('query') or '?'}")
    if kind == "no_where":
        return f"{d.get('rows')} rows of {d.get('table')}"
    if kind == "unbounded_select":
        return f"up to {d.get('rows_max')} rows (threshold {d.get('threshold')})"
    if kind == "deep_offset":
        most = d.get("offset_max")
        return f"OFFSET up to {most}" if most is not None else f"OFFSET past {d.get('threshold')}"
    if kind == "leading_wildcard":
        return f"{d.get('operator')} on {d.get('table')}.{d.get('column')} by a Seq Scan (pg_trgm {d.get('pg_trgm')})"
    if kind == "blocking_ddl":
        n = d.get("blocked_clients") or 0
        return (f"{d.get('operation')} held {d.get('lock')} on {d.get('table')} for {d.get('held_ms', 0):.0f} ms, "
                f"blocking {n} client{'s' if n != 1 else ''} up to {d.get('blocked_ms', 0):.0f} ms")
    if kind in ("unused_index", "duplicate_index"):
        more = f", covered by {d.get('covered_by')}" if kind == "duplicate_index" else ""
        return f"{d.get('schema')}.{d.get('index')} on {d.get('table')}, {d.get('size_bytes', 0) / 1024:.0f} kB{more}"
    if kind == "plan_change":
        return (f"mean {d.get('mean_ms_before', 0):.2f} ms -> {d.get('mean_ms_after', 0):.2f} ms over "
                f"{d.get('calls_after')} calls after the change")
    return json.dumps(d)[:200]


def findings_lines(findings: list[dict], width: int = 100) -> list[str]:
    """Findings grouped by kind, the costliest kind first (summed impact_ms), each kind's costliest first."""
    kinds: dict[str, list[dict]] = {}
    for f in findings:
        kinds.setdefault(f["kind"], []).append(f)
    out = []
    for kind, rows in sorted(kinds.items(), key=lambda kv: (-sum(f["impact_ms"] for f in kv[1]), kv[0])):
        total = sum(f["impact_ms"] for f in rows)
        out.append(f"{kind}: {len(rows)} finding{'s' if len(rows) != 1 else ''}, {total:.1f} ms")
        for f in sorted(rows, key=lambda f: (f["impact_ms"], f["count"]), reverse=True):
            who = f.get("application_name") or f.get("user") or ""
            what = f.get("query") or f.get("advice", "").partition(":")[0]
            out.append(f"  {f['count']:>6}x {f['impact_ms']:>10.1f} ms  {_cut(who, 12):<12} "
                       f"{_cut(what, max(20, width - 38))}")
            out.append(f"            {_cut(_finding_detail(f), width - 14)}")
            out.extend(textwrap.wrap(f.get("advice") or "", max(40, width - 12), initial_indent="            advice: ",
                                     subsequent_indent="                    ", break_on_hyphens=False))
    return out


def _optional(base: str, path: str, key: str, **kw: Any) -> list[dict]:
    try:
        return fetch(base, path, **kw).get(key, [])
    except (urllib.error.HTTPError, urllib.error.URLError, ValueError):
        return []


def report(base: str, limit: int = 15, token: str | None = None, ca_file: str | None = None) -> str:
    kw: dict[str, Any] = {"token": token, "ca_file": ca_file}
    statements = fetch(base, f"/api/statements?order=total_time&limit={limit}", **kw)["statements"]
    explains = _optional(base, "/api/explains?limit=50", "explains", **kw)
    recs = _optional(base, "/api/recommendations", "recommendations", **kw)
    extra: dict[str, list] = {}
    width = shutil.get_terminal_size((100, 20)).columns
    bursts = _optional(base, "/api/nplusone", "bursts", **kw)
    extra["N+1 bursts (one query per row of a list query, in a loop)"] = nplusone_lines(bursts, width)
    locks = _optional(base, "/api/locks", "locks", **kw)
    extra["Long-held locks and idle transactions"] = lock_lines(locks, width)
    found = _optional(base, "/api/findings?limit=200", "findings", **kw)
    extra["Findings (by kind, most costly first)"] = findings_lines(found, width)
    return render(statements, explains, recs, width, extra)
