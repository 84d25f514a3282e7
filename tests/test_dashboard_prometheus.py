"""The Grafana dashboard and the alert rules against a real Prometheus scraping a real ``pgscope run``.

One module-wide scene: a `pgscope run` process in transaction mode in front of the test server,
a Prometheus (the Debian ``prometheus`` binary) scraping its metrics port every second with
deploy/prometheus/pgscope-alerts.yaml loaded, and load through the proxy that exercises every
feature the dashboard shows: statements of several commands, errors, slow statements, EXPLAIN
samples and a HypoPG-verified index recommendation, an N+1 loop, a long lock hold with a blocked
client, a client waiting for the pool's only server, a client refused at max_client_conn, a failed
client login and a failed upstream login (unknown database).

Then, through Prometheus's HTTP API, every template variable's ``label_values()`` query (as a
label-values query with ``match[]``), and every panel target and every rule expression evaluated
with the variables substituted as Grafana does. Every expression must evaluate without an error;
every panel target must return data (see ``NO_DATA_EXPECTED`` for the few that may not, and why);
every rule must be loaded with health ok, the operands each rule compares must return data, and
the alert the scene provokes (PgscopeClientsRefused) must fire while PgscopeDown must not.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import yaml

from tests.support.client import login_error
from tests.support.proxy import ProxyProcess
from tests.support.tools import free_port, require, require_hypopg
from tests.support.wire import wait_for

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "pgscope-alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "pgscope-dashboard.json"

# Grafana's $__rate_interval is max(4 x scrape interval, $__interval + scrape interval); with the
# 2 s scrape below a rate over 30 s holds the whole scene, which has just been scraped.
RATE_INTERVAL = "30s"
# Panel targets that may return nothing after this scene, and why (everything else must return data):
NO_DATA_EXPECTED = {
    # an EXPLAIN that fails is counted per failure only; nothing in a healthy scene fails
    'sum(rate(pgscope_explain_errors_total{',
    # the slow-log limiter (inspect.slow_log_rate) suppresses nothing at this scene's few slow statements
    'rate(pgscope_slow_log_suppressed_total{',
}
# ... and with one database and user selected: the scene's failed upstream login was for a database
# with no statements (no_such_db_dash), which is therefore no value of $db (only "All" shows it)
NO_DATA_WITH_ONE_EACH = {'rate(pgscope_server_connect_failures_total{'}


# ------------------------------------------------------------------ Prometheus

class Prometheus:
    def __init__(self, tmp: Path, scrape_target: str) -> None:
        binary = require("prometheus")
        self.port = free_port()
        cfg = {
            # a 2 s timeout: on a loaded 2-core machine a 1 s one lost most scrapes of the scene
            "global": {"scrape_interval": "2s", "scrape_timeout": "2s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "pgscope", "static_configs": [{"targets": [scrape_target]}]}],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log_path = tmp / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=tmp)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def get(self, path: str, **params: Any) -> Any:
        q = urllib.parse.urlencode(params, doseq=True)
        url = f"http://127.0.0.1:{self.port}{path}" + (f"?{q}" if q else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
        return body

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.log()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        body = self.get("/api/v1/query", query=expr, time=f"{at:.3f}")
        assert body.get("status") == "success", f"{expr}\n{body}"
        assert not body.get("warnings"), f"{expr}\n{body}"
        return body["data"]["result"]

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        body = self.get("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1")
        assert body.get("status") == "success", f"{expr}\n{body}"
        assert not body.get("warnings"), f"{expr}\n{body}"
        return body["data"]["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ------------------------------------------------------------------ the scene

def _config(tmp: Path, pg, users: Path) -> str:
    cfg = tmp / "pgscope.toml"
    cfg.write_text("\n".join([
        f'upstream = "{pg.dsn()}"',
        'pool_mode = "transaction"',
        "pool_size = 2",
        "max_client_conn = 5",
        "query_wait_timeout = 20.0",
        'auth_type = "md5"',
        f'auth_file = "{users}"',
        'log_level = "warning"',
        "[inspect]",
        "flush_interval_ms = 50",
        "slow_query_ms = 20.0",
        "explain_cooldown_s = 3600.0",
        "explain_max_per_minute = 600",
        "nplusone_min_total_ms = 0.0",
        "lock_hold_ms = 200.0",
        "lock_sample_interval_ms = 100.0",
        'nplusone_allow_apps = "steady"',
        "[advisor]",
        "min_table_rows = 1000",
    ]) + "\n")
    return str(cfg)


def _drive(proxy: ProxyProcess, pg) -> None:
    dsn = proxy.dsn("pgscope_md5", "md5pass")
    with psycopg.connect(dsn, autocommit=True, application_name="dash") as c:
        for i in range(20):
            c.execute("select %s::int + 1", (i,))
        c.execute("insert into dash_orders (customer_id, amount) values (1, 1)")
        c.execute("update dash_orders set amount = amount + 1 where id = 1")
        for _ in range(3):
            with pytest.raises(psycopg.errors.DivisionByZero):
                c.execute("select 1 / 0")
        # slow: a seq scan on the big table, sampled by EXPLAIN, an index recommended (HypoPG)
        for i in range(3):
            c.execute("select pg_sleep(0.03), count(*) from dash_orders where customer_id = %s", (i,))
        # N+1: a list query, then one SELECT per row
        ids = [r[0] for r in c.execute("select id from dash_orders order by id limit 12").fetchall()]
        for i in ids:
            c.execute("select amount from dash_orders where id = %s", (i,))
    # a long lock hold with a client blocked behind it, and the steady client waiting for a server
    holder = psycopg.connect(dsn, application_name="holder")
    blocked = psycopg.connect(dsn, autocommit=True, application_name="blocked")
    done: list[Any] = []
    try:
        holder.execute("update dash_orders set amount = 0 where id = 2")  # holds the row and a server
        t = threading.Thread(target=lambda: done.append(blocked.execute(
            "update dash_orders set amount = 1 where id = 2").rowcount))  # the other server, blocked
        t.start()
        wait_for(lambda: "pgscope_blocked_clients 1.0" in _metrics(proxy), what="the lock sampler sees the block")
        wait_for(lambda: 'pgscope_pool_waiting_clients{db="pgscope_test",user="pgscope_md5"} 1.0' in _metrics(proxy),
                 what="the steady client waiting for a server")
        wait_for(lambda: [lk for lk in _api(proxy, "/api/locks")["locks"] if lk["application_name"] == "holder"],
                 what="the hold reported past lock_hold_ms")
        holder.commit()
        t.join(15)
        assert done == [1]
    finally:
        holder.close()
        blocked.close()
    # max_client_conn is 5: the steady client and four more (a login takes a server for a moment: they
    # come after the holder let go); the sixth is refused
    clients = [psycopg.connect(dsn, autocommit=True) for _ in range(4)]
    try:
        assert login_error(dsn).sqlstate == "53300"
    finally:
        for c in clients:
            c.close()
    assert login_error(proxy.dsn("pgscope_md5", "wrong")).sqlstate == "28P01"
    assert login_error(proxy.dsn("pgscope_md5", "md5pass", dbname="no_such_db_dash")).sqlstate == "3D000"


class Steady(threading.Thread):
    """Load through the whole scene and its evaluation, as a dashboard sees in production: Prometheus's
    rate() counts only increases between two scrapes of a series, so a burst that ends before a
    counter's second scrape shows as zero (and a ratio or a quantile of zeros as NaN). Each round: a
    fast SELECT, an error, a slow statement (its plan sampled once, then skipped for the cooldown)."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.rounds = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True, application_name="steady") as c:
                while not self.stop.is_set():
                    c.execute("select amount from dash_orders where id = %s", (self.rounds % 100 + 1,))
                    with pytest.raises(psycopg.errors.DivisionByZero):
                        c.execute("select 1 / 0")
                    c.execute("select pg_sleep(0.025), count(*) from dash_orders where customer_id = %s",
                              (self.rounds % 500,))
                    self.rounds += 1
                    self.stop.wait(0.05)
        except BaseException as e:  # noqa: BLE001 - reported by the fixture
            self.failure = e


def _metrics(proxy: ProxyProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def _api(proxy: ProxyProcess, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}{path}", timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def scene(pg, tmp_path_factory):
    require("prometheus")
    require_hypopg(pg)  # the index recommendation panel needs a recommendation
    tmp = tmp_path_factory.mktemp("dashboard")
    with pg.connect() as c:
        c.execute("drop table if exists dash_orders")
        c.execute("create table dash_orders (id serial primary key, customer_id int, amount numeric)")
        c.execute("insert into dash_orders (customer_id, amount) select g % 500, g from generate_series(1, 20000) g")
        c.execute("analyze dash_orders")
        c.execute("grant all on dash_orders to pgscope_md5")
        c.execute("grant all on sequence dash_orders_id_seq to pgscope_md5")
    users = tmp / "userlist.txt"
    users.write_text('"pgscope_md5" "md5pass"\n')
    proxy = ProxyProcess(["--config", _config(tmp, pg, users)]).wait_ready()
    prom = Prometheus(tmp, f"127.0.0.1:{proxy.metrics_port}")
    steady: Steady | None = None
    try:
        wait_for(prom.ready, timeout=60, what="Prometheus ready")
        # the first scrape before the scene, so that every counter's first increase is seen
        wait_for(lambda: prom.query("up", time.time()), timeout=60, what="a first scrape")
        scene_start = time.time()
        steady = Steady(proxy.dsn("pgscope_md5", "md5pass"))
        steady.start()
        _drive(proxy, pg)
        # what the scene made, as pgscope itself reports it (so that a panel without data is the
        # dashboard's fault, not a scene that did not happen)
        wait_for(lambda: _api(proxy, "/api/recommendations")["recommendations"], timeout=60,
                 what="an index recommendation")
        wait_for(lambda: _api(proxy, "/api/nplusone")["bursts"], timeout=30, what="an N+1 burst")
        wait_for(lambda: _api(proxy, "/api/locks")["locks"], timeout=30, what="a lock report")
        scraped_after = time.time()
        # Prometheus has scraped everything once a scrape started after the scene ended
        wait_for(lambda: [r for r in prom.query("timestamp(pgscope_build_info)", time.time())
                          if float(r["value"][1]) > scraped_after + 1], timeout=60, what="a scrape after the scene")
        # and the rules have been evaluated on it
        wait_for(lambda: _rules_evaluated_after(prom, scraped_after + 1), timeout=60, what="rules evaluated")
        # rates need samples: the statement counters were scraped several times during the scene
        wait_for(lambda: _samples_since(prom, "pgscope_statement_calls_total", scene_start) >= 4, timeout=60,
                 what=f"four scrapes of the scene's statement counters ({_scrape_health(prom, scene_start)})")
        assert steady.is_alive(), steady.failure
        yield Scene(prom, proxy, scene_start - 1, time.time())
        assert steady.is_alive(), steady.failure
    finally:
        if steady is not None:
            steady.stop.set()
            steady.join(30)
        prom.stop()
        proxy.stop()
        with pg.connect() as c:
            c.execute("drop table if exists dash_orders")


@dataclass
class Scene:
    prom: Prometheus
    proxy: ProxyProcess
    start: float  # the dashboard's time range: from before the load ...
    end: float  # ... to after it was scraped and the rules evaluated

    @property
    def range_s(self) -> int:  # Grafana's $__range
        return int(self.end - self.start) + 1


def _samples_since(prom: Prometheus, metric: str, since: float) -> int:
    """The fewest samples any series of ``metric`` has since ``since`` (0 when none)."""
    now = time.time()
    got = prom.query(f"min(count_over_time({metric}[{int(now - since) + 1}s]))", now)
    return int(float(got[0]["value"][1])) if got else 0


def _scrape_health(prom: Prometheus, since: float) -> str:
    """How the scrapes since ``since`` went, for a failure's message."""
    now = time.time()
    window = f"[{int(now - since) + 1}s]"
    out = []
    for what, expr in (("scrapes", f"count_over_time(up{window})"), ("succeeded", f"sum_over_time(up{window})"),
                       ("slowest s", f"max_over_time(scrape_duration_seconds{window})")):
        got = prom.query(expr, now)
        out.append(f"{what} {got[0]['value'][1] if got else 'none'}")
    return ", ".join(out)


def _has_data(result: list[dict[str, Any]]) -> bool:
    """A series with a number in it (a histogram_quantile over no observations is all NaN)."""
    for series in result:
        points = series.get("values") or [series["value"]]
        if any(v not in ("NaN", "+Inf", "-Inf") for _, v in points):
            return True
    return False


def _rules_evaluated_after(prom: Prometheus, t: float) -> bool:
    from datetime import datetime

    groups = prom.get("/api/v1/rules")["data"]["groups"]
    if not groups:
        return False
    for g in groups:
        last = g.get("lastEvaluation", "")
        if not last or last.startswith("0001"):
            return False
        stamp = datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", last.replace("Z", "+00:00")))
        if stamp.timestamp() <= t:
            return False
    return True


# ------------------------------------------------------------------ Grafana's side

def _regex_escape(value: str) -> str:
    """Grafana's escaping of a variable value inside a PromQL regex matcher: one backslash in the
    regex, two in the PromQL string."""
    return re.sub(r"([$^*{}\[\]'+?.()|\\])", r"\\\\\1", value)


def _substitute(expr: str, values: dict[str, str], range_s: int) -> str:
    out = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__range", f"{range_s}s")
    for name in sorted(values, key=len, reverse=True):
        out = out.replace(f"${name}", values[name])
    assert "$" not in out.replace("$labels", ""), f"a Grafana variable left in {out}"
    return out


def _variables(prom: Prometheus, at: float, pick_one: bool) -> dict[str, str]:
    """Resolve the dashboard's query variables in order, as Grafana does: each ``label_values(selector,
    label)`` becomes a label-values query with the variables before it substituted. With ``pick_one``
    every variable selects its one value (the scene has one of each), else "All" (allValue, or every
    value as a regex alternation when the variable has no allValue)."""
    values: dict[str, str] = {}
    for v in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["definition"])
        assert m, v["definition"]
        selector = _substitute(m.group(1), values, 60)
        body = prom.get(f"/api/v1/label/{m.group(2)}/values", **{"match[]": selector, "start": f"{at - 600:.3f}",
                                                                "end": f"{at:.3f}"})
        assert body["status"] == "success", (v["name"], body)
        found = body["data"]
        assert len(found) == 1, (v["name"], selector, found)  # one job, instance, database and user in the scene
        if pick_one:
            values[v["name"]] = "(" + "|".join(_regex_escape(x) for x in found) + ")"
        else:
            values[v["name"]] = v.get("allValue") or "(" + "|".join(_regex_escape(x) for x in found) + ")"
    return values


def test_variable_queries_find_the_scene(scene):
    values = _variables(scene.prom, scene.end, pick_one=True)
    assert values == {"job": "(pgscope)", "instance": f"(127\\\\.0\\\\.0\\\\.1:{scene.proxy.metrics_port})",
                      "db": "(pgscope_test)", "user": "(pgscope_md5)"}


def _evaluate(scene: Scene, target: dict[str, Any], values: dict[str, str]) -> list[dict[str, Any]]:
    """A panel target as Grafana asks Prometheus: a range query over the dashboard's time range, or an
    instant query at its end."""
    expr = _substitute(target["expr"], values, scene.range_s)
    if target.get("instant") and not target.get("range"):
        return scene.prom.query(expr, scene.end)
    return scene.prom.query_range(expr, scene.start, scene.end)


@pytest.mark.parametrize("pick_one", [False, True], ids=["all", "one-each"])
def test_every_panel_target_evaluates_and_the_exercised_ones_have_data(scene, pick_one):
    values = _variables(scene.prom, scene.end, pick_one)
    d = json.loads(DASHBOARD.read_text())
    targets = [(p["title"], t) for p in d["panels"] for t in p.get("targets", [])]
    assert len(targets) >= 40
    empty = []
    for title, t in targets:
        result = _evaluate(scene, t, values)
        allowed = NO_DATA_EXPECTED | (NO_DATA_WITH_ONE_EACH if pick_one else set())
        if not _has_data(result) and not any(marker in t["expr"] for marker in allowed):
            empty.append(f"{title}: {t['expr']}")
    assert not empty, "panel targets without data:\n" + "\n".join(empty) + f"\n({_scrape_health(scene.prom, scene.start)})"


def test_top_statements_table_names_the_queries(scene):
    """The table's columns join pgscope_statement_info for the text: the scene's statements show."""
    values = _variables(scene.prom, scene.end, pick_one=False)
    d = json.loads(DASHBOARD.read_text())
    (table,) = [p for p in d["panels"] if p["type"] == "table" and p["title"].startswith("Top")]
    for t in table["targets"]:
        queries = {r["metric"].get("query", "") for r in _evaluate(scene, t, values)}
        assert any("dash_orders" in q for q in queries), (t["expr"], queries)


def _operands(expr: str) -> list[str]:
    """The expressions a rule compares: its ``and`` parts, each without its comparison to a threshold."""
    def top_level_split(s: str, sep: str) -> list[str]:
        parts, depth, start, i = [], 0, 0, 0
        while i < len(s):
            ch = s[i]
            if ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
            elif depth == 0 and s.startswith(sep, i):
                parts.append(s[start:i])
                start = i + len(sep)
                i = start
                continue
            i += 1
        parts.append(s[start:])
        return [p.strip() for p in parts]

    out = []
    for part in top_level_split(" ".join(expr.split()), " and "):
        part = re.sub(r"^on \([^)]*\)\s*", "", part)
        for op in (" == ", " > "):
            if op in part:
                part = top_level_split(part, op)[0]
                break
        out.append(part)
    return out


def test_alert_rules_load_evaluate_and_fire_on_the_scene(scene):
    prom = scene.prom
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    loaded = {r["name"]: r for g in prom.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in rules}
    for r in loaded.values():
        assert r["health"] == "ok" and not r.get("lastError"), r
    no_data = []
    for r in rules:
        prom.query(r["expr"], scene.end)  # evaluates without an error
        for operand in _operands(r["expr"]):
            # what the rule compares matches what pgscope exported at some point of the scene
            if not _has_data(prom.query_range(operand, scene.start, scene.end)):
                no_data.append(f"{r['alert']}: {operand}")
    assert not no_data, "rule operands without data:\n" + "\n".join(no_data) + f"\n({_scrape_health(prom, scene.start)})"
    # the scene refused a client at max_client_conn: that alert fires (for: 0m); pgscope is up
    def firing_now() -> set[str]:
        return {a["labels"]["alertname"] for a in prom.get("/api/v1/alerts")["data"]["alerts"]
                if a["state"] == "firing"}
    wait_for(lambda: "PgscopeClientsRefused" in firing_now(), timeout=30, what="PgscopeClientsRefused firing")
    firing = firing_now()
    assert "PgscopeDown" not in firing and "PgscopeNotReady" not in firing, firing
    up = prom.query('up{job=~".*pgscope.*"}', scene.end)
    assert [float(s["value"][1]) for s in up] == [1.0], up
