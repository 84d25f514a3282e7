"""``pgscope report --from http://HOST:PORT``: a terminal report from a running proxy's API."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from typing import Any


def fetch(base: str, path: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(base.rstrip("/") + path, timeout=timeout) as r:
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
    qw = max(30, width - 62)
    out.append("Top statements by total time")
    out.append(f"{'calls':>8} {'total ms':>11} {'mean ms':>9} {'rows':>9} {'err':>4}  {'db/user':<14} query")
    for s in statements:
        out.append(f"{s['calls']:>8} {s['total_ms']:>11.1f} {s['mean_ms']:>9.2f} {s['rows']:>9} {s['errors']:>4}  "
                   f"{_cut(s['db'] + '/' + s['user'], 14):<14} {_cut(s['query'], qw)}")
    if not statements:
        out.append("  (none yet)")
    out.append("")
    out.append("Slow statements and their plans")
    seen = set()
    for e in explains:
        if e["fingerprint"] in seen:
            continue
        seen.add(e["fingerprint"])
        node = costliest_node(e.get("plan")) or {}
        where = node.get("Relation Name") or node.get("Index Name") or ""
        detail = node.get("Filter") or node.get("Index Cond") or node.get("Sort Key") or ""
        out.append(f"  {e['duration_ms']:>9.1f} ms  {_cut(e['query'], width - 16)}")
        out.append(f"               costliest: {node.get('Node Type', '?')} {where} {_cut(str(detail), 60)}".rstrip())
    if not explains:
        out.append("  (none sampled)")
    out.append("")
    out.append("Index recommendations")
    for r in recommendations:
        out.append(f"  {r['benefit'] * 100:>5.1f}% cheaper ({r['method']}), {r['calls']} calls, "
                   f"{r['total_ms']:.1f} ms: {r['create_statement']};")
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


def _optional(base: str, path: str, key: str) -> list[dict]:
    try:
        return fetch(base, path).get(key, [])
    except (urllib.error.HTTPError, urllib.error.URLError, ValueError):
        return []


def report(base: str, limit: int = 15) -> str:
    statements = fetch(base, f"/api/statements?order=total_time&limit={limit}")["statements"]
    explains = _optional(base, "/api/explains?limit=50", "explains")
    recs = _optional(base, "/api/recommendations", "recommendations")
    extra: dict[str, list] = {}
    bursts = _optional(base, "/api/nplusone", "bursts")
    extra["N+1 bursts"] = [f"{b['count']}x in {b['span_ms']:.0f} ms ({b['total_ms']:.1f} ms) "
                           f"{b.get('application_name') or b.get('client_addr')}: {_cut(b['query'], 60)}"
                           f"  after: {_cut(b.get('parent_query') or '-', 40)}" for b in bursts]
    locks = _optional(base, "/api/locks", "locks")
    extra["Long-held locks"] = [f"{lk['held_ms']:.0f} ms {lk['state']}, blocking {lk['blocked']}: "
                                f"{_cut(lk.get('query') or '-', 60)} ({lk.get('application_name') or lk.get('client_addr')})"
                                for lk in locks]
    return render(statements, explains, recs, shutil.get_terminal_size((100, 20)).columns, extra)
