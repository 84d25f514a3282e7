"""Imports point one way: the import-linter contracts in pyproject.toml hold (the admin console's
among them), and no module of proxy/ imports itself through others (no cycles)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_hold():
    out = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command;"
                          " sys.exit(lint_imports_command())"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "Contracts: " in out.stdout, out.stdout + out.stderr  # the contracts were found and run
    # the admin console's own contract ran too (proxy.admin: beside session and export, importing neither)
    assert "The admin console runs no SQL" in " ".join(out.stdout.split()), out.stdout
    assert out.returncode == 0, out.stdout + out.stderr


def _cycles(graph, modules):
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in modules:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for m in sorted(modules):
        if m not in index:
            visit(m)
    return found


def test_no_import_cycles():
    import grimp

    graph = grimp.build_graph("proxy", exclude_type_checking_imports=True)  # runtime imports
    modules = {m for m in graph.modules if m.startswith("proxy")}
    # packages import nothing here; a cycle through __init__ would show as one of their modules
    assert "proxy.session.client" in modules and "proxy.protocol.relay" in modules and "proxy.admin.console" in modules
    assert _cycles(graph, modules) == []
