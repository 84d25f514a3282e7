"""The ``pgscope`` command: only argument handling; the work is in proxy.server and friends."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

from proxy import __version__

# subcommand name -> (add_arguments, run); later features register theirs here
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    def deco(fn):
        COMMANDS[name] = (help, fn.add_arguments, fn)
        return fn
    return deco


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("pgscope")
    except Exception:
        return __version__


# flag -> settings key (None: the flag's dest is the key)
_RUN_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--listen", {"metavar": "HOST:PORT"}),
    ("--upstream", {"metavar": "URL", "help": "postgresql://user[:password]@host[:port][/db]"}),
    ("--pool-mode", {"choices": ["session", "transaction"]}),
    ("--metrics-listen", {"metavar": "HOST:PORT", "help": "empty string disables"}),
    ("--auth-type", {"choices": ["trust", "plain", "md5", "scram-sha-256"]}),
    ("--auth-file", {"metavar": "FILE"}),
    ("--log-format", {"choices": ["json", "console"]}),
    ("--log-level", {"choices": ["debug", "info", "warning", "error"]}),
    ("--pool-size", {"type": int, "metavar": "N"}),
    ("--max-client-conn", {"type": int, "metavar": "N"}),
]


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="TOML configuration file")
    for flag, kw in _RUN_FLAGS:
        p.add_argument(flag, default=None, **kw)
    p.add_argument("--allow-trust-remote", action="store_true", default=None,
                   help="allow auth_type trust on a non-loopback listen address")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, _ in _RUN_FLAGS}
    out["allow_trust_remote"] = args.allow_trust_remote
    return {k: v for k, v in out.items() if v is not None}


def _load(config: str | None, overrides: dict[str, Any]) -> Any:
    from proxy.config import load_settings

    return load_settings(config, env=os.environ, overrides=overrides)


def run(args: argparse.Namespace) -> int:
    from proxy.config import ConfigError
    from proxy.server import run_proxy

    overrides = _overrides(args)
    try:
        settings = _load(args.config, overrides)
    except ConfigError as e:
        print(f"pgscope: configuration error: {e}", file=sys.stderr)
        return 2
    return run_proxy(settings, args.config, overrides)


run.add_arguments = _add_run_arguments  # type: ignore[attr-defined]
command("run", "run the proxy")(run)


def check_config(args: argparse.Namespace) -> int:
    from proxy.config import ConfigError, as_dict

    try:
        settings = _load(args.file, {})
    except ConfigError as e:
        print(f"pgscope: configuration error: {e}", file=sys.stderr)
        return 2
    print("ok")
    print(json.dumps(as_dict(settings), indent=2))
    return 0


check_config.add_arguments = lambda p: p.add_argument("file", metavar="FILE")  # type: ignore[attr-defined]
command("check-config", "validate a configuration file and print the effective settings")(check_config)


def build_parser() -> argparse.ArgumentParser:
    import proxy.commands  # noqa: F401  (registers demo, report, …)

    parser = argparse.ArgumentParser(prog="pgscope", description="A query-aware PostgreSQL connection proxy.")
    parser.add_argument("--version", action="version", version=f"pgscope {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
