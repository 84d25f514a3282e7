"""The shipping pieces under deploy/ and the Dockerfile.

- Alert rules: `promtool check rules`, `promtool test rules` on the unit tests, every rule complete.
- Grafana dashboard: generated from deploy/grafana/dashboard.py, well-formed, every expression parses
  as PromQL (promtool) and names only metrics of a real scrape that docs/metrics.md documents (the
  alert rules too).
- Helm chart: structure and values references always; lint and the rendered manifests with Helm's
  own engine (helm-sdkpy, see tests/support/helm.py); the ConfigMap's pgscope.toml and the sidecar
  example's are accepted by `pgscope check-config`.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, unquote

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import helm
from tests.support.tools import require

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "pgscope-alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus" / "pgscope-alerts.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "pgscope-dashboard.json"
DASHBOARD_PY = DEPLOY / "grafana" / "dashboard.py"
CHART = DEPLOY / "helm" / "pgscope"
SIDECAR = DEPLOY / "kubernetes" / "pgscope-sidecar.yaml"

METRIC = re.compile(r"\b(?:pgscope|process|python)_[A-Za-z0-9_]+\b")
# Grafana's variables, for checking dashboard expressions as PromQL.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "1h", "$job": ".*", "$instance": ".*", "$db": ".*",
                "$user": ".*"}
CHART_OWNED_KEYS = {"listen", "metrics_listen", "upstream", "auth_file"}


def load_yaml(path: Path) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(ALERTS)["groups"] for r in g["rules"]]


def dashboard() -> dict[str, Any]:
    with open(DASHBOARD) as f:
        return json.load(f)


def dashboard_exprs() -> list[str]:
    d = dashboard()
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", v["definition"])
            assert m, v["definition"]
            exprs.append(m.group(1))
    return exprs


def promtool_check_exprs(promtool: str, exprs: list[str], tmp_path: Path) -> None:
    """Parse PromQL expressions with promtool (as recording rules in a throwaway rule file)."""
    rules = []
    for i, e in enumerate(exprs):
        for k, v in GRAFANA_VARS.items():
            e = e.replace(k, v)
        assert "$" not in e.replace("$labels", ""), f"unknown Grafana variable in {e}"
        rules.append({"record": f"pgscope_dashboard:expr_{i}", "expr": e})
    path = tmp_path / "exprs.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def check_config(toml_text: str, tmp_path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`pgscope check-config` on ``toml_text``: the effective settings."""
    path = tmp_path / f"pgscope-{abs(hash(toml_text))}.toml"
    path.write_text(toml_text)
    e = {k: v for k, v in os.environ.items() if not k.startswith("PGSCOPE_") or k.startswith("PGSCOPE_TEST_")}
    e.update(env or {})
    out = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(path)], capture_output=True,
                         text=True, timeout=60, env=e, cwd=ROOT)
    assert out.returncode == 0, f"check-config refused:\n{out.stderr}\n{toml_text}"
    assert out.stdout.startswith("ok\n"), out.stdout
    return json.loads(out.stdout[3:])


# ------------------------------------------------------------------ alert rules

@pytest.mark.promtool
def test_alert_rules_pass_promtool_check():
    promtool = require("promtool")
    out = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout


@pytest.mark.promtool
def test_alert_rules_unit_tests_pass():
    promtool = require("promtool")
    out = subprocess.run([promtool, "test", "rules", ALERT_TESTS.name], capture_output=True, text=True,
                         timeout=120, cwd=ALERT_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_alert_rules_are_complete():
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)) >= 10
    for r in rules:
        assert set(r) == {"alert", "expr", "for", "labels", "annotations"}, r["alert"]
        assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert set(r["annotations"]) == {"summary", "description"}, r["alert"]
        assert "{{ $labels." in r["annotations"]["summary"] + r["annotations"]["description"], r["alert"]
    for wanted in ("PgscopeDown", "PgscopeNotReady", "PgscopePoolSaturated", "PgscopePoolNearlyExhausted",
                   "PgscopePoolWaitHigh", "PgscopeClientConnectionsNearLimit", "PgscopeClientsRefused",
                   "PgscopeServerConnectFailures", "PgscopeErrorRatioHigh", "PgscopeSlowStatementsRising",
                   "PgscopeNPlusOneBursts", "PgscopeLongLockHolds", "PgscopeBlockedSessions",
                   "PgscopeInspectionDropping", "PgscopeInspectionBacklog"):
        assert wanted in names


def test_alert_unit_tests_cover_firing_and_quiet():
    """At least 4 alerts are tested both firing and not firing, and every alert on a limit or on
    readiness is."""
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in load_yaml(ALERT_TESTS)["tests"]:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert firing <= names and quiet <= names
    assert len(firing & quiet) >= 4, (firing, quiet)
    for name in ("PgscopeNotReady", "PgscopePoolSaturated", "PgscopePoolNearlyExhausted", "PgscopePoolWaitHigh",
                 "PgscopeClientConnectionsNearLimit", "PgscopeClientsRefused", "PgscopeInspectionBacklog"):
        assert name in firing & quiet, name


def test_chart_embeds_the_same_alert_rules():
    assert (CHART / "files" / "pgscope-alerts.yaml").read_bytes() == ALERTS.read_bytes(), \
        "cp deploy/prometheus/pgscope-alerts.yaml deploy/helm/pgscope/files/"


# ------------------------------------------------------------------ dashboard

def test_dashboard_is_generated_from_its_source():
    spec = importlib.util.spec_from_file_location("pgscope_dashboard", DASHBOARD_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.render() == DASHBOARD.read_text(), \
        "python3 deploy/grafana/dashboard.py > deploy/grafana/pgscope-dashboard.json"


def test_dashboard_structure():
    d = dashboard()
    assert d["schemaVersion"] >= 36 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("job", "instance", "db", "user"):
        v = variables[name]
        assert v["type"] == "query" and v["multi"] and v["includeAll"], name
        assert v["datasource"]["uid"] == "${DS_PROMETHEUS}", name
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
    titles = " | ".join(p["title"] for p in d["panels"])
    for words in ("Statements/s by command", "p50 / p95 / p99", "Error", "Slow statements/s", "Top",
                  "Client connections by state", "Server connections by pool and state",
                  "Clients waiting for a server", "Pool wait", "N+1 bursts", "lock holds",
                  "Inspection queue length", "Dropped", "CPU", "memory"):
        assert words in titles, words


def test_dashboard_covers_the_metrics_and_joins_query_text():
    exprs = dashboard_exprs()
    used = {m for e in exprs for m in METRIC.findall(e)}
    for name in ("pgscope_query_duration_seconds_count", "pgscope_query_duration_seconds_bucket",
                 "pgscope_statement_errors_total", "pgscope_slow_statements_total", "pgscope_statement_info",
                 "pgscope_statement_calls_total", "pgscope_statement_duration_seconds_total",
                 "pgscope_statement_rows_total", "pgscope_client_connections", "pgscope_server_connections",
                 "pgscope_pool_waiting_clients", "pgscope_pool_wait_seconds_bucket",
                 "pgscope_nplusone_bursts_total", "pgscope_lock_holds_total", "pgscope_blocked_clients",
                 "pgscope_findings_total",
                 "pgscope_inspect_queue_length", "pgscope_inspect_dropped_total", "process_cpu_seconds_total",
                 "process_resident_memory_bytes"):
        assert name in used, name
    table = next(p for p in dashboard()["panels"] if p["type"] == "table" and p["title"].startswith("Top"))
    for t in table["targets"]:
        assert t["instant"] and t["format"] == "table"
        assert "* on (fingerprint) group_left (query)" in t["expr"] and "pgscope_statement_info" in t["expr"]
    assert {"merge", "organize"} <= {tr["id"] for tr in table["transformations"]}


@pytest.mark.promtool
def test_dashboard_expressions_parse_as_promql(tmp_path):
    promtool = require("promtool")
    promtool_check_exprs(promtool, dashboard_exprs(), tmp_path)


def scrape_names(text: str) -> set[str]:
    """Every sample name a scrape has or can have (families without samples yet included)."""
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        names.update(s.name for s in fam.samples)
        if fam.type == "counter":
            names.add(fam.name + "_total")
        elif fam.type == "histogram":
            names.update(fam.name + s for s in ("_bucket", "_count", "_sum"))
        else:
            names.add(fam.name)
    return names


def test_expressions_name_only_metrics_of_a_real_scrape(proxy_factory, pg):
    proxy = proxy_factory(pool_mode="transaction")
    with psycopg.connect(proxy.dsn(pg.superuser, application_name="deploy-test"), autocommit=True) as c:
        c.execute("select 1")
        c.execute("create temporary table if not exists t_deploy (id int)")
        with pytest.raises(psycopg.Error):
            c.execute("select * from no_such_table_deploy")
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        c.execute("select g from generate_series(1, 3) g")
    proxy.flush_inspection()
    text = proxy.metrics()
    names = scrape_names(text)
    docs = (ROOT / "docs" / "metrics.md").read_text()

    sources = {"dashboard": dashboard_exprs(), "alert rules": [r["expr"] for r in alert_rules()]}
    for where, exprs in sources.items():
        used = {m for e in exprs for m in METRIC.findall(e)}
        assert used, where
        unknown = sorted(used - names)
        assert not unknown, f"{where} name metrics a real scrape does not have: {unknown}"
        for name in used:
            base = name if re.search(r"`%s[`{]" % name, docs) else re.sub(r"_(bucket|count|sum)$", "", name)
            assert re.search(r"`%s[`{]" % base, docs), f"{where}: {name} is not in docs/metrics.md"
    # The scrape really carries the data the dashboard shows.
    assert 'pgscope_query_duration_seconds_count{command="SELECT",db="pgscope_test"}' in text
    assert "pgscope_statement_info{" in text


# ------------------------------------------------------------------ Helm chart, without Helm

def chart_values() -> dict[str, Any]:
    return load_yaml(CHART / "values.yaml")


def template_texts() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((CHART / "templates").iterdir())}


def test_chart_metadata_and_image():
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2" and chart["name"] == "pgscope" and chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    with open(ROOT / "pyproject.toml", "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    assert chart["appVersion"] == version, "the image tag defaults to appVersion: keep it pgscope's version"
    values = chart_values()
    assert values["image"]["repository"] == "pgscope" and values["image"]["tag"] == ""
    for name in ("_helpers.tpl", "NOTES.txt", "configmap.yaml", "secret.yaml", "deployment.yaml",
                 "service.yaml", "servicemonitor.yaml", "prometheusrule.yaml", "pdb.yaml"):
        assert (CHART / "templates" / name).is_file(), name


def test_dockerfile_matches_the_chart():
    text = (ROOT / "Dockerfile").read_text()
    instructions = [ln for ln in text.splitlines() if ln and not ln.startswith(("#", " "))]
    froms = [ln for ln in instructions if ln.startswith("FROM ")]
    # a build stage with a compiler makes the wheel with the compiled cores; the image installs it
    assert froms == ["FROM python:3.11-slim AS build", "FROM python:3.11-slim"]
    assert "COPY pyproject.toml setup.py README.md ./" in instructions
    assert "pip wheel" in text and all(c in text for c in ("proxy/protocol/_core", "proxy/pool/_hot", "proxy/session/_hot")) and "gcc" in text
    assert "COPY --from=build /wheels /wheels" in instructions and "pip install /wheels/*.whl" in text
    user = next(ln for ln in instructions if ln.startswith("USER "))
    uid = user.split()[1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    values = chart_values()
    assert int(uid) == values["podSecurityContext"]["runAsUser"]
    assert instructions[-1] == 'ENTRYPOINT ["pgscope", "run"]'
    with open(ROOT / "pyproject.toml", "rb") as f:
        assert tomllib.load(f)["project"]["scripts"]["pgscope"] == "proxy.cli:main"
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "!proxy/" in ignore and "!pyproject.toml" in ignore and "!README.md" in ignore and "!setup.py" in ignore
    assert "**/*.so" in ignore  # a locally built core never slips into the build context


def value_at(values: dict[str, Any], dotted: str) -> bool:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_chart_templates_reference_only_existing_values():
    values = chart_values()
    refs = {m for text in template_texts().values() for m in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", text)}
    assert refs
    missing = sorted(r for r in refs if not value_at(values, r.rstrip(".")))
    assert not missing, f"templates use values that values.yaml does not have: {missing}"


def test_chart_includes_are_defined():
    texts = template_texts()
    defined = set(re.findall(r'define "([^"]+)"', texts["_helpers.tpl"]))
    used = {m for text in texts.values() for m in re.findall(r'include "([^"]+)"', text)}
    assert used and used <= defined, used - defined


def pgscope_keys() -> dict[str, set[str]]:
    from proxy.config import KEYS

    keys: dict[str, set[str]] = {}
    for k in KEYS:
        keys.setdefault(k.section, set()).add(k.name)
    return keys


def test_chart_config_values_are_pgscope_keys():
    keys = pgscope_keys()
    config = chart_values()["config"]
    for name, value in config.items():
        if isinstance(value, dict):
            assert name in keys and name, name
            assert set(value) <= keys[name], set(value) - keys[name]
        else:
            assert name in keys[""], name
            assert name not in CHART_OWNED_KEYS, f"{name} is set by the chart itself"


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float) and v == int(v):
        return str(int(v))
    if isinstance(v, (int, float)):
        return repr(v)
    raise TypeError(v)


def chart_toml(values: dict[str, Any]) -> str:
    """What the chart's "pgscope.configToml" renders, in Python (checked against Helm below)."""
    cfg = dict(values.get("config") or {})
    host = values["listenHost"]

    def hostport(port: Any) -> str:
        return f"[{host}]:{int(port)}" if ":" in host else f"{host}:{int(port)}"

    up = values["upstream"]
    cfg["listen"] = hostport(values["containerPorts"]["postgresql"])
    cfg["metrics_listen"] = hostport(values["containerPorts"]["metrics"])
    cfg["upstream"] = f"postgresql://{quote_plus(up['user'])}@{up['host']}:{int(up['port'])}/{quote_plus(up['database'])}"
    cfg["auth_file"] = "/etc/pgscope/secret/auth.txt"
    if (values.get("auth") or {}).get("hba"):
        cfg["auth_type"] = "hba"
        cfg["auth_hba_file"] = "/etc/pgscope/config/hba.conf"
    lines = [f"{k} = {toml_value(v)}" for k, v in sorted(cfg.items()) if not isinstance(v, dict) and v is not None]
    for section, keys in sorted(cfg.items()):
        if isinstance(keys, dict):
            lines += ["", f"[{section}]"]
            lines += [f"{k} = {toml_value(v)}" for k, v in sorted(keys.items()) if v is not None]
    return "\n".join(lines) + "\n"


def test_chart_default_config_passes_check_config(tmp_path):
    values = chart_values()
    effective = check_config(chart_toml(values), tmp_path)
    assert effective["listen"] == "0.0.0.0:6432" and effective["metrics_listen"] == "0.0.0.0:9930"
    assert effective["upstream"] == "postgresql://postgres@postgresql:5432/postgres"
    assert effective["auth_file"] == "/etc/pgscope/secret/auth.txt"
    for name, value in values["config"].items():
        if isinstance(value, dict):
            for sub, v in value.items():
                assert effective[f"{name}.{sub}"] == v, (name, sub)
        else:
            assert effective[name] == value, name
    shutdown = values["config"]["shutdown_timeout"]
    assert values["terminationGracePeriodSeconds"] > shutdown


def test_chart_probes_and_ports_in_values():
    values = chart_values()
    assert values["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert values["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert values["podSecurityContext"]["runAsNonRoot"] is True
    assert values["securityContext"]["readOnlyRootFilesystem"] is True
    assert values["securityContext"]["allowPrivilegeEscalation"] is False


# ------------------------------------------------------------------ Helm chart, rendered by Helm

@pytest.fixture(scope="module")
def rendered_default():
    helm.require()
    return helm.render(str(CHART))


FULL = {
    "upstream": {"password": "p@ss word+%/x"},
    "httpToken": "given-http-token-42",
    "auth": {"users": {"app": "s3cret", 'we"ird': 'pa"ss', "ro": "md5" + "0" * 32},
             "hba": 'host all app,"r o" 10.0.0.0/8 scram-sha-256\nhost all all 0.0.0.0/0 reject  # the rest\n'},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
    "podDisruptionBudget": {"enabled": True},
    "metrics": {"podAnnotations": False},
    "extraEnv": [{"name": "PGSCOPE_LOG_LEVEL", "value": "debug"}],
    "listenHost": "::",
    "config": {
        "pool_mode": "transaction", "pool_size": 50, "reserve_pool_timeout": 2.5, "metrics_require_token": True,
        "server_reset_query": 'DISCARD ALL; -- "quoted" \\ back\tslash é',
        "inspect": {"queue_size": 2000000, "slow_query_ms": 250, "explain_sample_rate": 0.25,
                    "nplusone_allow_apps": "batch,cron"},
        "advisor": {"min_benefit": 0.3},
    },
}


@pytest.fixture(scope="module")
def rendered_full():
    helm.require()
    return helm.render(str(CHART), FULL)


def assert_clean(r: helm.Rendered) -> None:
    assert not r.problems(), f"helm lint: {r.lint}\n{r.log[-3000:]}"
    assert not r.lint.get("Errors"), r.lint
    assert not r.fails, r.fails
    assert "templates/deployment.yaml" in r.files, r.log[-3000:]


def container(kinds: dict[str, Any]) -> dict[str, Any]:
    (c,) = kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def test_ci_installs_the_helm_sdkpy_the_tests_expect():
    assert f"helm-sdkpy=={helm.HELM_SDKPY_VERSION}" in (ROOT / ".ci" / "run").read_text()


def test_helm_lints_and_renders_the_defaults(rendered_default, tmp_path):
    r = rendered_default
    assert_clean(r)
    kinds = r.kinds()
    assert set(kinds) == {"ConfigMap", "Secret", "Service", "ServiceAccount", "Deployment"}
    chart = load_yaml(CHART / "Chart.yaml")
    c = container(kinds)
    assert c["image"] == f"pgscope:{chart['appVersion']}"
    assert c["args"] == ["--config", "/etc/pgscope/config/pgscope.toml"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"postgresql": 6432, "metrics": 9930}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # no upstream password by default; the HTTP token, generated into the chart's Secret
    assert [e["name"] for e in c["env"]] == ["PGSCOPE_HTTP_TOKEN"]
    assert c["env"][0]["valueFrom"]["secretKeyRef"] == {"name": kinds["Secret"]["metadata"]["name"],
                                                        "key": "http-token"}
    token = base64.b64decode(kinds["Secret"]["data"]["http-token"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{40}", token)
    pod = kinds["Deployment"]["spec"]["template"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9930"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["config"] == "/etc/pgscope/config" and mounts["secret"] == "/etc/pgscope/secret"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["secret"]["secret"]["items"] == [{"key": "auth.txt", "path": "auth.txt"}]
    assert pod["spec"]["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    svc_ports = {p["name"]: p for p in kinds["Service"]["spec"]["ports"]}
    assert svc_ports["metrics"]["targetPort"] == "metrics" and svc_ports["postgresql"]["port"] == 6432
    assert kinds["Service"]["spec"]["selector"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]

    toml_text = kinds["ConfigMap"]["data"]["pgscope.toml"]
    assert tomllib.loads(toml_text) == tomllib.loads(chart_toml(chart_values()))
    effective = check_config(toml_text, tmp_path, env={"PGSCOPE_HTTP_TOKEN": token})
    assert effective["listen"] == "0.0.0.0:6432" and effective["auth_type"] == ""
    assert effective["http_token"] == "***" and effective["metrics_require_token"] is False
    notes = r.files["templates/NOTES.txt"]
    assert "NOTE: auth.users is empty" in notes
    assert "Authorization: Bearer $PGSCOPE_HTTP_TOKEN" in notes and "WARNING" not in notes
    assert "bearerTokenSecret" not in r.files["templates/servicemonitor.yaml"]


def test_helm_renders_every_option(rendered_full, tmp_path):
    from proxy.config import parse_upstream
    from proxy.protocol.auth import parse_userlist

    r = rendered_full
    assert_clean(r)
    kinds = r.kinds()
    assert set(kinds) == {"ConfigMap", "Secret", "Service", "ServiceAccount", "Deployment", "ServiceMonitor",
                          "PrometheusRule", "PodDisruptionBudget"}
    # The configuration: every type through Helm's values (numbers arrive as float64) and TOML.
    toml_text = kinds["ConfigMap"]["data"]["pgscope.toml"]
    values = helm.merge(chart_values(), FULL)
    assert tomllib.loads(toml_text) == tomllib.loads(chart_toml(values))
    hba_file = tmp_path / "hba.conf"  # the ConfigMap's hba.conf, where auth_hba_file names it in the pod
    hba_file.write_text(kinds["ConfigMap"]["data"]["hba.conf"])
    effective = check_config(toml_text, tmp_path, env={"PGSCOPE_HTTP_TOKEN": FULL["httpToken"],
                                                       "PGSCOPE_AUTH_HBA_FILE": str(hba_file)})
    assert effective["metrics_require_token"] is True
    assert effective["listen"] == "[::]:6432" and effective["metrics_listen"] == "[::]:9930"
    assert effective["pool_size"] == 50 and effective["reserve_pool_timeout"] == 2.5
    assert effective["server_reset_query"] == FULL["config"]["server_reset_query"]
    assert effective["inspect.queue_size"] == 2000000 and effective["inspect.slow_query_ms"] == 250.0
    assert effective["inspect.explain_sample_rate"] == 0.25 and effective["advisor.min_benefit"] == 0.3
    # The Secret: the userlist as pgscope parses it, the password percent-encoded for the URL.
    secret = {k: base64.b64decode(v).decode() for k, v in kinds["Secret"]["data"].items()}
    assert parse_userlist(secret["auth.txt"]) == FULL["auth"]["users"]
    assert unquote(secret["upstream-password"]) == FULL["upstream"]["password"]
    assert secret["http-token"] == FULL["httpToken"]
    # The container's environment: Kubernetes expands $(UPSTREAM_PASSWORD) into PGSCOPE_UPSTREAM.
    c = container(kinds)
    env = {e["name"]: e for e in c["env"]}
    assert env["UPSTREAM_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": kinds["Secret"]["metadata"]["name"], "key": "upstream-password"}
    assert list(env)[:2] == ["UPSTREAM_PASSWORD", "PGSCOPE_UPSTREAM"]
    url = env["PGSCOPE_UPSTREAM"]["value"].replace("$(UPSTREAM_PASSWORD)", secret["upstream-password"])
    up = parse_upstream(url)
    assert (up.user, up.password, up.host, up.port, up.dbname) == (
        "postgres", FULL["upstream"]["password"], "postgresql", 5432, "postgres")
    assert env["PGSCOPE_HTTP_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": kinds["Secret"]["metadata"]["name"], "key": "http-token"}
    effective = check_config(toml_text, tmp_path, env={"PGSCOPE_UPSTREAM": url, "PGSCOPE_LOG_LEVEL": "debug",
                                                       "PGSCOPE_HTTP_TOKEN": secret["http-token"],
                                                       "PGSCOPE_AUTH_HBA_FILE": str(hba_file)})
    assert effective["upstream"].startswith("postgresql://postgres:")
    assert FULL["upstream"]["password"] not in json.dumps(effective)
    assert env["PGSCOPE_LOG_LEVEL"]["value"] == "debug"
    pod = kinds["Deployment"]["spec"]["template"]
    assert "prometheus.io/scrape" not in pod["metadata"].get("annotations", {})
    # Monitoring objects.
    sm = kinds["ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics" and sm["spec"]["endpoints"][0]["path"] == "/metrics"
    # /metrics asks for the token (metrics_require_token): Prometheus sends it from the Secret
    assert sm["spec"]["endpoints"][0]["bearerTokenSecret"] == {"name": kinds["Secret"]["metadata"]["name"],
                                                               "key": "http-token"}
    assert sm["spec"]["selector"]["matchLabels"].items() <= kinds["Service"]["metadata"]["labels"].items()
    assert kinds["Service"]["metadata"]["labels"][sm["spec"]["jobLabel"]] == "pgscope"  # PgscopeDown's job
    rule = kinds["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["labels"]["release"] == "prom"
    assert rule["spec"] == load_yaml(ALERTS)
    pdb = kinds["PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    assert "NOTE: both serviceMonitor.enabled" not in r.files["templates/NOTES.txt"]


def test_helm_hba_rules_go_to_the_configmap(rendered_full, rendered_default):
    """auth.hba: the rules as hba.conf in the ConfigMap (mounted at /etc/pgscope/config), auth_type
    hba pointing at it, and the pods roll when the rules change; without it, none of that."""
    from proxy.protocol.hba import parse

    kinds = rendered_full.kinds()
    data = kinds["ConfigMap"]["data"]
    assert data["hba.conf"] == FULL["auth"]["hba"]
    rules = parse(data["hba.conf"])
    assert [r.method for r in rules] == ["scram-sha-256", "reject"] and rules[0].users.names == {"app", "r o"}
    toml = tomllib.loads(data["pgscope.toml"])
    assert (toml["auth_type"], toml["auth_hba_file"]) == ("hba", "/etc/pgscope/config/hba.conf")
    mounts = {m["name"]: m["mountPath"] for m in container(kinds)["volumeMounts"]}
    assert mounts["config"] == "/etc/pgscope/config"
    pod = kinds["Deployment"]["spec"]["template"]
    changed = helm.render(str(CHART), helm.merge(FULL, {"auth": {"hba": "host all all 10.0.0.0/8 md5\n"}})).kinds()
    assert changed["Deployment"]["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != \
        pod["metadata"]["annotations"]["checksum/config"]

    default = rendered_default.kinds()["ConfigMap"]["data"]
    assert "hba.conf" not in default
    assert "auth_type" not in tomllib.loads(default["pgscope.toml"]) or \
        tomllib.loads(default["pgscope.toml"])["auth_type"] != "hba"


def test_helm_renders_an_existing_secret():
    helm.require()
    r = helm.render(str(CHART), {"secret": {"existingSecret": "db-creds", "authFileKey": "userlist",
                                            "upstreamPasswordKey": "pw", "httpTokenKey": "api-token"},
                                 "serviceMonitor": {"enabled": True}, "config": {"metrics_require_token": True}})
    assert_clean(r)
    kinds = r.kinds()
    assert "Secret" not in kinds
    c = container(kinds)
    env = {e["name"]: e for e in c["env"]}
    assert env["UPSTREAM_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "db-creds", "key": "pw"}
    assert env["PGSCOPE_HTTP_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "db-creds", "key": "api-token"}
    sm = kinds["ServiceMonitor"]["spec"]["endpoints"][0]
    assert sm["bearerTokenSecret"] == {"name": "db-creds", "key": "api-token"}
    pod = kinds["Deployment"]["spec"]["template"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["secret"]["secret"]["secretName"] == "db-creds"
    assert volumes["secret"]["secret"]["items"] == [{"key": "userlist", "path": "auth.txt"}]
    assert "checksum/secret" not in pod["metadata"]["annotations"]

    r = helm.render(str(CHART), {"secret": {"existingSecret": "db-creds", "upstreamPasswordKey": ""}})
    assert_clean(r)
    assert [e["name"] for e in container(r.kinds())["env"]] == ["PGSCOPE_HTTP_TOKEN"]

    # no token at all: no environment, and the notes say the API is open
    r = helm.render(str(CHART), {"secret": {"existingSecret": "db-creds", "upstreamPasswordKey": "",
                                            "httpTokenKey": ""}})
    assert_clean(r)
    assert "env" not in container(r.kinds())
    assert "WARNING: secret.httpTokenKey is \"\"" in r.files["templates/NOTES.txt"]
    # ... which metrics_require_token cannot do without
    r = helm.render(str(CHART), {"secret": {"existingSecret": "db-creds", "httpTokenKey": ""},
                                 "serviceMonitor": {"enabled": True}, "config": {"metrics_require_token": True}})
    assert any("metrics_require_token needs an HTTP token" in f for f in r.fails), r.fails


# ------------------------------------------------------------------ the sidecar example

def test_sidecar_example_is_consistent(tmp_path):
    from proxy.config import parse_upstream

    docs = {d["kind"]: d for d in yaml.safe_load_all(SIDECAR.read_text())}
    assert set(docs) == {"ConfigMap", "Deployment"}
    toml_text = docs["ConfigMap"]["data"]["pgscope.toml"]
    effective = check_config(toml_text, tmp_path)
    assert effective["listen"].startswith("127.0.0.1:")  # trust only over the pod's loopback
    assert effective["auth_type"] == "trust"
    pod = docs["Deployment"]["spec"]["template"]
    (side,) = pod["spec"]["initContainers"]
    assert side["restartPolicy"] == "Always"  # a native sidecar
    assert side["args"] == ["--config", "/etc/pgscope/config/pgscope.toml"]
    mount = next(m for m in side["volumeMounts"] if m["mountPath"] == "/etc/pgscope/config")
    assert next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])["configMap"]["name"] == \
        docs["ConfigMap"]["metadata"]["name"]
    metrics_port = int(effective["metrics_listen"].rsplit(":", 1)[1])
    assert {p["name"]: p["containerPort"] for p in side["ports"]} == {"metrics": metrics_port}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert side[probe]["httpGet"] == {"path": path, "port": "metrics"}, probe
    env = {e["name"]: e for e in side["env"]}
    assert not any(n.startswith("PGSCOPE_") and n != "PGSCOPE_UPSTREAM" for n in env)
    url = env["PGSCOPE_UPSTREAM"]["value"].replace("$(UPSTREAM_PASSWORD)", "s%40cret")
    assert parse_upstream(url).password == "s@cret"
    check_config(toml_text, tmp_path, env={"PGSCOPE_UPSTREAM": url})
    (app,) = pod["spec"]["containers"]
    app_url = next(e["value"] for e in app["env"] if e["name"] == "DATABASE_URL")
    assert f"@{effective['listen']}/" in app_url
