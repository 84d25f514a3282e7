"""Fixtures: one real PostgreSQL per test session, a fresh pgscope per test."""

from __future__ import annotations

import pytest

from tests.support.pg import start_pg


@pytest.fixture(scope="session")
def pg():
    server = start_pg()
    yield server
    server.stop()


@pytest.fixture
def proxy_factory(pg):
    from tests.support.proxy import RunningProxy, make_settings

    started: list[RunningProxy] = []

    def factory(**overrides):
        p = RunningProxy(make_settings(pg, **overrides)).start()
        started.append(p)
        return p

    yield factory
    for p in reversed(started):
        p.stop()


@pytest.fixture
def proxy(proxy_factory):
    return proxy_factory()
