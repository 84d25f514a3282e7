"""The package's shape (issue 13): small modules, small classes, each module saying what it owns.

Walks every ``.py`` file under proxy/ with ``ast``; nothing is imported.  A
failure lists every offender with its size, so one run shows what is left.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "proxy")
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 300


def _modules() -> list[tuple[str, str]]:
    """(path relative to the repository, source) of every module under proxy/, sorted."""
    found = []
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    found.append((os.path.relpath(path, ROOT), f.read()))
    return found


def test_the_walk_finds_the_package():
    paths = [p for p, _ in _modules()]
    assert os.path.join("proxy", "__init__.py") in paths and os.path.join("proxy", "config.py") in paths


def test_no_module_over_400_lines_and_no_class_over_300():
    offenders = []
    for path, source in _modules():
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            offenders.append(f"{path}: module of {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(source, filename=path)):
            if isinstance(node, ast.ClassDef):
                span = node.end_lineno - node.lineno + 1
                if span > MAX_CLASS_LINES:
                    offenders.append(f"{path}:{node.lineno}: class {node.name} of {span} lines "
                                     f"(at most {MAX_CLASS_LINES})")
    if offenders:
        pytest.fail(f"{len(offenders)} too big:\n  " + "\n  ".join(offenders), pytrace=False)


def test_every_module_has_a_docstring():
    missing = [path for path, source in _modules()
               if not (ast.get_docstring(ast.parse(source, filename=path)) or "").strip()]
    if missing:
        pytest.fail(f"{len(missing)} modules without a docstring saying what they own:\n  " + "\n  ".join(missing),
                    pytrace=False)
