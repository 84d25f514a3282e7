"""The Helm chart under deploy/helm, linted and rendered by Helm's own template engine.

There is no helm binary in Debian's packages. The helm-sdkpy wheel (PyPI) carries Helm v4 built as a
shared library with a C API; that API has `lint` but no `template`, and needs no cluster for lint.
Lint renders every template with the chart's values.yaml, and in lint mode Helm's `fail` does not
stop rendering: it logs its message. So to see what a template renders to, a copy of the chart gets
one extra template that `fail`s with each template's rendered text (base64), and the log is read
back. The library runs in a child process (it is a Go runtime; its log goes to stderr).

helm-sdkpy declares Requires-Python >= 3.12 but its Python part is plain cffi and works on 3.11:
.ci/run installs it with ``pip install --no-deps --ignore-requires-python helm-sdkpy==<pinned>``.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from tests.support.tools import missing

HELM_SDKPY_VERSION = "0.1.32"  # the version .ci/run installs

_CHILD = r"""
import json, sys
from helm_sdkpy._ffi import ffi, get_library, string_from_c
lib = get_library()
handle = ffi.new("helm_sdkpy_handle *")
if lib.helm_sdkpy_config_create(b"default", ffi.NULL, ffi.NULL, b"{}", handle) != 0:
    print(json.dumps({"error": string_from_c(lib.helm_sdkpy_last_error())}))
    sys.exit(0)
out = ffi.new("char **")
if lib.helm_sdkpy_lint(handle[0], sys.argv[1].encode(), out) != 0:
    print(json.dumps({"error": string_from_c(lib.helm_sdkpy_last_error())}))
else:
    print(json.dumps({"result": json.loads(string_from_c(out[0]))}))
sys.stdout.flush()
"""

_RENDER = re.compile(r"PGSCOPE-RENDER (\S+) ([A-Za-z0-9+/=]*)")
_FAIL = re.compile(r"fail.*", re.I)

# helm's support.Severity
INFO, WARNING, ERROR = 1, 2, 3


def available() -> bool:
    return importlib.util.find_spec("helm_sdkpy") is not None


def require(python: tuple[int, int] | None = None) -> None:
    if available():
        return
    python = python or (sys.version_info[0], sys.version_info[1])
    if python < (3, 12):  # on tests/conftest.py's ALLOWED_SKIPS with this reason
        pytest.skip(f"helm-sdkpy needs Python >= 3.12 (this is {python[0]}.{python[1]}); install it as .ci/run "
                    f"does: pip install --no-deps --ignore-requires-python helm-sdkpy=={HELM_SDKPY_VERSION} cffi")
    missing(f"helm-sdkpy {HELM_SDKPY_VERSION} (Helm's engine as a library)")


@dataclass
class Rendered:
    lint: dict[str, Any]
    files: dict[str, str]  # "templates/x.yaml" -> rendered text
    fails: list[str] = field(default_factory=list)  # the chart's own `fail` messages
    log: str = ""

    def problems(self, at_least: int = WARNING) -> list[dict[str, Any]]:
        return [m for m in self.lint.get("Messages") or [] if m.get("Severity", 0) >= at_least]

    def documents(self) -> list[dict[str, Any]]:
        docs: list[dict[str, Any]] = []
        for path, text in sorted(self.files.items()):
            if path.endswith((".yaml", ".yml")):
                docs.extend(d for d in yaml.safe_load_all(text) if d)
        return docs

    def kinds(self) -> dict[str, dict[str, Any]]:
        """kind -> the one document of that kind (the chart renders at most one of each)."""
        out: dict[str, dict[str, Any]] = {}
        for d in self.documents():
            assert d["kind"] not in out, f"two {d['kind']} documents"
            out[d["kind"]] = d
        return out


def merge(base: Any, over: Any) -> Any:
    """Helm's values coalescing, as far as the tests need it: maps merge, anything else replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = merge(base.get(k), v)
        return out
    return over


def render(chart_dir: str, values: dict[str, Any] | None = None, timeout: float = 120) -> Rendered:
    """Lint a copy of ``chart_dir`` (values.yaml merged with ``values``) and capture every template's output."""
    with tempfile.TemporaryDirectory(prefix="pgscope-helm-") as tmp:
        chart = os.path.join(tmp, os.path.basename(os.path.normpath(chart_dir)))
        shutil.copytree(chart_dir, chart)
        with open(os.path.join(chart, "Chart.yaml")) as f:
            name = yaml.safe_load(f)["name"]
        if values:
            path = os.path.join(chart, "values.yaml")
            with open(path) as f:
                merged = merge(yaml.safe_load(f) or {}, values)
            with open(path, "w") as f:
                yaml.safe_dump(merged, f, sort_keys=False)
        tdir = os.path.join(chart, "templates")
        names = sorted(n for n in os.listdir(tdir) if not n.startswith("_"))
        with open(os.path.join(tdir, "zz-pgscope-test-render.yaml"), "w") as f:
            for n in names:
                f.write(f'{{{{ fail (printf "PGSCOPE-RENDER %s %s" "templates/{n}" '
                        f'(include "{name}/templates/{n}" . | b64enc)) }}}}\n')
        proc = subprocess.run([sys.executable, "-c", _CHILD, chart], capture_output=True, text=True,
                              timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"helm-sdkpy lint failed (exit {proc.returncode}): {proc.stdout}\n{proc.stderr}")
    answer = json.loads(lines[-1])
    if "error" in answer:
        raise RuntimeError(f"helm-sdkpy: {answer['error']}\n{proc.stderr}")
    files = {path: base64.b64decode(b64).decode() for path, b64 in _RENDER.findall(proc.stderr)}
    fails = [ln for ln in proc.stderr.splitlines() if _FAIL.search(ln) and "PGSCOPE-RENDER" not in ln]
    return Rendered(answer["result"], files, fails, proc.stderr)
