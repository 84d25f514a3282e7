"""SCRAM pass-through and the auth_query answer, as pure exchanges (no socket, no server).

The integration tests (tests/test_auth_query.py) prove the same against PostgreSQL;
these pin the parts: the keys a client's proof gives, their use as a SCRAM client,
what stale keys do, and that the keys never print.
"""

from __future__ import annotations

import struct

import pytest

from proxy.pool.authquery import LookupFailed, bind_text, secret_from_rows
from proxy.protocol import messages as m
from proxy.protocol.auth import AuthFailed, ClientAuthenticator, UpstreamAuthenticator, md5_password
from proxy.protocol.framing import Framer
from proxy.protocol.scram import ScramKeys, keys, make_verifier, parse_verifier


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    fb = Framer()
    fb.feed(data)
    return fb.messages()


def _exchange(server: ClientAuthenticator, client: UpstreamAuthenticator) -> list[int]:
    """Run ``client`` against ``server`` to the end; the authentication codes seen."""
    codes, out = [], server.start()
    while True:
        reply = b""
        for t, body in _frames(out):
            codes.append(struct.unpack("!i", body[:4])[0])
            reply += client.feed(body) or b""
        if server.done:
            assert client.done
            return codes
        (t, body), = _frames(reply)
        out = server.feed(bytes([t]), body)


def test_keys_from_the_proof_log_in_where_the_verifier_is():
    verifier = make_verifier("pw")
    first = ClientAuthenticator("scram-sha-256", "alice", verifier)
    assert first.upstream_secret is None
    _exchange(first, UpstreamAuthenticator("alice", "pw"))
    k = first.upstream_secret
    iterations, salt, _, server_key = parse_verifier(verifier)
    assert isinstance(k, ScramKeys)
    assert (k.client_key, k.server_key, k.salt, k.iterations) == (keys("pw", salt, iterations)[0], server_key,
                                                                  salt, iterations)
    # the server (here: another ClientAuthenticator holding the same verifier) takes the keys alone
    assert _exchange(ClientAuthenticator("scram-sha-256", "alice", verifier),
                     UpstreamAuthenticator("alice", k)) == [10, 11, 12, 0]


def test_cleartext_login_against_a_verifier_keeps_keys_not_the_password():
    verifier = make_verifier("pw")
    a = ClientAuthenticator("plain", "alice", verifier)
    _exchange(a, UpstreamAuthenticator("alice", "pw"))
    assert isinstance(a.upstream_secret, ScramKeys)
    assert _exchange(ClientAuthenticator("md5", "alice", verifier), UpstreamAuthenticator("alice", a.upstream_secret))


def test_md5_secret_is_what_an_md5_login_keeps():
    secret = md5_password("alice", "pw")
    a = ClientAuthenticator("md5", "alice", secret)
    assert _exchange(a, UpstreamAuthenticator("alice", "pw")) == [5, 0]
    assert a.upstream_secret == secret


def test_stale_keys_fail_like_a_wrong_password():
    a = ClientAuthenticator("scram-sha-256", "alice", make_verifier("pw"))
    _exchange(a, UpstreamAuthenticator("alice", "pw"))
    changed = make_verifier("pw2")  # the password changed on the server: a new salt
    with pytest.raises(AuthFailed) as ei:
        _exchange(ClientAuthenticator("scram-sha-256", "alice", changed), UpstreamAuthenticator("alice", a.upstream_secret))
    assert ei.value.sqlstate == "28P01" and "salt" in ei.value.reason


def test_keys_cannot_answer_md5_or_cleartext():
    a = ClientAuthenticator("scram-sha-256", "alice", make_verifier("pw"))
    _exchange(a, UpstreamAuthenticator("alice", "pw"))
    for code in (3, 5):
        with pytest.raises(AuthFailed) as ei:
            UpstreamAuthenticator("alice", a.upstream_secret).feed(struct.pack("!i", code) + b"salt"[: 4 if code == 5 else 0])
        assert ei.value.sqlstate == "28000" and "SCRAM keys" in ei.value.message


def test_keys_never_print():
    a = ClientAuthenticator("scram-sha-256", "alice", make_verifier("pw"))
    _exchange(a, UpstreamAuthenticator("alice", "pw"))
    k = a.upstream_secret
    for text in (repr(k), str(k), f"{k}", repr([k]), repr({"x": k})):
        assert k.client_key.hex() not in text and "client_key" not in text and text.count("<hidden>") == 1


def test_unknown_user_with_md5_gets_scram_like_a_real_scram_user():
    a = ClientAuthenticator("md5", "ghost", None)
    assert a.method == "scram-sha-256"
    with pytest.raises(AuthFailed) as ei:
        _exchange(a, UpstreamAuthenticator("ghost", "pw"))
    assert ei.value.sqlstate == "28P01" and a.upstream_secret is None


def test_auth_query_rows():
    assert secret_from_rows([]) is None
    assert secret_from_rows([["alice", "md5abc"]]) == "md5abc"
    assert secret_from_rows([["alice", None]]) == ""  # a role without a password: no login
    for rows in ([["a", "x"], ["a", "y"]], [["a"]], [["a", "x", "z"]]):
        with pytest.raises(LookupFailed) as ei:
            secret_from_rows(rows)
        assert ei.value.sqlstate == "28000"


def test_the_user_name_is_a_bind_parameter():
    (t, body), = _frames(bind_text("o'hara"))
    assert t == m.F_BIND
    portal, stmt, params, formats = m.decode_bind_params(body)
    assert (portal, stmt, params) == ("", "", [b"o'hara"])
