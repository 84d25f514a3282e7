"""Raw-socket edge cases: protocol negotiation, SSL refusal, bad input, cancel keys."""

from __future__ import annotations

import socket
import struct

import psycopg

from proxy.protocol import messages as m
from proxy.protocol.framing import Framer


def _conn(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    return s


def _read_messages(s, until=b"Z"):
    fb = Framer()
    out = []
    while True:
        data = s.recv(65536)
        if not data:
            return out
        fb.feed(data)
        for t, body in fb.messages():
            out.append((bytes([t]), body))
            if bytes([t]) == until or bytes([t]) == b"E":
                return out


def test_protocol_32_client_gets_negotiate_protocol_version(proxy, pg):
    s = _conn(proxy)
    s.sendall(m.startup_message({"user": pg.superuser, "database": "pgscope_test",
                                 "_pq_.something": "on"}, version=m.PROTOCOL_3_2))
    msgs = _read_messages(s)
    types = [t for t, _ in msgs]
    assert types[0] == b"v"
    minor, n = struct.unpack("!ii", msgs[0][1][:8])
    assert (minor, n) == (0, 1) and b"_pq_.something" in msgs[0][1]
    assert b"R" in types and types[-1] == b"Z"
    s.sendall(m.query("select 1") + m.terminate())
    assert [t for t, _ in _read_messages(s)][-1] == b"Z"
    s.close()


def test_ssl_and_gss_requests_are_refused_then_plain_works(proxy, pg):
    s = _conn(proxy)
    s.sendall(m.ssl_request())
    assert s.recv(1) == b"N"
    s.sendall(struct.pack("!ii", 8, m.GSSENC_REQUEST_CODE))
    assert s.recv(1) == b"N"
    s.sendall(m.startup_message({"user": pg.superuser, "database": "pgscope_test"}))
    assert _read_messages(s)[-1][0] == b"Z"
    s.close()


def test_garbage_startup_gets_protocol_violation_and_close(proxy):
    s = _conn(proxy)
    s.sendall(struct.pack("!i", 1 << 24) + b"junk")
    msgs = _read_messages(s)
    assert msgs and msgs[0][0] == b"E"
    assert m.decode_error_fields(msgs[0][1])["C"] == "08P01"
    assert s.recv(10) == b""
    s.close()


def test_bad_message_length_after_login_closes_cleanly(proxy, pg):
    s = _conn(proxy)
    s.sendall(m.startup_message({"user": pg.superuser, "database": "pgscope_test"}))
    _read_messages(s)
    s.sendall(b"Q" + struct.pack("!i", 2))
    msgs = _read_messages(s)
    assert msgs[0][0] == b"E" and m.decode_error_fields(msgs[0][1])["C"] == "08P01"
    s.close()
    with psycopg.connect(proxy.dsn(pg.superuser)) as c:  # proxy unharmed
        assert c.execute("select 1").fetchone() == (1,)


def test_random_cancel_key_does_nothing(proxy, pg):
    s = _conn(proxy)
    s.sendall(m.cancel_request(12345, b"\x00\x01\x02\x03"))
    assert s.recv(10) == b""  # closed, nothing said
    s.close()
    with psycopg.connect(proxy.dsn(pg.superuser)) as c:
        assert c.execute("select 1").fetchone() == (1,)


def test_client_disconnect_mid_transaction_does_not_leak(proxy_factory, pg):
    proxy = proxy_factory(pool_size=1)
    c = psycopg.connect(proxy.dsn(pg.superuser))
    c.execute("create temp table leak(x int)")
    c.execute("insert into leak values (1)")  # transaction left open
    c.close()
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c2:
        assert c2.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert c2.execute("select count(*) from pg_class where relname = 'leak'").fetchone() == (0,)


def test_random_garbage_never_hurts_the_proxy(proxy_factory, pg):
    """Random bytes at login and after it: an ErrorResponse or a close, never a hang; others unaffected."""
    import random

    proxy = proxy_factory(pool_mode="transaction", pool_size=2)
    rnd = random.Random(11)
    for i in range(40):
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        try:
            if i % 2:
                s.sendall(m.startup_message({"user": pg.superuser, "database": "pgscope_test"}))
                _read_messages(s)
            blob = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 300)))
            if i % 4 == 1:  # a plausible type byte with a random length
                blob = bytes([rnd.choice(b"QPBEDSHCXdcf")]) + struct.pack("!i", rnd.randint(-5, (1 << 31) - 1)) + blob
            s.sendall(blob)
            s.settimeout(0.5)
            try:
                while s.recv(65536):
                    pass
            except socket.timeout:
                # the proxy may be waiting for the rest of a message the client may still send; once the
                # client says it sends nothing more, it must close (a hang fails here)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(10)
                while s.recv(65536):
                    pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        finally:
            s.close()
    with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:
        assert c.execute("select 1").fetchone() == (1,)
    n = proxy.call(lambda: len(proxy.proxy.sessions))
    assert n <= 1  # no leaked sessions (the timed-out partial ones close with their sockets)


def _frame(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!i", len(body) + 4) + body


def test_unterminated_strings_get_08p01_and_the_next_message_is_not_misread(proxy_factory, pg):
    """A Parse or Bind whose string field has no NUL within the message is refused with an
    ErrorResponse (08P01) and a close, in both pooling modes; the search for the NUL stays in
    the message (it used to run on into the next one, or end the session without a word)."""
    for mode in ("session", "transaction"):
        proxy = proxy_factory(pool_mode=mode, pool_size=2)
        for bad in (_frame(b"P", b"stmt"),  # name never ends
                    _frame(b"P", b"s\0select 1"),  # query never ends (a NUL in the next message)
                    _frame(b"B", b"portal")):
            s = _conn(proxy)
            s.sendall(m.startup_message({"user": pg.superuser, "database": "pgscope_test"}))
            assert _read_messages(s)[-1][0] == b"Z"
            s.sendall(m.query("select 1"))  # a positive control on the same connection
            assert [t for t, _ in _read_messages(s)][-1] == b"Z"
            s.sendall(bad + m.sync())
            msgs = _read_messages(s)
            assert msgs and msgs[-1][0] == b"E", (mode, bad, msgs)
            fields = m.decode_error_fields(msgs[-1][1])
            assert fields.get("C") == "08P01", (mode, fields)
            s.settimeout(10)
            assert s.recv(65536) == b""  # then closed
            s.close()
        with psycopg.connect(proxy.dsn(pg.superuser), autocommit=True) as c:  # the proxy is fine
            assert c.execute("select 2").fetchone() == (2,)
