"""TLS on both sides: clients to pgscope, pgscope to PostgreSQL (certificates made at test time)."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl

import asyncpg
import psycopg
import pytest
import trustme  # a dev dependency: missing is an error, not a skip

from tests.support.client import login_error


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": d / "ca.pem", "cert": d / "server.crt", "key": d / "server.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    other = trustme.CA()
    paths["other_ca"] = d / "other_ca.pem"
    other.cert_pem.write_to_path(str(paths["other_ca"]))
    os.chmod(paths["key"], 0o600)
    # the certificate pgscope presents to PostgreSQL (server_tls_cert), from the same CA
    mine = ca.issue_cert("pgscope.test", common_name="pgscope-proxy")
    paths["proxy_cert"], paths["proxy_key"] = d / "proxy.crt", d / "proxy.key"
    mine.cert_chain_pems[0].write_to_path(str(paths["proxy_cert"]))
    mine.private_key_pem.write_to_path(str(paths["proxy_key"]))
    os.chmod(paths["proxy_key"], 0o600)
    return {k: str(v) for k, v in paths.items()}


def tls_proxy(proxy_factory, certs, mode="require", **kw):
    return proxy_factory(client_tls_mode=mode, client_tls_cert=certs["cert"],
                         client_tls_key=certs["key"], **kw)


def test_client_tls_required(proxy_factory, pg, certs):
    proxy = tls_proxy(proxy_factory, certs, "require")
    dsn = proxy.dsn(pg.superuser)
    with psycopg.connect(dsn, sslmode="verify-full", sslrootcert=certs["ca"], autocommit=True) as c:
        assert c.pgconn.ssl_in_use
        assert c.execute("select 7 * 6").fetchone() == (42,)
        # a large result through the encrypted channel
        n = c.execute("select count(*) from (select repeat('x', 1000) from generate_series(1, 20000)) s").fetchone()
        assert n == (20000,)
        rows = c.execute("select repeat('y', 500) from generate_series(1, 5000)").fetchall()
        assert len(rows) == 5000 and rows[-1][0] == "y" * 500
    with pytest.raises(psycopg.OperationalError) as ei:
        psycopg.connect(dsn, sslmode="disable")
    assert "SSL required" in str(ei.value)
    assert 'pgscope_clients_refused_total{reason="tls_required"} 1.0' in proxy.metrics()


def test_client_tls_prefer_accepts_both(proxy_factory, pg, certs):
    proxy = tls_proxy(proxy_factory, certs, "prefer")
    dsn = proxy.dsn(pg.superuser)
    with psycopg.connect(dsn, sslmode="disable", autocommit=True) as c:
        assert not c.pgconn.ssl_in_use
        assert c.execute("select 1").fetchone() == (1,)
    with psycopg.connect(dsn, sslmode="require", autocommit=True) as c:
        assert c.pgconn.ssl_in_use
        assert c.execute("select 1").fetchone() == (1,)


def test_client_tls_disabled_answers_n(proxy, pg):
    with psycopg.connect(proxy.dsn(pg.superuser), sslmode="prefer", autocommit=True) as c:
        assert not c.pgconn.ssl_in_use
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(pg.superuser), sslmode="require")


def test_client_tls_asyncpg_transaction_mode(proxy_factory, pg, certs):
    proxy = tls_proxy(proxy_factory, certs, "require", pool_mode="transaction", pool_size=2)
    ctx = ssl.create_default_context(cafile=certs["ca"])

    async def main():
        pool = await asyncpg.create_pool(proxy.dsn(pg.superuser), ssl=ctx, min_size=5, max_size=5)
        try:
            async def one(i):
                async with pool.acquire() as c:
                    return await c.fetchval("select $1::int * 2", i)
            return await asyncio.gather(*(one(i) for i in range(200)))
        finally:
            await pool.close()

    assert asyncio.run(main()) == [i * 2 for i in range(200)]


def test_client_plaintext_after_sslrequest_is_refused(proxy_factory, pg, certs):
    """Bytes sent in the clear behind an SSLRequest must not be taken as encrypted-channel data."""
    import socket
    import struct

    proxy = tls_proxy(proxy_factory, certs, "prefer")
    s = socket.create_connection((proxy.host, proxy.port), timeout=5)
    startup = struct.pack("!i", 196608) + b"user\0postgres\0\0"
    s.sendall(struct.pack("!ii", 8, 80877103) + struct.pack("!i", len(startup) + 4) + startup)
    data = s.recv(1024)
    s.close()
    assert data[:1] == b"E" and b"08P01" in data


# ------------------------------------------------------------------ upstream TLS

@pytest.fixture(scope="module")
def pg_tls(pg, certs):
    """Turn TLS on in the test server (managed clusters only), off again afterwards."""
    if not pg.managed:
        pytest.skip("upstream TLS tests need a throwaway cluster (not PGSCOPE_TEST_DSN)")
    with pg.connect() as c:
        datadir = c.execute("show data_directory").fetchone()[0]
    cert = os.path.join(datadir, "pgscope_test.crt")
    key = os.path.join(datadir, "pgscope_test.key")
    ca = os.path.join(datadir, "pgscope_test_ca.crt")  # PostgreSQL asks clients for certificates of this CA
    shutil.copy(certs["cert"], cert)
    shutil.copy(certs["key"], key)
    shutil.copy(certs["ca"], ca)
    st = os.stat(datadir)
    for f in (cert, key, ca):
        os.chown(f, st.st_uid, st.st_gid)
    os.chmod(key, 0o600)
    with pg.connect() as c:
        c.execute(f"alter system set ssl_cert_file = '{cert}'")
        c.execute(f"alter system set ssl_key_file = '{key}'")
        c.execute(f"alter system set ssl_ca_file = '{ca}'")
        c.execute("alter system set ssl = on")
        c.execute("select pg_reload_conf()")
    yield pg
    with pg.connect() as c:
        c.execute("alter system reset ssl")
        c.execute("alter system reset ssl_cert_file")
        c.execute("alter system reset ssl_key_file")
        c.execute("alter system reset ssl_ca_file")
        c.execute("select pg_reload_conf()")


def _ssl_in_use(conn) -> bool:
    return conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone()[0]


@pytest.mark.parametrize("mode", ["require", "verify-ca", "verify-full"])
def test_server_tls(proxy_factory, pg_tls, certs, mode):
    proxy = proxy_factory(server_tls_mode=mode, server_tls_ca_file=certs["ca"])
    with psycopg.connect(proxy.dsn(pg_tls.superuser), autocommit=True) as c:
        assert _ssl_in_use(c)
        assert c.execute("select 1").fetchone() == (1,)


def test_server_tls_client_certificate(proxy_factory, pg_tls, certs):
    """server_tls_cert: PostgreSQL (with ssl_ca_file) sees pgscope's certificate; without it, none."""
    def client_dn(proxy) -> str | None:
        with psycopg.connect(proxy.dsn(pg_tls.superuser), autocommit=True) as c:
            assert _ssl_in_use(c)
            return c.execute("select client_dn from pg_stat_ssl where pid = pg_backend_pid()").fetchone()[0]

    with_cert = proxy_factory(server_tls_mode="verify-full", server_tls_ca_file=certs["ca"],
                              server_tls_cert=certs["proxy_cert"], server_tls_key=certs["proxy_key"])
    dn = client_dn(with_cert)  # PostgreSQL cuts the DN at 63 bytes: trustme's O and OU come first
    assert dn is not None and "/CN=pgscope-" in dn, dn
    without = proxy_factory(server_tls_mode="verify-full", server_tls_ca_file=certs["ca"])
    assert client_dn(without) is None


def test_server_tls_wrong_ca_fails_cleanly(proxy_factory, pg_tls, certs):
    proxy = proxy_factory(server_tls_mode="verify-full", server_tls_ca_file=certs["other_ca"])
    e = login_error(proxy.dsn(pg_tls.superuser), ssl=False)
    assert e.sqlstate == "08006"
    assert "TLS handshake with server failed" in e.args[0]


def test_server_tls_prefer_and_disable(proxy_factory, pg_tls, certs):
    p1 = proxy_factory(server_tls_mode="prefer")
    with psycopg.connect(p1.dsn(pg_tls.superuser), autocommit=True) as c:
        assert _ssl_in_use(c)
    p2 = proxy_factory(server_tls_mode="disable")
    with psycopg.connect(p2.dsn(pg_tls.superuser), autocommit=True) as c:
        assert not _ssl_in_use(c)
