"""``pgscope report`` against a live proxy: --limit, and its N+1 and lock sections."""

from __future__ import annotations

import subprocess
import sys

import psycopg

from tests.support.wire import wait_for


def report(proxy, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "proxy", "report", "--from", f"http://127.0.0.1:{proxy.metrics_port}",
                          *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def section(text: str, title: str) -> list[str]:
    """The lines of one section of the report: from its title to the next blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start + 1:end]


def test_report_limit_and_its_nplusone_and_lock_sections(proxy_factory, pg):
    with pg.connect() as c:
        c.execute("drop table if exists rep_items")
        c.execute("create table rep_items (id int primary key, name text)")
        c.execute("insert into rep_items select g, 'item ' || g from generate_series(1, 20) g")
    try:
        p = proxy_factory(**{"inspect.flush_interval_ms": 50, "inspect.nplusone_min_total_ms": 0.0,
                             "inspect.slow_query_ms": 10_000.0, "inspect.lock_hold_ms": 200.0})
        with psycopg.connect(p.dsn(pg.superuser, application_name="listing"), autocommit=True) as c:
            for col in ("id", "name", "length(name)", "upper(name)", "lower(name)", "id * 2"):
                c.execute(f"select max({col}) from rep_items")  # statements of their own fingerprints
            ids = [r[0] for r in c.execute("select id from rep_items order by id").fetchall()]
            for i in ids:  # the N+1: one SELECT per row of the list
                c.execute("select name from rep_items where id = %s", (i,))
        with psycopg.connect(p.dsn(pg.superuser, application_name="locker")) as holder:
            holder.execute("select * from rep_items where id = 3 for update")
            wait_for(lambda: p.api("/api/locks")["locks"], what="the hold reported")
            wait_for(lambda: [b for b in p.api("/api/nplusone")["bursts"] if b["count"] == 20],
                     what="the N+1 burst whole")
            short = report(p, "--limit", "2")
            full = report(p, "--limit", "50")
            holder.rollback()
    finally:
        with pg.connect() as c:
            c.execute("drop table if exists rep_items")
    # --limit: the top statements section has exactly that many rows (a header line, then the rows)
    top_short = section(short, "Top statements by total time")
    top_full = section(full, "Top statements by total time")
    assert len(top_short) == 1 + 2, top_short
    assert len(top_full) >= 1 + 8, top_full  # the control: there are more than 2 to show (6 + 3 at least)
    assert top_short[1:] == top_full[1:3]  # the same order, cut
    # the N+1 section: the loop, its repeated query and the list query before it
    for text in (short, full):
        n1 = section(text, "N+1 bursts")
        assert n1[0].strip().startswith("listing: 1 loop, 20 queries"), n1
        assert n1[1].split() == ["repeated:", *"select name from rep_items where id = $1".split()], n1
        assert n1[2].split() == ["after:", *"select id from rep_items order by id".split()], n1
        locks = section(text, "Long-held locks and idle transactions")
        assert "locker (idle in transaction)" in locks[0], locks
        assert "FOR UPDATE" in locks[1].upper(), locks
