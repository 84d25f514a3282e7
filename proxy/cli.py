"""The ``pgscope`` command: one table of subcommands, each imported only when it is used.

Every entry point (the ``pgscope`` console script, ``python -m proxy`` and
``python -m proxy.cli``) goes through ``main`` below and reads the same
``COMMANDS`` table, so all of them list every command.  A row names its
function and its argument set-up as ``"module:attribute"``; the modules are
imported when the parser needs them (the argument set-up of the one command
being run, and its function), so ``pgscope run`` never imports the demo and no
command module imports this one.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Any, Callable

from proxy import __version__


@dataclass(frozen=True)
class Command:
    run: str  # "module:function" taking the parsed arguments, returning the exit code
    add_arguments: str  # "module:function" taking the subcommand's argparse parser
    help: str


COMMANDS: dict[str, Command] = {
    "run": Command("proxy.commands:run", "proxy.commands:run_arguments", "run the proxy"),
    "check-config": Command("proxy.commands:check_config", "proxy.commands:check_config_arguments",
                            "validate a configuration file and print the effective settings"),
    "report": Command("proxy.commands:report", "proxy.commands:report_arguments",
                      "print a report from a running pgscope (statements, plans, index advice, N+1 bursts, locks)"),
    "demo": Command("proxy.commands:demo", "proxy.demo:add_arguments",
                    "start a throwaway PostgreSQL and pgscope, run a sample app through it, print the report"),
}


def resolve(ref: str) -> Callable[..., Any]:
    """The object a ``"module:attribute"`` reference names (importing the module)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("pgscope")
    except Exception:
        return __version__


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is one), if any."""
    for word in argv:
        if word in COMMANDS:
            return word
        if not word.startswith("-"):
            return None  # an unknown command: argparse says so
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser: every command listed; the arguments of the one ``argv`` names (all when None)."""
    parser = argparse.ArgumentParser(prog="pgscope", description="A query-aware PostgreSQL connection proxy.")
    parser.add_argument("--version", action="version", version=f"pgscope {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen(argv) if argv is not None else None
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if argv is None or name == chosen:
            resolve(cmd.add_arguments)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    return resolve(COMMANDS[args.command].run)(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
