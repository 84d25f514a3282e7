"""auth_user + auth_query (secrets looked up on the server, cached), and SCRAM pass-through.

Against the throwaway cluster's hba: pgscope_aq_scram and pgscope_aq_pass must log in
with scram-sha-256 over TCP, pgscope_aq_md5 with md5 (its password stored as md5), so a
login through pgscope reaches the server only if pgscope answered the server's challenge
with what the client's login proved: nothing in pgscope's config or auth file is a
plaintext password of theirs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import signal
import socket
import struct
import time

import asyncpg
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.protocol import messages as m
from proxy.protocol.auth import UpstreamAuthenticator
from proxy.protocol.framing import Framer
from proxy.protocol.scram import keys, parse_verifier
from tests.support.client import login_error
from tests.support.proxy import ProxyProcess
from tests.support.wire import wait_for

SCRAM_USER, SCRAM_PW = "pgscope_aq_scram", "aq-scram-pw"
MD5_USER, MD5_PW = "pgscope_aq_md5", "aq-md5-pw"
PASS_USER, PASS_PW = "pgscope_aq_pass", "aq-pass-through-pw"
LOOKUP_USER = "pgscope_aq_lookup"  # a plain role: may run the SECURITY DEFINER function, not read pg_shadow
WRONG = "aq-wrong-pw-7"
FAILED = 'password authentication failed for user "{}"'


def _create_role(c, name: str, password: str, encryption: str = "scram-sha-256") -> None:
    c.execute(f"set password_encryption = '{encryption}'")
    verb = "alter" if c.execute("select 1 from pg_roles where rolname = %s", (name,)).fetchone() else "create"
    c.execute(f"{verb} role {name} login password '{password}'")
    c.execute(f"grant all on database {c.info.dbname} to {name}")
    c.execute("reset password_encryption")


@pytest.fixture(scope="module")
def roles(pg):
    if not (pg.managed and pg.cluster.how == "binaries"):
        pytest.skip("needs the throwaway cluster's hba (scram-sha-256 and md5 for the pgscope_aq_* roles)")
    with pg.connect() as c:
        _create_role(c, SCRAM_USER, SCRAM_PW)
        _create_role(c, MD5_USER, MD5_PW, "md5")
        _create_role(c, PASS_USER, PASS_PW)
        if not c.execute("select 1 from pg_roles where rolname = %s", (LOOKUP_USER,)).fetchone():
            c.execute(f"create role {LOOKUP_USER} login")
        c.execute("create schema if not exists pgscope_aq")
        c.execute("""create or replace function pgscope_aq.user_secret(p_user text,
                         out usename name, out passwd text) returns setof record
                     language sql security definer set search_path = pg_catalog
                     as $$ select usename, passwd from pg_shadow where usename = p_user $$""")
        c.execute("revoke all on function pgscope_aq.user_secret(text) from public")
        c.execute(f"grant usage on schema pgscope_aq to {LOOKUP_USER}")
        c.execute(f"grant execute on function pgscope_aq.user_secret(text) to {LOOKUP_USER}")
        rules = dict(c.execute("select user_name[1], auth_method from pg_hba_file_rules "
                               "where type = 'host' and user_name[1] like 'pgscope_aq_%'").fetchall())
        assert rules == {MD5_USER: "md5", SCRAM_USER: "scram-sha-256"}, rules  # PASS_USER shares SCRAM's line
        assert c.execute("select rolpassword like 'md5%%' from pg_authid where rolname = %s",
                         (MD5_USER,)).fetchone() == (True,)
    yield pg
    with pg.connect() as c:  # the passwords may have been changed by a test
        _create_role(c, SCRAM_USER, SCRAM_PW)


def _verifier(pg, user: str) -> str:
    with pg.connect() as c:
        return c.execute("select rolpassword from pg_authid where rolname = %s", (user,)).fetchone()[0]


def _current_user(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute("select current_user").fetchone()[0]


def _scram_login_trace(port: int, user: str, password: str) -> tuple[list[int], dict[str, str], str]:
    """Log in over a raw socket with our own SCRAM client: (authentication codes seen,
    the server-first attributes, the ErrorResponse's SQLSTATE and message or "ok")."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    fb, codes, first = Framer(), [], {}
    auth = UpstreamAuthenticator(user, password)
    try:
        sock.sendall(m.startup_message({"user": user, "database": "pgscope_test"}))
        while True:
            msg = fb.next()
            if msg is None:
                data = sock.recv(65536)
                assert data, f"closed after {codes}"
                fb.feed(data)
                continue
            t, body = msg
            if t == m.B_ERROR:
                f = m.decode_error_fields(body)
                return codes, first, f"{f['C']} {f['M']}" + (f" {f['D']}" if "D" in f else "")
            if t == m.B_READY_FOR_QUERY:
                return codes, first, "ok"
            if t == m.B_AUTH:
                code = struct.unpack("!i", body[:4])[0]
                codes.append(code)
                if code == 11:
                    first = dict(p.split("=", 1) for p in body[4:].decode().split(","))
                out = auth.feed(body)
                if out:
                    sock.sendall(out)
    finally:
        sock.close()


def test_scram_and_md5_roles_right_and_wrong_passwords(roles, proxy_factory):
    """auth_type md5 as in PgBouncer's hba habit: the SCRAM role still gets SCRAM (its secret is a
    verifier), the md5 role gets md5; upstream, the SCRAM role logs in with the keys its client's
    proof gave (pass-through) and the md5 role with the looked-up hash."""
    proxy = proxy_factory(auth_user="postgres", auth_type="md5", pool_mode="transaction")
    assert _current_user(proxy.dsn(SCRAM_USER, SCRAM_PW)) == SCRAM_USER
    assert _current_user(proxy.dsn(MD5_USER, MD5_PW)) == MD5_USER
    for user, method in ((SCRAM_USER, 10), (MD5_USER, 5)):
        codes, _, outcome = _scram_login_trace(proxy.port, user, "wrong")
        assert codes[0] == method and outcome == "28P01 " + FAILED.format(user), (codes, outcome)
        e = login_error(proxy.dsn(user, "wrong"))
        assert (e.sqlstate, e.args[0], e.detail) == ("28P01", FAILED.format(user), None)
    # the default auth_type with auth_user is scram-sha-256: the md5 role cannot use it, as in PostgreSQL
    scram = proxy_factory(auth_user="postgres")
    assert _current_user(scram.dsn(SCRAM_USER, SCRAM_PW)) == SCRAM_USER
    assert login_error(scram.dsn(MD5_USER, MD5_PW)).sqlstate == "28P01"


def test_missing_user_gets_a_full_scram_exchange_then_28P01(roles, proxy_factory):
    proxy = proxy_factory(auth_user="postgres", auth_type="md5")
    codes, real_first, outcome = _scram_login_trace(proxy.port, SCRAM_USER, "wrong")
    assert codes == [10, 11] and outcome == "28P01 " + FAILED.format(SCRAM_USER)
    salts = set()
    for _ in range(2):
        codes, first, outcome = _scram_login_trace(proxy.port, "pgscope_aq_ghost", "whatever")
        # the whole exchange: SASL, SASLContinue with a salt and the usual iteration count, and only
        # at the proof the very failure a wrong password gets (md5 asked: SCRAM all the same)
        assert codes == [10, 11], codes
        assert outcome == "28P01 " + FAILED.format("pgscope_aq_ghost")
        assert first["i"] == real_first["i"] == "4096"
        assert len(base64.b64decode(first["s"])) == len(base64.b64decode(real_first["s"]))
        salts.add(first["s"])
    assert len(salts) == 1  # a fixed fake salt per user: asking twice does not tell
    assert _scram_login_trace(proxy.port, "pgscope_aq_ghost2", "x")[1]["s"] not in salts


def test_cache_ttl_then_the_changed_password(roles, proxy_factory, pg):
    proxy = proxy_factory(auth_user="postgres", auth_query_cache_s=2.0)
    before_lookup = time.monotonic()  # the TTL runs from the lookup this login makes
    assert _current_user(proxy.dsn(SCRAM_USER, SCRAM_PW)) == SCRAM_USER
    with pg.connect() as c:
        c.execute(f"alter role {SCRAM_USER} password 'aq-scram-pw-2'")
    changed = time.monotonic()
    try:
        # within the TTL the cached verifier still decides: the new password is refused
        assert login_error(proxy.dsn(SCRAM_USER, "aq-scram-pw-2")).sqlstate == "28P01"
        assert time.monotonic() - changed < 2.0, "too slow to see the cache"
        wait_for(lambda: _try(proxy.dsn(SCRAM_USER, "aq-scram-pw-2")), timeout=15, interval=0.2,
                 what="the new password accepted after auth_query_cache_s")
        assert time.monotonic() - before_lookup >= 2.0
        assert login_error(proxy.dsn(SCRAM_USER, SCRAM_PW)).sqlstate == "28P01"
    finally:
        with pg.connect() as c:
            c.execute(f"alter role {SCRAM_USER} password '{SCRAM_PW}'")


def _try(dsn: str) -> bool:
    try:
        return _current_user(dsn) is not None
    except psycopg.OperationalError:
        return False


def test_security_definer_function_as_auth_query(roles, proxy_factory):
    # the default query needs pg_shadow, which this role may not read: a clean 28000, not a hang
    plain = proxy_factory(auth_user=LOOKUP_USER)
    t0 = time.monotonic()
    e = login_error(plain.dsn(SCRAM_USER, SCRAM_PW))
    assert (e.sqlstate, e.args[0]) == ("28000", "could not look up the user's password")
    assert time.monotonic() - t0 < 10
    proxy = proxy_factory(auth_user=LOOKUP_USER, auth_query="SELECT usename, passwd FROM pgscope_aq.user_secret($1)")
    assert _current_user(proxy.dsn(SCRAM_USER, SCRAM_PW)) == SCRAM_USER
    assert login_error(proxy.dsn(SCRAM_USER, "nope")).sqlstate == "28P01"
    assert login_error(proxy.dsn("pgscope_aq_ghost", "nope")).sqlstate == "28P01"
    # the user name is a parameter, never part of the text
    assert login_error(proxy.dsn("x' or usename <> 'x", "nope")).sqlstate == "28P01"


def test_auth_dbname_is_where_lookups_run(roles, proxy_factory, pg):
    """The function is in the test database only: a client of "postgres" is looked up there with
    auth_dbname, and cannot be without."""
    query = "SELECT usename, passwd FROM pgscope_aq.user_secret($1)"
    fixed = proxy_factory(auth_user=LOOKUP_USER, auth_query=query, auth_dbname=pg.dbname)
    with psycopg.connect(fixed.dsn(SCRAM_USER, SCRAM_PW, dbname="postgres")) as c:
        assert c.execute("select current_database(), current_user").fetchone() == ("postgres", SCRAM_USER)
    assert login_error(fixed.dsn(SCRAM_USER, WRONG, dbname="postgres")).sqlstate == "28P01"
    per_db = proxy_factory(auth_user=LOOKUP_USER, auth_query=query)
    e = login_error(per_db.dsn(SCRAM_USER, SCRAM_PW, dbname="postgres"))
    assert (e.sqlstate, e.args[0]) == ("28000", "could not look up the user's password")


def test_lookup_failure_when_auth_user_cannot_log_in(roles, proxy_factory):
    proxy = proxy_factory(auth_user="pgscope_aq_no_such_role")
    e = login_error(proxy.dsn(SCRAM_USER, SCRAM_PW))
    assert (e.sqlstate, e.args[0]) == ("28000", "could not look up the user's password")


def test_console_users_looked_up_in_the_default_database(roles, proxy_factory):
    """An admin user not in the auth file: its secret comes from auth_query in upstream's
    database (the console's own database is not on the server)."""
    proxy = proxy_factory(auth_user="postgres", admin_users=[SCRAM_USER])
    with psycopg.connect(proxy.dsn(SCRAM_USER, SCRAM_PW, dbname="pgscope"), autocommit=True,
                         cursor_factory=psycopg.ClientCursor) as c:
        assert c.execute("SHOW VERSION").fetchone()[0].startswith("pgscope")
    e = login_error(proxy.dsn(SCRAM_USER, WRONG, dbname="pgscope"))
    assert (e.sqlstate, e.args[0]) == ("28P01", FAILED.format(SCRAM_USER))


def test_trust_looks_nothing_up(roles, proxy_factory):
    # auth_user that could not look anything up: with trust nobody is asked for a password
    proxy = proxy_factory(auth_user="pgscope_aq_no_such_role", auth_type="trust")
    assert _current_user(proxy.dsn(LOOKUP_USER)) == LOOKUP_USER
    assert "pgscope_auth_query_lookups_total{outcome=\"failed\"} 0.0" in proxy.metrics()


def test_concurrent_logins_share_one_lookup(roles, proxy_factory):
    slow = "SELECT usename, passwd FROM pg_shadow, pg_sleep(1.5) WHERE usename = $1"
    proxy = proxy_factory(auth_user="postgres", auth_query=slow, auth_query_cache_s=0.0, pool_mode="transaction")

    async def login():
        conn = await asyncpg.connect(proxy.dsn(SCRAM_USER, SCRAM_PW), timeout=20)
        try:
            return await conn.fetchval("select current_user")
        finally:
            await conn.close()

    async def many():
        return await asyncio.gather(*(login() for _ in range(5)))

    def counts() -> dict[str, float]:
        return {s.labels["outcome"]: s.value for f in text_string_to_metric_families(proxy.metrics())
                for s in f.samples if s.name == "pgscope_auth_query_lookups_total"}

    assert asyncio.run(many()) == [SCRAM_USER] * 5
    assert counts()["found"] == 1, counts()
    assert asyncio.run(login()) == SCRAM_USER  # no cache (0 s): the next login looks up again
    assert counts()["found"] == 2, counts()


def _config(tmp_path, pg, **settings) -> str:
    lines = [f'upstream = "{pg.dsn()}"']
    for k, v in settings.items():
        lines.append(f"{k} = {v!r}".replace("'", '"') if isinstance(v, (str, list)) else f"{k} = {v}")
    path = tmp_path / "pgscope.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_scram_pass_through_with_only_the_verifier_and_no_secret_shown(roles, pg, tmp_path):
    verifier = _verifier(pg, PASS_USER)
    userlist = tmp_path / "userlist.txt"
    userlist.write_text(f'"{PASS_USER}" "{verifier}"\n')  # the server's verifier, copied: no password
    cfg = _config(tmp_path, pg, auth_file=str(userlist), auth_user="postgres", log_level="debug",
                  pool_mode="session", admin_users=[PASS_USER])
    for text in (open(cfg).read(), userlist.read_text()):
        assert PASS_PW not in text and SCRAM_PW not in text and MD5_PW not in text
    p = ProxyProcess(["--config", cfg]).wait_ready()
    try:
        dsn = p.dsn(PASS_USER, PASS_PW)
        # two clients at once: two server logins, the second from the kept keys alone
        with psycopg.connect(dsn, autocommit=True) as a, psycopg.connect(dsn, autocommit=True) as b:
            pids = {c.execute("select current_user, pg_backend_pid()").fetchone() for c in (a, b)}
            assert {u for u, _ in pids} == {PASS_USER} and len(pids) == 2
            with pg.connect() as admin:
                rows = admin.execute("select client_addr is not null from pg_stat_activity where pid = any(%s)",
                                     ([pid for _, pid in pids],)).fetchall()
            assert rows == [(True,), (True,)]  # over TCP, where hba asks SCRAM of this role
        assert login_error(p.dsn(PASS_USER, WRONG)).sqlstate == "28P01"
        # auth_query users in the same process, and failures, so that the log has them all
        assert _current_user(p.dsn(SCRAM_USER, SCRAM_PW)) == SCRAM_USER
        assert login_error(p.dsn(MD5_USER, MD5_PW)).sqlstate == "28P01"  # md5 secret, SCRAM asked
        assert login_error(p.dsn(SCRAM_USER, WRONG)).sqlstate == "28P01"
        assert login_error(p.dsn("pgscope_aq_ghost", "x")).sqlstate == "28P01"
        p.wait_event("client_auth_failed", user="pgscope_aq_ghost")
        shown = [_console(p.dsn(PASS_USER, PASS_PW, dbname="pgscope")), p.logs(), _http(p, "/metrics")]
        for path in ("/api/statements", "/api/explains", "/api/nplusone", "/api/locks", "/api/recommendations"):
            shown.append(_http(p, path))
        assert "server_connected" in shown[1] and PASS_USER in shown[1]  # the log does say who
        assert "auth_query" in shown[0] and PASS_USER in shown[0]  # SHOW CONFIG, SHOW CLIENTS
        for secret in _secrets(pg, verifier):
            for text in shown:
                assert secret not in text
    finally:
        p.stop()


CONSOLE_SHOWS = ("POOLS", "CLIENTS", "SERVERS", "STATS", "STATS_TOTALS", "DATABASES", "USERS", "CONFIG", "LISTS",
                 "VERSION", "STATE", "QUERIES", "EXPLAINS", "NPLUSONE", "LOCKS", "RECOMMENDATIONS")


def _console(dsn: str) -> str:
    """Every SHOW of the admin console, as text."""
    with psycopg.connect(dsn, autocommit=True, cursor_factory=psycopg.ClientCursor) as c:
        return "\n".join(repr(c.execute(f"SHOW {what}").fetchall()) for what in CONSOLE_SHOWS)


def test_sighup_with_a_new_auth_query_forgets_the_cache(roles, pg, tmp_path):
    cfg = _config(tmp_path, pg, auth_user="postgres", auth_query_cache_s=600, log_level="info")
    p = ProxyProcess(["--config", cfg]).wait_ready()
    try:
        assert _current_user(p.dsn(SCRAM_USER, SCRAM_PW)) == SCRAM_USER
        with pg.connect() as c:
            c.execute(f"alter role {SCRAM_USER} password 'aq-scram-pw-3'")
        assert login_error(p.dsn(SCRAM_USER, "aq-scram-pw-3")).sqlstate == "28P01"  # cached for 600 s
        p.signal(signal.SIGHUP)  # the same file: nothing changed, the cache stays
        p.wait_event("reloaded")
        assert login_error(p.dsn(SCRAM_USER, "aq-scram-pw-3")).sqlstate == "28P01"
        _config(tmp_path, pg, auth_user="postgres", auth_query_cache_s=600, log_level="info",
                auth_query="SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = $1")
        p.signal(signal.SIGHUP)
        wait_for(lambda: sum(e.get("event") == "reloaded" for e in p.events()) == 2, what="the second reload")
        assert _current_user(p.dsn(SCRAM_USER, "aq-scram-pw-3")) == SCRAM_USER
    finally:
        p.stop()
        with pg.connect() as c:
            c.execute(f"alter role {SCRAM_USER} password '{SCRAM_PW}'")


def _http(p: ProxyProcess, path: str) -> str:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}{path}", timeout=10) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:
        return e.read().decode()


def _secrets(pg, verifier: str) -> list[str]:
    """Every form of the passwords that must not be shown: plaintexts, stored secrets, their
    parts, and the ClientKey pass-through recovers (base64 and hex)."""
    out = [PASS_PW, SCRAM_PW, MD5_PW, WRONG, verifier, _verifier(pg, SCRAM_USER), _verifier(pg, MD5_USER)]
    out.append(hashlib.md5((MD5_PW + MD5_USER).encode()).hexdigest())
    for v, pw in ((verifier, PASS_PW), (_verifier(pg, SCRAM_USER), SCRAM_PW)):
        iterations, salt, stored, server = parse_verifier(v)
        client_key = keys(pw, salt, iterations)[0]
        for key in (stored, server, client_key):
            out += [base64.b64encode(key).decode(), key.hex()]
    return out
