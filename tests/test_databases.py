"""Several databases on one proxy (issue 15): [databases.ALIAS] and [users.NAME], routing by the
startup packet's database, per-database and per-user pool modes and caps, 3D000 for a name not
served, and SIGHUP adding, changing and removing databases while other clients keep running."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading

import psycopg
import pytest

from tests.support.client import login_error
from tests.support.proxy import ProxyProcess
from tests.support.tools import require
from tests.support.wire import wait_for

DB_A, DB_B = "pgscope_db_a", "pgscope_db_b"


@pytest.fixture(scope="module")
def two_dbs(pg):
    """Two real databases besides pgscope_test, open to the test roles."""
    with pg.connect(dbname="postgres") as c:
        for name in (DB_A, DB_B):
            if not c.execute("select 1 from pg_database where datname = %s", (name,)).fetchone():
                c.execute(f"create database {name}")
            c.execute(f"grant all on database {name} to pgscope_md5, pgscope_scram")
    return DB_A, DB_B


@pytest.fixture
def userlist(tmp_path):
    """An auth file with the md5 role's password, so pgscope can log in upstream as it (clients: trust)."""
    f = tmp_path / "userlist.txt"
    f.write_text('"pgscope_md5" "md5pass"\n')
    return {"auth_file": str(f), "auth_type": "trust"}


def _one(conn, sql: str):
    return conn.execute(sql).fetchone()[0]


def _pools(proxy) -> dict:
    """(alias, user) -> servers open, read on the proxy's loop."""
    return proxy.call(lambda: {k: p.total for k, p in proxy.proxy.pools.pools.items()})


def test_two_databases_with_their_own_pool_modes(proxy_factory, pg, two_dbs):
    su = pg.superuser
    p = proxy_factory(query_wait_timeout=1.0, databases={
        "alpha": {"dbname": DB_A, "pool_mode": "session", "pool_size": 1},
        "beta": {"dbname": DB_B, "pool_mode": "transaction", "pool_size": 1},
    })
    # each alias reaches its own database
    with psycopg.connect(p.dsn(su, dbname="alpha"), autocommit=True) as a, \
            psycopg.connect(p.dsn(su, dbname="beta"), autocommit=True) as b:
        assert _one(a, "select current_database()") == DB_A
        assert _one(b, "select current_database()") == DB_B
        # session mode: the client owns its server; the key it was given is that server's pid
        assert _one(a, "select pg_backend_pid()") == a.info.backend_pid == _one(a, "select pg_backend_pid()")
        # ... so a second alpha client waits for pool_size 1 and times out
        assert login_error(p.dsn(su, dbname="alpha")).sqlstate == "08P01"
        # transaction mode: two beta clients share its one server between transactions
        with psycopg.connect(p.dsn(su, dbname="beta"), autocommit=True) as b2:
            assert _one(b2, "select pg_backend_pid()") == _one(b, "select pg_backend_pid()")
            assert b2.info.backend_pid != _one(b2, "select pg_backend_pid()")  # a made-up key, not the server's
            # named prepared statements work across the shared server (transaction mode renames them)
            b.execute("select %s::int", (1,), prepare=True)
            assert b2.execute("select %s::int + 1", (1,), prepare=True).fetchone() == (2,)
    assert set(_pools(p)) == {("alpha", su), ("beta", su)}
    # the pool gauges carry the alias as db
    m = p.metrics()
    assert f'pgscope_pool_size{{db="alpha",user="{su}"}} 1.0' in m
    assert f'pgscope_pool_size{{db="beta",user="{su}"}} 1.0' in m


def test_user_pool_mode_overrides_the_database(proxy_factory, pg, two_dbs, userlist):
    p = proxy_factory(query_wait_timeout=1.0, **userlist,
                      databases={"alpha": {"dbname": DB_A, "pool_mode": "session", "pool_size": 1}},
                      users={"pgscope_md5": {"pool_mode": "transaction"}})
    md5 = "pgscope_md5"
    with psycopg.connect(p.dsn(md5, "md5pass", dbname="alpha"), autocommit=True) as x, \
            psycopg.connect(p.dsn(md5, "md5pass", dbname="alpha"), autocommit=True) as y:
        # the user's transaction mode: both share the one server
        assert _one(x, "select pg_backend_pid()") == _one(y, "select pg_backend_pid()")
        assert _one(x, "select current_user") == md5
    # the database's session mode for everyone else: a second client waits and times out
    with psycopg.connect(p.dsn(pg.superuser, dbname="alpha"), autocommit=True) as s:
        assert _one(s, "select current_database()") == DB_A
        assert login_error(p.dsn(pg.superuser, dbname="alpha")).sqlstate == "08P01"


def _connect_in_thread(dsn: str) -> tuple[threading.Thread, list]:
    out: list = []

    def go():
        try:
            c = psycopg.connect(dsn, autocommit=True, connect_timeout=20)
            out.append(c)
        except Exception as e:  # surfaced by the test
            out.append(e)
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


def _waiting(p, alias: str, user: str) -> int:
    return p.call(lambda: p.proxy.pools.pools[(alias, user)].waiting if (alias, user) in p.proxy.pools.pools else 0)


def test_max_db_connections_caps_every_pool_of_an_alias(proxy_factory, pg, two_dbs, userlist):
    su, md5 = pg.superuser, "pgscope_md5"
    p = proxy_factory(query_wait_timeout=20.0, **userlist,
                      databases={"alpha": {"dbname": DB_A, "pool_size": 5, "max_db_connections": 1}})
    first = psycopg.connect(p.dsn(su, dbname="alpha"), autocommit=True)
    assert _one(first, "select 1") == 1
    # another user's pool of the same alias may not open a second server: its client waits
    t, out = _connect_in_thread(p.dsn(md5, "md5pass", dbname="alpha"))
    wait_for(lambda: _waiting(p, "alpha", md5) == 1, what="second user waiting at max_db_connections")
    assert sum(n for (db, _), n in _pools(p).items() if db == "alpha") == 1
    # the first client leaves: its idle server is closed to make room, the waiter gets in
    first.close()
    t.join(20)
    (second,) = out
    assert not isinstance(second, Exception), second
    with second:
        assert _one(second, "select current_user") == md5
        assert sum(n for (db, _), n in _pools(p).items() if db == "alpha") == 1
        # a third client, while the server is held, waits as well; it gets the server once the holder leaves
        t3, out3 = _connect_in_thread(p.dsn(su, dbname="alpha"))
        wait_for(lambda: _waiting(p, "alpha", su) == 1, what="third client waiting")
    t3.join(20)
    (third,) = out3
    assert not isinstance(third, Exception), third
    third.close()


@pytest.mark.parametrize("round_robin", [False, True])
def test_the_cap_evicts_the_longest_idle_server(proxy_factory, pg, two_dbs, userlist, round_robin):
    """At max_db_connections, another pool's longest-idle server is closed to make room, whether
    idle servers are handed out last-in-first-out or in turn (server_round_robin)."""
    su, md5 = pg.superuser, "pgscope_md5"
    p = proxy_factory(query_wait_timeout=20.0, server_round_robin=round_robin, **userlist,
                      databases={"alpha": {"dbname": DB_A, "pool_size": 5, "max_db_connections": 2}})

    def idle() -> int:
        return p.call(lambda: len(p.proxy.pools.pools[("alpha", su)].idle))

    older = psycopg.connect(p.dsn(su, dbname="alpha"), autocommit=True)
    newer = psycopg.connect(p.dsn(su, dbname="alpha"), autocommit=True)
    pids = [_one(c, "select pg_backend_pid()") for c in (older, newer)]
    assert pids[0] != pids[1]
    older.close()
    wait_for(lambda: idle() == 1, what="the older server idle")
    newer.close()
    wait_for(lambda: idle() == 2, what="both servers idle")
    # another user of the alias needs a server: the cap is reached, one idle server is closed
    with psycopg.connect(p.dsn(md5, "md5pass", dbname="alpha"), autocommit=True) as other:
        assert _one(other, "select current_user") == md5
        assert idle() == 1
        # the one kept is the one released last: the longest idle went
        with psycopg.connect(p.dsn(su, dbname="alpha"), autocommit=True) as again:
            assert _one(again, "select pg_backend_pid()") == pids[1]


def test_max_user_connections_caps_a_user_over_databases(proxy_factory, pg, two_dbs, userlist):
    md5 = "pgscope_md5"
    p = proxy_factory(query_wait_timeout=1.0, **userlist,
                      databases={"alpha": {"dbname": DB_A}, "beta": {"dbname": DB_B}},
                      users={md5: {"max_user_connections": 1}})
    with psycopg.connect(p.dsn(md5, "md5pass", dbname="alpha"), autocommit=True) as a:
        assert _one(a, "select current_database()") == DB_A
        # the user's one server is held: a login to the other database waits and times out
        assert login_error(p.dsn(md5, "md5pass", dbname="beta")).sqlstate == "08P01"
        # other users are not capped
        with psycopg.connect(p.dsn(pg.superuser, dbname="beta"), autocommit=True) as other:
            assert _one(other, "select current_database()") == DB_B
    # once the user's server is idle it makes room (closed) for the other database
    with psycopg.connect(p.dsn(md5, "md5pass", dbname="beta"), autocommit=True) as b:
        assert _one(b, "select current_database()") == DB_B
        assert sum(n for (_, u), n in _pools(p).items() if u == md5) == 1


def test_unknown_database_gets_3d000_and_the_fallback_maps_names(proxy_factory, pg, two_dbs):
    su = pg.superuser
    p = proxy_factory(databases={"alpha": {"dbname": DB_A}, "ghost": {"dbname": "pgscope_no_such_db"}})
    with psycopg.connect(p.dsn(su, dbname="alpha"), autocommit=True) as a:  # the positive control
        assert _one(a, "select current_database()") == DB_A
    e = login_error(p.dsn(su, dbname="nope"))
    assert (e.sqlstate, str(e)) == ("3D000", 'database "nope" does not exist')
    e = login_error(p.dsn(su, dbname=DB_A))  # the real name is not an alias
    assert e.sqlstate == "3D000"
    m = p.metrics()
    assert 'pgscope_clients_refused_total{reason="unknown_database"} 2.0' in m
    # an alias whose database is missing on the server: PostgreSQL's own 3D000, counted under the alias
    e = login_error(p.dsn(su, dbname="ghost"))
    assert (e.sqlstate, str(e)) == ("3D000", 'database "pgscope_no_such_db" does not exist')
    assert f'pgscope_server_connect_failures_total{{db="ghost",user="{su}"}} 1.0' in p.metrics()
    # with "*", any other name goes to the same-named database; a missing one gets PostgreSQL's 3D000
    # and an alias with its own user and password: every client logs in upstream as that user
    q = proxy_factory(databases={"alpha": {"dbname": DB_A, "user": "pgscope_md5", "password": "md5pass"},
                                 "*": {}})
    with psycopg.connect(q.dsn(su, dbname=DB_B), autocommit=True) as b:
        assert _one(b, "select current_database()") == DB_B
    with psycopg.connect(q.dsn(su, dbname="alpha"), autocommit=True) as a:
        assert _one(a, "select current_user") == "pgscope_md5"
    assert login_error(q.dsn(su, dbname="pgscope_missing_db")).sqlstate == "3D000"
    status, body = q.http("/api/databases")
    assert status == 200 and b"md5pass" not in body
    rows = {r["name"]: r for r in q.api("/api/databases")["databases"]}
    assert rows["alpha"]["database"] == DB_A and rows["alpha"]["force_user"] == "pgscope_md5"
    assert rows[DB_B]["database"] == DB_B and rows[DB_B]["current_connections"] == 1
    assert rows["*"]["pool_mode"] == "session" and all(r["state"] == "active" for r in rows.values())


class Forwarder:
    """A TCP port in front of PostgreSQL that counts the connections through it: "another server"."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.accepted += 1
            up = socket.create_connection(self.target)
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


def test_an_alias_on_another_port_gets_its_servers_and_its_cancels_there(proxy_factory, pg, two_dbs):
    su = pg.superuser
    far = Forwarder(pg.host, pg.port)
    try:
        p = proxy_factory(databases={"far": {"port": far.port, "dbname": DB_A}, "near": {"dbname": DB_A}})
        with psycopg.connect(p.dsn(su, dbname="near"), autocommit=True) as near:
            assert _one(near, "select current_database()") == DB_A
        assert far.accepted == 0  # the positive control below is the alias's own port
        with psycopg.connect(p.dsn(su, dbname="far"), autocommit=True) as c:
            assert _one(c, "select current_database()") == DB_A and far.accepted == 1
            errors: list = []

            def sleep() -> None:
                try:
                    c.execute("select pg_sleep(30) /* far-cancel */")
                except psycopg.Error as e:
                    errors.append(e)
            t = threading.Thread(target=sleep, daemon=True)
            t.start()
            with pg.connect(dbname="postgres") as admin:
                wait_for(lambda: admin.execute("select count(*) from pg_stat_activity where query like "
                                               "'select pg_sleep(30) /* far-cancel */%'").fetchone()[0] == 1,
                         what="the sleep running")
            c.cancel_safe()  # reaches the server through the alias's port, as a new connection there
            t.join(20)
            assert errors and isinstance(errors[0], psycopg.errors.QueryCanceled), errors
            assert far.accepted == 2
    finally:
        far.close()


def test_drop_database_fences_the_real_database_behind_an_alias(proxy_factory, pg, two_dbs):
    su, name = pg.superuser, "pgscope_fence_alias"
    p = proxy_factory(databases={"fx": {"dbname": name}, "admin": {"dbname": "postgres"}})
    with psycopg.connect(p.dsn(su, dbname="admin"), autocommit=True) as admin:
        admin.execute(f"drop database if exists {name}")
        admin.execute(f"create database {name}")
        with psycopg.connect(p.dsn(su, dbname="fx"), autocommit=True) as c:
            assert _one(c, "select current_database()") == name
        # the positive control: the alias's pool keeps an idle server in that database
        idle = lambda: p.call(lambda: len(p.proxy.pools.pools[("fx", su)].idle))  # noqa: E731
        wait_for(lambda: idle() == 1, what="an idle server of fx")
        admin.execute(f"drop database {name}")  # 55006 if the pool's server were still there
        assert idle() == 0 and p.call(lambda: p.proxy.pools.fences) == {}


def test_tables_in_the_file_the_environment_and_their_errors(tmp_path):
    from proxy.config import ConfigError, as_dict, diff_reloadable, load_settings
    from proxy.config_tables import resolve

    f = tmp_path / "c.toml"
    f.write_text('pool_mode = "session"\n[databases.app]\nhost = "db1"\nport = 5433\ndbname = "app_prod"\n'
                 'pool_mode = "transaction"\nmax_db_connections = 9\n'
                 '[databases.rep]\nuser = "reporter"\npassword = "s3cret"\n[databases."*"]\n'
                 '[users.batch]\npool_mode = "session"\nmax_user_connections = 2\n')
    s = load_settings(str(f), env={})
    app = resolve(s, "app", "web")
    assert (app.host, app.port, app.dbname, app.user, app.pool_mode, app.max_db_connections) == \
        ("db1", 5433, "app_prod", "web", "transaction", 9)
    batch = resolve(s, "app", "batch")  # the user's pool_mode before the database's
    assert (batch.pool_mode, batch.max_user_connections) == ("session", 2)
    rep = resolve(s, "rep", "web")  # the entry's user: one pool as reporter, with its password
    assert (rep.user, rep.password, rep.dbname, rep.host) == ("reporter", "s3cret", "rep", s.upstream_host)
    assert resolve(s, "other", "web").dbname == "other"  # "*"
    assert "s3cret" not in repr(s) and as_dict(s)["databases"]["rep"]["password"] == "***"
    assert as_dict(s, redact=False)["databases"]["rep"]["password"] == "s3cret"
    # without a table every name goes to upstream's host; with one and no "*", other names are not served
    assert resolve(load_settings(None, env={}), "anything", "u").dbname == "anything"
    assert resolve(load_settings(None, env={"PGSCOPE_DATABASES": '{app = {}}'}), "other", "u") is None
    # the environment: a TOML inline table, replacing the file's
    e = load_settings(str(f), env={"PGSCOPE_DATABASES": '{app = {pool_mode = "session"}}',
                                   "PGSCOPE_USERS": '{web = {max_user_connections = 3}}'})
    assert [d.alias for d in e.databases] == ["app"] and resolve(e, "app", "web").max_user_connections == 3
    changed, frozen = diff_reloadable(s, e)
    assert {"databases", "users"} <= set(changed) and not frozen
    for source, expect in (
        ('[databases.app]\nhots = "x"\n', 'databases.app: unknown key "hots"'),
        ('[databases.app]\npool_mode = "statement"\n', "databases.app.pool_mode: expected one of session, transaction"),
        ('[databases.app]\nport = "5432"\n', "databases.app.port: expected an integer"),
        ('[databases.app]\nport = 70000\n', "databases.app.port: out of range"),
        ('[databases.app]\npool_size = 0\n', "databases.app.pool_size: expected a number >= 1"),
        ('[databases.app]\npassword = "p"\n', "databases.app.password: needs user"),
        ('[databases."*"]\ndbname = "x"\n', 'databases."*".dbname: the fallback maps'),
        ('[databases.pgbouncer]\n', "databases.pgbouncer: the name is the admin console's"),
        ('databases = 5\n', "expected a table"),
        ('[users.bob]\nmax_user_connections = -1\n', "users.bob.max_user_connections: expected a number >= 0"),
        ('min_pool_size = 5\n[databases.app]\npool_size = 2\n', "databases.app.pool_size: 2 is less than min_pool_size 5"),
    ):
        f.write_text(source)
        with pytest.raises(ConfigError) as ei:
            load_settings(str(f), env={})
        assert expect in str(ei.value), (source, str(ei.value))
    with pytest.raises(ConfigError) as ei:
        load_settings(None, env={"PGSCOPE_DATABASES": "app = {}"})
    assert "expected a TOML inline table" in str(ei.value) and "PGSCOPE_DATABASES" in str(ei.value)
    with pytest.raises(ConfigError) as ei:  # a bad password is not echoed
        load_settings(None, env={"PGSCOPE_DATABASES": '{app = {user = "u", password = 12345678}}'})
    assert "12345678" not in str(ei.value)


def test_auth_query_tells_an_unknown_database_only_after_authentication(proxy_factory, pg, two_dbs):
    """The lookup for a name not served runs in upstream's database, so a wrong password gets 28P01
    (as PostgreSQL answers) and only an authenticated client learns that the database does not exist."""
    md5 = "pgscope_md5"
    p = proxy_factory(auth_user=pg.superuser, auth_type="md5", databases={"alpha": {"dbname": DB_A}})
    with psycopg.connect(p.dsn(md5, "md5pass", dbname="alpha"), autocommit=True) as a:
        assert _one(a, "select current_user") == md5
    e = login_error(p.dsn(md5, "wrong", dbname="nope"))
    assert (e.sqlstate, str(e)) == ("28P01", f'password authentication failed for user "{md5}"')
    e = login_error(p.dsn(md5, "md5pass", dbname="nope"))
    assert (e.sqlstate, str(e)) == ("3D000", 'database "nope" does not exist')


def _toml(pg, databases: str) -> str:
    return f'upstream = "{pg.dsn()}"\nlog_level = "info"\n{databases}'


def _api_databases(p) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/api/databases", timeout=10) as r:
        return {row["name"]: row for row in json.loads(r.read())["databases"]}


def test_sighup_adds_changes_and_removes_databases(pg, two_dbs, tmp_path):
    pgbench = require("pgbench")
    su = pg.superuser
    subprocess.run([pgbench, "-i", "-q", "-s", "1", pg.dsn(dbname=DB_B)], check=True, capture_output=True,
                   timeout=120)
    cfg = tmp_path / "pgscope.toml"
    cfg.write_text(_toml(pg, f'[databases.keep]\ndbname = "{DB_B}"\npool_mode = "transaction"\n'
                             f'[databases.gone]\ndbname = "{DB_A}"\n'
                             f'[databases.moving]\ndbname = "{DB_A}"\npool_size = 1\n'
                             f'[databases.moding]\ndbname = "{DB_A}"\n'))
    p = ProxyProcess(["--config", str(cfg)]).wait_ready()
    bench = None
    try:
        gone = psycopg.connect(p.dsn(su, dbname="gone"), autocommit=True)
        gone.execute("begin")
        gone.execute("create temp table t(x int)")  # state that would be lost with its server
        moving = psycopg.connect(p.dsn(su, dbname="moving"), autocommit=True)
        assert _one(moving, "select current_database()") == DB_A
        moding = psycopg.connect(p.dsn(su, dbname="moding"), autocommit=True)
        assert moding.info.backend_pid == _one(moding, "select pg_backend_pid()")  # session mode: the real pid
        # clients of "keep" run through the reload
        bench = subprocess.Popen([pgbench, "-n", "-T", "4", "-c", "2", "-M", "extended", p.dsn(su, dbname="keep")],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        cfg.write_text(_toml(pg, f'[databases.keep]\ndbname = "{DB_B}"\npool_mode = "transaction"\n'
                                 f'[databases.moving]\ndbname = "{DB_B}"\npool_size = 1\n'
                                 f'[databases.added]\ndbname = "{DB_A}"\n'
                                 f'[databases.moding]\ndbname = "{DB_A}"\npool_mode = "transaction"\n'))
        p.signal(signal.SIGHUP)
        ev = p.wait_event("reloaded")
        assert "databases" in ev["changed"]
        p.wait_event("database_draining", db="gone", reason="removed")
        p.wait_event("database_draining", db="moving", reason="moved")
        p.wait_event("database_draining", db="moding", reason="pool_mode")
        assert _api_databases(p)["gone"]["state"] == "draining"
        # added: served at once
        with psycopg.connect(p.dsn(su, dbname="added"), autocommit=True) as added:
            assert _one(added, "select current_database()") == DB_A
        # removed: new clients get 3D000, the client it had finishes its transaction on its server
        assert login_error(p.dsn(su, dbname="gone")).sqlstate == "3D000"
        gone.execute("insert into t values (1)")
        assert _one(gone, "select count(*) from t") == 1
        gone.execute("commit")
        gone.close()
        # drained: once its last client left, its servers close and it is gone from /api/databases
        wait_for(lambda: "gone" not in _api_databases(p), what="the removed database drained")
        # a new pool_mode: the connected client keeps its session (and its server), new ones get the new mode
        with psycopg.connect(p.dsn(su, dbname="moding"), autocommit=True) as tx:
            assert tx.info.backend_pid != _one(tx, "select pg_backend_pid()")  # transaction mode: a made-up key
        assert moding.info.backend_pid == _one(moding, "select pg_backend_pid()")
        moding.close()
        # changed: the connected client keeps its server (pool_size 1 there), a new one goes to the new place
        assert _one(moving, "select current_database()") == DB_A
        with psycopg.connect(p.dsn(su, dbname="moving"), autocommit=True) as moved:
            assert _one(moved, "select current_database()") == DB_B
        moving.close()
        out, _ = bench.communicate(timeout=60)
        assert bench.returncode == 0, out
        assert "number of failed transactions: 0" in out and "error" not in out.lower(), out
    finally:
        if bench is not None and bench.poll() is None:
            bench.kill()
            bench.wait()
        p.stop()
