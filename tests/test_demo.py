"""``pgscope demo`` end to end (a subprocess, as a user runs it), its report helpers, and its failure message."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def _accepts(host: str, port: int) -> bool:
    if host.startswith("/"):
        return os.path.exists(f"{host}/.s.PGSQL.{port}")
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def test_demo_json_shows_every_feature_and_leaves_nothing_behind():
    # a temp dir of its own (traversable by the postgres OS user the cluster runs as under root):
    # whatever the demo creates there must be gone when it exits
    tmp = tempfile.mkdtemp(prefix="pgscope-demo-test-")
    os.chmod(tmp, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSCOPE_") or k.startswith("PGSCOPE_TEST_")}
    env["TMPDIR"] = tmp
    try:
        out = subprocess.run([sys.executable, "-m", "proxy", "demo", "--duration", "8", "--json"],
                             capture_output=True, text=True, timeout=150, env=env, cwd=ROOT)
        left = os.listdir(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if out.returncode == 1 and "no PostgreSQL server could be started" in out.stderr:  # a failure under CI=true
        pytest.skip("no PostgreSQL for the demo: " + out.stderr[-500:])
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout)
    assert left == [], f"left behind in TMPDIR: {left}"

    pg = data["postgres"]
    if pg["datadir"]:
        assert not os.path.exists(pg["datadir"])
        assert _processes_mentioning(pg["datadir"]) == []
    if pg["how"] != "testcontainers":
        assert not _accepts(pg["host"], pg["port"]), "the demo's PostgreSQL still answers"

    # statements, with the errors the signup client runs into
    stmts = data["statements"]
    assert stmts and all(s["calls"] > 0 for s in stmts)
    signups = [s for s in stmts if s["query"].startswith("INSERT INTO customers")]
    assert signups and signups[0]["errors"] > 0
    assert any(s["calls"] >= 20 and "FROM orders WHERE id = $1" in s["query"] for s in stmts)  # prepared, api

    # a sampled plan and index advice for the missing index
    assert any("customer_id = $1" in e["query"] and e["plan"] for e in data["explains"]), data["explains"]
    recs = [r for r in data["recommendations"] if r["table"] == "orders" and r["columns"][0] == "customer_id"]
    assert recs, data["recommendations"]
    hypopg_here = pg["how"] == "binaries" and pg["bindir"] and os.path.exists(
        os.path.join(os.path.dirname(pg["bindir"]), "lib", "hypopg.so"))
    if hypopg_here:
        assert pg["hypopg"], "HypoPG is installed but the demo did not get it"
    assert recs[0]["method"] == ("hypopg" if pg["hypopg"] else "heuristic")
    assert recs[0]["calls"] > 0 and recs[0]["benefit"] >= 0.5

    # the N+1 loop of the storefront, after its list query
    bursts = [b for b in data["nplusone"] if b["application_name"] == "storefront"]
    assert bursts, data["nplusone"]
    assert bursts[0]["count"] >= 5 and "customers" in bursts[0]["query"] and "orders" in bursts[0]["parent_query"]

    # checkout's row lock, with billing waiting on it
    locks = [lk for lk in data["locks"] if lk["application_name"] == "checkout"]
    assert locks, data["locks"]
    lk = locks[0]
    assert lk["blocked"] >= 1 and "billing" in [c["application_name"] for c in lk["blocked_clients"]]
    assert lk["held_ms"] >= 500 and "customers" in lk["relations"]

    # every kind of finding, and billing's wait shown as a lock wait on its slow sample, not as its plan
    from proxy.inspect.findings import KINDS

    found = {f["kind"]: f for f in data["findings"]}
    assert set(found) == set(KINDS), sorted(found)
    waits = [f for f in data["findings"] if f["kind"] == "lock_wait" and f["application_name"] == "billing"]
    assert waits and waits[0]["detail"]["blocker"]["application_name"] == "checkout", data["findings"]
    assert "SET city = city" in waits[0]["query"]
    billing = [e for e in data["explains"] if e["fingerprint"] == waits[0]["fingerprint"]]
    assert billing and billing[0]["lock_wait"]["blocker"]["application_name"] == "checkout", billing
    assert found["blocking_ddl"]["application_name"] == "migration"
    assert found["unused_index"]["detail"]["index"] == "orders_total_idx"
    assert found["duplicate_index"]["detail"]["covered_by"] == "customers_email_key"
    assert found["plan_change"]["application_name"] == "dashboard"

    assert set(data["workload"]) == {"storefront", "reports", "checkout", "billing", "signup", "api", "search",
                                     "dashboard", "migration"}
    assert data["proxy"]["metrics_url"].startswith("http://127.0.0.1:")


def test_demo_without_any_postgresql_says_so(monkeypatch, capsys):
    import proxy.throwaway
    from proxy.demo import run

    def nothing(tried):
        tried += ["local binaries: none", "testcontainers: no Docker engine answers", "pgserver wheel: not installed"]
        raise RuntimeError("no PostgreSQL available")

    monkeypatch.setattr(proxy.throwaway, "start_postgres", nothing)
    code = run(argparse.Namespace(duration=1.0, keep=False, json=False, verbose=False))
    err = capsys.readouterr().err
    assert code == 1
    assert "no PostgreSQL server could be started" in err and "pgserver wheel: not installed" in err


def test_report_sections_for_nplusone_and_locks():
    from proxy.report import lock_lines, nplusone_lines, render

    burst = {"fingerprint": "f1", "query": "SELECT name FROM customers WHERE id = $1", "count": 20, "span_ms": 9.0,
             "total_ms": 4.0, "parent_fingerprint": "p1", "parent_query": "SELECT id FROM orders LIMIT $1",
             "application_name": "storefront", "client_addr": "127.0.0.1:1", "started_at": 1.0, "db": "shop"}
    lines = nplusone_lines([burst, dict(burst, count=25)])
    assert lines[0] == "storefront: 2 loops, 45 queries (8.0 ms), up to 25 per loop"
    assert "SELECT name FROM customers WHERE id = $1" in lines[1] and "SELECT id FROM orders" in lines[2]
    lock = {"fingerprint": "f2", "query": "SELECT id FROM customers WHERE id = $1 FOR UPDATE", "held_ms": 1500.4,
            "blocked": 1, "blocked_fingerprints": ["f3"],
            "blocked_clients": [{"application_name": "billing", "client_addr": "127.0.0.1:2", "server_pid": 9}],
            "relations": ["customers"], "application_name": "checkout", "client_addr": "127.0.0.1:3",
            "state": "ended", "started_at": 1.0, "db": "shop", "user": "postgres", "server_pid": 8}
    lines = lock_lines([lock])
    assert lines[0].split() == ["1500", "ms", "checkout", "(ended)", "on", "customers,", "blocking", "1", "(billing)"]
    assert "FOR UPDATE" in lines[1]
    rec = {"db": "shop", "table": "orders", "columns": ["customer_id"], "benefit": 0.5, "method": "heuristic",
           "create_statement": "CREATE INDEX CONCURRENTLY ON orders (customer_id)", "fingerprints": ["f"],
           "calls": 3, "total_ms": 60.0}
    text = render([], [], [rec], extra={"N+1 bursts": [], "Locks": lines})
    assert "CREATE INDEX CONCURRENTLY ON orders (customer_id);" in text
    assert "unverified" in text and "N+1 bursts\n  (none)" in text and "(billing)" in text


def test_report_findings_section_groups_by_kind_most_costly_first():
    from proxy.report import findings_lines, render

    def f(kind, impact, **kw):
        return {"kind": kind, "fingerprint": "f", "query": f"q {kind} {impact}", "db": "shop", "user": "u",
                "application_name": "app", "count": 1, "first_seen": 1.0, "last_seen": 2.0, "impact_ms": impact,
                "detail": kw, "advice": f"advice for {kind} {impact}"}
    lines = findings_lines([f("no_where", 5.0, table="t", rows=3), f("loop", 40.0, count=120, total_ms=40.0),
                            f("no_where", 50.0, table="t", rows=9),
                            f("lock_wait", 30.0, wait_ms=30.0, duration_ms=31.0,
                              blocker={"application_name": "checkout", "query": "SELECT 1", "xact_open_ms": 900})])
    heads = [line for line in lines if not line.startswith(" ")]
    assert heads == ["no_where: 2 findings, 55.0 ms", "loop: 1 finding, 40.0 ms", "lock_wait: 1 finding, 30.0 ms"]
    assert lines.index(next(x for x in lines if "q no_where 50.0" in x)) < lines.index(
        next(x for x in lines if "q no_where 5.0" in x))
    assert any("on checkout" in x for x in lines) and any("advice: advice for loop 40.0" in x for x in lines)
    explain = {"fingerprint": "f", "query": "UPDATE customers SET city = city WHERE id = $1", "duration_ms": 1300.0,
               "plan": [{"Plan": {"Node Type": "ModifyTable", "Total Cost": 8.0}}],
               "lock_wait": {"wait_ms": 1290.0, "blocker": {"application_name": "checkout", "query": "SELECT …"}}}
    text = render([], [explain], [], extra={"Findings": lines})
    assert "waited 1290 ms on a lock held by checkout" in text and "costliest" not in text
