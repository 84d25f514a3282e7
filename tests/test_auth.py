"""Authentication through the proxy: clients to pgscope, pgscope to PostgreSQL (trust, password, md5, SCRAM)."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from proxy.protocol.scram import make_verifier
from tests.support.client import login_error


@pytest.fixture
def auth_file(tmp_path):
    path = tmp_path / "userlist.txt"
    path.write_text(
        '; pgscope test users\n'
        '"pgscope_md5" "md5pass"\n'
        '"pgscope_scram" "scrampass"\n'
        '"pgscope_plain" "plainpass"\n'
        f'"postgres" "{make_verifier("superpass")}"\n'
        '"md5stored" "md5' + __import__("hashlib").md5(b"m5passmd5stored").hexdigest() + '"\n'
    )
    return str(path)


def _fail_message(dsn):
    return login_error(dsn)


@pytest.mark.parametrize("auth_type", ["scram-sha-256", "md5", "plain"])
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_every_upstream_method(proxy_factory, pg, auth_file, auth_type, mode):
    """Clients log in to pgscope with `auth_type`; pgscope logs in upstream with md5, SCRAM or cleartext."""
    proxy = proxy_factory(auth_type=auth_type, auth_file=auth_file, pool_mode=mode)
    if not (pg.managed and pg.cluster.how == "binaries"):
        pytest.skip("needs the throwaway cluster's hba (md5, scram-sha-256, password per role)")
    for user, password, method in (("pgscope_md5", "md5pass", "md5"), ("pgscope_scram", "scrampass", "scram-sha-256"),
                                   ("pgscope_plain", "plainpass", "password")):
        with psycopg.connect(proxy.dsn(user, password), autocommit=True) as c:
            assert c.execute("select current_user").fetchone() == (user,)
            # and the upstream connection really used the role's hba method: PostgreSQL 16 says which
            # (system_user is "method:identity"); before 16, the server's hba asks exactly that of
            # this role over TCP, so logging in at all proves it
            if pg.version >= 16:
                assert c.execute("select system_user").fetchone() == (f"{method}:{user}",)
        with pg.connect() as admin:
            rules = admin.execute("select auth_method from pg_hba_file_rules where %s = any(user_name) "
                                  "and type = 'host'", (user,)).fetchall()
            assert rules == [(method,)], rules


def test_scram_verifier_in_auth_file(proxy_factory, pg, auth_file):
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file)
    with psycopg.connect(proxy.dsn("postgres", "superpass"), autocommit=True) as c:
        assert c.execute("select 1").fetchone() == (1,)
    e = _fail_message(proxy.dsn("postgres", "wrong"))
    assert e.sqlstate == "28P01"


def test_md5_secret_with_md5_method(proxy_factory, pg, auth_file):
    with pg.connect() as admin:
        admin.execute("drop owned by md5stored") if admin.execute(
            "select 1 from pg_roles where rolname = 'md5stored'").fetchone() else None
        admin.execute("drop role if exists md5stored")
        admin.execute("set password_encryption = 'md5'")
        admin.execute("create role md5stored login password 'm5pass'")
        admin.execute("grant all on database pgscope_test to md5stored")
    try:
        proxy = proxy_factory(auth_type="md5", auth_file=auth_file)
        with psycopg.connect(proxy.dsn("md5stored", "m5pass"), autocommit=True) as c:
            assert c.execute("select current_user").fetchone() == ("md5stored",)
        assert _fail_message(proxy.dsn("md5stored", "nope")).sqlstate == "28P01"
    finally:
        with pg.connect() as admin:
            admin.execute("drop owned by md5stored")
            admin.execute("drop role md5stored")


def test_wrong_password_and_unknown_user_look_like_postgres(proxy_factory, pg, auth_file):
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file)
    wrong = _fail_message(proxy.dsn("pgscope_scram", "wrong"))
    direct = _fail_message(pg.dsn("pgscope_scram", "wrong"))
    assert wrong.sqlstate == direct.sqlstate == "28P01"
    assert wrong.args[0] == direct.args[0] == 'password authentication failed for user "pgscope_scram"'
    unknown = _fail_message(proxy.dsn("nobody_here", "x"))
    assert unknown.sqlstate == "28P01"
    assert unknown.args[0] == 'password authentication failed for user "nobody_here"'
    assert unknown.detail is None and wrong.detail is None


def test_asyncpg_scram(proxy_factory, pg, auth_file):
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file, pool_mode="transaction")

    async def main():
        conn = await asyncpg.connect(proxy.dsn("pgscope_scram", "scrampass"))
        try:
            return await conn.fetchval("select $1::int + 1", 41)
        finally:
            await conn.close()

    assert asyncio.run(main()) == 42
    with pytest.raises(asyncpg.InvalidPasswordError):
        asyncio.run(asyncpg.connect(proxy.dsn("pgscope_scram", "bad")))


def test_trust_by_default_without_auth_file(proxy, pg):
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        assert c.execute("select 1").fetchone() == (1,)


def test_auth_file_reload(proxy_factory, pg, auth_file):
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file)
    with psycopg.connect(proxy.dsn("postgres", "superpass")) as c:
        c.execute("select 1")
    lines = [x for x in open(auth_file).read().splitlines() if not x.startswith('"postgres"')]
    open(auth_file, "w").write("\n".join(lines + ['"postgres" "superpass2"', ""]))
    proxy.call(proxy.proxy.reload_auth)
    with psycopg.connect(proxy.dsn("postgres", "superpass2")) as c:
        c.execute("select 1")
    assert _fail_message(proxy.dsn("postgres", "superpass")).sqlstate == "28P01"
