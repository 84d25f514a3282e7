"""The README's test command is the whole story: what the tests need is in the dev extra (with an
environment marker where a package needs a newer Python), and what cannot be there is on the
skip allow-list with that reason."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from tests.conftest import ALLOWED_SKIPS, allowed_skip
from tests.support import helm

ROOT = Path(__file__).resolve().parent.parent


def dev_extra() -> dict[str, Requirement]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    return {r.name: r for r in reqs}


def test_helm_sdkpy_is_in_the_dev_extra_from_python_3_12():
    req = dev_extra()["helm-sdkpy"]
    assert str(req.specifier) == f"=={helm.HELM_SDKPY_VERSION}"  # the version tests/support/helm.py drives
    assert req.marker is not None
    assert req.marker.evaluate({"python_version": "3.12"}) and req.marker.evaluate({"python_version": "3.13"})
    assert not req.marker.evaluate({"python_version": "3.11"})  # pip would refuse it there


def test_where_the_dev_extra_cannot_install_helm_sdkpy_the_skip_is_allowed(monkeypatch):
    """On Python 3.11 helm.require() skips with the reason ALLOWED_SKIPS names; on 3.12 the dev extra
    installs the package, so a missing one is no allowed skip (a failure under CI)."""
    import pytest

    monkeypatch.setattr(helm, "available", lambda: False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as e:
        helm.require(python=(3, 11))
    assert allowed_skip("tests/test_deploy.py::test_helm_lints_and_renders_the_defaults", str(e.value))
    with pytest.raises(pytest.skip.Exception) as e:
        helm.require(python=(3, 12))
    assert not allowed_skip("tests/test_deploy.py::test_helm_lints_and_renders_the_defaults", str(e.value))
    assert len(ALLOWED_SKIPS) == 1


def test_ci_installs_the_same_helm_sdkpy_and_runs_the_readme_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"helm-sdkpy=={helm.HELM_SDKPY_VERSION}" in ci
    assert "-e '.[dev]'" in ci and "python3 -m pytest -q\n" in ci
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e '.[dev]' && python3 -m pytest -q" in readme
    assert f"helm-sdkpy=={helm.HELM_SDKPY_VERSION}" in readme
