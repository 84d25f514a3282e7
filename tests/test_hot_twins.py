"""The compiled session and pool cores (proxy/session/_hot.pyx, proxy/pool/_hot.pyx) against their
pure-Python references (proxy/session/hot.py, proxy/pool/hot.py).

The relay and pooling tests run over real sockets on both (the compiled ones by default,
``PGSCOPE_NO_EXTENSIONS=1`` in .ci/run); here the two pool cores run the same random sequences of
checkouts and releases side by side and must leave the same lists, wake-ups and closes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.hist import Hist, PyHist
from proxy.pool.pool import PoolConfig
from proxy.pool import hot as pool_hot
from proxy.protocol import native
from proxy.session import hot as session_hot
from tests.support.tools import in_ci

def _methods(cls: type) -> set[str]:
    return {n for n in vars(cls) if not n.startswith("__") and callable(getattr(cls, n))}


def test_the_session_and_pool_cores_follow_the_switch():
    from proxy.pool.pool import Pool
    from proxy.pool.upstream import ServerConn
    from proxy.session.binding import Binding
    from proxy.session.client import ClientSession

    bases = (ClientSession.__mro__[1], ServerConn.__mro__[1], Pool.__mro__[1], Binding.__mro__[1])
    if native.disabled():
        assert bases == (session_hot.PySessionCore, pool_hot.PyServerCore, pool_hot.PyPoolCore,
                         session_hot.PyBindingCore)
        return
    if not native.COMPILED:
        if in_ci():
            pytest.fail(native.why_not)
        pytest.skip(native.why_not)
    from proxy.pool._hot import PoolCore, ServerCore
    from proxy.session._hot import BindingCore, SessionCore

    assert bases == (SessionCore, ServerCore, PoolCore, BindingCore)
    for ref, twin in ((session_hot.PySessionCore, SessionCore), (pool_hot.PyServerCore, ServerCore),
                      (pool_hot.PyPoolCore, PoolCore), (session_hot.PyBindingCore, BindingCore)):
        assert _methods(ref) == _methods(twin), twin


def _python(code: str, **env: str) -> list[str]:
    e = {k: v for k, v in os.environ.items() if k != native.ENV_SWITCH}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


_BASES = ("from proxy.session.client import ClientSession; from proxy.pool.pool import Pool; "
          "from proxy.pool.upstream import ServerConn; "
          "print(ClientSession.__mro__[1].__name__, ServerConn.__mro__[1].__name__, Pool.__mro__[1].__name__)")


def test_no_extensions_runs_the_pure_python_cores():
    assert _python(_BASES, **{native.ENV_SWITCH: "1"}) == ["PySessionCore", "PyServerCore", "PyPoolCore"]


def test_a_missing_session_or_pool_build_falls_back_with_one_warning():
    """The relay core built but not the other two: each says so once, and the references run."""
    code = """
import sys, warnings
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name in ("proxy.session._hot", "proxy.pool._hot"):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Hide())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from proxy.protocol import native
    from proxy.session.client import ClientSession
    from proxy.pool.pool import Pool
    from proxy.pool.upstream import ServerConn
print(ClientSession.__mro__[1].__name__, ServerConn.__mro__[1].__name__, Pool.__mro__[1].__name__)
print(native.COMPILED, *sorted(str(w.message).split(" is not built")[0].split("compiled ")[1] for w in caught))
"""
    out = _python(code)
    if out[3] == "False":  # no relay core either (no compiler): proxy.protocol.native warned instead
        if in_ci():
            pytest.fail("the compiled relay core is not built")
        pytest.skip(native.why_not)
    assert out == ["PySessionCore", "PyServerCore", "PyPoolCore", "True", "pool", "core", "session", "core"]


# ------------------------------------------------------------- the pool cores side by side

class _Future:
    def __init__(self, done: bool) -> None:
        self._done = done
        self.result: object = None

    def done(self) -> bool:
        return self._done

    def set_result(self, value: object) -> None:
        self._done = True
        self.result = value


def _pair() -> list[tuple[type, type]]:
    pairs = [(pool_hot.PyServerCore, pool_hot.PyPoolCore)]
    if native.COMPILED:
        from proxy.pool._hot import PoolCore, ServerCore
        pairs.append((ServerCore, PoolCore))
    return pairs


def _make(server_base: type, pool_base: type, n_servers: int, lifetime: float, check: bool):
    class Srv(server_base):  # type: ignore[misc, valid-type]
        def __init__(self, i: int) -> None:
            self.i = i
            self.owner = None
            self.transport = None
            self.closed = False
            self.pool = None
            self.created = 0.0
            self.last_used = 0.0
            self.read_paused = False
            self.resumed = 0

        def reading_paused(self, paused: bool) -> None:
            self.read_paused = paused
            self.resumed += 1

    class P(pool_base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.cfg = PoolConfig(host="h", port=1, server_lifetime=lifetime,
                                  server_check_query="SELECT 1" if check else "", server_check_delay=1e9)
            self.idle = deque()
            self.active = set()
            self.waiters = deque()
            self.closed = False
            self.capped = False
            self.paused = False
            self.retire_before = 0.0
            self.dbname = "db"
            self.mgr = SimpleNamespace(fences={})
            self.fences = self.mgr.fences
            self.wait_hist = Hist()
            self.drops: list[tuple[int, str]] = []

        def _drop(self, srv, reason: str) -> None:
            self.active.discard(srv)
            srv.closed = True
            self.drops.append((srv.i, reason))

    pool = P()
    servers = [Srv(i) for i in range(n_servers)]
    for s in servers:
        s.pool = pool
        pool.active.add(s)
    return pool, servers


def _state(pool, servers, log):
    return ([s.i for s in pool.idle], sorted(s.i for s in pool.active), pool.drops, log,
            list(pool.wait_hist.counts), pool.wait_hist.count,
            [(s.closed, s.read_paused, s.resumed, s.owner) for s in servers])


ops = st.lists(st.tuples(st.sampled_from(["take", "take_prefer", "release", "close", "retire", "fence", "wait",
                                          "wait_done", "pause_read", "close_pool", "old"]),
                         st.integers(0, 5)), max_size=40)


@given(ops=ops, lifetime=st.sampled_from([0.0, 3600.0]), check=st.booleans())
@settings(max_examples=300, deadline=None)
def test_the_pool_cores_take_and_release_alike(ops, lifetime, check):
    results = []
    for server_base, pool_base in _pair():
        pool, servers = _make(server_base, pool_base, 6, lifetime, check)
        log: list = []
        futures: list[_Future] = []
        for op, k in ops:
            srv = servers[k]
            if op == "take" or op == "take_prefer":
                got = pool.take_idle_now(srv if op == "take_prefer" else None)
                log.append(None if got is None else got.i)
            elif op == "release":
                pool.release(srv)
            elif op == "close":
                srv.closed = True
            elif op == "retire":
                pool.retire_before = 1.0  # created 0.0: closed once released
            elif op == "fence":
                pool.mgr.fences["db"] = [1, None]
            elif op == "wait" or op == "wait_done":
                f = _Future(op == "wait_done")
                futures.append(f)
                pool.waiters.append(f)
            elif op == "pause_read":
                srv.read_paused = True
            elif op == "close_pool":
                pool.closed = True
            elif op == "old":
                srv.created = -1e12  # past any server_lifetime
        log.append([None if f.result is None else f.result.i for f in futures])
        results.append(_state(pool, servers, log))
    assert all(r == results[0] for r in results[1:])


# ------------------------------------------------------------- the record queue

sink_ops = st.lists(st.one_of(st.tuples(st.just("emit"), st.integers(0, 3)),
                              st.tuples(st.just("drain"), st.integers(0, 40)),
                              st.tuples(st.just("callback"), st.integers(0, 8))), max_size=120)


@given(ops=sink_ops, maxsize=st.integers(1, 30))
@settings(max_examples=300, deadline=None)
def test_the_record_queues_keep_drop_and_call_back_alike(ops, maxsize):
    from proxy.inspect import pipeline

    kinds = [pipeline.PyEventSink] + ([native.core.EventSink] if native.COMPILED else [])
    results = []
    for kind in kinds:
        sink = kind(maxsize)
        seen: list = []
        calls: list[int] = []
        i = 0
        for op, k in ops:
            if op == "emit":
                for _ in range(k + 1):
                    sink.emit(i)
                    i += 1
            elif op == "drain":
                seen.append(sink.drain(k) if k else sink.drain())
            else:
                sink.set_batch_callback(k, (lambda: calls.append(len(sink))) if k % 4 else None)
            seen.append(len(sink))
        results.append((seen, calls, sink.dropped, sink.maxsize))
    assert all(r == results[0] for r in results[1:])


# ------------------------------------------------------------- the histogram

values = st.floats(min_value=0.0, max_value=100.0, allow_nan=False) | st.sampled_from([0.0, 0.0001, 0.001, 60.0])


@given(ops=st.lists(st.one_of(st.tuples(st.just("one"), values),
                              st.tuples(st.just("many"), st.lists(values, max_size=40)),
                              st.tuples(st.just("many_total"), st.lists(values, max_size=40))), max_size=30),
       buckets=st.sampled_from([None, (0.001, 0.01, 0.1), (1.0,)]))
@settings(max_examples=300, deadline=None)
def test_the_histograms_count_alike(ops, buckets):
    """The compiled Hist against PyHist: same buckets on a bound (le), same counts, sum, count."""
    from proxy.hist import Hist

    if native.COMPILED:
        assert issubclass(Hist, native.core.Hist)
    elif not native.disabled() and in_ci():
        pytest.fail(native.why_not)
    results = []
    for kind in (PyHist, Hist):
        h = kind() if buckets is None else kind(buckets)
        for op, v in ops:
            if op == "one":
                h.observe(v)
            elif op == "many":
                h.observe_many(v)
            else:
                h.observe_many(v, sum(v))
        results.append((h.buckets, list(h.counts), round(h.sum, 9), h.count, h.cumulative()))
    assert results[0] == results[1]
