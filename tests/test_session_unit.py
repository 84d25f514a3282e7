"""The session's pure parts, without sockets: the login generator and the state table."""

from __future__ import annotations

import pytest

from proxy.protocol import messages as m
from proxy.protocol.auth import ClientAuthenticator
from proxy.protocol.errors import PgError
from proxy.session.login import (
    NEED_MESSAGE, NEED_PACKET, START_TLS, AuthFailedError, CancelStep, LoginRules, Refused, login,
)
from proxy.session.states import RELAYING, STATE_NAMES, TRANSITIONS, ClientState, IllegalTransition, advance


def rules(**kw):
    base = dict(tls_available=False, tls_required=False, unix=False, refusal=None,
                method=lambda db, user, tls: "md5",
                authenticator=lambda user, method: ClientAuthenticator(method, user, "secret"))
    base.update(kw)
    return LoginRules(**base)


def run(gen, inputs, first=None):
    """Drive a login generator (``first`` answers the step it waits at): answer each NEED_*
    with the next input; collect what it says."""
    said, value = [], first
    inputs = list(inputs)
    while True:
        try:
            step = gen.send(value)
        except StopIteration as stop:
            return said, stop.value
        value = None
        if step in (NEED_PACKET, NEED_MESSAGE):
            value = inputs.pop(0)
        else:
            said.append(step)


def md5_answer(user: str, password: str, salt: bytes) -> tuple[int, bytes]:
    import hashlib

    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
    outer = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
    return ord("p"), outer.encode() + b"\x00"


def test_login_md5_with_ssl_refused_first():
    gen = login(rules())
    assert gen.send(None) == NEED_PACKET
    assert gen.send(m.ssl_request()) == b"N"  # no certificate: 'N', then plaintext startup
    assert gen.send(None) == NEED_PACKET
    challenge = gen.send(m.startup_message({"user": "alice", "database": "shop",
                                            "options": "-c search_path=app", "application_name": "web"}))
    assert challenge[:1] == b"R" and challenge[5:9] == b"\x00\x00\x00\x05"  # AuthenticationMD5Password
    assert gen.send(None) == NEED_MESSAGE
    said, result = run(gen, [], first=md5_answer("alice", "secret", challenge[9:13]))
    assert said[0][:9] == b"R\x00\x00\x00\x08\x00\x00\x00\x00"  # AuthenticationOk
    assert (result.user, result.db, result.application_name) == ("alice", "shop", "web")
    assert result.wanted == {"application_name": "web", "search_path": "app"}


def test_login_wrong_password_and_refusals():
    gen = login(rules())
    gen.send(None)
    challenge = gen.send(m.startup_message({"user": "alice"}))
    gen.send(None)
    with pytest.raises(AuthFailedError) as e:
        gen.send(md5_answer("alice", "nope", challenge[9:13]))
    assert e.value.sqlstate == "28P01" and e.value.user == "alice"

    full = Refused("max_client_conn", PgError("53300", "no more connections allowed"))
    gen = login(rules(refusal=full))
    gen.send(None)
    with pytest.raises(Refused) as r:  # after the startup packet was read, as PostgreSQL does
        gen.send(m.startup_message({"user": "alice"}))
    assert r.value.reason == "max_client_conn" and r.value.sqlstate == "53300"

    gen = login(rules(tls_required=True))
    gen.send(None)
    with pytest.raises(Refused) as r:
        gen.send(m.startup_message({"user": "alice"}))
    assert r.value.reason == "tls_required"
    gen = login(rules(tls_required=True, unix=True))  # unix sockets are exempt
    gen.send(None)
    assert gen.send(m.startup_message({"user": "alice"}))[:1] == b"R"

    gen = login(rules())
    gen.send(None)
    with pytest.raises(Refused) as r:
        gen.send(m.startup_message({"user": "alice", "replication": "database"}))
    assert r.value.reason == "replication"


def test_login_tls_cancel_and_protocol_negotiation():
    gen = login(rules(tls_available=True))
    gen.send(None)
    assert gen.send(m.ssl_request()) == START_TLS
    assert gen.send(None) == NEED_PACKET
    assert gen.send(m.ssl_request()) == b"N"  # a second SSLRequest inside TLS: refused
    gen = login(rules())
    gen.send(None)
    assert gen.send(m.cancel_request(42, b"abcd")) == CancelStep(42, b"abcd")
    with pytest.raises(StopIteration) as stop:
        gen.send(None)
    assert stop.value.value is None
    gen = login(rules())
    gen.send(None)
    v = gen.send(m.startup_message({"user": "u", "_pq_.x": "1"}, version=m.PROTOCOL_3_2))
    assert v[:1] == b"v"  # NegotiateProtocolVersion before the authentication request
    assert gen.send(None)[:1] == b"R"


def test_state_table_has_a_way_out_of_every_state():
    for state in ClientState:
        assert state in TRANSITIONS and state in STATE_NAMES
        if state is not ClientState.CLOSED:
            assert ClientState.CLOSED in TRANSITIONS[state], state
    assert advance(ClientState.IDLE, ClientState.WAITING) is ClientState.WAITING
    with pytest.raises(IllegalTransition):
        advance(ClientState.CLOSED, ClientState.ACTIVE)
    with pytest.raises(IllegalTransition):
        advance(ClientState.STARTUP, ClientState.ACTIVE)  # never without authentication
    assert RELAYING == {ClientState.IDLE, ClientState.WAITING, ClientState.ACTIVE}
