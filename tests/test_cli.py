"""The ``pgscope`` command line: every entry point lists every command, and commands load lazily."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from proxy.cli import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = {
    "pgscope": ["pgscope"],
    "python -m proxy": [sys.executable, "-m", "proxy"],
    "python -m proxy.cli": [sys.executable, "-m", "proxy.cli"],
}


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PGSCOPE_") or k.startswith("PGSCOPE_TEST_")}


def test_pgscope_is_an_installed_console_script():
    (ep,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "pgscope"]
    assert ep.value == "proxy.cli:main"
    assert shutil.which("pgscope"), "pip install -e . puts pgscope on PATH"


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_lists_every_command(entry):
    argv = ENTRY_POINTS[entry]
    if argv[0] == "pgscope":
        argv = [shutil.which("pgscope") or pytest.fail("pgscope is not on PATH")]
    out = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT, env=_env())
    assert out.returncode == 0, out.stderr
    listed = out.stdout.split("positional arguments:", 1)[1]
    for name in ("run", "check-config", "report", "demo"):
        assert f"\n    {name} " in listed or f"\n    {name}\n" in listed, (entry, name, out.stdout)
    assert set(COMMANDS) == {"run", "check-config", "report", "demo"}
    # each command's own arguments are there too
    for name, flag in (("run", "--upstream"), ("report", "--from"), ("demo", "--duration"), ("check-config", "FILE")):
        sub = subprocess.run([*argv, name, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                             env=_env())
        assert sub.returncode == 0 and flag in sub.stdout, (entry, name, sub.stdout, sub.stderr)


def test_commands_load_lazily_and_without_a_cycle():
    code = (
        "import sys\n"
        "import proxy.commands\n"
        "assert 'proxy.cli' not in sys.modules, 'proxy.commands imports proxy.cli'\n"
        "from proxy.cli import build_parser\n"
        "args = build_parser(['run', '--pool-size', '3']).parse_args(['run', '--pool-size', '3'])\n"
        "assert args.pool_size == 3\n"
        "for m in ('proxy.demo', 'proxy.listener', 'proxy.runner', 'proxy.report'):\n"
        "    assert m not in sys.modules, m\n"
        "build_parser()  # every command's arguments\n"
        "assert 'proxy.demo' in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env=_env())
    assert out.returncode == 0, out.stderr


def test_every_table_reference_resolves():
    from proxy.cli import resolve

    for name, cmd in COMMANDS.items():
        assert callable(resolve(cmd.run)) and callable(resolve(cmd.add_arguments)), name
        assert cmd.help, name


def test_unknown_and_missing_command():
    none = subprocess.run([sys.executable, "-m", "proxy"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env=_env())
    assert none.returncode == 2 and "report" in none.stdout
    bad = subprocess.run([sys.executable, "-m", "proxy", "bogus"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env=_env())
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
