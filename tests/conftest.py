"""Fixtures: one real PostgreSQL per test session, a fresh pgscope per test.

And the skip policy: under ``CI=true`` a skip is a failure unless it is on
``ALLOWED_SKIPS`` below, with its reason. A test that cannot run where CI runs
must say why here, not skip quietly.
"""

from __future__ import annotations

import re

import pytest

from tests.support.pg import start_pg
from tests.support.tools import in_ci, require, require_hypopg

# (test id pattern, text the skip reason must contain, why CI may skip it)
ALLOWED_SKIPS: tuple[tuple[str, str, str], ...] = (
    (r"tests/test_deploy\.py::test_helm_", "helm-sdkpy needs Python >= 3.12",
     "helm-sdkpy (Helm's engine as a library) declares Requires-Python >= 3.12; on an older Python the "
     "Helm chart tests need `pip install --no-deps --ignore-requires-python` as .ci/run does, which "
     "the dev extra cannot express"),
)


def allowed_skip(nodeid: str, reason: str) -> bool:
    return any(re.match(pat, nodeid) and text in reason for pat, text, _ in ALLOWED_SKIPS)


def _reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and in_ci() and not hasattr(rep, "wasxfail"):
        reason = _reason(rep.longrepr)
        if not allowed_skip(rep.nodeid, reason):
            rep.outcome = "failed"
            rep.longrepr = (f"skipped under CI=true, and not on tests/conftest.py's ALLOWED_SKIPS: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and in_ci():
        reason = _reason(rep.longrepr)
        if not allowed_skip(rep.nodeid, reason):
            rep.outcome = "failed"
            rep.longrepr = f"a whole module skipped under CI=true, not on ALLOWED_SKIPS: {reason}"


@pytest.fixture(autouse=True)
def _marked_needs(request):
    """The markers declared in pyproject.toml say what a test needs; missing is a skip (a failure in CI)."""
    if request.node.get_closest_marker("hypopg"):
        require_hypopg(request.getfixturevalue("pg"))
    for tool in ("pgbouncer", "promtool"):
        if request.node.get_closest_marker(tool):
            require(tool)


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
