"""auth_type = hba (PgBouncer's auth_hba_file): the rules read as pg_hba.conf's, and logins through a
real pgscope decided by them: by address, database and user, TLS or not, the Unix socket with
peer, reject and no rule (28000), a reload, and check-config's report of a bad line."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys

import psycopg
import pytest
import trustme

from proxy.protocol.auth import AuthFailed
from proxy.protocol.hba import HbaError, HbaRefusal, Identity, decide, login_method, parse, settle
from tests.support.client import login_error
from tests.support.tools import require

DB = "pgscope_test"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OS_USER = pwd.getpwuid(os.getuid()).pw_name


# ------------------------------------------------------------------ the file


def test_rules_read_as_pg_hba_conf():
    text = (
        "# a comment line\n"
        "local   all   all                      peer\n"
        'host    "all"  x        10.1.2.3/8     md5      # "all" quoted: the database named all\n'
        "host    db1,db2 @users  192.168.0.0 255.255.0.0 scram-sha-256\n"
        "hostssl all    all      ::1/128        password\n"
        "hostnossl sameuser all  all            trust\n"
        "host    all    all      0.0.0.0/0 \\\n"
        "        reject\n"
    )
    files = {"/etc/pgscope/users": "alice, bob\n# not a name\ncarol\n"}
    rules = parse(text, "/etc/pgscope/hba.conf", read=files.__getitem__)
    assert [(r.line, r.kind, r.method) for r in rules] == [
        (2, "local", "peer"), (3, "host", "md5"), (4, "host", "scram-sha-256"), (5, "hostssl", "plain"),
        (6, "hostnossl", "trust"), (7, "host", "reject")]
    assert rules[2].users.names == {"alice", "bob", "carol"} and rules[2].databases.names == {"db1", "db2"}

    def line(**kw):
        rule = decide(rules, **{"unix": False, "ip": "8.8.8.8", "tls": False, "db": "d", "user": "u", **kw})
        return rule.line if rule else None

    assert line(unix=True, ip="") == 2
    assert line(ip="10.200.0.1", db="all", user="x") == 3  # 10.1.2.3/8 is 10.0.0.0/8, as PostgreSQL reads it
    assert line(ip="10.200.0.1", db="other", user="x") == 7  # "all" quoted names one database
    assert line(ip="::ffff:192.168.3.4", db="db2", user="carol") == 4  # an IPv4 client of a dual-stack listener
    assert line(ip="192.168.3.4", db="db3", user="carol") == 7
    assert line(ip="::1", tls=True) == 5
    assert line(ip="::1", tls=False) is None  # 0.0.0.0/0 is IPv4 only
    assert line(db="u", user="u") == 6 and line(db="u", user="u", tls=True) == 7  # sameuser, hostnossl
    assert decide(rules[1:], unix=True, ip="", tls=False, db="d", user="u") is None  # no local rule left


@pytest.mark.parametrize("text, error", [
    ("foo all all md5", "unknown connection type 'foo'"),
    ("host all all 10.0.0.0/8 sha1", "unknown method 'sha1'"),
    ("host all all 10.0.0.0/8", "missing fields"),
    ("local all all", "missing fields"),
    ("host all all samehost md5", "samehost is not supported"),
    ("host all all db.example.com md5", "host names are not supported"),
    ("host all all 10.0.0.0 255.0.255.0 md5", "invalid netmask 255.0.255.0"),
    ("local all all ident", "method ident: use peer on the Unix socket instead"),
    ("host all all all cert", "cert authentication is only supported on hostssl rules"),
    ("host all all all peer", "peer authentication is only supported on local"),
    ("host all all all md5 clientcert=verify-ca", "options after the method are not supported"),
    ("host all +admins all md5", "group names (+admins) are not supported"),
    ('host all "alice all md5', "unterminated quoted string"),
])
def test_a_line_pgscope_cannot_follow_is_an_error_with_its_number(text, error):
    with pytest.raises(HbaError) as e:
        parse("# first line\n\n" + text + "\n", "hba.conf")
    assert str(e.value).startswith("hba.conf:3: ") and error in str(e.value), str(e.value)


def test_login_method_refuses_and_checks_peer_and_cert():
    rules = parse("local all app peer\nhost all bob all reject\nhostssl all all all cert\n"
                  "host all all 127.0.0.1/32 scram-sha-256\n")
    app = Identity(peer_user=lambda: "app", cert_name=lambda: "alice")
    common = {"db": "shop", "identity": app}
    assert login_method(rules, unix=False, ip="127.0.0.1", tls=False, user="alice", **common) == "scram-sha-256"
    assert login_method(rules, unix=True, ip="", tls=False, user="app", **common) == "trust"  # peer: the same OS user
    with pytest.raises(AuthFailed, match='Peer authentication failed for user "app"') as e:
        login_method(rules, unix=True, ip="", tls=False, user="app", db="shop",
                     identity=Identity(lambda: "mallory", lambda: None))
    assert e.value.sqlstate == "28000" and "line 1" in e.value.reason and "mallory" in e.value.reason
    # cert: the certificate's common name is the user
    assert login_method(rules, unix=False, ip="10.0.0.1", tls=True, user="alice", **common) == "trust"
    with pytest.raises(AuthFailed, match='certificate authentication failed for user "carol"'):
        login_method(rules, unix=False, ip="10.0.0.1", tls=True, user="carol", **common)
    with pytest.raises(AuthFailed, match="connection requires a valid client certificate"):
        settle("cert", "alice", Identity(lambda: None, lambda: None))
    assert settle("md5", "alice", Identity(lambda: None, lambda: None)) == "md5"  # nothing to settle

    with pytest.raises(HbaRefusal) as e:
        login_method(rules, unix=False, ip="127.0.0.1", tls=False, user="bob", **common)
    assert e.value.sqlstate == "28000"
    assert e.value.message == ('auth_hba_file rejects connection for host "127.0.0.1", user "bob", '
                               'database "shop", no encryption')
    with pytest.raises(HbaRefusal, match='no auth_hba_file entry for host "10.0.0.9", user "alice"'):
        login_method(rules, unix=False, ip="10.0.0.9", tls=False, user="alice", **common)
    with pytest.raises(HbaRefusal, match=r'no auth_hba_file entry for host "\[local\]", user "alice"'):
        login_method(rules, unix=True, ip="", tls=False, user="alice", **common)


# ------------------------------------------------------------ through pgscope


@pytest.fixture
def hba_setup(tmp_path, pg):
    """An auth file (alice, bob, carol with passwords) and a database alias whose upstream user is
    the superuser, so that every client user reaches PostgreSQL."""
    auth = tmp_path / "userlist.txt"
    auth.write_text('"alice" "alicepw"\n"bob" "bobpw"\n"carol" "carolpw"\n')
    (tmp_path / "admins").write_text(f"{pg.superuser}\n")
    databases = {"shop": {"dbname": DB, "user": pg.superuser}}
    return tmp_path, str(auth), databases


def refused(proxy, metric: str) -> float:
    found = re.search(rf"^{re.escape(metric)} ([0-9.e+]+)$", proxy.metrics(), re.M)
    return float(found.group(1)) if found else 0.0


def test_rules_decide_each_login_by_user_database_and_address(proxy_factory, pg, hba_setup):
    tmp, auth, databases = hba_setup
    hba = tmp / "hba.conf"
    hba.write_text(
        "host  all   bob      127.0.0.1/32  reject\n"
        "host  shop  alice    127.0.0.1/32  scram-sha-256\n"
        "host  all   @admins  127.0.0.0/8   trust\n"
        "host  all   all      10.0.0.0/8    trust\n"  # not this client's address
    )
    proxy = proxy_factory(auth_type="hba", auth_file=auth, auth_hba_file=str(hba), databases=databases,
                          admin_users=[pg.superuser])
    # the control: alice by SCRAM with her password, the superuser by trust through the @file
    with psycopg.connect(proxy.dsn("alice", "alicepw", dbname="shop")) as c:
        assert c.execute("select current_user, 6 * 7").fetchone() == (pg.superuser, 42)
    with psycopg.connect(proxy.dsn(pg.superuser, dbname="shop")) as c:
        assert c.execute("select 1").fetchone() == (1,)
    assert login_error(proxy.dsn("alice", "wrong", dbname="shop")).sqlstate == "28P01"

    # bob has the right password, and a reject rule before anything else
    e = login_error(proxy.dsn("bob", "bobpw", dbname="shop"))
    assert e.sqlstate == "28000"
    assert 'auth_hba_file rejects connection for host "127.0.0.1", user "bob", database "shop"' in str(e)
    # alice's rule names one database; carol has no rule at all
    e = login_error(proxy.dsn("alice", "alicepw", dbname="pgscope"))
    assert e.sqlstate == "28000" and 'no auth_hba_file entry for host "127.0.0.1", user "alice", database "pgscope"' in str(e)
    e = login_error(proxy.dsn("carol", "carolpw", dbname="shop"))
    assert e.sqlstate == "28000" and "no auth_hba_file entry" in str(e)
    assert refused(proxy, 'pgscope_clients_refused_total{reason="hba"}') == 3.0

    # psql: the same rules, and the admin console is a database like the others
    psql = require("psql")
    env = {**os.environ, "PGPASSWORD": "alicepw", "PGCONNECT_TIMEOUT": "10"}
    out = subprocess.run([psql, "-X", "-At", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "alice", "-d", "shop",
                          "-c", "select 'via psql'"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "via psql", out.stderr
    out = subprocess.run([psql, "-X", "-At", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", pg.superuser,
                          "-d", "pgscope", "-c", "show pools"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and "shop" in out.stdout, out.stderr

    # a reload takes a new file; a file with an error keeps the rules in force
    hba.write_text("host all alice 127.0.0.1/32 reject\nhost all all 127.0.0.1/32 trust\n")
    assert proxy.call(proxy.proxy.reload_auth)
    assert "rejects connection" in str(login_error(proxy.dsn("alice", "alicepw", dbname="shop")))
    with psycopg.connect(proxy.dsn("bob", dbname="shop")) as c:  # trust now: no password asked
        assert c.execute("select 1").fetchone() == (1,)
    hba.write_text("host all all 127.0.0.1/32 ldap ldapserver=x\n")
    assert not proxy.call(proxy.proxy.reload_auth)
    with psycopg.connect(proxy.dsn("bob", dbname="shop")) as c:
        assert c.execute("select 1").fetchone() == (1,)


def test_hostssl_and_hostnossl(proxy_factory, pg, hba_setup):
    tmp, auth, databases = hba_setup
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    hba = tmp / "hba.conf"
    hba.write_text("hostssl all alice 127.0.0.1/32 password\nhostnossl all all 127.0.0.1/32 reject\n")
    proxy = proxy_factory(auth_type="hba", auth_file=auth, auth_hba_file=str(hba), databases=databases,
                          client_tls_mode="allow", client_tls_cert=str(tmp / "server.pem"),
                          client_tls_key=str(tmp / "server.pem"))
    tls = proxy.dsn("alice", "alicepw", dbname="shop") + f"?sslmode=verify-full&sslrootcert={tmp / 'ca.pem'}"
    with psycopg.connect(tls) as c:
        assert c.info.pgconn.ssl_in_use
        assert c.execute("select 1").fetchone() == (1,)
    e = login_error(proxy.dsn("alice", "alicepw", dbname="shop") + "?sslmode=disable")
    assert e.sqlstate == "28000" and "no encryption" in str(e) and "rejects connection" in str(e)


def test_peer_on_the_unix_socket(proxy_factory, pg, hba_setup):
    tmp, auth, databases = hba_setup
    sockdir = tmp / "sock"
    sockdir.mkdir()
    hba = tmp / "hba.conf"
    hba.write_text("local all all peer\nhost all all 127.0.0.1/32 reject\n")
    proxy = proxy_factory(auth_type="hba", auth_file=auth, auth_hba_file=str(hba), databases=databases,
                          unix_socket_dir=str(sockdir))
    psql = require("psql")

    def over_socket(user: str) -> subprocess.CompletedProcess:
        return subprocess.run([psql, "-X", "-At", "-h", str(sockdir), "-p", str(proxy.port), "-U", user, "-d", "shop",
                               "-c", "select 'peer ok'"], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PGCONNECT_TIMEOUT": "10", "PGPASSWORD": "alicepw"})

    # this process's operating-system user logs in as itself, with no password
    out = over_socket(OS_USER)
    assert out.returncode == 0 and out.stdout.strip() == "peer ok", out.stderr
    before = refused(proxy, "pgscope_client_auth_failures_total")
    # the same process as another user: refused, whatever password it has
    out = over_socket("alice" if OS_USER != "alice" else "bob")
    assert out.returncode != 0 and "Peer authentication failed for user" in out.stderr, out.stderr
    assert refused(proxy, "pgscope_client_auth_failures_total") == before + 1
    # local rules are for the socket only, host rules for TCP only
    e = login_error(proxy.dsn(OS_USER, dbname="shop"))
    assert "rejects connection" in str(e) and 'host "127.0.0.1"' in str(e)


def test_check_config_reports_a_bad_rule(tmp_path):
    hba = tmp_path / "hba.conf"
    hba.write_text("local all all peer\nhost all all samenet md5\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSCOPE_")}
    env.update(PGSCOPE_AUTH_TYPE="hba", PGSCOPE_AUTH_HBA_FILE=str(hba))
    run = lambda: subprocess.run([sys.executable, "-m", "proxy", "check-config", "config/pgscope.example.toml"],
                                 capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    hba.write_text("local all all peer\n")
    ok = run()
    assert ok.returncode == 0, ok.stderr
    hba.write_text("local all all peer\nhost all all samenet md5\n")
    bad = run()
    assert bad.returncode == 2 and f"{hba}:2: samenet is not supported" in bad.stderr, bad.stderr
    del env["PGSCOPE_AUTH_HBA_FILE"]
    bad = run()
    assert bad.returncode == 2 and "auth_type: hba needs auth_hba_file" in bad.stderr, bad.stderr


@pytest.fixture
def client_certs(tmp_path):
    """A CA for the proxy's certificate and clients' certificates (alice's), and one from another CA."""
    ca, other = trustme.CA(), trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    for name, issuer in (("alice", ca), ("stranger", other)):
        leaf = issuer.issue_cert(f"{name}.clients.test", common_name="alice")
        leaf.cert_chain_pems[0].write_to_path(str(tmp_path / f"{name}.crt"))
        leaf.private_key_pem.write_to_path(str(tmp_path / f"{name}.key"))
        os.chmod(tmp_path / f"{name}.key", 0o600)
    return tmp_path


def test_client_certificates(proxy_factory, pg, hba_setup, client_certs):
    """client_tls_ca_file + cert: a hostssl cert rule and auth_type = cert let in the user named
    by a verified certificate's common name, and only that user."""
    tmp, auth, databases = hba_setup
    certs = client_certs
    tls = {"client_tls_mode": "allow", "client_tls_cert": str(certs / "server.pem"),
           "client_tls_key": str(certs / "server.pem"), "client_tls_ca_file": str(certs / "ca.pem")}
    hba = tmp / "hba.conf"
    hba.write_text("hostssl all all 127.0.0.1/32 cert\nhost all all 127.0.0.1/32 reject\n")
    by_rule = proxy_factory(auth_type="hba", auth_file=auth, auth_hba_file=str(hba), databases=databases, **tls)
    by_type = proxy_factory(auth_type="cert", auth_file=auth, databases=databases, **tls)

    def dsn(proxy, user: str, cert: str | None = "alice") -> str:
        out = proxy.dsn(user, dbname="shop") + f"?sslmode=verify-full&sslrootcert={certs / 'ca.pem'}"
        if cert:
            out += f"&sslcert={certs / cert}.crt&sslkey={certs / cert}.key"
        return out

    for proxy in (by_rule, by_type):
        with psycopg.connect(dsn(proxy, "alice")) as c:  # the control: alice's certificate, no password
            assert c.info.pgconn.ssl_in_use
            assert c.execute("select 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError, match='certificate authentication failed for user "bob"'):
            psycopg.connect(dsn(proxy, "bob"), connect_timeout=10)
        with pytest.raises(psycopg.OperationalError, match="connection requires a valid client certificate"):
            psycopg.connect(dsn(proxy, "alice", cert=None), connect_timeout=10)
        with pytest.raises(psycopg.OperationalError) as e:  # the right name from another CA: TLS refuses it
            psycopg.connect(dsn(proxy, "alice", cert="stranger"), connect_timeout=10)
        # (TLS 1.3: the refusal comes after the client's side of the handshake is done, so libpq
        # reports it either way)
        assert any(w in str(e.value).lower() for w in ("ssl error", "closed the connection unexpectedly")), e.value
        with psycopg.connect(dsn(proxy, "alice")) as c:  # and the next client is served as before
            assert c.execute("select 2").fetchone() == (2,)
    # hba: without TLS the reject rule decides
    e = login_error(by_rule.dsn("alice", "alicepw", dbname="shop") + "?sslmode=disable")
    assert e.sqlstate == "28000" and "rejects connection" in str(e)
