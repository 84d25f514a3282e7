"""The test fixture itself: a real server with the password roles, and the skip policy of tests/conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import psycopg
import pytest

from tests.support.client import login_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_server_is_real(pg):
    with pg.connect() as c:
        assert c.execute("select current_database()").fetchone() == ("pgscope_test",)
    assert pg.version >= 13


@pytest.mark.parametrize("role,password", [("pgscope_md5", "md5pass"), ("pgscope_scram", "scrampass"),
                                           ("pgscope_plain", "plainpass")])
def test_password_roles(pg, role, password):
    with psycopg.connect(pg.dsn(role, password)) as c:
        assert c.execute("select current_user").fetchone() == (role,)
    if not (pg.managed and pg.cluster.how == "binaries"):
        pytest.skip("the wrong-password check needs the throwaway cluster's hba (local binaries)")
    e = login_error(pg.dsn(role, "wrong"))
    assert e.sqlstate == "28P01"
    assert e.args[0] == f'password authentication failed for user "{role}"'


def _run_inner(tmp_path, body: str, ci: bool) -> subprocess.CompletedProcess:
    """Run a throwaway test module under tests/ (so tests/conftest.py applies) with CI set or not."""
    name = f"test_zz_policy_{os.getpid()}_{tmp_path.name}.py"
    path = os.path.join(ROOT, "tests", name)
    with open(path, "w") as f:
        f.write(textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    try:
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                               f"tests/{name}"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    finally:
        os.unlink(path)


POLICY_CASES = """
    import pytest

    def test_plain_skip():
        pytest.skip("something is missing")

    @pytest.mark.skipif(True, reason="never here")
    def test_marked_skip():
        pass

    @pytest.mark.xfail(reason="expected")
    def test_xfail():
        assert False
"""


def test_ci_turns_skips_not_on_the_allow_list_into_failures(tmp_path):
    out = _run_inner(tmp_path, POLICY_CASES, ci=True)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "FAILED" in text and "test_plain_skip" in text and "test_marked_skip" in text, text
    assert "not on tests/conftest.py's ALLOWED_SKIPS: Skipped: something is missing" in text, text
    assert "1 failed" in text and "1 error" in text and "1 xfailed" in text and " skipped in " not in text, text


def test_without_ci_skips_stay_skips(tmp_path):
    out = _run_inner(tmp_path, POLICY_CASES, ci=False)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "2 skipped" in text and "1 xfailed" in text, text


def test_ci_fails_a_module_that_skips_at_import(tmp_path):
    out = _run_inner(tmp_path, 'import pytest\npytest.skip("no module", allow_module_level=True)\n', ci=True)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "not on ALLOWED_SKIPS: Skipped: no module" in text, text


def test_the_allow_list_admits_only_its_own_reason(monkeypatch):
    from tests.conftest import allowed_skip
    from tests.support import helm

    monkeypatch.setattr(helm, "available", lambda: False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        helm.require(python=(3, 11))
    reason = str(skipped.value)
    assert allowed_skip("tests/test_deploy.py::test_helm_renders_every_option", reason)
    assert not allowed_skip("tests/test_deploy.py::test_chart_metadata_and_image", reason)
    assert not allowed_skip("tests/test_deploy.py::test_helm_renders_every_option", "helm-sdkpy is not installed")
    monkeypatch.setenv("CI", "true")  # on a Python it can be installed on, missing is a failure in CI
    with pytest.raises(pytest.fail.Exception):
        helm.require(python=(3, 12))


def test_every_declared_marker_is_applied(request):
    """pyproject.toml's markers are put on the tests that need them (and conftest's _marked_needs acts on them)."""
    import glob
    import re

    declared = {line.split(":")[0].strip() for line in request.config.getini("markers")}
    assert {"hypopg", "pgbouncer", "promtool"} <= declared
    source = "".join(open(p).read() for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
    used = set(re.findall(r"^@pytest\.mark\.(hypopg|pgbouncer|promtool)$", source, re.M))
    assert used == {"hypopg", "pgbouncer", "promtool"}, "declared but never applied: " + str({"hypopg", "pgbouncer", "promtool"} - used)
