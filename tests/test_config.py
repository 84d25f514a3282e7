"""Settings: sources and precedence, validation messages, the generated file and docs, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from proxy.config import ConfigError, diff_reloadable, load_settings, parse_upstream
from proxy.config_docs import generate_example, generate_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults():
    s = load_settings(None, env={})
    assert (s.listen_host, s.listen_port) == ("127.0.0.1", 6432)
    assert (s.metrics_host, s.metrics_port) == ("127.0.0.1", 9930)
    assert s.pool_mode == "session" and s.pool_size == 20 and s.max_client_conn == 200
    assert s.inspect.enabled and s.inspect.max_fingerprints == 5000 and s.inspect.export_top_k == 100
    assert s.effective_auth_type == "trust"


def test_precedence_file_env_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('pool_size = 5\nquery_timeout = 3\n[inspect]\nslow_query_ms = 100\n')
    s = load_settings(str(f), env={})
    assert (s.pool_size, s.query_timeout, s.inspect.slow_query_ms) == (5, 3.0, 100.0)
    s = load_settings(str(f), env={"PGSCOPE_POOL_SIZE": "7", "PGSCOPE_INSPECT_SLOW_QUERY_MS": "50"})
    assert (s.pool_size, s.inspect.slow_query_ms) == (7, 50.0)
    s = load_settings(str(f), env={"PGSCOPE_POOL_SIZE": "7"}, overrides={"pool_size": 9, "listen": None})
    assert s.pool_size == 9 and s.listen == "127.0.0.1:6432"
    # the [advisor] section, in the file and as PGSCOPE_ADVISOR_<KEY> (docs/configuration.md)
    f.write_text('[advisor]\nmin_benefit = 0.2\n')
    assert load_settings(str(f), env={}).advisor.min_benefit == 0.2
    assert load_settings(str(f), env={"PGSCOPE_ADVISOR_MIN_BENEFIT": "0.3"}).advisor.min_benefit == 0.3


@pytest.mark.parametrize("source,expect", [
    ({"file": "pool_sizee = 1\n"}, 'unknown key "pool_sizee"'),
    ({"file": "[inspect]\nnope = 1\n"}, 'unknown key "inspect.nope"'),
    ({"env": {"PGSCOPE_POOL_SIZEE": "1"}}, 'unknown key "PGSCOPE_POOL_SIZEE"'),
    ({"overrides": {"bogus": 1}}, 'unknown key "bogus"'),
    ({"file": 'pool_size = "abc"\n'}, "pool_size: expected an integer"),
    ({"env": {"PGSCOPE_POOL_SIZE": "abc"}}, "pool_size: expected an integer, got 'abc' (from environment PGSCOPE_POOL_SIZE)"),
    ({"file": 'pool_mode = "bogus"\n'}, "pool_mode: expected one of session, transaction"),
    ({"file": 'listen = "nope"\n'}, "listen: expected HOST:PORT"),
    ({"file": 'listen = "127.0.0.1:70000"\n'}, "listen: port out of range"),
    ({"file": "pool_size = 0\n"}, "pool_size: expected a number >= 1"),
    ({"file": "min_pool_size = 30\n"}, "min_pool_size: 30 is more than pool_size 20"),
    ({"file": 'client_tls_mode = "require"\n'}, "client_tls_mode: needs client_tls_cert and client_tls_key"),
    ({"file": 'upstream = "mysql://x"\n'}, "upstream: expected a postgresql:// URL"),
    ({"file": "pool_size = \n"}, "not valid TOML"),
])
def test_errors_name_the_key_and_source(tmp_path, source, expect):
    path = None
    if "file" in source:
        path = tmp_path / "c.toml"
        path.write_text(source["file"])
    with pytest.raises(ConfigError) as ei:
        load_settings(str(path) if path else None, env=source.get("env", {}), overrides=source.get("overrides"))
    assert expect in str(ei.value)


def test_test_variables_are_ignored():
    assert load_settings(None, env={"PGSCOPE_TEST_DSN": "postgresql://x", "PATH": "/bin"}).pool_size == 20


def test_port_zero_and_ipv6():
    s = load_settings(None, env={}, overrides={"listen": "[::1]:0", "metrics_listen": ""})
    assert (s.listen_host, s.listen_port) == ("::1", 0)
    assert s.metrics_port == 0 and s.metrics_host is None


def test_upstream_url_forms():
    u = parse_upstream("postgresql://us%40er:p%3Ass@db.example:6543/my%20db")
    assert (u.user, u.password, u.host, u.port, u.dbname) == ("us@er", "p:ss", "db.example", 6543, "my db")
    u = parse_upstream("postgres://bob@localhost")
    assert (u.port, u.dbname, u.password) == (5432, None, None)
    u = parse_upstream("postgresql://bob@/app?host=/var/run/postgresql&port=5433")
    assert (u.host, u.port, u.dbname) == ("/var/run/postgresql", 5433, "app")
    s = load_settings(None, env={}, overrides={"upstream": "postgresql://u:secret@h:1/d"})
    assert s.redacted_upstream == "postgresql://u:***@h:1/d" and s.upstream_password == "secret"


def test_auth_type_auto():
    assert load_settings(None, env={}, overrides={"auth_file": "/x"}).effective_auth_type == "scram-sha-256"
    assert load_settings(None, env={}, overrides={"auth_file": "/x", "auth_type": "md5"}).effective_auth_type == "md5"


def test_diff_reloadable():
    a = load_settings(None, env={})
    b = load_settings(None, env={}, overrides={"pool_size": 3, "listen": "127.0.0.1:1",
                                               "inspect": {"slow_query_ms": 1, "queue_size": 5}})
    changed, frozen = diff_reloadable(a, b)
    assert set(changed) == {"pool_size", "inspect.slow_query_ms"}
    assert set(frozen) == {"listen", "inspect.queue_size"}


def test_generated_example_and_docs_are_current():
    with open(os.path.join(ROOT, "config", "pgscope.example.toml")) as f:
        assert f.read() == generate_example(), "run: python3 -m proxy.config_docs --toml > config/pgscope.example.toml"
    with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
        assert generate_markdown() in f.read(), "refresh the table in docs/configuration.md: python3 -m proxy.config_docs --markdown"
    assert load_settings(os.path.join(ROOT, "config", "pgscope.example.toml"), env={}) == load_settings(None, env={})


def _cli(*args, env=None):
    e = {k: v for k, v in os.environ.items() if not k.startswith("PGSCOPE_") or k.startswith("PGSCOPE_TEST_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=ROOT,
                          env=e, timeout=60)


def test_cli_check_config_and_version(tmp_path):
    ok = _cli("check-config", "config/pgscope.example.toml")
    assert ok.returncode == 0 and ok.stdout.startswith("ok")
    bad = tmp_path / "bad.toml"
    bad.write_text('pool_size = "many"\n')
    r = _cli("check-config", str(bad))
    assert r.returncode == 2 and "pool_size" in r.stderr
    r = _cli("check-config", "config/pgscope.example.toml", env={"PGSCOPE_POOL_MODE": "nope"})
    assert r.returncode == 2 and "PGSCOPE_POOL_MODE" in r.stderr
    v = _cli("--version")
    assert v.returncode == 0 and v.stdout.strip().startswith("pgscope ")
    s = _cli("check-config", "config/pgscope.example.toml", env={"PGSCOPE_UPSTREAM": "postgresql://u:topsecret@h/d"})
    assert "topsecret" not in s.stdout and "***" in s.stdout


def test_http_token_sources_and_checks(tmp_path):
    assert load_settings(None, env={}).http_token == ""
    assert load_settings(None, env={"PGSCOPE_HTTP_TOKEN": "t0k-en"}).http_token == "t0k-en"
    f = tmp_path / "token"
    f.write_text("from-file-123\nsecond line ignored\n")
    s = load_settings(None, env={"PGSCOPE_HTTP_TOKEN_FILE": str(f), "PGSCOPE_METRICS_REQUIRE_TOKEN": "true"})
    assert s.http_token == "from-file-123" and s.metrics_require_token
    # a changed file is a changed (reloadable) key
    f.write_text("rotated-456\n")
    changed, frozen = diff_reloadable(s, load_settings(None, env={"PGSCOPE_HTTP_TOKEN_FILE": str(f)}))
    assert "http_token" in changed and not frozen
    for env, expect in (
        ({"PGSCOPE_HTTP_TOKEN": "a", "PGSCOPE_HTTP_TOKEN_FILE": str(f)}, "set http_token or http_token_file"),
        ({"PGSCOPE_HTTP_TOKEN_FILE": str(tmp_path / "missing")}, "http_token_file: "),
        ({"PGSCOPE_HTTP_TOKEN": "has space"}, "http_token: expected printable ASCII"),
        ({"PGSCOPE_METRICS_REQUIRE_TOKEN": "true"}, "metrics_require_token: needs http_token"),
        ({"PGSCOPE_HTTP_TLS_CERT": "/x.pem"}, "http_tls_cert: needs http_tls_key"),
    ):
        with pytest.raises(ConfigError) as ei:
            load_settings(None, env=env)
        assert expect in str(ei.value), (env, str(ei.value))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_settings(None, env={"PGSCOPE_HTTP_TOKEN_FILE": str(tmp_path / "empty")})


def test_check_config_masks_the_http_token():
    s = _cli("check-config", "config/pgscope.example.toml", env={"PGSCOPE_HTTP_TOKEN": "very-secret-token"})
    assert s.returncode == 0 and "very-secret-token" not in s.stdout
    assert '"http_token": "***"' in s.stdout
