"""Signals to a real `pgscope run` process: SIGHUP reloads (auth file, pool_size, max_client_conn),
SIGINT/SIGTERM drain, a second signal forces, and shutdown_timeout ends what is still open."""

from __future__ import annotations

import signal
import time

import psycopg
import pytest

from proxy.protocol import messages as m
from tests.support.client import login_error
from tests.support.proxy import ProxyProcess
from tests.support.wire import WireClient


def _config(tmp_path, pg, **settings) -> str:
    lines = [f'upstream = "{pg.dsn()}"', 'log_level = "info"']
    for k, v in settings.items():
        lines.append(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {str(v).lower() if isinstance(v, bool) else v}")
    cfg = tmp_path / "pgscope.toml"
    cfg.write_text("\n".join(lines).replace("'", '"') + "\n")
    return str(cfg)


def _reload(p: ProxyProcess, n: int) -> dict:
    """Send SIGHUP and wait for the n-th ``reloaded`` event."""
    p.signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        evs = [e for e in p.events() if e.get("event") in ("reloaded", "reload_failed")]
        if len(evs) >= n:
            assert evs[n - 1]["event"] == "reloaded", evs[n - 1]
            return evs[n - 1]
        time.sleep(0.05)
    raise AssertionError(f"no reload: {p.logs()[-2000:]}")


def test_sighup_reloads_the_auth_file(pg, tmp_path):
    users = tmp_path / "userlist.txt"
    users.write_text('"pgscope_md5" "md5pass"\n')
    cfg = _config(tmp_path, pg, auth_type="md5", auth_file=str(users))
    p = ProxyProcess(["--config", cfg]).wait_ready()
    try:
        with psycopg.connect(p.dsn("pgscope_md5", "md5pass"), autocommit=True) as c:
            assert c.execute("select current_user").fetchone() == ("pgscope_md5",)
            assert login_error(p.dsn("pgscope_scram", "scrampass")).sqlstate == "28P01"  # not in the file yet
            users.write_text('"pgscope_scram" "scrampass"\n')  # pgscope_md5 removed, pgscope_scram added
            _reload(p, 1)  # the config file itself did not change
            with psycopg.connect(p.dsn("pgscope_scram", "scrampass"), autocommit=True) as c2:
                assert c2.execute("select current_user").fetchone() == ("pgscope_scram",)
            assert login_error(p.dsn("pgscope_md5", "md5pass")).sqlstate == "28P01"
            assert c.execute("select 1").fetchone() == (1,)  # a client logged in before stays
    finally:
        p.stop()


def test_sighup_changes_pool_size_and_max_client_conn_live(pg, tmp_path):
    base = dict(pool_mode="transaction", query_wait_timeout=1.0)
    cfg = _config(tmp_path, pg, pool_size=1, max_client_conn=2, **base)
    p = ProxyProcess(["--config", cfg]).wait_ready()
    a = psycopg.connect(p.dsn(pg.superuser))
    try:
        b = psycopg.connect(p.dsn(pg.superuser))  # (a login takes a server for a moment)
        a.execute("select 1")  # a transaction open: a holds the pool's one server
        with b:
            assert login_error(p.dsn(pg.superuser)).sqlstate == "53300"  # a third client
            with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
                b.execute("select 2")  # no server for b within query_wait_timeout
        _config(tmp_path, pg, pool_size=2, max_client_conn=3, **base)
        ev = _reload(p, 1)
        assert {"pool_size", "max_client_conn"} <= set(ev["changed"]), ev
        with psycopg.connect(p.dsn(pg.superuser)) as b, psycopg.connect(p.dsn(pg.superuser)) as c:
            assert b.execute("select 2").fetchone() == (2,)  # a second server, while a holds the first
            assert login_error(p.dsn(pg.superuser)).sqlstate == "53300"  # the fourth client
            with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
                c.execute("select 3")  # and no third server
        assert a.execute("select 4").fetchone() == (4,)
        a.commit()
    finally:
        a.close()
        p.stop()


def _readyz(p) -> int:
    import urllib.error
    import urllib.request

    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/readyz", timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_drains_then_exits(pg, tmp_path, sig):
    p = ProxyProcess(["--config", _config(tmp_path, pg, shutdown_timeout=30)]).wait_ready()
    try:
        w = WireClient(p.port, pg.superuser, "pgscope_test")
        w.send(m.query("begin; select 1"))
        w.read_until(b"Z")
        assert _readyz(p) == 200  # (positive control)
        p.signal(sig)
        p.wait_event("draining")
        assert _readyz(p) == 503  # not ready while draining: a load balancer sends no one new
        with pytest.raises(psycopg.OperationalError):  # no new clients while draining
            psycopg.connect(p.dsn(pg.superuser), connect_timeout=3)
        w.send(m.query("select 2"))  # the open transaction goes on ...
        assert any(t == b"D" for t, _ in w.read_until(b"Z"))
        assert p.proc.poll() is None
        w.send(m.query("commit"))  # ... and once it ends, the proxy exits
        msgs = w.read_to_eof(timeout=15)
        assert b"C" in [t for t, _ in msgs], msgs
        assert p.proc.wait(15) == 0
        ev = [e for e in p.events() if e.get("event") == "signal"]
        assert [(e["signal"], e["action"]) for e in ev] == [(sig.name, "drain")]
    finally:
        p.stop()


def test_a_second_signal_forces_shutdown(pg, tmp_path):
    p = ProxyProcess(["--config", _config(tmp_path, pg, shutdown_timeout=60)]).wait_ready()
    try:
        w = WireClient(p.port, pg.superuser, "pgscope_test")
        w.send(m.query("begin; select 1"))
        w.read_until(b"Z")
        p.signal(signal.SIGINT)
        p.wait_event("draining")
        w.send(m.query("select 2"))  # draining, the transaction still runs
        assert any(t == b"D" for t, _ in w.read_until(b"Z"))
        t0 = time.monotonic()
        p.signal(signal.SIGTERM)
        assert p.proc.wait(15) == 0
        assert time.monotonic() - t0 < 10  # far sooner than shutdown_timeout
        w.read_to_eof(timeout=10)  # the client was closed
        ev = [(e["signal"], e["action"]) for e in p.events() if e.get("event") == "signal"]
        assert ev == [("SIGINT", "drain"), ("SIGTERM", "force")]
    finally:
        p.stop()


def test_shutdown_timeout_ends_an_open_transaction(pg, tmp_path):
    p = ProxyProcess(["--config", _config(tmp_path, pg, shutdown_timeout=1.5)]).wait_ready()
    try:
        w = WireClient(p.port, pg.superuser, "pgscope_test")
        w.send(m.query("begin; select 1"))
        w.read_until(b"Z")
        t0 = time.monotonic()
        p.signal(signal.SIGTERM)
        msgs = w.read_to_eof(timeout=20)
        waited = time.monotonic() - t0
        assert 1.4 <= waited < 15, waited
        assert msgs and msgs[-1][0] == b"E", msgs
        fields = m.decode_error_fields(msgs[-1][1])
        assert fields["C"] == "57P01" and "administrator command" in fields["M"], fields
        assert p.proc.wait(15) == 0
    finally:
        p.stop()
