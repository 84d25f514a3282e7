"""The HTTP endpoint closed by a bearer token, and served over TLS.

The server alone (no PostgreSQL) for the rules, then ``pgscope run`` as a child process with the token
from the environment or a file, over HTTPS, rotated by SIGHUP, and read by ``pgscope report``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psycopg
import pytest
import trustme  # a dev dependency

from proxy.export.http import Access, ExportServer
from proxy.tls import client_side_context
from tests.support.proxy import ProxyProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "tok-3f9c1a7e5b"
ROUTES = {
    "/metrics": lambda p: (200, "text/plain", b"pgscope_up 1\n"),
    "/healthz": lambda p: (200, "text/plain", b"ok\n"),
    "/readyz": lambda p: (200, "text/plain", b"ready\n"),
    "/api/statements": lambda p: {"statements": [{"query": "select $1"}]},
}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("http-certs")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": d / "ca.pem", "cert": d / "server.crt", "key": d / "server.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    os.chmod(paths["key"], 0o600)
    return {k: str(v) for k, v in paths.items()}


async def request(port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET",
                  ssl_ctx: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx,
                                         server_hostname="127.0.0.1" if ssl_ctx else None)
    head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    w.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
    await w.drain()
    resp = await asyncio.wait_for(r.read(), 15)
    w.close()
    top, _, body = resp.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    hdrs = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    return int(lines[0].split(" ")[1]), hdrs, body


def serve(scenario, **kw):
    async def main():
        srv = ExportServer("127.0.0.1", 0, ROUTES, **kw)
        await srv.start()
        try:
            return await scenario(srv)
        finally:
            await srv.close()
    return asyncio.run(main())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_api_needs_the_token_and_probes_do_not():
    access = {"now": Access(TOKEN)}

    async def scenario(srv):
        port = srv.port
        # without a token, or with a wrong one, or another scheme: 401, nothing more
        for headers in (None, bearer("wrong"), bearer(TOKEN + "x"), {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": TOKEN}, {"Authorization": "Bearer"}):
            status, hdrs, body = await request(port, "/api/statements", headers)
            assert status == 401, headers
            assert hdrs["www-authenticate"] == "Bearer"
            assert json.loads(body) == {"error": "unauthorized"}
        status, hdrs, body = await request(port, "/api/statements", method="HEAD")
        assert status == 401 and body == b""
        # with it: the answer (the scheme's case does not matter)
        status, _, body = await request(port, "/api/statements", bearer(TOKEN))
        assert status == 200 and json.loads(body)["statements"]
        assert (await request(port, "/api/statements", {"authorization": f"bearer {TOKEN}"}))[0] == 200
        # unknown paths are closed too (a route added later is not open by accident)
        assert (await request(port, "/api/nothing"))[0] == 401
        assert (await request(port, "/nothing"))[0] == 401
        assert (await request(port, "/nothing", bearer(TOKEN)))[0] == 404
        # probes are always open; /metrics too unless metrics_require_token
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await request(port, path))[0] == 200, path
        access["now"] = Access(TOKEN, metrics_require_token=True)
        assert (await request(port, "/metrics"))[0] == 401
        status, _, body = await request(port, "/metrics", bearer(TOKEN))
        assert status == 200 and body == b"pgscope_up 1\n"
        for path in ("/healthz", "/readyz"):
            assert (await request(port, path))[0] == 200, path
        # a new token (SIGHUP) applies to the next request; the old one is refused
        access["now"] = Access("rotated-token")
        assert (await request(port, "/api/statements", bearer(TOKEN)))[0] == 401
        assert (await request(port, "/api/statements", bearer("rotated-token")))[0] == 200
        # no token: open
        access["now"] = Access()
        assert (await request(port, "/api/statements"))[0] == 200
        return srv.unauthorized

    assert serve(scenario, access=lambda: access["now"]) == 11  # every 401 above counted


def test_without_access_rules_everything_is_open():
    async def scenario(srv):
        return [(await request(srv.port, p))[0] for p in ("/api/statements", "/metrics", "/healthz")]

    assert serve(scenario) == [200, 200, 200]


def test_https(certs):
    client = ssl.create_default_context(cafile=certs["ca"])

    async def scenario(srv):
        status, _, body = await request(srv.port, "/api/statements", bearer(TOKEN), ssl_ctx=client)
        assert status == 200 and json.loads(body)["statements"]
        assert (await request(srv.port, "/api/statements", ssl_ctx=client))[0] == 401
        assert (await request(srv.port, "/healthz", ssl_ctx=client))[0] == 200
        # plain HTTP on the TLS port gets no HTTP answer
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await w.drain()
        try:
            data = await asyncio.wait_for(r.read(), 15)
        except ConnectionError:
            data = b""
        w.close()
        assert not data.startswith(b"HTTP/1.1 200")

    serve(scenario, access=lambda: Access(TOKEN), ssl=client_side_context(certs["cert"], certs["key"]))


# ------------------------------------------------------------------ pgscope run, as deployed

def https_get(port: int, path: str, ca: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"https://127.0.0.1:{port}{path}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10, context=ssl.create_default_context(cafile=ca)) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def report(port: int, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("PGSCOPE_") or k.startswith("PGSCOPE_TEST_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "proxy", "report", "--from", f"https://127.0.0.1:{port}", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=e)


def test_pgscope_run_with_a_token_file_over_https(pg, certs, tmp_path):
    token_file = tmp_path / "http-token"
    token_file.write_text(TOKEN + "\n")
    cfg = tmp_path / "pgscope.toml"
    cfg.write_text(f'upstream = "{pg.dsn()}"\nlog_level = "info"\nhttp_token_file = "{token_file}"\n'
                   f'metrics_require_token = true\nhttp_tls_cert = "{certs["cert"]}"\n'
                   f'http_tls_key = "{certs["key"]}"\n')
    p = ProxyProcess(["--config", str(cfg)]).wait_ready()
    try:
        port, ca = p.metrics_port, certs["ca"]
        with psycopg.connect(p.dsn(pg.superuser), autocommit=True) as c:
            c.execute("select 1 as http_auth_probe")
        assert https_get(port, "/api/statements", ca)[0] == 401
        assert https_get(port, "/metrics", ca)[0] == 401
        assert https_get(port, "/healthz", ca) == (200, b"ok\n")
        assert https_get(port, "/readyz", ca)[0] == 200

        def listed():
            status, body = https_get(port, "/api/statements?limit=100", ca, TOKEN)
            assert status == 200
            return "http_auth_probe" in body.decode()
        deadline = time.monotonic() + 10
        while not listed():
            assert time.monotonic() < deadline, "the statement never showed up"
            time.sleep(0.1)
        status, body = https_get(port, "/metrics", ca, TOKEN)
        assert status == 200 and b"pgscope_build_info" in body
        assert TOKEN not in p.logs()
        # pgscope report: refused without the token, with it from the environment or a file
        bad = report(port, "--ca-file", ca)
        assert bad.returncode == 1 and "401" in bad.stderr and "PGSCOPE_HTTP_TOKEN" in bad.stderr
        for args, env in ((["--ca-file", ca], {"PGSCOPE_HTTP_TOKEN": TOKEN}),
                          (["--ca-file", ca, "--token-file", str(token_file)], None)):
            ok = report(port, *args, env=env)
            assert ok.returncode == 0, ok.stderr
            assert "http_auth_probe" in ok.stdout
        # rotate: a new file content and SIGHUP; the old token stops working
        token_file.write_text("rotated-7c2d\n")
        p.signal(signal.SIGHUP)
        assert "http_token" in p.wait_event("reloaded")["changed"]
        assert https_get(port, "/api/statements", ca, TOKEN)[0] == 401
        assert https_get(port, "/api/statements", ca, "rotated-7c2d")[0] == 200
        assert "rotated-7c2d" not in p.logs()
    finally:
        p.stop()


def test_an_open_api_on_a_public_address_is_warned_about(pg):
    from tests.support.tools import free_port

    loopback = ProxyProcess(["--upstream", pg.dsn()]).wait_ready()
    try:
        loopback.wait_event("listening")  # started up, and said nothing about an open API
        assert "http_api_open" not in loopback.logs()
    finally:
        loopback.stop()
    public = ProxyProcess(["--upstream", pg.dsn(), "--metrics-listen", f"0.0.0.0:{free_port()}"]).wait_ready()
    try:
        assert "http_token" in public.wait_event("http_api_open")["hint"]
    finally:
        public.stop()
    with_token = ProxyProcess(["--upstream", pg.dsn(), "--metrics-listen", f"0.0.0.0:{free_port()}"],
                              env={"PGSCOPE_HTTP_TOKEN": TOKEN}).wait_ready()
    try:
        with_token.wait_event("listening")
        assert "http_api_open" not in with_token.logs()
    finally:
        with_token.stop()
