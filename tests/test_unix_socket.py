"""Listening on a Unix socket (``unix_socket_dir``, PgBouncer's): psql, psycopg and asyncpg through
it in both pooling modes, cancel and the admin console over it, its mode, the client's pid as its
address, no TLS on it, and what happens to a socket file already there."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import threading
import time

import asyncpg
import psycopg
import pytest
import trustme

from tests.support.proxy import RunningProxy, make_settings
from tests.support.tools import require

DB = "pgscope_test"


@pytest.fixture
def sockdir(tmp_path):
    d = tmp_path / "sock"
    d.mkdir()
    d.chmod(0o777)
    return str(d)


def sock_file(sockdir: str, proxy) -> str:
    return os.path.join(sockdir, f".s.PGSQL.{proxy.port}")


def psql(sockdir: str, port: int, user: str, command: str, db: str = DB) -> subprocess.CompletedProcess:
    return subprocess.run([require("psql"), "-X", "-At", "-h", sockdir, "-p", str(port), "-U", user, "-d", db,
                           "-c", command], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PGCONNECT_TIMEOUT": "10"})


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_clients_through_the_unix_socket(proxy_factory, pg, sockdir, mode):
    proxy = proxy_factory(pool_mode=mode, unix_socket_dir=sockdir, admin_users=[pg.superuser])
    path = sock_file(sockdir, proxy)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o777  # the default mode, as PgBouncer's

    out = psql(sockdir, proxy.port, pg.superuser, "select 6 * 7")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42"

    with psycopg.connect(host=sockdir, port=proxy.port, user=pg.superuser, dbname=DB, autocommit=True) as c:
        assert c.info.host == sockdir  # libpq went through the socket, not TCP
        assert c.execute("select count(*) from generate_series(1, 1000)").fetchone() == (1000,)
        with c.transaction():
            c.execute("create temp table t_unix (x int)")
            c.execute("insert into t_unix select generate_series(1, 10)")
            assert c.execute("select sum(x) from t_unix").fetchone() == (55,)
        # this client shows as addr "unix", port its pid (the test process's), as in PgBouncer
        console_out = psql(sockdir, proxy.port, pg.superuser, "show clients", db="pgscope")
        assert console_out.returncode == 0, console_out.stderr
        assert f"|unix|{os.getpid()}|" in console_out.stdout, console_out.stdout

    async def with_asyncpg():
        con = await asyncpg.connect(host=sockdir, port=proxy.port, user=pg.superuser, database=DB)
        try:
            assert await con.fetchval("select $1::int + 1", 41) == 42
            stmt = await con.prepare("select $1::text || 'x'")
            assert await stmt.fetchval("a") == "ax"
            assert await stmt.fetchval("b") == "bx"
        finally:
            await con.close()

    asyncio.run(with_asyncpg())


def test_cancel_through_the_unix_socket(proxy_factory, pg, sockdir):
    proxy = proxy_factory(unix_socket_dir=sockdir)
    with psycopg.connect(host=sockdir, port=proxy.port, user=pg.superuser, dbname=DB, autocommit=True) as c:
        assert c.execute("select 1").fetchone() == (1,)  # positive control: the connection works
        timer = threading.Timer(0.5, c.cancel_safe)  # the CancelRequest goes to the same socket
        timer.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                c.execute("select pg_sleep(30)")
        finally:
            timer.cancel()
        assert time.monotonic() - t0 < 20
        assert c.execute("select 2").fetchone() == (2,)


def test_mode_group_and_abstract_name(proxy_factory, pg, sockdir):
    proxy = proxy_factory(unix_socket_dir=sockdir, unix_socket_mode="0700", unix_socket_group="root")
    st = os.lstat(sock_file(sockdir, proxy))
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_gid == 0

    name = f"@pgscope-test-{os.getpid()}-{time.monotonic_ns()}"
    abstract = proxy_factory(unix_socket_dir=name)
    assert not os.path.exists(name)
    out = psql(name, abstract.port, pg.superuser, "select 5")  # libpq spells abstract sockets "@name"
    assert out.returncode == 0 and out.stdout.strip() == "5", out.stderr


def test_no_unix_socket_unless_set(proxy_factory, pg, sockdir):
    on = proxy_factory(unix_socket_dir=sockdir)
    assert os.path.exists(sock_file(sockdir, on))  # positive control
    off = proxy_factory()
    assert not os.path.exists(sock_file(sockdir, off))
    assert sorted(os.listdir(sockdir)) == [f".s.PGSQL.{on.port}"]


def test_no_tls_over_the_unix_socket(proxy_factory, pg, sockdir, tmp_path):
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    proxy = proxy_factory(unix_socket_dir=sockdir, client_tls_mode="require", client_tls_cert=str(cert),
                          client_tls_key=str(key))
    with pytest.raises(psycopg.OperationalError) as ei:  # the control: TCP without TLS is refused
        psycopg.connect(proxy.dsn(pg.superuser), sslmode="disable")
    assert "SSL required" in str(ei.value)
    # over the socket: not required (PostgreSQL's and PgBouncer's rule) and not offered
    with psycopg.connect(host=sockdir, port=proxy.port, user=pg.superuser, dbname=DB, sslmode="disable") as c:
        assert not c.pgconn.ssl_in_use and c.execute("select 1").fetchone() == (1,)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock_file(sockdir, proxy))
        s.sendall((8).to_bytes(4, "big") + (80877103).to_bytes(4, "big"))  # SSLRequest
        assert s.recv(1) == b"N"


def test_a_stale_socket_file_is_replaced_and_removed_at_close(pg, sockdir):
    from tests.support.tools import free_port

    port = free_port()
    path = os.path.join(sockdir, f".s.PGSQL.{port}")
    left = socket.socket(socket.AF_UNIX)  # bound, never listening, closed: what a killed process leaves
    left.bind(path)
    left.close()
    assert os.path.exists(path)
    proxy = RunningProxy(make_settings(pg, listen=f"127.0.0.1:{port}", unix_socket_dir=sockdir)).start()
    try:
        with psycopg.connect(host=sockdir, port=port, user=pg.superuser, dbname=DB) as c:
            assert c.execute("select 3").fetchone() == (3,)
    finally:
        proxy.stop()
    assert not os.path.exists(path)  # removed at shutdown


def test_a_socket_in_use_is_not_taken(proxy_factory, pg, sockdir):
    first = proxy_factory(unix_socket_dir=sockdir)
    path = sock_file(sockdir, first)
    inode = os.lstat(path).st_ino
    with socket.socket() as s:  # a second pgscope on the same port number: another TCP address
        s.bind(("127.0.0.2", first.port))
    second = RunningProxy(make_settings(pg, listen=f"127.0.0.2:{first.port}", unix_socket_dir=sockdir))
    with pytest.raises(OSError, match="in use"):
        second.start()
    assert os.lstat(path).st_ino == inode  # the first one's socket is untouched and still answers
    with psycopg.connect(host=sockdir, port=first.port, user=pg.superuser, dbname=DB) as c:
        assert c.execute("select 4").fetchone() == (4,)

    lock = os.path.join(sockdir, ".s.PGSQL.1.lock")  # PostgreSQL's lock file beside a socket
    with open(lock, "w") as f:
        f.write("1\n")
    from proxy.listening import claim

    with pytest.raises(OSError, match="lock"):
        claim(os.path.join(sockdir, ".s.PGSQL.1"))
    with pytest.raises(OSError, match="not a socket"):
        claim(lock)  # a file of another kind


def test_unix_socket_from_the_command_line(pg, sockdir):
    """``pgscope run`` with the setting in its environment: the listening log line names the socket,
    and SIGTERM removes it."""
    from tests.support.proxy import ProxyProcess

    proc = ProxyProcess(["--upstream", pg.dsn()], env={"PGSCOPE_UNIX_SOCKET_DIR": sockdir})
    path = os.path.join(sockdir, f".s.PGSQL.{proc.port}")
    try:
        proc.wait_ready()
        assert os.path.exists(path)
        out = psql(sockdir, proc.port, pg.superuser, "select 'via unix'")
        assert out.returncode == 0 and out.stdout.strip() == "via unix", out.stderr
        proc.wait_event("listening", unix_socket=path)
    finally:
        assert proc.stop() == 0
    assert not os.path.exists(path)
