"""Documented pooling behaviour through a running proxy: server_reset_query_always in transaction
mode, server_reuse in session mode, cancel requests from clients that speak TLS to pgscope, and
application_name_add_host."""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.request

import psycopg
import pytest
import trustme

from tests.support.proxy import ProxyProcess
from tests.support.wire import wait_for


@pytest.mark.parametrize("always", [False, True], ids=["not-always", "always"])
def test_server_reset_query_always(proxy_factory, pg, always):
    """A session-level setting made with set_config() (no SET statement, so nothing pins the client)
    stays on the one server for the next client's transaction, unless server_reset_query_always
    runs server_reset_query after every transaction."""
    p = proxy_factory(pool_mode="transaction", pool_size=1, server_reset_query="DISCARD ALL",
                      server_reset_query_always=always)
    with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as a, \
            psycopg.connect(p.dsn(pg.superuser), autocommit=True) as b:
        pid = a.execute("select pg_backend_pid()").fetchone()[0]
        a.execute("select set_config('work_mem', '7MB', false)")
        assert b.execute("select pg_backend_pid()").fetchone() == (pid,)  # the same, only server
        seen = b.execute("show work_mem").fetchone()[0]
    assert p.proxy.ctx.rules.pins == 0
    if always:
        assert seen != "7MB"
    else:
        assert seen == "7MB"  # the control: without the reset the setting leaks


def _pool_servers(p) -> list[tuple[int, bool]]:
    """(pid, idle) of every server pgscope holds, from inside its loop."""
    def read():
        out = []
        for pool in p.proxy.pools.all_pools():
            out += [(s.pid, True) for s in pool.idle if not s.closed]
            out += [(s.pid, False) for s in pool.active]
        return out
    return p.call(read)


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
def test_server_reuse(proxy_factory, pg, reuse):
    """Session mode: a server whose client left goes to the next client (its pid with it), or
    with server_reuse = false is closed, the next client getting a spare opened ahead
    (min_pool_size) whose process nobody used, as connected directly."""
    p = proxy_factory(pool_mode="session", pool_size=3, min_pool_size=1, server_reuse=reuse)
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        def alive(pid: int) -> bool:
            return admin.execute("select count(*) from pg_stat_activity where pid = %s",
                                 (pid,)).fetchone()[0] == 1

        with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as a:
            pid_a = a.info.backend_pid
            assert a.execute("select pg_backend_pid()").fetchone() == (pid_a,)  # the real pid
            a.execute("create temp table left_behind (x int)")
            assert a.execute("select count(*) from pg_tables where tablename = 'left_behind'").fetchone() == (1,)
            assert alive(pid_a)  # the control for the checks below
        if reuse:
            wait_for(lambda: (pid_a, True) in _pool_servers(p), 10, "the server back in the pool")
        else:
            wait_for(lambda: not alive(pid_a), 10, "the departed client's server process gone")
            wait_for(lambda: [s for s in _pool_servers(p) if s[1]], 10, "a spare server open")
        spare = [pid for pid, idle in _pool_servers(p) if idle]
        with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as b:
            pid_b = b.info.backend_pid
            assert b.execute("select pg_backend_pid()").fetchone() == (pid_b,)
            temp = b.execute("select count(*) from pg_tables where tablename = 'left_behind'").fetchone()[0]
        assert temp == 0  # reset (DISCARD ALL) or a new process: nothing of a's is left
        assert pid_b in spare  # an idle server, no wait for one to start
        if reuse:
            assert pid_b == pid_a  # LIFO: the server a just left
        else:
            assert pid_b != pid_a
            wait_for(lambda: not alive(pid_b), 10, "b's server process gone too")


def test_server_reuse_is_session_mode_only(proxy_factory, pg):
    """Transaction mode shares servers between clients by definition: server_reuse = false
    does not close a server after each transaction."""
    p = proxy_factory(pool_mode="transaction", pool_size=1, server_reuse=False)
    with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as a:
        first = a.execute("select pg_backend_pid()").fetchone()[0]
        assert a.execute("select pg_backend_pid()").fetchone() == (first,)
    with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as b:
        assert b.execute("select pg_backend_pid()").fetchone() == (first,)


def _sockopts(p, *opts: tuple[int, int]) -> list[tuple[int, ...]]:
    """The options ``opts`` ((level, name) pairs) of the one client's socket and of its server's,
    read on the proxy's loop."""
    def read():
        (s,) = [s for s in p.proxy.sessions if s.server is not None]
        return [tuple(t.get_extra_info("socket").getsockopt(level, name) for level, name in opts)
                for t in (s.transport, s.server.transport)]
    return p.call(read)


def _buffers(p) -> list[tuple[int, ...]]:
    """(SO_SNDBUF, SO_RCVBUF) of the one client's socket and of its server's."""
    return _sockopts(p, (socket.SOL_SOCKET, socket.SO_SNDBUF), (socket.SOL_SOCKET, socket.SO_RCVBUF))


KEEPALIVE = ((socket.SOL_SOCKET, socket.SO_KEEPALIVE), (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
             (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL), (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
             (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))


def test_tcp_keepalive_settings(proxy_factory, pg):
    """tcp_keepalive (on by default, as PgBouncer's) and its timing keys reach the client's and the
    server's TCP sockets; tcp_keepalive = false leaves SO_KEEPALIVE off."""
    def opts(**settings):
        p = proxy_factory(pool_mode="session", **settings)
        with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as c:
            c.execute("select 1")
            return _sockopts(p, *KEEPALIVE)
    off = opts(tcp_keepalive=False)
    assert [o[0] for o in off] == [0, 0]  # the control: nobody else turns it on
    default = opts()
    assert [o[0] for o in default] == [1, 1]
    assert default[0][1:] == default[1][1:] != (61, 7, 4, 12_345)  # the kernel's timing
    tuned = opts(tcp_keepidle=61, tcp_keepintvl=7, tcp_keepcnt=4, tcp_user_timeout=12_345)
    assert tuned == [(1, 61, 7, 4, 12_345)] * 2


def test_tcp_settings_reload_for_new_connections(proxy_factory, pg):
    """A reload (SIGHUP) gives the tcp_* settings to the connections opened after it, client and
    server side, in every pool."""
    from tests.support.proxy import make_settings

    p = proxy_factory(pool_mode="session", server_reuse=False)  # each client: a new server
    with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as c:
        c.execute("select 1")
        before = _sockopts(p, *KEEPALIVE)
    assert before[0][1:] != (61, 7, 4, 12_345)
    p.call(p.proxy.reload, make_settings(pg, pool_mode="session", server_reuse=False, tcp_keepidle=61,
                                         tcp_keepintvl=7, tcp_keepcnt=4, tcp_user_timeout=12_345))
    with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as c:
        c.execute("select 1")
        assert _sockopts(p, *KEEPALIVE) == [(1, 61, 7, 4, 12_345)] * 2


def test_tcp_socket_buffer(proxy_factory, pg):
    """tcp_socket_buffer fixes SO_SNDBUF and SO_RCVBUF of the client's and the server's TCP sockets
    (Linux doubles the value it is given), as PgBouncer's setting does; 0 leaves the kernel's
    sizes. With a small buffer a 16 MiB COPY still goes through both ways, every byte, no stall."""
    assert pg.dsn().startswith("postgresql://") and "127.0.0.1" in pg.dsn()  # TCP to PostgreSQL too
    size = 50_000  # no kernel default is 100,000
    default = proxy_factory(pool_mode="session")
    with psycopg.connect(default.dsn(pg.superuser), autocommit=True) as c:
        c.execute("select 1")
        assert all(b != (2 * size, 2 * size) for b in _buffers(default))  # the control
    p = proxy_factory(pool_mode="session", tcp_socket_buffer=size)
    with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as c:
        c.execute("select 1")
        assert _buffers(p) == [(2 * size, 2 * size), (2 * size, 2 * size)]
        c.execute("create temporary table t_sockbuf (line text)")
        row = "x" * 1000 + "\n"
        with c.cursor() as cur:
            with cur.copy("copy t_sockbuf from stdin") as cp:
                for _ in range(16):
                    cp.write(row * 1024)
            assert c.execute("select count(*), sum(length(line)) from t_sockbuf").fetchone() == (16384, 16384000)
            got = 0
            with cur.copy("copy t_sockbuf to stdout") as cp:
                for chunk in cp:
                    got += len(chunk)
            assert got == 16384 * 1001


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cancel-certs")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(d / "server.crt"))
    leaf.private_key_pem.write_to_path(str(d / "server.key"))
    os.chmod(d / "server.key", 0o600)
    return {"ca": str(d / "ca.pem"), "cert": str(d / "server.crt"), "key": str(d / "server.key")}


def _cancel_a_sleep(conn, cancel) -> float:
    """Run pg_sleep(30) on ``conn``, cancel it with ``cancel()`` once it runs: seconds until it ended."""
    result: list = []

    def run():
        try:
            conn.execute("select pg_sleep(30)")
            result.append("finished")
        except psycopg.Error as e:
            result.append(e)
    t = threading.Thread(target=run)
    t.start()
    try:
        wait_for(lambda: _sleeping(conn), timeout=15, what="pg_sleep running")
        t0 = time.monotonic()
        cancel()
        t.join(20)
        assert not t.is_alive(), "the cancel did not reach the server"
        return time.monotonic() - t0
    finally:
        t.join(30)
        assert result and isinstance(result[0], psycopg.errors.QueryCanceled), result


_ADMIN: list = []  # a direct connection to the test server, for pg_stat_activity


def _sleeping(conn) -> bool:
    admin = _ADMIN[0]
    return bool(admin.execute("select count(*) from pg_stat_activity where query = 'select pg_sleep(30)' "
                              "and state = 'active'").fetchone()[0])


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_cancel_over_tls(pg, certs, tmp_path, mode):
    """A client that speaks TLS to pgscope (client_tls_mode = require) cancels its running statement:
    libpq's encrypted cancel (PQcancelCreate, libpq 17+: SSLRequest, then the CancelRequest inside TLS)
    and the classic one (PQcancel: a CancelRequest in plain TCP, which PostgreSQL too accepts whatever
    its hba says). pgscope runs as its own process: psycopg's cancel() holds the GIL while libpq waits,
    which would stall a proxy running in the test's own process."""
    cfg = tmp_path / "pgscope.toml"
    cfg.write_text(f'upstream = "{pg.dsn()}"\npool_mode = "{mode}"\npool_size = 2\nclient_tls_mode = "require"\n'
                   f'client_tls_cert = "{certs["cert"]}"\nclient_tls_key = "{certs["key"]}"\n')
    p = ProxyProcess(["--config", str(cfg)]).wait_ready()
    try:
        with pg.connect() as admin:
            _ADMIN[:] = [admin]
            with psycopg.connect(p.dsn(pg.superuser), sslmode="verify-full", sslrootcert=certs["ca"],
                                 autocommit=True) as c:
                assert c.pgconn.ssl_in_use
                assert psycopg.pq.version() >= 170000  # cancel_safe() then negotiates TLS like the connection
                assert _cancel_a_sleep(c, c.cancel_safe) < 10
                assert c.execute("select 1").fetchone() == (1,)  # the connection goes on
                assert _cancel_a_sleep(c, c.cancel) < 10
                assert c.execute("select 2").fetchone() == (2,)
        with urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert "pgscope_cancel_requests_total 2.0" in text, [ln for ln in text.splitlines() if "cancel" in ln]
        # and only over TLS is a login possible: the plain cancel was no way in
        assert 'pgscope_clients_refused_total{reason="tls_required"}' not in text
        with pytest.raises(psycopg.OperationalError, match="SSL required"):
            psycopg.connect(p.dsn(pg.superuser), sslmode="disable")
    finally:
        p.stop()


@pytest.mark.parametrize("drain", [0.3, 30.0], ids=["expires", "waits"])
def test_server_drain_timeout(proxy_factory, pg, drain):
    """A client leaves (Terminate) with a 2 s statement running: within server_drain_timeout the server
    finishes it and goes back to the pool (the next client gets the same backend); past it the
    server is closed instead and the next client gets a new one at once."""
    from proxy.protocol import messages as m
    from tests.support.wire import WireClient

    p = proxy_factory(pool_mode="transaction", pool_size=1, server_drain_timeout=drain, query_wait_timeout=30.0)
    leaver = WireClient(p.port, pg.superuser, "pgscope_test")
    tag = f"drain-me-{os.getpid()}-{drain}"  # (the other case's closed server may still be sleeping)
    leaver.send(m.query(f"select pg_sleep(2) /* {tag} */"))
    with pg.connect() as admin:
        def running() -> int | None:
            row = admin.execute("select pid from pg_stat_activity where state = 'active' "
                                "and query like %s and pid <> pg_backend_pid()", (f"%{tag}%",)).fetchone()
            return row[0] if row else None
        pid = wait_for(running, what="the statement running")
        leaver.terminate()
        t0 = time.monotonic()
        with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as c:
            next_pid = c.execute("select pg_backend_pid()").fetchone()[0]
        took = time.monotonic() - t0
    if drain < 1:
        assert next_pid != pid and took < 1.5, (took, next_pid, pid)  # closed at 0.3 s, a new server
    else:
        assert next_pid == pid and took >= 1.0, (took, next_pid, pid)  # waited for the statement's end


def _closed_after(sock: socket.socket, t0: float, timeout: float = 15.0) -> tuple[float, bytes]:
    """Seconds from ``t0`` until the proxy closed ``sock``, and what it sent."""
    got = b""
    sock.settimeout(timeout)
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return time.monotonic() - t0, got
        got += chunk


def test_client_login_timeout(proxy_factory, pg, tmp_path):
    """A client that does not finish logging in within client_login_timeout is closed: silently before
    its startup packet, with 08P01 during authentication; one that logs in in time is not."""
    from proxy.protocol import messages as m
    from proxy.protocol.framing import Framer
    from proxy.protocol.scram import make_verifier

    users = tmp_path / "users.txt"
    users.write_text(f'"{pg.superuser}" "{make_verifier("pw")}"\n')
    proxy = proxy_factory(client_login_timeout=1.0, auth_type="scram-sha-256", auth_file=str(users))
    # the control: a client that answers at once logs in, and stays past the timeout
    with psycopg.connect(proxy.dsn(pg.superuser, password="pw"), autocommit=True) as c:
        t0 = time.monotonic()
        silent = socket.create_connection(("127.0.0.1", proxy.port))  # connects, says nothing
        stalled = socket.create_connection(("127.0.0.1", proxy.port))
        stalled.sendall(m.startup_message({"user": pg.superuser, "database": "pgscope_test"}))  # then no answer
        took, said = _closed_after(silent, t0)
        assert said == b"" and 0.9 <= took < 10, (took, said)
        took, said = _closed_after(stalled, t0)
        framer = Framer()
        framer.feed(said)
        msgs = list(framer.messages())
        assert [bytes([t]) for t, _ in msgs] == [b"R", b"E"], msgs  # the SCRAM request it never answered, then
        fields = m.decode_error_fields(msgs[1][1])
        assert fields["C"] == "08P01" and fields["M"] == "client login timed out", fields
        assert 0.9 <= took < 10, took
        assert c.execute("select 1").fetchone() == (1,)  # the logged-in client is still there
    # 0 turns it off (it does not mean at once): a silent client is still connected after 1.5 s
    off = proxy_factory(client_login_timeout=0.0)
    quiet = socket.create_connection(("127.0.0.1", off.port))
    quiet.settimeout(1.5)
    with pytest.raises(socket.timeout):
        quiet.recv(1)
    quiet.close()


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_application_name_add_host(proxy_factory, pg, mode, tmp_path):
    """The servers run with "app - address:port" of the client they serve, one server shared by two
    clients in transaction mode included; without the setting, the client's own name."""
    sockdir = tmp_path / "sock"
    sockdir.mkdir()
    plain = proxy_factory(pool_mode=mode)
    added = proxy_factory(pool_mode=mode, pool_size=1 if mode == "transaction" else 5, application_name_add_host=True,
                          unix_socket_dir=str(sockdir))

    def server_name(c) -> str:
        return c.execute("select application_name from pg_stat_activity where pid = pg_backend_pid()").fetchone()[0]

    def local_port(c) -> int:
        return socket.socket(fileno=os.dup(c.pgconn.socket)).getsockname()[1]

    with psycopg.connect(plain.dsn(pg.superuser), application_name="shop", autocommit=True) as c:
        assert server_name(c) == "shop"  # the control: the name the client gave
    with psycopg.connect(added.dsn(pg.superuser), application_name="shop", autocommit=True) as a, \
            psycopg.connect(added.dsn(pg.superuser), autocommit=True) as b:
        for _ in range(2):  # taking turns on the one server in transaction mode
            assert server_name(a) == f"shop - 127.0.0.1:{local_port(a)}"
            assert server_name(b) == f"app - 127.0.0.1:{local_port(b)}"  # no name given: "app", as PgBouncer
        if mode == "transaction":
            assert a.execute("select pg_backend_pid()").fetchone() == b.execute("select pg_backend_pid()").fetchone()
    with psycopg.connect(host=str(sockdir), port=added.port, user=pg.superuser, dbname="pgscope_test",
                         application_name="cron", autocommit=True) as u:
        assert server_name(u) == f"cron - unix({os.getpid()})"


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_server_round_robin(proxy_factory, pg, mode):
    """With two idle servers, server_round_robin hands them out in turn (transaction mode: a client's
    next transaction too; session mode: the next client); without it, the one released last."""
    def pids(p) -> list[int]:
        # two servers: two clients in a transaction at once
        with psycopg.connect(p.dsn(pg.superuser)) as a, psycopg.connect(p.dsn(pg.superuser)) as b:
            assert a.execute("select pg_backend_pid()").fetchone() != b.execute("select pg_backend_pid()").fetchone()
        def both_idle() -> None:  # (a server comes back once released, and reset in session mode)
            wait_for(lambda: p.call(lambda: sum(len(x.idle) for x in p.proxy.pools.all_pools())) == 2,
                     timeout=10, what="both servers idle")

        seen = []
        if mode == "transaction":
            with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as c:
                for _ in range(6):
                    both_idle()
                    seen.append(c.execute("select pg_backend_pid()").fetchone()[0])
        else:
            for _ in range(6):
                both_idle()
                with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as c:
                    seen.append(c.execute("select pg_backend_pid()").fetchone()[0])
        return seen

    lifo = pids(proxy_factory(pool_mode=mode, pool_size=2))
    assert len(set(lifo)) == 1, lifo  # the control: always the server released last
    turns = pids(proxy_factory(pool_mode=mode, pool_size=2, server_round_robin=True))
    assert len(set(turns)) == 2 and all(x != y for x, y in zip(turns, turns[1:])), turns
