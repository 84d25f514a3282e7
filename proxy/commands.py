"""What each ``pgscope`` subcommand does, and its arguments (listed by the table in proxy.cli).

This module never imports proxy.cli: the table points here, not the other way.
The heavy modules (the server, the demo, the report) are imported inside the
command that needs them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

# -------------------------------------------------------------------- run

# flag -> argparse options; the flag's dest is the settings key
_RUN_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--listen", {"metavar": "HOST:PORT"}),
    ("--upstream", {"metavar": "URL", "help": "postgresql://user[:password]@host[:port][/db]"}),
    ("--pool-mode", {"choices": ["session", "transaction"]}),
    ("--metrics-listen", {"metavar": "HOST:PORT", "help": "empty string disables"}),
    ("--auth-type", {"choices": ["trust", "plain", "md5", "scram-sha-256", "cert", "hba"]}),
    ("--auth-file", {"metavar": "FILE"}),
    ("--auth-hba-file", {"metavar": "FILE"}),
    ("--log-format", {"choices": ["json", "console"]}),
    ("--log-level", {"choices": ["debug", "info", "warning", "error"]}),
    ("--pool-size", {"type": int, "metavar": "N"}),
    ("--max-client-conn", {"type": int, "metavar": "N"}),
]


def run_arguments(p: argparse.ArgumentParser) -> None:
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
    from proxy.runner import run_proxy

    overrides = _overrides(args)
    try:
        settings = _load(args.config, overrides)
    except ConfigError as e:
        print(f"pgscope: configuration error: {e}", file=sys.stderr)
        return 2
    return run_proxy(settings, args.config, overrides)


# -------------------------------------------------------------------- check-config

def check_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE")


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


# -------------------------------------------------------------------- report

def report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, metavar="URL",
                   help="a running pgscope's metrics address, e.g. http://127.0.0.1:9930")
    p.add_argument("--limit", type=int, default=15, help="top statements to show")
    p.add_argument("--token-file", metavar="FILE",
                   help="file whose first line is the proxy's http_token (default: $PGSCOPE_HTTP_TOKEN)")
    p.add_argument("--ca-file", metavar="FILE", help="CA certificates to verify an https:// address with")


def _report_token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            return f.readline().strip() or None
    return os.environ.get("PGSCOPE_HTTP_TOKEN") or None


def report(args: argparse.Namespace) -> int:
    import urllib.error

    from proxy.report import report as build

    try:
        token = _report_token(args)
    except (OSError, UnicodeDecodeError) as e:
        print(f"pgscope: cannot read the token file: {e}", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(build(args.source, args.limit, token=token, ca_file=args.ca_file))
    except urllib.error.HTTPError as e:
        hint = " (the API asks for a token: set PGSCOPE_HTTP_TOKEN or --token-file)" if e.code == 401 else ""
        print(f"pgscope: cannot read {args.source}: {e}{hint}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        print(f"pgscope: cannot read {args.source}: {e}", file=sys.stderr)
        return 1
    return 0


# -------------------------------------------------------------------- demo (arguments: proxy.demo)

def demo(args: argparse.Namespace) -> int:
    try:
        import psycopg  # noqa: F401  (the sample app's client: the "demo" extra)
    except ImportError:
        print("pgscope: the demo needs its extra packages: pip install 'pgscope[demo]'"
              " (from a checkout: pip install -e '.[demo]')", file=sys.stderr)
        return 2
    from proxy.demo import run as run_demo

    return run_demo(args)
