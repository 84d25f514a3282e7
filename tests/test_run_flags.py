"""Every ``pgscope run`` flag takes effect in a real ``pgscope run`` process, over a configuration
file that says otherwise (flags > environment > file), and ``--log-format console``.

The flags are proxy/commands.py's ``_RUN_FLAGS`` plus ``--config`` and ``--allow-trust-remote``;
the first test keeps this file's list in step with that table.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import psycopg
import pytest

from tests.support.client import login_error
from tests.support.proxy import ProxyProcess
from tests.support.tools import free_port
from tests.support.wire import wait_for

TESTED = {"--config", "--listen", "--upstream", "--pool-mode", "--metrics-listen", "--auth-type", "--auth-file",
          "--auth-hba-file", "--log-format", "--log-level", "--pool-size", "--max-client-conn", "--allow-trust-remote"}


def test_the_flags_tested_here_are_every_run_flag():
    import argparse

    from proxy.cli import build_parser

    parser = build_parser(["run"])
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    run = sub.choices["run"]
    flags = {s for a in run._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    assert flags == TESTED


def _file(tmp_path, text: str) -> str:
    path = tmp_path / "pgscope.toml"
    path.write_text(text)
    return str(path)


def test_flags_override_the_file(pg, tmp_path):
    """The file says: another upstream, session mode, pool_size 5, max_client_conn 50, trust, log level
    error, JSON logs; the flags say otherwise, and what happens is what the flags say."""
    users = tmp_path / "userlist.txt"
    users.write_text('"pgscope_md5" "md5pass"\n')
    cfg = _file(tmp_path, f'upstream = "postgresql://nobody@127.0.0.1:{free_port()}/nowhere"\n'
                          'pool_mode = "session"\npool_size = 5\nmax_client_conn = 50\nauth_type = "trust"\n'
                          'log_level = "error"\nlog_format = "json"\nquery_wait_timeout = 1.0\n')
    p = ProxyProcess(["--config", cfg, "--upstream", pg.dsn(), "--pool-mode", "transaction", "--pool-size", "1",
                      "--max-client-conn", "2", "--auth-type", "md5", "--auth-file", str(users),
                      "--log-level", "debug"]).wait_ready()
    try:
        dsn = p.dsn("pgscope_md5", "md5pass")
        # --auth-type md5 with --auth-file (the file said trust): a wrong password is refused
        assert login_error(p.dsn("pgscope_md5", "wrong")).sqlstate == "28P01"
        with psycopg.connect(dsn) as a, psycopg.connect(dsn, autocommit=True) as b:
            # --upstream: the file's upstream does not exist
            assert a.execute("select current_database()").fetchone() == ("pgscope_test",)
            pid = a.execute("select pg_backend_pid()").fetchone()[0]
            a.commit()
            # --pool-mode transaction with --pool-size 1: b runs on the server a used (in session mode
            # b could not even have logged in while a held the one server)
            assert b.execute("select pg_backend_pid()").fetchone() == (pid,)
            # --max-client-conn 2 (the file said 50): a third client is refused
            assert login_error(dsn).sqlstate == "53300"
            # --pool-size 1 (the file said 5): while a holds the server in a transaction, b gets none
            # within the file's query_wait_timeout (--config read where no flag says otherwise)
            a.execute("select 1")
            with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
                b.execute("select 2")  # (and pgscope closes b, as PgBouncer does)
            a.commit()
        # --log-level debug (the file said error): debug events are logged
        ev = p.wait_event("server_connected", db="pgscope_test", user="pgscope_md5")
        assert ev["level"] == "debug"
        # --metrics-listen: the HTTP endpoint is where the flag says
        with socket.create_connection(("127.0.0.1", p.metrics_port), timeout=5):
            pass
        text = _get(p.metrics_port, "/metrics")
        assert "pgscope_max_client_connections 2.0" in text
        assert 'pgscope_pool_size{db="pgscope_test",user="pgscope_md5"} 1.0' in text
    finally:
        p.stop()


def test_auth_hba_file_flag(pg, tmp_path):
    """--auth-type hba --auth-hba-file F: F's rules decide (the file given says trust for everyone)."""
    hba = tmp_path / "hba.conf"
    hba.write_text("host all pgscope_md5 127.0.0.1/32 reject\nhost all all 127.0.0.1/32 trust\n")
    cfg = _file(tmp_path, 'auth_type = "trust"\n')
    p = ProxyProcess(["--config", cfg, "--upstream", pg.dsn(), "--auth-type", "hba",
                      "--auth-hba-file", str(hba)]).wait_ready()
    try:
        with psycopg.connect(p.dsn(pg.superuser)) as c:  # the control: trust by the second rule
            assert c.execute("select 1").fetchone() == (1,)
        e = login_error(p.dsn("pgscope_md5", "md5pass"))
        assert e.sqlstate == "28000" and "auth_hba_file rejects connection" in str(e)
    finally:
        p.stop()


def _get(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


def test_listen_and_an_empty_metrics_listen(pg):
    port = free_port()
    metrics = free_port()
    out = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--upstream", pg.dsn(), "--listen",
                            f"127.0.0.1:{port}", "--metrics-listen", ""], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    try:
        def listening() -> bool:
            assert out.poll() is None, out.stdout.read().decode()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False
        wait_for(listening, timeout=30, what="pgscope on --listen")
        with psycopg.connect(f"postgresql://{pg.superuser}@127.0.0.1:{port}/pgscope_test", autocommit=True) as c:
            assert c.execute("select 1").fetchone() == (1,)
        # the default metrics address is 127.0.0.1:9930; with "" nothing listens for HTTP at all
        fds = subprocess.run(["ls", "-l", f"/proc/{out.pid}/fd"], capture_output=True, text=True).stdout
        inodes = {line.rsplit("socket:[", 1)[1].rstrip("]") for line in fds.splitlines() if "socket:[" in line}
        listening_ports = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for row in f.read().splitlines()[1:]:
                    cols = row.split()
                    if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                        listening_ports.add(int(cols[1].rsplit(":", 1)[1], 16))
        assert listening_ports == {port}, listening_ports
        assert metrics not in listening_ports
    finally:
        out.terminate()
        out.wait(30)
        out.stdout.close()


def test_allow_trust_remote(pg):
    """trust on a non-loopback address refuses to start; --allow-trust-remote lets it."""
    port = free_port()
    args = [sys.executable, "-m", "proxy", "run", "--listen", f"0.0.0.0:{port}", "--metrics-listen", "",
            "--upstream", pg.dsn(), "--auth-type", "trust"]
    refused = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "refusing_trust_on_remote_listen" in refused.stdout + refused.stderr
    p = subprocess.Popen(args + ["--allow-trust-remote"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            assert p.poll() is None, p.stdout.read().decode()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False
        wait_for(up, timeout=30, what="pgscope with --allow-trust-remote")
        with psycopg.connect(f"postgresql://{pg.superuser}@127.0.0.1:{port}/pgscope_test", autocommit=True) as c:
            assert c.execute("select 2").fetchone() == (2,)
    finally:
        p.terminate()
        p.wait(30)
        p.stdout.close()


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_log_format(pg, tmp_path, fmt):
    """--log-format console: human-readable lines (not JSON) with the event and its fields; json: one
    object per line. The file says the other format each time."""
    other = "json" if fmt == "console" else "console"
    cfg = _file(tmp_path, f'log_format = "{other}"\nlog_level = "debug"\n')
    p = ProxyProcess(["--config", cfg, "--upstream", pg.dsn(), "--log-format", fmt]).wait_ready()
    try:
        with psycopg.connect(p.dsn(pg.superuser), autocommit=True, application_name="flagged") as c:
            c.execute("select 1")

        def login_lines() -> list[str]:
            return [line for line in p.logs().splitlines() if "client_login" in line]
        lines = wait_for(login_lines, what="the client_login event")
    finally:
        p.stop()
    logged = [line for line in p.logs().splitlines() if line.strip()]
    assert logged
    parsed = []
    for line in logged:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            parsed.append(None)
    if fmt == "json":
        assert all(isinstance(x, dict) for x in parsed), logged
        return
    assert not any(isinstance(x, dict) for x in parsed), logged  # no JSON line at all
    line = lines[0]
    assert "db=pgscope_test" in line and f"user={pg.superuser}" in line, line
    assert "info" in line and not line.startswith("{"), line  # (client_login: info, log_connections)
    assert "\x1b[" not in line  # no colours: stderr is not a terminal
