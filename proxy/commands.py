"""Subcommands beyond run and check-config (imported by proxy.cli, which lists them)."""

from __future__ import annotations

import sys

from proxy.cli import command


def report(args) -> int:
    import urllib.error

    from proxy.report import report as build

    try:
        sys.stdout.write(build(args.source, args.limit))
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        print(f"pgscope: cannot read {args.source}: {e}", file=sys.stderr)
        return 1
    return 0


def _report_args(p) -> None:
    p.add_argument("--from", dest="source", required=True, metavar="URL",
                   help="a running pgscope's metrics address, e.g. http://127.0.0.1:9930")
    p.add_argument("--limit", type=int, default=15, help="top statements to show")


report.add_arguments = _report_args  # type: ignore[attr-defined]
command("report", "print a report from a running pgscope (statements, plans, index advice, N+1 bursts, locks)")(report)


def demo(args) -> int:
    try:
        import psycopg  # noqa: F401  (the sample app's client: the "demo" extra)
    except ImportError:
        print("pgscope: the demo needs its extra packages: pip install 'pgscope[demo]'"
              " (from a checkout: pip install -e '.[demo]')", file=sys.stderr)
        return 2
    from proxy.demo import run as run_demo

    return run_demo(args)


def _demo_args(p) -> None:
    from proxy.demo import add_arguments

    add_arguments(p)


demo.add_arguments = _demo_args  # type: ignore[attr-defined]
command("demo", "start a throwaway PostgreSQL and pgscope, run a sample app through it, print the report")(demo)
