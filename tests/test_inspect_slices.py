"""The inspector's slice passes: the compiled twins (proxy/inspect/_slices.pyx) give what the
pure-Python references (proxy/inspect/slices.py) give, on random slices."""

from __future__ import annotations

import importlib

import pytest
from hypothesis import given, settings, strategies as st

from proxy.inspect import slices
from proxy.protocol import native
from proxy.protocol.records import ClientInfo, StatementEvent
from tests.support.tools import in_ci

CLIENTS = [ClientInfo(i, "db", "u", "app", f"127.0.0.1:{5000 + i}") for i in range(5)]
TEXTS = st.one_of(st.sampled_from(["SELECT 1", "SELECT abalance FROM t WHERE aid = 12;", "SELECT 'x9'", "",
                                   "select é from t where a = 3", "BEGIN"]),
                  st.text(alphabet="SELCT 0123456789';é", max_size=20))
TIMES = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)


def _compiled():
    if native.disabled():
        pytest.skip("PGSCOPE_NO_EXTENSIONS is set: only the reference runs")
    try:
        return importlib.import_module("proxy.inspect._slices")
    except ImportError as e:
        if in_ci():
            pytest.fail(f"the compiled slice passes are not built: {e}")
        pytest.skip(str(e))


def test_the_inspector_uses_the_compiled_passes_when_built():
    fast = _compiled()
    assert (slices.columns, slices.lookup_texts, slices.group, slices.run_summary) == (
        fast.columns, fast.lookup_texts, fast.group, fast.run_summary)


records = st.lists(st.tuples(st.integers(0, 4), TEXTS, st.integers(0, 2), TIMES, TIMES, st.integers(0, 3),
                             st.sampled_from([None, "42P01", "57014"]), st.booleans()), max_size=60)


@given(recs=records)
@settings(max_examples=300, deadline=None)
def test_columns_alike(recs):
    fast = _compiled()
    evs = [StatementEvent(CLIENTS[c], q, k, False, "", None, 7, s, e, 0.0, "SELECT", r, st_, tx)
           for c, q, k, s, e, r, st_, tx in recs]
    if not evs:
        with pytest.raises(ValueError):  # (zip(*[]) has nothing to unpack)
            slices.py_columns(evs)
        assert fast.columns(evs) == ([],) * 9
        return
    assert fast.columns(evs) == tuple(map(list, slices.py_columns(evs)))
    with pytest.raises(ValueError):
        fast.columns(evs + [("too", "short")])
    with pytest.raises(ValueError):
        slices.py_columns(evs + [("too", "short")])


@given(texts=st.lists(TEXTS, max_size=40), cached=st.lists(TEXTS, max_size=10), shapes=st.lists(TEXTS, max_size=10))
@settings(max_examples=300, deadline=None)
def test_lookups_alike(texts, cached, shapes):
    fast = _compiled()
    cache: dict = {t: ("exact", t) for t in cached}
    for t in shapes:
        cache[t.encode().translate(slices.ZERO_DIGITS)] = ("shape", t)
    assert fast.lookup_texts(cache, texts) == slices.py_lookup_texts(cache, texts)
    assert fast.lookup_texts(cache, tuple(texts)) == slices.py_lookup_texts(cache, tuple(texts))


@given(pairs=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 4)), max_size=200))
@settings(max_examples=300, deadline=None)
def test_groups_alike(pairs):
    fast = _compiled()
    infos_pool = [object() for _ in range(7)]
    infos = [infos_pool[a] for a, _ in pairs]
    clients = [CLIENTS[b] for _, b in pairs]
    got, want = fast.group(infos, clients), slices.py_group(infos, clients)
    assert list(got.items()) == list(want.items())  # the same groups, in the same order
    if pairs:  # a positive control for the order check above
        assert next(iter(got)) == (id(infos[0]), id(clients[0]))


@given(recs=st.lists(st.tuples(TIMES, st.floats(0.0, 1.0), st.integers(0, 3), st.sampled_from([None, None, "57014"])),
                     min_size=1, max_size=30),
       last_end=TIMES, pick=st.data())
@settings(max_examples=300, deadline=None)
def test_run_summaries_alike(recs, last_end, pick):
    fast = _compiled()
    evs = [StatementEvent(CLIENTS[0], "SELECT 1", 0, False, "", None, 7, s, s + d, 0.0, "SELECT", r, state, False)
           for s, d, r, state in recs]
    idx = sorted(pick.draw(st.sets(st.integers(0, len(evs) - 1), min_size=1)))
    assert fast.run_summary(evs, idx, last_end) == slices.py_run_summary(evs, idx, last_end)
    with pytest.raises(ValueError):
        fast.run_summary(evs, [], last_end)
