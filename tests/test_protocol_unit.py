"""Sans-IO codec and relay-core tests: recorded byte strings, no sockets.

The framer and relay tests run on both implementations: the pure-Python
reference and the compiled twin (tests/support/cores.py).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from proxy.protocol.records import ClientInfo, StatementEvent, TransactionEvent
from proxy.protocol import messages as m
from proxy.protocol.errors import PgError, ProtocolViolation
from tests.support.cores import FRAMERS, RELAYS

CLIENT = ClientInfo(1, "db", "alice", "app", "127.0.0.1:5555")


def be(t: bytes, body: bytes) -> bytes:
    return m.frame(t, body)


def command_complete(tag: str) -> bytes:
    return be(b"C", tag.encode() + b"\x00")


def rfq(s: bytes = b"I") -> bytes:
    return be(b"Z", s)


def data_row(*vals: bytes) -> bytes:
    body = struct.pack("!h", len(vals)) + b"".join(struct.pack("!i", len(v)) + v for v in vals)
    return be(b"D", body)


def error(code: str, msg: str = "boom") -> bytes:
    return m.error_response(code, msg, severity="ERROR")


def bind(portal: str = "", stmt: str = "", params: tuple[bytes, ...] = ()) -> bytes:
    body = portal.encode() + b"\0" + stmt.encode() + b"\0" + struct.pack("!h", 0)
    body += struct.pack("!h", len(params)) + b"".join(struct.pack("!i", len(p)) + p for p in params)
    body += struct.pack("!h", 0)
    return be(b"B", body)


def execute(portal: str = "", limit: int = 0) -> bytes:
    return be(b"E", portal.encode() + b"\0" + struct.pack("!i", limit))


# ----------------------------------------------------------------- codecs


@pytest.mark.parametrize("Framer", FRAMERS)
def test_startup_packet_roundtrip(Framer):
    pkt = m.startup_message({"user": "alice", "database": "db", "application_name": "x"})
    f = Framer()
    f.feed(pkt[:5])
    assert f.next_packet() is None
    f.feed(pkt[5:])
    assert f.next_packet() == pkt
    p = m.parse_startup_packet(pkt)
    assert p.kind == "startup" and p.version == m.PROTOCOL_3_0
    assert p.params == {"user": "alice", "database": "db", "application_name": "x"}


def test_startup_protocol_32_and_pq_options_are_reported():
    pkt = m.startup_message({"user": "u", "_pq_.foo": "1"}, version=m.PROTOCOL_3_2)
    p = m.parse_startup_packet(pkt)
    assert p.version == m.PROTOCOL_3_2 and p.unsupported == ["_pq_.foo"]
    v = m.negotiate_protocol_version(0, p.unsupported)
    assert v == b"v" + struct.pack("!i", 4 + 8 + 9) + struct.pack("!ii", 0, 1) + b"_pq_.foo\0"


def test_ssl_gss_cancel_packets():
    assert m.parse_startup_packet(m.ssl_request()).kind == "ssl"
    assert m.parse_startup_packet(struct.pack("!ii", 8, m.GSSENC_REQUEST_CODE)).kind == "gssenc"
    c = m.parse_startup_packet(m.cancel_request(1234, b"\x01\x02\x03\x04"))
    assert (c.kind, c.cancel_pid, c.cancel_key) == ("cancel", 1234, b"\x01\x02\x03\x04")


@pytest.mark.parametrize("Framer", FRAMERS)
def test_startup_errors(Framer):
    with pytest.raises(PgError) as e:
        m.parse_startup_packet(m.startup_message({"user": "u"}, version=2 << 16))
    assert e.value.sqlstate == "0A000"
    with pytest.raises(PgError) as e:
        m.parse_startup_packet(m.startup_message({"database": "d"}))
    assert e.value.sqlstate == "28000"
    for bad in (struct.pack("!i", 3) + b"xxxx", struct.pack("!i", 1 << 20)):
        f = Framer()
        f.feed(bad)
        with pytest.raises(ProtocolViolation):
            f.next_packet()


def test_parse_options():
    assert m.parse_options("-c statement_timeout=5s --search_path=a,b -cwork_mem=1MB") == {
        "statement_timeout": "5s", "search_path": "a,b", "work_mem": "1MB"}
    assert m.parse_options(r"-c application_name=a\ b") == {"application_name": "a b"}
    with pytest.raises(PgError):
        m.parse_options("-x")


def test_error_response_fields_and_sqlstate():
    e = m.error_response("28P01", 'password authentication failed for user "x"')
    assert e[:1] == b"E"
    body = e[5:]
    f = m.decode_error_fields(body)
    assert f["S"] == "FATAL" and f["C"] == "28P01" and f["M"].startswith("password")
    assert m.error_sqlstate(body) == "28P01"


def test_command_tag_rows():
    assert m.command_tag(b"SELECT 42\0") == ("SELECT", 42)
    assert m.command_tag(b"INSERT 0 3\0") == ("INSERT", 3)
    assert m.command_tag(b"CREATE TABLE\0") == ("CREATE", 0)
    assert m.command_tag(b"COPY 10\0") == ("COPY", 10)


def test_decode_parse_and_bind():
    p = m.parse("s1", "select $1::int", (23,))
    assert m.decode_parse(p[5:]) == ("s1", "select $1::int", (23,))
    b = bind("", "s1", (b"42", b"x"))
    portal, stmt, values, fmts = m.decode_bind_params(b[5:])
    assert (portal, stmt, values, fmts) == ("", "s1", [b"42", b"x"], [0, 0])


@pytest.mark.parametrize("Framer", FRAMERS)
def test_frame_buffer_rejects_bad_length(Framer):
    fb = Framer()
    fb.feed(b"Q" + struct.pack("!i", 2))
    with pytest.raises(ProtocolViolation):
        fb.next()


@pytest.mark.parametrize("Framer", FRAMERS)
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=40))
def test_frame_buffer_any_split(Framer, cuts):
    stream = (m.query("select 1") + m.parse("", "select $1", (23,)) + bind(params=(b"7",))
              + execute() + m.sync() + be(b"d", b"x" * 100) + m.terminate())
    want = []
    fb = Framer()
    fb.feed(stream)
    want = fb.messages()
    got = []
    fb = Framer()
    pos = 0
    i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        i += 1
        fb.feed(stream[pos : pos + step])
        pos += step
        got.extend(fb.messages())
    assert got == want and len(got) == 7


# --------------------------------------------------------------- relay core


def run_relay(Relay, front: list[bytes], back: list[bytes]):
    events: list = []
    r = Relay(CLIENT, events.append)
    fout = b"".join(r.from_client(x, 1.0) for x in front)
    bout = b"".join(r.from_server(x, 2.0) for x in back)
    return r, events, fout, bout


def stmts(events):
    return [e for e in events if isinstance(e, StatementEvent)]


@pytest.mark.parametrize("Relay", RELAYS)
def test_simple_query_multi_statement_events(Relay):
    q = m.query("select 1; select 2; update t set x=1")
    back = [command_complete("SELECT 1"), command_complete("SELECT 1"), command_complete("UPDATE 3"), rfq()]
    r, events, fout, bout = run_relay(Relay, [q], [b"".join(back)])
    assert fout == q and bout == b"".join(back)
    ev = stmts(events)
    assert [(e.stmt_index, e.tag, e.rows) for e in ev] == [(0, "SELECT", 1), (1, "SELECT", 1), (2, "UPDATE", 3)]
    assert all(e.query == "select 1; select 2; update t set x=1" and not e.extended for e in ev)
    assert r.releasable and r.expect_rfq == 0


@pytest.mark.parametrize("Relay", RELAYS)
def test_simple_query_error_stops_the_rest(Relay):
    q = m.query("select 1; select 1/0; select 3")
    back = command_complete("SELECT 1") + error("22012") + rfq()
    r, events, _, _ = run_relay(Relay, [q], [back])
    ev = stmts(events)
    assert [(e.stmt_index, e.sqlstate) for e in ev] == [(0, None), (1, "22012")]
    assert r.releasable


@pytest.mark.parametrize("Relay", RELAYS)
def test_extended_protocol_events_and_named_statement(Relay):
    front = m.parse("s1", "select $1::int", (23,)) + m.sync()
    front2 = bind("", "s1", (b"1",)) + execute() + bind("", "s1", (b"2",)) + execute() + m.sync()
    back = be(b"1", b"") + rfq()
    back2 = (be(b"2", b"") + data_row(b"1") + command_complete("SELECT 1")
             + be(b"2", b"") + data_row(b"2") + command_complete("SELECT 1") + rfq())
    r, events, _, _ = run_relay(Relay, [front, front2], [back, back2])
    ev = stmts(events)
    assert len(ev) == 2 and all(e.extended and e.query == "select $1::int" and e.statement_name == "s1" for e in ev)
    assert m.decode_bind_params(ev[1].bind)[2] == [b"2"]
    assert r.releasable


@pytest.mark.parametrize("Relay", RELAYS)
def test_extended_error_skips_rest_of_batch(Relay):
    front = (m.parse("", "select 1/0") + bind() + execute() + m.parse("", "select 2") + bind()
             + execute() + m.sync())
    back = be(b"1", b"") + be(b"2", b"") + error("22012") + rfq()
    r, events, _, _ = run_relay(Relay, [front], [back])
    ev = stmts(events)
    assert [(e.query, e.sqlstate) for e in ev] == [("select 1/0", "22012")]
    assert r.releasable and r.oldest_request_time() is None


@pytest.mark.parametrize("Relay", RELAYS)
def test_transaction_status_events_and_idle(Relay):
    r, events, _, _ = run_relay(Relay, [m.query("begin")], [command_complete("BEGIN") + rfq(b"T")])
    assert r.tx_status == "T" and not r.releasable and r.answered
    tx = [e for e in events if isinstance(e, TransactionEvent)]
    assert [e.status for e in tx] == ["T"]


@pytest.mark.parametrize("Relay", RELAYS)
def test_unsynced_extended_keeps_server(Relay):
    events: list = []
    r = Relay(CLIENT, events.append)
    r.from_client(m.parse("", "select 1") + be(b"D", b"S\0") + be(b"H", b""), 1.0)
    r.from_server(be(b"1", b"") + be(b"n", b""), 1.5)
    assert not r.releasable  # no Sync yet: the batch is open
    r.from_client(m.sync(), 2.0)
    r.from_server(rfq(), 2.5)
    assert r.releasable


@pytest.mark.parametrize("Relay", RELAYS)
def test_copy_in_keeps_server_until_done(Relay):
    events: list = []
    r = Relay(CLIENT, events.append)
    r.from_client(m.query("copy t from stdin"), 1.0)
    r.from_server(be(b"G", b"\0\0\0"), 1.1)
    assert r.in_copy and not r.releasable
    r.from_client(be(b"d", b"1\n") + be(b"c", b""), 1.2)
    r.from_server(command_complete("COPY 1") + rfq(), 1.3)
    assert r.releasable and stmts(events)[0].rows == 1


@pytest.mark.parametrize("Relay", RELAYS)
def test_terminate_is_not_forwarded(Relay):
    r = Relay(CLIENT, None)
    out = r.from_client(m.query("select 1") + m.terminate(), 1.0)
    assert out == m.query("select 1") and r.terminated


@pytest.mark.parametrize("Relay", RELAYS)
def test_bad_length_from_client_is_protocol_violation(Relay):
    r = Relay(CLIENT, None)
    with pytest.raises(ProtocolViolation):
        r.from_client(b"Q" + struct.pack("!i", 1), 1.0)


@pytest.mark.parametrize("Relay", RELAYS)
def test_portal_suspended_counts_rows(Relay):
    front = m.parse("", "select g from generate_series(1,3) g") + bind() + execute(limit=2) + m.sync()
    back = be(b"1", b"") + be(b"2", b"") + data_row(b"1") + data_row(b"2") + be(b"s", b"") + rfq(b"T")
    r, events, _, _ = run_relay(Relay, [front], [back])
    assert stmts(events)[0].rows == 2


@pytest.mark.parametrize("Relay", RELAYS)
@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=23), min_size=1, max_size=30))
def test_relay_any_split_same_output_and_events(Relay, cuts):
    front = (m.query("select 1; select 2") + m.parse("a", "select $1") + bind("", "a", (b"5",))
             + execute() + m.sync())
    back = (command_complete("SELECT 1") + m.parameter_status("TimeZone", "UTC") + data_row(b"x" * 50)
            + command_complete("SELECT 1") + rfq() + be(b"1", b"") + be(b"2", b"") + data_row(b"5")
            + command_complete("SELECT 1") + rfq())

    def feed(fn, stream):
        out = []
        pos = i = 0
        while pos < len(stream):
            step = cuts[i % len(cuts)]
            i += 1
            out.append(fn(stream[pos : pos + step], 1.0))
            pos += step
        return b"".join(out)

    ev1: list = []
    r1 = Relay(CLIENT, ev1.append)
    assert r1.from_client(front, 1.0) == front and r1.from_server(back, 1.0) == back
    ev2: list = []
    r2 = Relay(CLIENT, ev2.append)
    assert feed(r2.from_client, front) == front
    assert feed(r2.from_server, back) == back
    key = lambda e: (e.query, e.stmt_index, e.rows, e.tag, e.sqlstate)
    assert [key(e) for e in stmts(ev1)] == [key(e) for e in stmts(ev2)]
    assert len(stmts(ev2)) == 3 and r2.releasable


def test_session_state_classification():
    from proxy.session.rules import classify

    cases = {
        "update t set a = 1": None, "SET x = 1": "SET", "  /* c */ set x=1": "SET", "select 1; set x = 2": "SET",
        "-- hi\nreset all": "RESET", "create temp table t(a int)": "CREATE TEMP", "CREATE TABLE t(a int)": None,
        "select pg_advisory_lock(1)": "ADVISORY LOCK", "select * into temp t from x": "CREATE TEMP",
        "declare c cursor with hold for select 1": "DECLARE WITH HOLD", "listen a": "LISTEN",
        "begin; set local x = 1; commit": None, "prepare p as select 1": "PREPARE", "unlisten *": "UNLISTEN",
        "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;": "RESET",
        "set transaction isolation level serializable": None, "discard all": "DISCARD",
    }
    for sql, kind in cases.items():
        assert classify(sql) == kind, sql
