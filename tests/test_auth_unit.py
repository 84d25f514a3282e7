"""Auth state machines with published vectors and in-memory exchanges (no server needed).

One test talks to the real PostgreSQL of the test fixture (it skips only when that server's hba does not check SCRAM for the probe role, as with some PGSCOPE_TEST_DSN servers).
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
from urllib.parse import unquote, urlsplit

import pytest

from proxy.protocol import messages as m
from proxy.protocol.framing import Framer
from proxy.protocol.auth import (
    AuthFailed, ClientAuthenticator, UpstreamAuthenticator, load_userlist, md5_password,
    md5_response, parse_userlist, secret_kind,
)
from proxy.protocol.scram import (
    ScramClient, ScramError, ScramServer, keys, make_verifier, parse_verifier,
)
from tests.support.pg import ROLES

# RFC 7677 section 3
RFC_USER = "user"
RFC_PASSWORD = "pencil"
RFC_CNONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SNONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
RFC_CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
FAILED = 'password authentication failed for user "alice"'


# ------------------------------------------------------------------ SCRAM vectors

def test_scram_client_rfc7677_vector():
    c = ScramClient(RFC_PASSWORD, nonce=RFC_CNONCE, user=RFC_USER)
    assert c.client_first() == RFC_CLIENT_FIRST
    assert c.client_final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    c.verify_server_final(RFC_SERVER_FINAL)
    with pytest.raises(ScramError, match="server signature mismatch"):
        c.verify_server_final(b"v=" + base64.b64encode(b"x" * 32))
    with pytest.raises(ScramError):
        c.verify_server_final(b"e=invalid-proof")


def test_scram_client_default_first_message():
    first = ScramClient("pw").client_first()
    assert first.startswith(b"n,,n=,r=") and len(first) > 20
    with pytest.raises(ScramError):  # the server must extend our nonce
        ScramClient("pw", nonce="abc").client_final(b"r=xyz123,s=AAAA,i=4096")


def test_scram_server_rfc7677_vector():
    _, stored, server_key = keys(RFC_PASSWORD, RFC_SALT, 4096)
    s = ScramServer(stored, server_key, RFC_SALT, 4096, nonce=RFC_SNONCE)
    assert s.server_first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert s.server_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    v = make_verifier(RFC_PASSWORD, salt=RFC_SALT)
    s = ScramServer.from_verifier(v, nonce=RFC_SNONCE)
    s.server_first(RFC_CLIENT_FIRST)
    assert s.server_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    s = ScramServer.from_password(RFC_PASSWORD, RFC_SALT, nonce=RFC_SNONCE)
    s.server_first(RFC_CLIENT_FIRST)
    assert s.server_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL


def test_scram_server_rejects_wrong_proof_and_odd_messages():
    s = ScramServer.from_password("other", RFC_SALT, nonce=RFC_SNONCE)
    s.server_first(RFC_CLIENT_FIRST)
    with pytest.raises(ScramError, match="wrong password"):
        s.server_final(RFC_CLIENT_FINAL)
    for bad in (b"p=tls-server-end-point,,n=,r=abc", b"n,a=admin,n=,r=abc", b"n,,n=", b"x,,n=,r=a",
                b"n,,m=ext,n=,r=abc", b"garbage"):
        with pytest.raises(ScramError):
            ScramServer.mock("u").server_first(bad)
    s = ScramServer.mock("u")
    s.server_first(b"n,,n=,r=abc")
    with pytest.raises(ScramError, match="nonce"):
        s.server_final(b"c=biws,r=abcWRONG,p=" + base64.b64encode(b"\0" * 32))


def test_scram_mock_always_fails_and_is_stable():
    a, b = ScramServer.mock("ghost"), ScramServer.mock("ghost")
    assert (a.salt, a.iterations) == (b.salt, b.iterations) and len(a.salt) == 16
    assert ScramServer.mock("other").salt != a.salt
    # even a client computing a "correct" proof against the fake salt fails
    c = ScramClient("anything")
    first = a.server_first(c.client_first())
    with pytest.raises(ScramError, match="wrong password"):
        a.server_final(c.client_final(first))


def test_scram_server_accepts_y_gs2_header():
    """``y,,``: the client could bind but thinks we cannot; c= must then be base64("y,,")."""
    import hmac as _hmac
    salt = b"0123456789abcdef"
    client_key, stored, _ = keys("pw", salt, 4096)
    s = ScramServer.from_password("pw", salt)
    first = s.server_first(b"y,,n=,r=clientnonce").decode()
    nonce = dict(p.split("=", 1) for p in first.split(","))["r"]
    without_proof = f"c={base64.b64encode(b'y,,').decode()},r={nonce}"
    auth_message = f"n=,r=clientnonce,{first},{without_proof}".encode()
    sig = _hmac.new(stored, auth_message, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(client_key, sig))
    with pytest.raises(ScramError, match="channel-binding"):
        s.server_final(f"c=biws,r={nonce},p={base64.b64encode(proof).decode()}".encode())
    assert s.server_final(f"{without_proof},p={base64.b64encode(proof).decode()}".encode()).startswith(b"v=")


def test_verifier_format_round_trip():
    v = make_verifier("secret", salt=b"0123456789abcdef", iterations=4096)
    assert v.startswith("SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$")
    it, salt, stored, server = parse_verifier(v)
    assert (it, salt) == (4096, b"0123456789abcdef")
    assert keys("secret", salt, it)[1:] == (stored, server)
    # PostgreSQL's layout, keys as computed independently
    salted = hashlib.pbkdf2_hmac("sha256", b"secret", salt, 4096)
    import hmac as _hmac
    ck = _hmac.new(salted, b"Client Key", "sha256").digest()
    sk = _hmac.new(salted, b"Server Key", "sha256").digest()
    assert v.split("$")[2] == (base64.b64encode(hashlib.sha256(ck).digest()).decode() + ":"
                               + base64.b64encode(sk).decode())
    assert parse_verifier(make_verifier("x")) is not None
    assert make_verifier("x") != make_verifier("x")  # fresh salt
    for bad in ("md5abc", "SCRAM-SHA-256$x:y$z:w", "SCRAM-SHA-256$4096:AAAA$AAAA:AAAA",
                "SCRAM-SHA-256$-1:" + v.split(":", 1)[1], "plain password", ""):
        assert parse_verifier(bad) is None, bad


def test_saslprep_nfkc():
    # U+2168 ROMAN NUMERAL NINE normalises to "IX" under NFKC
    assert keys("\u2168", b"salt", 1) == keys("IX", b"salt", 1)


# ------------------------------------------------------------------ md5 and secrets

def test_md5_vectors():
    inner = hashlib.md5(b"postgrespostgres").hexdigest()
    assert md5_password("postgres", "postgres") == "md5" + inner
    assert md5_password("postgres", "postgres") == "md53175bce1d3201d16594cebf9d7eb3f9d"
    salt = b"\x01\x02\x03\x04"
    expected = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
    assert md5_response("postgres", "postgres", salt) == expected
    assert md5_response("postgres", md5_password("postgres", "postgres"), salt) == expected


def test_secret_kind():
    assert secret_kind("hello") == "plain"
    assert secret_kind(md5_password("u", "p")) == "md5"
    assert secret_kind("md5" + "z" * 32) == "plain"
    assert secret_kind(make_verifier("p")) == "scram"
    assert secret_kind("SCRAM-SHA-256$broken") == "plain"


# ------------------------------------------------------------------ in-memory exchanges

def _frames(data: bytes) -> list[tuple[int, bytes]]:
    fb = Framer()
    fb.feed(data)
    msgs = fb.messages()
    assert fb.pending() == 0
    return msgs


def _exchange(method: str, secret: str | None, user: str = "alice", password: str | None = "pw",
              trace: list[int] | None = None) -> bool:
    """ClientAuthenticator (the proxy as server) against UpstreamAuthenticator (as client)."""
    server = ClientAuthenticator(method, user, secret)
    client = UpstreamAuthenticator(user, password)
    out = server.start()
    for _ in range(10):
        reply = b""
        for t, body in _frames(out):
            assert t == m.B_AUTH
            if trace is not None:
                trace.append(struct.unpack("!i", body[:4])[0])
            r = client.feed(body)
            if r:
                reply += r
        if server.done:
            assert client.done and not reply
            return True
        assert not client.done
        (t, body), = _frames(reply)
        out = server.feed(bytes([t]), body)
    raise AssertionError("no end to the exchange")


MD5_SECRET = md5_password("alice", "pw")


@pytest.mark.parametrize("method,secret,codes", [
    ("plain", "pw", [3, 0]),
    ("plain", MD5_SECRET, [3, 0]),
    ("plain", "verifier", [3, 0]),
    ("md5", "pw", [5, 0]),
    ("md5", MD5_SECRET, [5, 0]),
    ("md5", "verifier", [10, 11, 12, 0]),  # PostgreSQL: a SCRAM secret turns md5 into SCRAM
    ("scram-sha-256", "pw", [10, 11, 12, 0]),
    ("scram-sha-256", "verifier", [10, 11, 12, 0]),
    ("trust", None, [0]),
    ("trust", "pw", [0]),
])
def test_round_trips(method, secret, codes):
    if secret == "verifier":
        secret = make_verifier("pw")
    trace: list[int] = []
    assert _exchange(method, secret, trace=trace)
    assert trace == codes


def test_md5_method_with_verifier_falls_back_to_scram():
    a = ClientAuthenticator("md5", "alice", make_verifier("pw"))
    assert a.method == "scram-sha-256"
    assert a.start() == m.frame(b"R", struct.pack("!i", 10) + b"SCRAM-SHA-256\0\0")


def test_scram_method_with_md5_secret_fails_like_wrong_password():
    with pytest.raises(AuthFailed) as ei:
        _exchange("scram-sha-256", MD5_SECRET)
    assert (ei.value.sqlstate, ei.value.message) == ("28P01", FAILED)
    assert "SCRAM secret" in ei.value.reason


@pytest.mark.parametrize("method", ["plain", "md5", "scram-sha-256"])
@pytest.mark.parametrize("secret", ["pw", MD5_SECRET, "verifier"])
def test_wrong_password(method, secret):
    if secret == "verifier":
        secret = make_verifier("pw")
    with pytest.raises(AuthFailed) as ei:
        _exchange(method, secret, password="nope")
    assert (ei.value.sqlstate, ei.value.message) == ("28P01", FAILED)


@pytest.mark.parametrize("method", ["plain", "md5", "scram-sha-256"])
def test_unknown_user_fails_like_wrong_password(method):
    trace: list[int] = []
    with pytest.raises(AuthFailed) as ei:
        _exchange(method, None, trace=trace)
    assert (ei.value.sqlstate, ei.value.message) == ("28P01", FAILED)
    assert ei.value.reason == "unknown user"
    if method == "scram-sha-256":
        assert trace == [10, 11]  # the whole exchange ran, failing only at the proof


def _scram_first(user: str, secret: str | None) -> dict[str, str]:
    a = ClientAuthenticator("scram-sha-256", user, secret)
    a.start()
    data = b"n,,n=,r=abcdefghijklmn"
    out = a.feed(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(data)) + data)
    (t, body), = _frames(out)
    assert t == m.B_AUTH and body[:4] == struct.pack("!i", 11)
    return dict(p.split("=", 1) for p in body[4:].decode().split(","))


def test_unknown_user_server_first_is_well_formed_and_stable():
    a, b = _scram_first("ghost", None), _scram_first("ghost", None)
    assert sorted(a) == ["i", "r", "s"]
    assert a["s"] == b["s"] and a["i"] == b["i"] == "4096"
    assert a["r"].startswith("abcdefghijklmn") and a["r"] != b["r"]
    assert len(base64.b64decode(a["s"], validate=True)) == 16
    assert _scram_first("other", None)["s"] != a["s"]
    # a known user looks the same: salt of the same size, stable across attempts too
    for secret in ("pw", make_verifier("pw")):
        k1, k2 = _scram_first("alice", secret), _scram_first("alice", secret)
        assert sorted(k1) == sorted(a) and k1["s"] == k2["s"] and k1["i"] == "4096"
        assert len(base64.b64decode(k1["s"])) == 16


def test_trust():
    a = ClientAuthenticator("trust", "alice", None)
    assert a.start() == m.auth_ok() and a.done
    with pytest.raises(AuthFailed):
        a.feed(b"p", b"pw\0")


def test_client_protocol_errors():
    a = ClientAuthenticator("md5", "alice", "pw")
    a.start()
    with pytest.raises(AuthFailed) as ei:
        a.feed(b"Q", b"select 1\0")
    assert ei.value.sqlstate == "08P01"
    for body in (b"pw", b"p\0w\0"):
        a = ClientAuthenticator("plain", "alice", "pw")
        a.start()
        with pytest.raises(AuthFailed) as ei:
            a.feed(b"p", body)
        assert ei.value.sqlstate == "08P01"
    s = ClientAuthenticator("scram-sha-256", "alice", "pw")
    s.start()
    with pytest.raises(AuthFailed) as ei:
        s.feed(b"p", b"SCRAM-SHA-1\0" + struct.pack("!i", 3) + b"abc")
    assert (ei.value.sqlstate, ei.value.message) == (
        "08P01", "client selected an invalid SASL authentication mechanism")
    for body in (b"SCRAM-SHA-256", b"SCRAM-SHA-256\0\0\0", b"SCRAM-SHA-256\0" + struct.pack("!i", 9) + b"n,,",
                 b"SCRAM-SHA-256\0" + struct.pack("!i", 3) + b"abc"):
        s = ClientAuthenticator("scram-sha-256", "alice", "pw")
        s.start()
        with pytest.raises(AuthFailed) as ei:
            s.feed(b"p", body)
        assert ei.value.sqlstate == "08P01", body
    with pytest.raises(ValueError):
        ClientAuthenticator("kerberos", "alice", "pw")


def test_empty_passwords():
    a = ClientAuthenticator("plain", "alice", "pw")
    a.start()
    with pytest.raises(AuthFailed) as ei:
        a.feed(b"p", b"\0")
    assert ei.value.message == FAILED
    with pytest.raises(AuthFailed) as ei:
        _exchange("scram-sha-256", "", password="pw")
    assert ei.value.message == FAILED and ei.value.reason == "no password configured"


# ------------------------------------------------------------------ upstream side

def _auth(code: int, payload: bytes = b"") -> bytes:
    return struct.pack("!i", code) + payload


def test_upstream_recorded_replies():
    assert UpstreamAuthenticator("bob", "s3cret").feed(_auth(3)) == b"p\x00\x00\x00\x0bs3cret\x00"
    salt = b"\xaa\xbb\xcc\xdd"
    want = ("md5" + hashlib.md5(hashlib.md5(b"s3cretbob").hexdigest().encode() + salt).hexdigest()).encode()
    assert UpstreamAuthenticator("bob", "s3cret").feed(_auth(5, salt)) == m.frame(b"p", want + b"\0")
    assert UpstreamAuthenticator("bob", md5_password("bob", "s3cret")).feed(_auth(5, salt)) \
        == m.frame(b"p", want + b"\0")
    u = UpstreamAuthenticator("bob", "s3cret")
    (t, body), = _frames(u.feed(_auth(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")))
    mech, pos = m.cstr(body)
    (n,) = struct.unpack_from("!i", body, pos)
    assert (t, mech, n) == (m.F_PASSWORD, "SCRAM-SHA-256", len(body) - pos - 4)
    assert body[pos + 4 :].startswith(b"n,,n=,r=")


def test_upstream_errors():
    with pytest.raises(AuthFailed) as ei:
        UpstreamAuthenticator("bob", None).feed(_auth(5, b"salt"))
    assert ei.value.sqlstate == "08P01"
    assert ei.value.message == 'no password configured for user "bob" (upstream URL or auth file)'
    for code in (2, 7, 9):
        with pytest.raises(AuthFailed) as ei:
            UpstreamAuthenticator("bob", "x").feed(_auth(code))
        assert ei.value.message == f"unsupported authentication method {code} requested by server"
    with pytest.raises(AuthFailed, match="no supported SASL mechanism"):
        UpstreamAuthenticator("bob", "x").feed(_auth(10, b"SCRAM-SHA-256-PLUS\0\0"))
    for hashed in (make_verifier("x"), md5_password("bob", "x")):
        with pytest.raises(AuthFailed, match="plaintext password"):
            UpstreamAuthenticator("bob", hashed).feed(_auth(10, b"SCRAM-SHA-256\0\0"))
    with pytest.raises(AuthFailed):  # SASL continue without a SASL start
        UpstreamAuthenticator("bob", "x").feed(_auth(11, b"r=abc,s=AAAA,i=1"))
    with pytest.raises(AuthFailed):
        UpstreamAuthenticator("bob", "x").feed(b"\0\0")


def test_upstream_rejects_ok_before_scram_final_and_bad_signature():
    u = UpstreamAuthenticator("alice", "pw")
    u.feed(_auth(10, b"SCRAM-SHA-256\0\0"))
    with pytest.raises(AuthFailed):
        u.feed(_auth(0))
    # a server that does not know the password cannot produce the signature
    server = ClientAuthenticator("scram-sha-256", "alice", "pw")
    u = UpstreamAuthenticator("alice", "pw")
    server.start()
    (_, body), = _frames(u.feed(_auth(10, b"SCRAM-SHA-256\0\0")))
    (_, cont), = _frames(server.feed(b"p", body))
    u.feed(cont)
    with pytest.raises(AuthFailed) as ei:
        u.feed(_auth(12, b"v=" + base64.b64encode(b"\0" * 32)))
    assert (ei.value.sqlstate, ei.value.message) == ("08P01", "server signature mismatch")


# ------------------------------------------------------------------ userlist

def test_userlist_parsing(tmp_path):
    text = ('; comment\n# another\n\n"alice" "pw"\n  "bob"\t  "a ""quoted"" one"  \n'
            '"md5u" "md5abc" extra ignored\n"" ""\n"sp ace" "x"\n')
    users = parse_userlist(text)
    assert users == {"alice": "pw", "bob": 'a "quoted" one', "md5u": "md5abc", "": "", "sp ace": "x"}
    path = tmp_path / "userlist.txt"
    path.write_text(text)
    assert load_userlist(str(path)) == users
    for bad in ('alice pw\n', '"alice"\n', '"alice" "pw\n', '"alice" pw\n', '"al"ice" "pw"\n'):
        with pytest.raises(ValueError) as ei:
            parse_userlist("; header\n\n" + bad)
        assert ":3:" in str(ei.value), (bad, ei.value)
    path.write_text('"a" "b"\nnope\n')
    with pytest.raises(ValueError, match=rf"{path}:2:"):
        load_userlist(str(path))


# ------------------------------------------------------------------ real PostgreSQL (optional)

def _recv_message(sock: socket.socket) -> tuple[int, bytes]:
    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        return buf
    head = exact(5)
    (length,) = struct.unpack("!i", head[1:])
    return head[0], exact(length - 4)


def _upstream_login(host: str, port: int, user: str, password: str, dbname: str,
                    tamper: bytes | None = None) -> list[int]:
    """Drive UpstreamAuthenticator over a plain socket; return the auth codes seen."""
    auth = UpstreamAuthenticator(user, password)
    codes: list[int] = []
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(m.startup_message({"user": user, "database": dbname}))
        while True:
            t, body = _recv_message(sock)
            if t == m.B_ERROR:
                f = m.decode_error_fields(body)
                raise AuthFailed(f["C"], f["M"])
            if t == m.B_READY_FOR_QUERY:
                sock.sendall(m.terminate())
                return codes
            if t == m.B_AUTH:
                codes.append(struct.unpack("!i", body[:4])[0])
                out = auth.feed(body)
                if out and tamper is not None:
                    out = tamper
                if out:
                    sock.sendall(out)


def test_against_real_postgres(pg):
    dsn = pg.dsn()
    import psycopg  # a dev dependency: missing is an error, not a skip

    u = urlsplit(dsn)
    host, port = u.hostname or "127.0.0.1", u.port or 5432
    role = "pgscope_auth_unit_probe"
    with psycopg.connect(dsn, autocommit=True) as admin:
        hba = admin.execute("select type, user_name, auth_method from pg_hba_file_rules").fetchall()
        scram_roles = [r for t, users, meth in hba if t == "host" and meth == "scram-sha-256"
                       for r in (users or []) if r != "all"]
        verifier = make_verifier("probe pw", salt=os.urandom(16), iterations=4096)
        admin.execute(f"drop role if exists {role}")
        admin.execute(f"create role {role} login password '{verifier}'")
        try:
            # PostgreSQL keeps a valid verifier verbatim (an invalid one would be hashed as a password)
            stored = admin.execute("select rolpassword from pg_authid where rolname = %s", (role,)).fetchone()
            assert stored == (verifier,)
            # pgscope_scram (tests/support/pg.py): a role whose TCP login really checks SCRAM.
            # Store our own verifier of its usual password, so concurrent tests are unaffected.
            probe, password = next((r, pw) for r, pw, _ in ROLES if r == "pgscope_scram")
            if probe not in scram_roles:
                pytest.skip(f"the server's hba does not ask {probe} for scram-sha-256 over TCP")
            keep = admin.execute("select rolpassword from pg_authid where rolname = %s", (probe,)).fetchone()
            if keep is None:
                pytest.skip(f"role {probe} does not exist")
            mine = make_verifier(password, salt=os.urandom(16), iterations=4096)
            admin.execute(f"alter role {probe} password '{mine}'")
            try:
                assert admin.execute("select rolpassword from pg_authid where rolname = %s",
                                     (probe,)).fetchone() == (mine,)
                db = unquote(u.path.lstrip("/")) or "postgres"
                assert _upstream_login(host, port, probe, password, db) == [10, 11, 12, 0]
                with psycopg.connect(host=host, port=port, user=probe, password=password, dbname=db):
                    pass
                with pytest.raises(AuthFailed) as ei:
                    _upstream_login(host, port, probe, "wrong", db)
                assert (ei.value.sqlstate, ei.value.message) == (
                    "28P01", f'password authentication failed for user "{probe}"')
                # the other roles of tests/support/pg.py: md5 and cleartext logins
                methods = {r: meth for t, users, meth in hba if t == "host" for r in (users or [])}
                for r, pw, _ in ROLES:
                    want = {"md5": [5, 0], "password": [3, 0]}.get(methods.get(r, ""))
                    if want and r != probe:
                        assert _upstream_login(host, port, r, pw, db) == want, r
                bad_mech = m.frame(b"p", b"SCRAM-SHA-1\0" + struct.pack("!i", 3) + b"abc")
                with pytest.raises(AuthFailed) as ei:
                    _upstream_login(host, port, probe, password, db, tamper=bad_mech)
                assert (ei.value.sqlstate, ei.value.message) == (
                    "08P01", "client selected an invalid SASL authentication mechanism")
            finally:
                admin.execute(f"alter role {probe} password '{keep[0]}'" if keep[0]
                              else f"alter role {probe} password null")
        finally:
            admin.execute(f"drop role if exists {role}")
