"""Auth state machines with recorded byte strings and in-memory exchanges (no server)."""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest

from proxy.protocol import messages as m
from proxy.protocol.auth import (
    AuthFailed, ClientAuthenticator, UpstreamAuthenticator, md5_password, md5_response,
    parse_userlist, secret_kind,
)
from proxy.protocol.scram import ScramClient, ScramServer, keys, make_verifier, parse_verifier

# RFC 7677 section 3
RFC_PASSWORD = "pencil"
RFC_CNONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SNONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
             b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_scram_client_rfc7677_vector():
    # RFC 7677 uses n=user; PostgreSQL clients send n= (empty): rebuild the RFC's bare message
    c = ScramClient(RFC_PASSWORD, nonce=RFC_CNONCE)
    c._first_bare = f"n=user,r={RFC_CNONCE}"
    server_first = f"r={RFC_CNONCE}{RFC_SNONCE},s={base64.b64encode(RFC_SALT).decode()},i=4096".encode()
    assert c.client_final(server_first) == RFC_FINAL
    c.verify_server_final(RFC_SERVER_FINAL)
    with pytest.raises(ValueError):
        c.verify_server_final(b"v=" + base64.b64encode(b"x" * 32))


def test_scram_server_rfc7677_vector():
    _, stored, server_key = keys(RFC_PASSWORD, RFC_SALT, 4096)
    s = ScramServer(4096, RFC_SALT, stored, server_key, nonce=RFC_SNONCE)
    first = s.server_first(f"n,,n=user,r={RFC_CNONCE}".encode())
    assert first == f"r={RFC_CNONCE}{RFC_SNONCE},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096".encode()
    assert s.server_final(RFC_FINAL) == RFC_SERVER_FINAL


def test_verifier_format_round_trip():
    v = make_verifier("secret", salt=b"0123456789abcdef", iterations=4096)
    assert v.startswith("SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$")
    it, salt, stored, server = parse_verifier(v)
    assert (it, salt) == (4096, b"0123456789abcdef")
    assert keys("secret", salt, it)[1:] == (stored, server)
    assert parse_verifier("md5abc") is None
    assert parse_verifier("SCRAM-SHA-256$x:y$z:w") is None


def test_md5_vectors():
    assert md5_password("postgres", "postgres") == "md5" + hashlib.md5(b"postgrespostgres").hexdigest()
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5(b"postgrespostgres").hexdigest().encode()
    expected = "md5" + hashlib.md5(inner + salt).hexdigest()
    assert md5_response("postgres", "postgres", salt) == expected
    assert md5_response("postgres", md5_password("postgres", "postgres"), salt) == expected


def test_secret_kind():
    assert secret_kind("hello") == "plain"
    assert secret_kind(md5_password("u", "p")) == "md5"
    assert secret_kind(make_verifier("p")) == "scram"


def _exchange(method, secret, user="alice", password="pw"):
    """Run ClientAuthenticator (proxy as server) against UpstreamAuthenticator (proxy as client)."""
    server = ClientAuthenticator(method, user, secret)
    client = UpstreamAuthenticator(user, password)
    out = server.start()
    for _ in range(10):
        fb = m.FrameBuffer()
        fb.feed(out)
        reply = b""
        for t, body in fb.messages():
            assert t == m.B_AUTH
            r = client.feed(body)
            if r:
                reply += r
        if server.done:
            assert client.done
            return True
        fb = m.FrameBuffer()
        fb.feed(reply)
        msgs = fb.messages()
        assert len(msgs) == 1
        t, body = msgs[0]
        out = server.feed(bytes([t]), body)
    raise AssertionError("no end to the exchange")


@pytest.mark.parametrize("method", ["plain", "md5", "scram-sha-256"])
@pytest.mark.parametrize("secret", ["pw", "md5" + hashlib.md5(b"pwalice").hexdigest(), "verifier"])
def test_round_trips(method, secret):
    if secret == "verifier":
        secret = make_verifier("pw")
    if method == "scram-sha-256" and secret_kind(secret) == "md5":
        with pytest.raises(AuthFailed) as ei:  # PostgreSQL: no valid SCRAM secret
            _exchange(method, secret)
        assert ei.value.sqlstate == "28P01"
        return
    if method == "md5" and secret_kind(secret) == "scram":
        assert ClientAuthenticator(method, "alice", secret).method == "scram-sha-256"
    assert _exchange(method, secret)


@pytest.mark.parametrize("method", ["plain", "md5", "scram-sha-256"])
def test_wrong_password_and_unknown_user_same_message(method):
    for secret, password in (("pw", "nope"), (None, "pw")):
        with pytest.raises(AuthFailed) as ei:
            _exchange(method, secret, password=password)
        assert ei.value.sqlstate == "28P01"
        assert ei.value.message == 'password authentication failed for user "alice"'


def test_trust():
    a = ClientAuthenticator("trust", "alice", None)
    assert a.start() == m.auth_ok() and a.done


def test_unknown_user_scram_first_message_is_stable():
    def first(user):
        a = ClientAuthenticator("scram-sha-256", user, None)
        a.start()
        body = b"SCRAM-SHA-256\0" + struct.pack("!i", 22) + b"n,,n=,r=abcdefghijklmn"
        out = a.feed(b"p", body)
        text = out[9:].decode()
        return dict(p.split("=", 1) for p in text.split(","))
    a, b = first("ghost"), first("ghost")
    assert a["s"] == b["s"] and a["i"] == b["i"] == "4096"
    assert first("other")["s"] != a["s"]


def test_client_protocol_errors():
    a = ClientAuthenticator("md5", "alice", "pw")
    a.start()
    with pytest.raises(AuthFailed) as ei:
        a.feed(b"Q", b"select 1\0")
    assert ei.value.sqlstate == "08P01"
    s = ClientAuthenticator("scram-sha-256", "alice", "pw")
    s.start()
    with pytest.raises(AuthFailed) as ei:
        s.feed(b"p", b"SCRAM-SHA-1\0" + struct.pack("!i", 3) + b"abc")
    assert ei.value.sqlstate == "08P01"


def test_upstream_errors():
    u = UpstreamAuthenticator("bob", None)
    with pytest.raises(AuthFailed) as ei:
        u.feed(struct.pack("!i", 5) + b"salt")
    assert "no password configured" in ei.value.message
    with pytest.raises(AuthFailed):
        UpstreamAuthenticator("bob", "x").feed(struct.pack("!i", 7))  # GSS
    with pytest.raises(AuthFailed):
        UpstreamAuthenticator("bob", "x").feed(struct.pack("!i", 10) + b"SCRAM-SHA-256-PLUS\0\0")
    with pytest.raises(AuthFailed):
        UpstreamAuthenticator("bob", make_verifier("x")).feed(struct.pack("!i", 10) + b"SCRAM-SHA-256\0\0")
    # recorded: AuthenticationCleartextPassword → PasswordMessage
    assert UpstreamAuthenticator("bob", "s3cret").feed(b"\0\0\0\x03") == b"p\x00\x00\x00\x0bs3cret\x00"


def test_userlist_parsing():
    users = parse_userlist('; comment\n# another\n\n"alice" "pw"\n  "bob"   "a ""quoted"" one"\n"md5u" "md5abc"\n')
    assert users == {"alice": "pw", "bob": 'a "quoted" one', "md5u": "md5abc"}
    for bad in ('alice pw\n', '"alice"\n', '"alice" "pw\n'):
        with pytest.raises(ValueError) as ei:
            parse_userlist(bad)
        assert ":1:" in str(ei.value)
