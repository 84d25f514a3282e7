"""The compiled relay core (proxy/protocol/_core.pyx) against its pure-Python reference.

Random conversations (client and server directions, simple and extended
protocol, errors, COPY, named prepared statements renamed per server, prepare-only
batches answered locally, wind-up, odd and malformed messages) are cut at random
points and fed through both; each step must give the same bytes out, the same
records, the same exceptions and the same state.  Also: which core runs, and how
the fallback behaves.
"""

from __future__ import annotations

import itertools
import os
import struct
import subprocess
import sys
from collections import OrderedDict

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from proxy.config import load_settings
from proxy.protocol import framing, messages as m, native, relay, renaming
from proxy.protocol.errors import PgError
from proxy.protocol.ledger import TRAFFIC
from proxy.protocol.records import ClientInfo, StatementEvent
from tests.support.cores import compiled, missing
from tests.support.tools import in_ci

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = ClientInfo(7, "db", "bob", "app", "127.0.0.1:1")
needs_compiled = pytest.mark.skipif(compiled is None, reason=missing)


def test_compiled_core_is_built():
    """Under CI=true the extension must be there (a broken build would otherwise pass unnoticed)."""
    if compiled is None:
        if in_ci():
            pytest.fail(missing)
        pytest.skip(missing)
    assert compiled.MAX_MESSAGE_SIZE == framing.MAX_MESSAGE_SIZE
    assert compiled.MAX_STARTUP_PACKET == framing.MAX_STARTUP_PACKET
    tail = b"select $1\0\0\x01\0\0\0\x17"
    assert compiled.server_statement_name(tail) == renaming.server_statement_name(tail)


def test_the_default_core_follows_the_switch():
    if native.disabled() or compiled is None:
        assert relay.Relay is relay.PyRelay and framing.Framer is framing.PyFramer
    else:
        assert relay.Relay is compiled.Relay and framing.Framer is compiled.Framer
        assert relay.RequestLedger is compiled.RequestLedger and native.COMPILED and native.why_not == ""


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != native.ENV_SWITCH}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=60)


def test_switch_forces_the_reference_without_a_warning():
    out = _python("import warnings; warnings.simplefilter('error');"
                  "from proxy.protocol import relay, framing, native;"
                  "print(relay.Relay is relay.PyRelay, framing.Framer is framing.PyFramer, native.why_not)",
                  PGSCOPE_NO_EXTENSIONS="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "PGSCOPE_NO_EXTENSIONS", "is", "set"]
    assert native.disabled({"PGSCOPE_NO_EXTENSIONS": "0"}) is False  # "0" (or empty) means: compiled


def test_a_missing_build_falls_back_with_one_warning():
    code = """
import sys, warnings
class Hide:  # the extension as if never built
    def find_spec(self, name, path=None, target=None):
        if name == "proxy.protocol._core":
            raise ImportError("No module named 'proxy.protocol._core'")
sys.meta_path.insert(0, Hide())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from proxy.protocol import framing, relay, native
    from proxy.session import client
assert relay.Relay is relay.PyRelay and framing.Framer is framing.PyFramer and not native.COMPILED
print(len(caught), caught[0].category.__name__, "not built" in str(caught[0].message))
"""
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "ExtensionWarning", "True"]


def test_the_switch_is_not_taken_for_an_unknown_setting():
    assert load_settings(None, env={"PGSCOPE_NO_EXTENSIONS": "1"}).pool_size == 20


# ------------------------------------------------------------------ messages

def _f(tag: bytes, body: bytes = b"") -> bytes:
    return m.frame(tag, body)


NAMES = st.sampled_from([b"", b"", b"s1", b"a", b"P_0", "é".encode()])
PORTALS = st.sampled_from([b"", b"", b"", b"c1", b"c2"])
TEXTS = st.sampled_from([b"select 1", b"select $1::int", b"begin", b"commit", b"select 1/0", b"not sql (",
                         b"copy t from stdin", "select 'ü'".encode(), b"select 1; select 2", b"select \xff\xfe",
                         b"", b"set x = 1", b"select pg_advisory_lock(1)", b"SELECT 1; DROP DATABASE d",
                         b"  -- c\nset x to 2", "select 'é'".encode()])
TYPES = st.lists(st.integers(0, 3000), max_size=2).map(lambda ts: struct.pack(f"!h{len(ts)}i", len(ts), *ts))
PARAMS = st.lists(st.binary(max_size=6), max_size=2).map(
    lambda ps: struct.pack("!hh", 0, len(ps)) + b"".join(struct.pack("!i", len(p)) + p for p in ps) + b"\0\0")

CLIENT_MESSAGES = st.one_of(
    TEXTS.map(lambda t: _f(b"Q", t + b"\0")),
    st.builds(lambda n, t, ty: _f(b"P", n + b"\0" + t + b"\0" + ty), NAMES, TEXTS, TYPES),
    st.builds(lambda p, n, ps: _f(b"B", p + b"\0" + n + b"\0" + ps), PORTALS, NAMES, PARAMS),
    st.builds(lambda p, lim: _f(b"E", p + b"\0" + struct.pack("!i", lim)), PORTALS, st.sampled_from([0, 0, 1, 2])),
    st.builds(lambda k, n: _f(b"D", k + n + b"\0"), st.sampled_from([b"S", b"P"]), NAMES | PORTALS),
    st.builds(lambda k, n: _f(b"C", k + n + b"\0"), st.sampled_from([b"S", b"P"]), NAMES | PORTALS),
    st.just(_f(b"S")), st.just(_f(b"S")), st.just(_f(b"H")),
    st.just(_f(b"F", b"\0\0\x04\xd2\0\0\0\0\0\0")),
    st.binary(max_size=8).map(lambda b: _f(b"d", b)), st.just(_f(b"c")), st.just(_f(b"f", b"no\0")),
    st.sampled_from([_f(b"X"), _f(b"B", b"abc"), _f(b"C"), _f(b"D"), _f(b"Q"), _f(b"E"), _f(b"P", b"x"),
                     _f(b"p", b"secret\0")]),  # rare and malformed
)

# coherent batches, so that named statements, renaming and prepare-only batches are common
ZNAMES = st.sampled_from([b"s1", b"s2", b"a", b"P_0"])


def _parse(name: bytes, text: bytes) -> bytes:
    return _f(b"P", name + b"\0" + text + b"\0\0\0")


def _bind(portal: bytes, name: bytes) -> bytes:
    return _f(b"B", portal + b"\0" + name + b"\0\0\0\0\x01\0\0\0\x01" + b"7" + b"\0\0")


def _extended(name, text, portal, describe, limit, end, reuse):
    msgs = [] if reuse else [_parse(name, text)]
    msgs.append(_bind(portal, name))
    if describe:
        msgs.append(_f(b"D", b"S" + name + b"\0") if describe == 1 else _f(b"D", b"P" + portal + b"\0"))
    msgs.append(_f(b"E", portal + b"\0" + struct.pack("!i", limit)))
    return msgs + [[_f(b"S")], [_f(b"H")], []][end]


EXTENDED = st.builds(_extended, NAMES | ZNAMES, TEXTS, PORTALS, st.integers(0, 2), st.sampled_from([0, 0, 1]),
                     st.sampled_from([0, 0, 0, 1, 2]), st.booleans())
BATCHES = st.one_of(
    CLIENT_MESSAGES.map(lambda msg: [msg]),
    EXTENDED,
    st.lists(EXTENDED, min_size=2, max_size=3).map(lambda bs: [x for b in bs for x in b] + [_f(b"S")]),
    st.lists(st.tuples(ZNAMES, TEXTS), min_size=1, max_size=3).map(  # a prepare-only batch
        lambda ps: [_parse(n, t) for n, t in ps] + [_f(b"S")]),
    st.builds(lambda k, n: [_f(b"C", k + n + b"\0"), _f(b"S")], st.sampled_from([b"S", b"P"]), ZNAMES | PORTALS),
    TEXTS.map(lambda t: [_f(b"Q", t + b"\0")]),
).map(lambda msgs: b"".join(msgs))

TAG_LIST = [b"SELECT 1", b"SELECT 0", b"INSERT 0 3", b"UPDATE 12", b"DELETE 0", b"COPY 10", b"BEGIN",
                        b"COMMIT", b"ROLLBACK", b"SELECT", b"SELECT ", b"SELECT x", b"INSERT 0 ", b"FETCH 99",
                        b"MOVE 123456789012345678901234", b"CREATE TABLE", b"MERGE 4", b"SELECT \xff1", b"\xffBAD 1",
                        b"SET", b"", b"SELECT 1 2"]
TAGS = st.sampled_from(TAG_LIST)
SQLSTATES = st.sampled_from(["22012", "42P01", "57P01", "XX000", "08P01"])
SEVERITIES = st.sampled_from(["ERROR", "ERROR", "FATAL", "PANIC"])


def _error(sev: str, code: str, layout: int) -> bytes:
    s, c, msg = f"S{sev}\0V{sev}\0".encode(), f"C{code}\0".encode(), b"Mboom\0"
    if layout == 6:
        return _f(b"E", b"C")  # a body of one byte
    return _f(b"E", [c + s + msg, s + c + msg, s + msg, b"C22\0", b"", s + b"C"][layout] + b"\0")


SERVER_MESSAGES = st.one_of(
    st.sampled_from([_f(b"1"), _f(b"2"), _f(b"3"), _f(b"n"), _f(b"I"), _f(b"s"), _f(b"c"),
                     _f(b"t", b"\0\x01\0\0\0\x17"), _f(b"T", b"\0\x01a\0" + b"\0" * 18)]),
    st.binary(max_size=12).map(lambda b: _f(b"D", b)),
    st.binary(max_size=12).map(lambda b: _f(b"D", b)),
    TAGS.map(lambda t: _f(b"C", t + b"\0")),
    st.builds(_error, SEVERITIES, SQLSTATES, st.integers(0, 6)),
    st.sampled_from([b"G", b"H", b"W"]).map(lambda t: _f(t, b"\0\0\0")),
    st.binary(max_size=6).map(lambda b: _f(b"d", b)),
    st.sampled_from([b"I", b"I", b"T", b"E"]).map(lambda s: _f(b"Z", s)),
    st.just(m.parameter_status("TimeZone", "UTC")), st.just(_f(b"N", b"SNOTICE\0\0")),
    st.just(_f(b"A", b"\0\0\0\x01ch\0\0")),
    st.just(_f(b"Z")),  # malformed: no status byte
)

CUTS = st.lists(st.integers(1, 40), min_size=1, max_size=8)
KINDS_OF_STEP = {  # what each step does, weighted: mostly the client asking and the server answering
    "client": st.tuples(st.lists(BATCHES, min_size=1, max_size=4), CUTS,
                        st.sampled_from(["track", "track", "answer", "defer"])),
    "respond": st.tuples(st.lists(st.integers(0, 9), min_size=1, max_size=12), CUTS),
    "server": st.tuples(st.lists(SERVER_MESSAGES, min_size=1, max_size=8), CUTS),
    "attach": st.tuples(st.integers(0, 2), st.sampled_from([0.0, 0.25])),
    "clear": st.tuples(st.integers(0, 2)),
}
STEPS = st.sampled_from(["client"] * 4 + ["respond"] * 3 + ["server", "attach", "clear"]).flatmap(
    lambda kind: KINDS_OF_STEP[kind].map(lambda args: (kind, *args)))


# --------------------------------------------------------------- the harness

def _tag(c: int) -> bytes:
    return b"SELECT %d" % c if c < 5 else TAG_LIST[c * 7 % len(TAG_LIST)]


def _answers(reqs: list, choices: list[int]) -> bytes:
    """What a server would answer to the requests still awaiting answers (the reference's view),
    a prefix of them, shaped by ``choices``: rows, errors (then nothing until Sync), COPY, suspended
    portals, transaction status."""
    it = itertools.cycle(choices)
    out: list[bytes] = []
    failed = False
    for q in reqs[: next(it) % (len(reqs) + 1) + 1]:
        kind = q.kind
        if kind == 8 or (failed and kind not in (0, 2, 3)):  # made up here; or skipped after an error
            continue
        c = next(it)
        if kind == 0:  # Query: each statement, then ReadyForQuery
            for _ in range(q.text.count(";") + 1):
                c = next(it)
                if c == 0:
                    out.append(_error("ERROR", "22012", next(it) % 7))
                    break
                out.append([_f(b"I"), _f(b"G", b"\0\0\0"), _f(b"H", b"\0\0\0") + _f(b"d", b"x") + _f(b"c")][c - 1]
                           if c <= 3 else _f(b"D", b"\0\0") * (c - 4) + _f(b"C", _tag(next(it)) + b"\0"))
            c = next(it) % 3
            out.append(_f(b"Z", b"ITE"[c : c + 1]))
            failed = False
        elif kind == 1:  # Execute
            out.append(_error("ERROR", "22012", next(it) % 7) if c == 0 else _f(b"D", b"\0") * c
                       + (_f(b"s") if c == 1 else _f(b"C", _tag(next(it)) + b"\0")))
            failed = c == 0
        elif kind in (2, 3):  # Sync, FunctionCall
            out.append((_f(b"V", b"\0\0\0\0") if kind == 3 else b"") + _f(b"Z", b"IIT"[c % 3 : c % 3 + 1]))
            failed = False
        elif c == 0:  # Parse, Bind, Close or Describe failing
            out.append(_error("ERROR", "42P01", 0))
            failed = True
        else:
            out.append({4: _f(b"1"), 5: _f(b"2"), 6: _f(b"3"),
                        7: _f(b"t", b"\0\0") + (_f(b"n") if c % 2 else _f(b"T", b"\0\0"))}[kind])
    return b"".join(out)


class Side:
    """One implementation under test, with its own server statement caches and records."""

    def __init__(self, cls: type, emit: bool, max_prepared: int) -> None:
        self.events: list = []
        self.queries: list[str] = []
        self.r = cls(CLIENT, self.events.append if emit else None, max_prepared)
        self.r.on_query = self.on_query
        self.caches: list[OrderedDict] = [OrderedDict() for _ in range(3)]
        self.pending: list[bytes] = []

    def on_query(self, text: str) -> None:
        self.queries.append(text)
        if "set x" in text:
            raise PgError("0A000", "refused")  # a pooling rule refusing a statement

    def do(self, fn, *args):
        try:
            return ("ok", fn(*args))
        except Exception as e:  # both must fail alike
            return ("raised", type(e).__name__, str(e))

    def state(self) -> dict:
        r = self.r
        reqs = [(q.kind, q.text, q.stmt, q.bind, q.sent, q.index, q.rows, q.swallow, q.srvname, q.answer)
                for q in r._requests]
        renamer = r.renamer
        return {
            "tx_status": r.tx_status, "expect_rfq": r.expect_rfq, "unsynced": r.unsynced, "in_copy": r.in_copy,
            "copy_in": r.copy_in, "server_fatal": r.server_fatal, "releasable": r.releasable,
            "answered": r.answered, "terminated": r.terminated, "oldest": r.oldest_request_time(),
            "server_pid": r.server_pid, "pending_wait": r.pending_wait, "to_client": list(r.to_client),
            "requests": reqs, "stmts": dict(r._stmts), "portals": dict(r._portals),
            "caches": [list(c) for c in self.caches], "emit": r.emit is None, "on_query": r.on_query is None,
            "defs": None if renamer is None else {k: tuple(v[:2]) for k, v in renamer.defs.items()},
            "events": [(type(e).__name__, tuple(e) if isinstance(e, StatementEvent) else e) for e in self.events],
            "queries": list(self.queries),
            "traffic": {k: getattr(r, k) for k in TRAFFIC},  # SHOW STATS counts
        }


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    out, pos, i = [], 0, 0
    while pos < len(data):
        out.append(data[pos : pos + cuts[i % len(cuts)]])
        pos += cuts[i % len(cuts)]
        i += 1
    return out


def _step(side: Side, step: tuple, now: float, transaction: bool, reqs: list) -> list:
    """Apply one step; return what it gave (outputs or exceptions) for comparison."""
    r = side.r
    kind = step[0]
    got: list = []
    if kind == "client":
        _, msgs, cuts, route = step
        for piece in _pieces(b"".join(msgs), cuts):
            if not transaction:
                got.append(side.do(r.from_client, piece, now))
                continue
            res = side.do(r.frame_client, piece)
            got.append(res)
            if res[0] != "ok" or not res[1]:
                continue
            chunk = res[1]
            if route == "answer":
                ans = side.do(r.answer_locally, chunk)
                got.append(ans)
                if ans != ("ok", None):
                    continue
            if route == "defer":
                side.pending.append(chunk)
            else:
                got.append(side.do(r.track, chunk, now))
            got.append(list(r.to_client))
            r.to_client.clear()
    elif kind in ("server", "respond"):
        _, msgs, cuts = step
        data = b"".join(msgs) if kind == "server" else _answers(reqs, msgs)
        for piece in _pieces(data, cuts):
            got.append(side.do(r.from_server, piece, now))
    elif kind == "attach":
        r.attach(4000 + step[1], side.caches[step[1]], step[2])
        if side.pending:
            got.append(side.do(r.track, b"".join(side.pending), now))
            side.pending.clear()
    elif kind == "clear":
        side.caches[step[1]].clear()  # the pool reset that server (DISCARD ALL)
    elif kind == "wind_up":
        got.append(side.do(r.wind_up, now))
    return got


@needs_compiled
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(STEPS, min_size=3, max_size=30), transaction=st.booleans(), emit=st.booleans(),
       max_prepared=st.sampled_from([1, 2, 3, 100]), end=st.sampled_from([(), (("wind_up",), ("respond", [1], [50]))]))
def test_random_conversations_give_the_same_bytes_records_and_state(steps, transaction, emit, max_prepared, end):
    py = Side(relay.PyRelay, emit, max_prepared if transaction else 0)
    cy = Side(compiled.Relay, emit, max_prepared if transaction else 0)
    if transaction:
        for s in (py, cy):
            s.r.attach(4000, s.caches[0], 0.0)
    for i, step in enumerate(steps + list(end)):  # the client may leave at the end (wind_up)
        now = 1.0 + i * 0.5
        reqs = list(py.r._requests)  # a "respond" step answers what the reference awaits
        a = _step(py, step, now, transaction, reqs)
        b = _step(cy, step, now, transaction, reqs)
        assert a == b, (i, step)
        assert py.state() == cy.state(), (i, step)


@needs_compiled
@settings(max_examples=150, deadline=None)
@given(msgs=st.lists(CLIENT_MESSAGES | SERVER_MESSAGES | st.binary(max_size=7), min_size=1, max_size=12),
       cuts=CUTS, stop=st.sampled_from([-1, 0x58, 0x53]), max_size=st.sampled_from([1 << 30, 20, 10000]))
def test_framers_agree_on_any_stream_and_split(msgs, cuts, stop, max_size):
    data = b"".join(msgs)
    py, cy = framing.PyFramer(max_size=max_size, stop=stop), compiled.Framer(max_size=max_size, stop=stop)
    for piece in _pieces(data, cuts):
        outs = []
        for f in (py, cy):
            try:
                outs.append(("ok", f.whole(piece), f.holding, f.stopped))
            except PgError as e:
                outs.append(("raised", type(e).__name__, e.message))
        assert outs[0] == outs[1]
        if outs[0][0] != "ok":
            break
    py, cy = framing.PyFramer(max_size=max_size), compiled.Framer(max_size=max_size)
    for piece in _pieces(data, cuts):
        outs = []
        for f in (py, cy):
            f.feed(piece)
            got = []
            try:
                while (msg := (f.next_packet() if piece[:1] == b"\0" else f.next())) is not None:
                    got.append(msg)
            except PgError as e:
                got.append(("raised", e.message))
            outs.append((got, f.pending()))
        assert outs[0] == outs[1]
    assert py.take_rest() == cy.take_rest() and py.pending() == cy.pending() == 0


@needs_compiled
@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=16), renamed=st.booleans())
def test_the_twin_refuses_what_is_not_whole_messages(data, renamed):
    """track() is given whole messages only (the framer's output); the reference may loop on a
    negative length, the twin must refuse any other input cleanly and never read past it."""
    r = compiled.Relay(CLIENT, None, 2 if renamed else 0)
    r.attach(1, OrderedDict(), 0.0)
    try:
        out = r.track(data, 1.0)
    except (PgError, ValueError, IndexError):
        return
    assert out[:1] == data[:1]


# statement texts for the hook's cheap test: keywords, cases, comments, separators, Unicode
_WORDS = st.sampled_from(["select", "SET", "set", "Reset", "listen", "unlisten", "load", "prepare", "deallocate",
                          "discard", "declare", "create", "drop", "DROPx", "alter", "database", "x", "1", "into",
                          "TEMP", "temporary", "pg_advisory_lock(1)", "advisory_lock", "setx", "sets", "é", "\u212a",
                          "_set", "begin", "commit"])
_GLUE = st.sampled_from([" ", "  ", "\t", "\n", ";", "; ", ";\n", "--c\n", "/* c */", "\x1c", "\xa0", "", "(", "'"])
STATEMENT_TEXTS = st.lists(st.tuples(_GLUE, _WORDS), max_size=6).map(
    lambda parts: "".join(g + w for g, w in parts)) | st.text(max_size=40)


@given(STATEMENT_TEXTS)
@settings(max_examples=1500, deadline=None)
def test_the_hooks_cheap_test_is_a_superset_of_the_rules_and_the_twins_agree(text):
    """The relay skips the pooling-rule hook for a text only when neither rule could act on it
    (hint.worth_a_look): a skipped SET would leave session state on a pooled server unseen,
    a skipped DROP DATABASE would hit the pool's own connections."""
    from proxy.protocol.hint import worth_a_look
    from proxy.session.fence import databases_to_fence
    from proxy.session.rules import might_leave_state

    look = worth_a_look(text)
    if might_leave_state(text) or databases_to_fence(text):
        assert look, text
    if compiled is not None:
        assert compiled.worth_a_look(text) == look, text


@given(STATEMENT_TEXTS)
@settings(max_examples=1500, deadline=None)
def test_session_modes_cheaper_test_is_a_superset_of_the_fence_and_the_twins_agree(text):
    """Session mode's hook is the fence alone (hint.might_fence): a skipped DROP DATABASE would
    hit the pool's own idle connections."""
    from proxy.protocol.hint import might_fence, worth_a_look
    from proxy.session.fence import databases_to_fence

    look = might_fence(text)
    if databases_to_fence(text):
        assert look, text
    if look:
        assert worth_a_look(text), text  # the narrower test
    if compiled is not None:
        assert compiled.worth_a_look(text, False) == look, text


def test_the_hooks_cheap_test_skips_plain_statements_and_keeps_the_rest():
    """Positive and negative controls for the property above: what pgbench runs is skipped."""
    from proxy.protocol.hint import worth_a_look

    tests = [worth_a_look] + ([compiled.worth_a_look] if compiled is not None else [])
    for look in tests:
        for plain in ("SELECT abalance FROM pgbench_accounts WHERE aid = 42;", "BEGIN;", "END;",
                      "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 2;", "select 1 ; "):
            assert not look(plain), plain
        for rule in ("SET search_path = x", "  reset all", "DISCARD ALL", "select pg_advisory_lock(1)",
                     "SELECT 1 INTO TEMP t", "select 1; set x = 1", "-- hi\nset x = 1", "drop database d",
                     "ALTER DATABASE d RENAME TO e", "create database e template d", "LISTEN ch"):
            assert look(rule), rule


def test_session_modes_cheaper_test_skips_all_but_the_fences_statements():
    """Positive and negative controls for the property above: only drop/alter/create (or a
    comment, or a character outside ASCII) first reach the fence."""
    from proxy.protocol.hint import might_fence

    tests = [might_fence] + ([lambda t: compiled.worth_a_look(t, False)] if compiled is not None else [])
    for look in tests:
        for plain in ("SELECT abalance FROM pgbench_accounts WHERE aid = 42;", "SET search_path = x",
                      "select 1; drop database d", "select pg_advisory_lock(1)", "SELECT 1 INTO TEMP t", ""):
            assert not look(plain), plain
        for fence in ("drop database d", "  ALTER DATABASE d RENAME TO e", "create database e template d",
                      "-- hi\ndrop database d", "/* c */ DROP DATABASE d", "\xa0drop database d", "\x1cdrop database d"):
            assert look(fence), fence
