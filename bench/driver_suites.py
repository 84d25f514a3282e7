#!/usr/bin/env python3
"""Drivers' own test suites, run directly against PostgreSQL and through pgscope (session mode).

Run by hand, never in CI (on 2 cores: asyncpg about 3 minutes for both targets, psycopg
about 25 minutes per target):

    python3 bench/driver_suites.py --suite asyncpg                      # asyncpg only
    python3 bench/driver_suites.py --psycopg-src ~/src/psycopg --confirm # both suites
    python3 bench/driver_suites.py --proxy-rev HEAD ...                 # pgscope as committed
    python3 bench/driver_suites.py --target pgscope \\
        --test 'asyncpg:tests/test_listeners.py::TestListeners::test_listen_01'   # re-run one test

--confirm re-runs the tests that failed only through pgscope, alone, on both targets
(fresh servers again), to tell what repeats from what depended on the tests before it.

For each suite and target it starts a fresh throwaway PostgreSQL (proxy/throwaway.py),
and for the pgscope target a `pgscope run --pool-mode session` in front of it, runs the
suite with pytest and records every test's outcome.  It then prints the tests that fail
through pgscope but not directly (the ones that matter), with their error, and the
opposite list.  Everything (the venv with the suites' test dependencies, the driver
sources, the proxy logs, results.json) lives in --workdir and is kept for the next run.

The suites:

- asyncpg: the tests/ directory of asyncpg's sdist from PyPI, at the installed asyncpg's
  version (pip download --no-binary :all:), run against the installed asyncpg.  With
  PGHOST set its tests use the running server (asyncpg/_testbase: RunningCluster) through
  PGHOST/PGPORT/PGUSER/PGDATABASE.
- psycopg (with psycopg_pool): the sdists carry no tests, so --psycopg-src names a
  psycopg source tree or git directory (a clone of psycopg's repository; REV with
  --psycopg-rev for a git directory, default HEAD); its tests/ run against the installed
  psycopg and psycopg_pool (PSYCOPG_TEST_DSN).  Without --psycopg-src it is skipped.

Exit status: 0 when no test fails only through pgscope, 1 otherwise, 2 on a harness error.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from proxy import throwaway  # noqa: E402

FAILED = ("failed", "error")

# Tests left out, as they say nothing about a proxy (each with its reason): paths to --ignore,
# and a marker expression for -m.
EXCLUDE: dict[str, dict[str, str]] = {
    "asyncpg": {},
    "psycopg": {
        "tests/crdb": "CockroachDB only (they skip on PostgreSQL anyway)",
    },
}
MARKERS: dict[str, tuple[str, str]] = {
    "psycopg": ("not mypy", "the tests marked mypy type-check example code with mypy (minutes, no server)"),
}

# The plugin pytest loads in the suite's process: one JSON line per test with its outcome.
PLUGIN = '''
import json, os

_out = open(os.environ["DRIVER_SUITES_RESULTS"], "a", buffering=1)
_seen = {}

def _msg(report):
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message
    if isinstance(report.longrepr, tuple):
        return report.longrepr[2]
    return str(report.longrepr)[-2000:] if report.longrepr else ""

_took = {}

def _put(nodeid, outcome, phase, message, longrepr="", seconds=0.0):
    _out.write(json.dumps({"id": nodeid, "outcome": outcome, "phase": phase, "seconds": round(seconds, 2),
                           "message": message[:4000], "longrepr": longrepr[-6000:]}) + "\\n")

def pytest_runtest_logreport(report):
    nid = report.nodeid
    xfail = hasattr(report, "wasxfail")
    _took[nid] = _took.get(nid, 0.0) + (report.duration or 0.0)
    if report.when == "call":
        if report.passed:
            outcome = "xpassed" if xfail else "passed"
        elif report.skipped:
            outcome = "xfailed" if xfail else "skipped"
        else:
            outcome = "failed"
        if nid not in _seen or _seen[nid]["outcome"] not in ("failed", "error"):
            _seen[nid] = {"outcome": outcome, "phase": "call", "message": _msg(report) if not report.passed else "",
                          "longrepr": str(report.longrepr) if report.failed else ""}
    elif report.failed:  # setup or teardown error
        if nid not in _seen or _seen[nid]["outcome"] not in ("failed", "error"):
            _seen[nid] = {"outcome": "error", "phase": report.when, "message": _msg(report),
                          "longrepr": str(report.longrepr)}
    elif report.when == "setup" and report.skipped:
        _seen[nid] = {"outcome": "xfailed" if xfail else "skipped", "phase": "setup",
                      "message": _msg(report), "longrepr": ""}
    if report.when == "teardown" and nid in _seen:
        r = _seen.pop(nid)
        _put(nid, r["outcome"], r["phase"], r["message"], r["longrepr"], _took.pop(nid, 0.0))

_current = os.environ["DRIVER_SUITES_CURRENT"]

def _set_current(nodeid):
    with open(_current, "w") as f:
        f.write(nodeid)

def pytest_runtest_logstart(nodeid, location):
    _set_current(nodeid)

def pytest_runtest_logfinish(nodeid, location):
    _set_current("")

def pytest_collection_modifyitems(config, items):
    # a run resumed after a timeout leaves out the tests that already have a result
    with open(os.environ["DRIVER_SUITES_DONE"]) as f:
        done = set(f.read().splitlines())
    if done:
        keep = [i for i in items if i.nodeid not in done]
        gone = [i for i in items if i.nodeid in done]
        if gone:
            config.hook.pytest_deselected(items=gone)
            items[:] = keep

def pytest_sessionfinish(session, exitstatus):
    _set_current("<finished>")

def pytest_unconfigure(config):
    _out.close()

def pytest_collectreport(report):
    if report.failed:
        _put(report.nodeid or "<collection>", "error", "collect", _msg(report), str(report.longrepr))
'''


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the proxy ({os.path.basename(str(proc.args[0]))}) exited with "
                               f"{proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- preparing the suites ------------------------------------------------------------

def ensure_venv(workdir: str) -> str:
    """A venv that sees this Python's packages (the drivers under test) plus the suites' test deps."""
    venv = os.path.join(workdir, "venv")
    py = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, ".deps-ok")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
    if not os.path.exists(stamp):
        # pproxy (psycopg's fixture for lost connections) installs uvloop when it can import it and
        # then calls asyncio.get_event_loop(), which uvloop >= 0.22 refuses: an older uvloop here
        deps = ["pytest", "pytest-timeout", "anyio>=4.0", "pproxy>=2.7", "uvloop<0.22", "distro"]
        pool = installed("psycopg-pool")
        if pool is None:  # the pool's tests need it; the newest release that fits the installed psycopg
            deps.append("psycopg-pool")
        log(f"installing test dependencies into {venv}: {' '.join(deps)}")
        subprocess.run([py, "-m", "pip", "install", "-q", *deps], check=True)
        open(stamp, "w").close()
    return py


def prepare_asyncpg(workdir: str) -> tuple[str, str]:
    """(directory to run pytest in, version): asyncpg's tests/ from its sdist, away from its sources."""
    version = installed("asyncpg")
    if version is None:
        raise RuntimeError("asyncpg is not installed")
    dest = os.path.join(workdir, f"asyncpg-{version}-tests")
    if not os.path.isdir(os.path.join(dest, "tests")):
        dl = os.path.join(workdir, "sdists")
        os.makedirs(dl, exist_ok=True)
        sdist = os.path.join(dl, f"asyncpg-{version}.tar.gz")
        if not os.path.exists(sdist):
            log(f"downloading asyncpg {version} sdist")
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                            "-d", dl, f"asyncpg=={version}"], check=True)
        tmp = tempfile.mkdtemp(dir=workdir)
        with tarfile.open(sdist) as tf:
            members = [m for m in tf.getmembers() if m.name.split("/")[1:2] == ["tests"]]
            if not members:
                raise RuntimeError(f"asyncpg {version} sdist has no tests/ directory")
            tf.extractall(tmp, members=members, filter="data")
        shutil.move(os.path.join(tmp, f"asyncpg-{version}", "tests"), os.path.join(dest, "tests"))
        shutil.rmtree(tmp)
        # no pytest config of asyncpg's own: rootdir is dest, the installed asyncpg is imported
        with open(os.path.join(dest, "pytest.ini"), "w") as f:
            f.write("[pytest]\n")
    return dest, version


def prepare_psycopg(workdir: str, src: str, rev: str) -> tuple[str, str]:
    """(directory to run pytest in, version): psycopg's tests/ and pytest settings from a source tree."""
    version = installed("psycopg")
    if version is None:
        raise RuntimeError("psycopg is not installed")
    dest = os.path.join(workdir, "psycopg-tests")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    src = os.path.abspath(os.path.expanduser(src))
    # tests/, the pytest settings in pyproject.toml, tools/pproxy_fix.py (the proxy fixture's)
    if os.path.isdir(os.path.join(src, "tests")):
        shutil.copytree(os.path.join(src, "tests"), os.path.join(dest, "tests"))
        shutil.copytree(os.path.join(src, "tools"), os.path.join(dest, "tools"))
        shutil.copy(os.path.join(src, "pyproject.toml"), dest)
        what = src
    else:  # a git directory (bare, or a clone's .git)
        arch = subprocess.run(["git", "--git-dir", src, "archive", rev, "tests", "tools", "pyproject.toml"],
                              capture_output=True, check=True).stdout
        subprocess.run(["tar", "x", "-C", dest], input=arch, check=True)
        what = subprocess.run(["git", "--git-dir", src, "describe", "--tags", "--always", rev],
                              capture_output=True, text=True).stdout.strip() or rev
    with open(os.path.join(dest, "SOURCE"), "w") as f:
        f.write(what + "\n")
    return dest, version


# -- servers -------------------------------------------------------------------------

def proxy_source(workdir: str, rev: str | None) -> tuple[str, str]:
    """(source root to run pgscope from, description): this tree, or `git archive REV` of it."""
    if not rev:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "proxy"], capture_output=True,
                               text=True).stdout.strip()
        return ROOT, (f"work tree at {head}" + (" with uncommitted changes in proxy/" if dirty else "")
                      + f", {relay_kind(ROOT)}")
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True,
                            text=True, check=True).stdout.strip()
    dest = os.path.join(workdir, f"pgscope-{commit[:12]}")
    if not os.path.isdir(os.path.join(dest, "proxy")):
        os.makedirs(dest, exist_ok=True)
        arch = subprocess.run(["git", "-C", ROOT, "archive", commit, "proxy", "setup.py", "pyproject.toml"],
                              capture_output=True, check=True).stdout
        subprocess.run(["tar", "x", "-C", dest], input=arch, check=True)
        # The compiled cores, as `pip install` builds them; without a compiler the pure-Python relay runs.
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dest, f"commit {commit[:12]} ({rev}), {relay_kind(dest)}"


def relay_kind(root: str) -> str:
    """Which relay a pgscope run from `root` uses: the compiled cores or the pure-Python fallback."""
    built = [n for n in ("protocol/_core", "pool/_hot", "session/_hot")
             if any(f.startswith(os.path.basename(n) + ".") and f.endswith(".so")
                    for f in os.listdir(os.path.join(root, "proxy", os.path.dirname(n))))]
    return "compiled relay" if len(built) == 3 else "pure-Python relay"


def start_pgscope(pg: throwaway.Cluster, workdir: str, tag: str, opts: argparse.Namespace
                  ) -> tuple[subprocess.Popen, int, str]:
    port = free_port()
    logfile = os.path.join(workdir, f"pgscope-{tag}.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSCOPE_")}
    env["PYTHONPATH"] = opts.proxy_root
    for setting in opts.proxy_setting:  # KEY=VALUE, as the environment takes it
        key, _, value = setting.partition("=")
        env["PGSCOPE_" + key.upper()] = value
    args = [sys.executable, "-m", "proxy", "run", "--listen", f"127.0.0.1:{port}",
            "--upstream", f"postgresql://{pg.superuser}@{pg.host}:{pg.port}/postgres",
            "--pool-mode", "session", "--metrics-listen", "", "--pool-size", str(opts.pool_size),
            "--max-client-conn", "2000", "--log-level", opts.proxy_log_level, "--log-format", "json"]
    with open(logfile, "w") as lf:
        proc = subprocess.Popen(args, env=env, stdout=lf, stderr=subprocess.STDOUT, cwd=opts.proxy_root,
                                start_new_session=True)
    wait_port(port, proc)
    return proc, port, logfile


def start_pgbouncer(pg: throwaway.Cluster, workdir: str, tag: str, opts: argparse.Namespace
                    ) -> tuple[subprocess.Popen, int, str]:
    """PgBouncer in session mode in front of ``pg`` (trust, the same pool size), for comparison."""
    exe = shutil.which("pgbouncer")
    if exe is None:
        raise RuntimeError("--target pgbouncer: no pgbouncer on PATH")
    port = free_port()
    d = os.path.join(workdir, f"pgbouncer-{tag}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    logfile = os.path.join(d, "pgbouncer.log")
    ini = os.path.join(d, "pgbouncer.ini")
    with open(os.path.join(d, "users.txt"), "w") as f:
        f.write(f'"{pg.superuser}" ""\n')
    with open(ini, "w") as f:
        f.write(f"[databases]\n* = host={pg.host} port={pg.port}\n[pgbouncer]\nlisten_addr = 127.0.0.1\n"
                f"listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {d}/users.txt\n"
                f"pool_mode = session\ndefault_pool_size = {opts.pool_size}\nmax_client_conn = 2000\n"
                f"logfile = {logfile}\n")
    demote, uid = throwaway._as_postgres()  # pgbouncer, like postgres, refuses to run as root
    if uid is not None:
        for path in (d, *(os.path.join(d, n) for n in os.listdir(d))):
            os.chown(path, uid, -1)
    proc = subprocess.Popen([exe, "-q", ini], preexec_fn=demote, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    wait_port(port, proc)
    return proc, port, logfile


def stop_proc(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # a second signal forces the drain
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- running -------------------------------------------------------------------------

def run_suite(suite: str, rundir: str, py: str, target: str, opts: argparse.Namespace,
              tests: list[str], workdir: str, tag_suffix: str = "") -> dict[str, Any]:
    """Run one suite against one target on a fresh cluster; {"results": {id: {...}}, ...}."""
    pg = throwaway.start_binaries(opts.bindir)
    proxy_proc = None
    tag = f"{suite}-{target}{tag_suffix}"
    try:
        port, logfile = pg.port, None
        if target == "pgscope":
            proxy_proc, port, logfile = start_pgscope(pg, workdir, tag, opts)
        elif target == "pgbouncer":
            proxy_proc, port, logfile = start_pgbouncer(pg, workdir, tag, opts)
        out = os.path.join(workdir, f"results-{tag}.jsonl")
        if os.path.exists(out):
            os.remove(out)
        plugdir = os.path.join(workdir, "plugin")
        os.makedirs(plugdir, exist_ok=True)
        with open(os.path.join(plugdir, "driver_suites_plugin.py"), "w") as f:
            f.write(PLUGIN)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PSYCOPG_"))}
        env.update(PGHOST="127.0.0.1", PGPORT=str(port), PGUSER=pg.superuser, PGDATABASE="postgres",
                   PGCONNECT_TIMEOUT="10", DRIVER_SUITES_RESULTS=out,
                   PYTHONPATH=plugdir, PYTHONDONTWRITEBYTECODE="1")
        if suite == "psycopg":
            env["PSYCOPG_TEST_DSN"] = f"host=127.0.0.1 port={port} user={pg.superuser} dbname=postgres"
        # a fresh cache per pytest process (psycopg's conftest keeps a "segfault" flag there that
        # would stop the run resumed after a test that hung: see the loop below)
        cache = os.path.join(workdir, f"pytest-cache-{tag}")
        args = [py, "-m", "pytest", "-p", "driver_suites_plugin", "-o", f"cache_dir={cache}",
                "-p", "no:randomly", "-q", "--no-header", "-rN", "--tb=short", "-o", "console_output_style=classic",
                f"--timeout={opts.timeout}"]
        if suite == "psycopg":
            args += ["-o", "addopts="]  # psycopg's own "-ra" summary is not needed
        if not tests:
            for path in EXCLUDE.get(suite, {}):
                args += ["--ignore", path]
            for d in opts.deselect:
                args += ["--deselect", d]
            if suite in MARKERS:
                args += ["-m", MARKERS[suite][0]]
            args += ["tests"]
            if opts.k:
                args += ["-k", opts.k]
        else:
            args += tests
        log(f"{suite} {target}: pytest on port {port}" + (f" ({target} log {logfile})" if logfile else ""))
        # pytest-timeout's thread method ends the whole pytest process on a timeout (its signal
        # method interrupts asyncio and CPython at random points and broke later tests); the run
        # is then resumed without the tests that have a result, the one that hung counted failed
        current = os.path.join(workdir, f"current-{tag}")
        done_file = os.path.join(workdir, f"done-{tag}")
        env.update(DRIVER_SUITES_CURRENT=current, DRIVER_SUITES_DONE=done_file)
        args.insert(args.index(f"--timeout={opts.timeout}") + 1, "--timeout-method=thread")
        t0 = time.monotonic()
        results: dict[str, dict[str, Any]] = {}
        rc: Any = None
        outpath = os.path.join(workdir, f"pytest-{tag}.out")
        open(outpath, "w").close()
        for attempt in range(opts.max_restarts + 1):
            with open(done_file, "w") as f:
                f.write("\n".join(results))
            open(current, "w").close()
            shutil.rmtree(cache, ignore_errors=True)
            start = os.path.getsize(outpath)
            with open(outpath, "a") as po:
                try:
                    rc = subprocess.run(args, cwd=rundir, env=env, stdout=po, stderr=subprocess.STDOUT,
                                        timeout=max(60, opts.suite_timeout - (time.monotonic() - t0))).returncode
                except subprocess.TimeoutExpired:
                    rc = "suite timeout"
            if os.path.exists(out):
                with open(out) as f:
                    for line in f:
                        r = json.loads(line)
                        results[r.pop("id")] = r
            hung = open(current).read().strip()
            if rc == "suite timeout" or not hung or hung == "<finished>" or hung in results:
                break
            with open(outpath, errors="replace") as f:
                f.seek(start)
                dump = f.read()[-8000:]
            results[hung] = {"outcome": "failed", "phase": "timeout", "seconds": float(opts.timeout),
                             "message": f"Timeout (>{opts.timeout}s): pytest-timeout ended the run here "
                                        "(resumed after it)", "longrepr": dump}
            log(f"{suite} {target}: {hung} timed out; resuming ({len(results)} results so far)")
        took = time.monotonic() - t0
        proxy_rc = None
        if proxy_proc is not None:
            proxy_rc = proxy_proc.poll()  # None: still running, as it should
        counts: dict[str, int] = {}
        for r in results.values():
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        log(f"{suite} {target}: pytest exit {rc} in {took:.0f}s: "
            + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
            + ("" if proxy_proc is None or proxy_rc is None else f"; {target} DIED with {proxy_rc}"))
        return {"results": results, "counts": counts, "seconds": round(took), "pytest_exit": rc,
                "proxy_died": proxy_rc, "proxy_log": logfile}
    finally:
        if proxy_proc is not None:
            stop_proc(proxy_proc)
        pg.stop()


def where(longrepr: str) -> str:
    """The outermost frame of a --tb=short traceback (the test's own line, or its tearDown)."""
    for line in longrepr.splitlines():
        if ": in " in line and not line.startswith((" ", "E ")):
            path, _, fn = line.partition(": in ")
            return f"{path.rsplit('/site-packages/', 1)[-1]} in {fn}"
    # pytest-timeout's thread dump: the main thread's frames in the tests or the test base
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', longrepr.split("~~ Stack of <_MainThread", 1)[-1])
    ours = [f for f in frames if "/tests/" in f[0] or "_testbase" in f[0]]
    if ours:
        path, line, fn = ours[-1]
        return f"{path.rsplit('/site-packages/', 1)[-1].split('-tests/', 1)[-1]}:{line} in {fn}"
    return ""


def first_line(msg: str, width: int = 300) -> str:
    msg = " ".join(msg.strip().split("\n")[:3])
    return msg if len(msg) <= width else msg[: width - 1] + "…"


def compare(suite: str, runs: dict[str, dict[str, Any]], proxy: str = "pgscope") -> dict[str, Any]:
    d, p = runs["direct"]["results"], runs[proxy]["results"]
    only_proxy = sorted(t for t, r in p.items()
                        if r["outcome"] in FAILED and d.get(t, {}).get("outcome") not in FAILED)
    only_direct = sorted(t for t, r in d.items()
                         if r["outcome"] in FAILED and p.get(t, {}).get("outcome") not in FAILED)
    return {"only_pgscope": only_proxy, "only_direct": only_direct}


def repeat(suite: str, rundir: str, py: str, targets: list[str], opts: argparse.Namespace,
           tests: list[str], workdir: str) -> dict[str, dict[str, int]]:
    """Run the same tests opts.repeat times on each target, the targets taking turns (so a
    spell of load on the machine hits them alike); {test: {target: times failed}}."""
    failed: dict[str, dict[str, int]] = {}
    for i in range(opts.repeat):
        for target in targets:
            run = run_suite(suite, rundir, py, target, opts, tests, workdir, "-repeat")
            for t, r in run["results"].items():
                counts = failed.setdefault(t, dict.fromkeys(targets, 0))
                counts[target] += r["outcome"] in FAILED
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", action="append", choices=["asyncpg", "psycopg"],
                    help="suite to run (repeatable; default: asyncpg, and psycopg when --psycopg-src is given)")
    ap.add_argument("--target", action="append", choices=["direct", "pgscope", "pgbouncer"],
                    help="run against PostgreSQL directly, through pgscope, and/or through PgBouncer in "
                         "session mode, for comparison (default: direct and pgscope)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="with --test: run the tests N times on every target, taking turns, and print "
                         "how often each failed where (for races)")
    ap.add_argument("--psycopg-src", default=os.environ.get("PGSCOPE_PSYCOPG_SRC"),
                    help="psycopg source tree or git directory holding its tests/ (env PGSCOPE_PSYCOPG_SRC)")
    ap.add_argument("--psycopg-rev", default="HEAD", help="revision when --psycopg-src is a git directory")
    ap.add_argument("--test", action="append", default=[], metavar="SUITE:NODEID",
                    help="run only these tests (pytest node ids as printed, prefixed by the suite)")
    ap.add_argument("-k", help="pytest -k expression for every suite")
    ap.add_argument("--deselect", action="append", default=[], metavar="NODEID", help="pytest --deselect")
    ap.add_argument("--confirm", action="store_true",
                    help="afterwards re-run the tests that failed only through pgscope, alone, on both targets")
    ap.add_argument("--timeout", type=int, default=60,
                    help="seconds per test (pytest-timeout); the run resumes after a test that hangs")
    ap.add_argument("--max-restarts", type=int, default=100, help="resumed runs at most, per suite and target")
    ap.add_argument("--suite-timeout", type=int, default=3600, help="seconds per suite run")
    ap.add_argument("--pool-size", type=int, default=250)
    ap.add_argument("--proxy-setting", action="append", default=[], metavar="KEY=VALUE",
                    help="a pgscope setting for the pgscope target, e.g. server_reuse=false (env PGSCOPE_KEY)")
    ap.add_argument("--proxy-log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--proxy-rev", metavar="REV",
                    help="run pgscope from this commit (git archive into --workdir) instead of the work tree")
    ap.add_argument("--bindir", default=None,
                    help="PostgreSQL server binaries (default: as proxy/throwaway.py finds them)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "pgscope-driver-suites"))
    ap.add_argument("--json", action="store_true", help="print results.json instead of the text report")
    opts = ap.parse_args()

    opts.bindir = opts.bindir or throwaway.find_bindir()
    if not opts.bindir:
        print("no PostgreSQL server binaries (pg_config --bindir, /usr/lib/postgresql/*/bin)", file=sys.stderr)
        return 2
    workdir = os.path.abspath(opts.workdir)
    os.makedirs(workdir, exist_ok=True)
    targets = opts.target or ["direct", "pgscope"]
    by_suite: dict[str, list[str]] = {}
    for t in opts.test:
        s, _, nid = t.partition(":")
        by_suite.setdefault(s, []).append(nid)
    suites = opts.suite or (list(by_suite) if by_suite else ["asyncpg"] + (["psycopg"] if opts.psycopg_src else []))
    if "psycopg" in suites and not opts.psycopg_src:
        print("psycopg's sdist has no tests: give --psycopg-src (a checkout of psycopg's repository)",
              file=sys.stderr)
        return 2

    py = ensure_venv(workdir)
    opts.proxy_root, proxy_desc = proxy_source(workdir, opts.proxy_rev)
    if opts.proxy_setting:
        proxy_desc += " with " + ", ".join(opts.proxy_setting)
    log(f"pgscope: {proxy_desc}")
    report: dict[str, Any] = {"postgres_bindir": opts.bindir, "pgscope": proxy_desc, "suites": {}}
    pgver = subprocess.run([os.path.join(opts.bindir, "postgres"), "--version"], capture_output=True,
                           text=True).stdout.strip()
    report["postgres"] = pgver
    bad = 0
    for suite in suites:
        if suite == "asyncpg":
            rundir, version = prepare_asyncpg(workdir)
            versions = {"asyncpg": version}
        else:
            rundir, version = prepare_psycopg(workdir, opts.psycopg_src, opts.psycopg_rev)
            versions = {"psycopg": version, "psycopg-pool": installed("psycopg-pool") or subprocess.run(
                [py, "-c", "import importlib.metadata as m; print(m.version('psycopg-pool'))"],
                capture_output=True, text=True).stdout.strip(),
                "tests from": open(os.path.join(rundir, "SOURCE")).read().strip()}
        log(f"{suite}: {versions}; {pgver}")
        if opts.repeat > 1:
            counts = repeat(suite, rundir, py, targets, opts, by_suite.get(suite, []), workdir)
            report["suites"][suite] = {"versions": versions, "repeat": opts.repeat, "failures": counts}
            continue
        runs = {t: run_suite(suite, rundir, py, t, opts, by_suite.get(suite, []), workdir) for t in targets}
        entry: dict[str, Any] = {"versions": versions, "excluded": EXCLUDE.get(suite, {}),
                                 "markers": MARKERS.get(suite),
                                 "runs": {t: {k: v for k, v in r.items() if k != "results"} for t, r in runs.items()}}
        for other in targets:
            if other not in ("direct", "pgscope") and "direct" in runs:
                entry[f"only_{other}"] = compare(suite, runs, other)["only_pgscope"]
        if "direct" in runs and "pgscope" in runs:
            diff = compare(suite, runs)
            entry.update(diff)
            if opts.confirm and diff["only_pgscope"]:
                log(f"{suite}: re-running {len(diff['only_pgscope'])} pgscope-only failures alone")
                again = {t: run_suite(suite, rundir, py, t, opts, diff["only_pgscope"], workdir, "-confirm")
                         for t in ("direct", "pgscope")}
                entry["confirmed"] = [t for t in diff["only_pgscope"]
                                      if again["pgscope"]["results"].get(t, {}).get("outcome") in FAILED
                                      and again["direct"]["results"].get(t, {}).get("outcome") not in FAILED]
            entry["details"] = {t: {"direct": runs["direct"]["results"].get(t),
                                    "pgscope": runs["pgscope"]["results"].get(t)}
                                for t in diff["only_pgscope"] + diff["only_direct"]}
            bad += len(entry.get("confirmed", diff["only_pgscope"]))
        else:
            entry["failed"] = {tgt: {t: r for t, r in run["results"].items() if r["outcome"] in FAILED}
                               for tgt, run in runs.items()}
        report["suites"][suite] = entry

    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    if opts.json:
        print(json.dumps(report, indent=1))
        return 1 if bad else 0

    print()
    print(f"{pgver}; pgscope ({proxy_desc}) in session mode; details in {os.path.join(workdir, 'results.json')}")
    for suite, e in report["suites"].items():
        print()
        print(f"== {suite} {e['versions']}")
        if "repeat" in e:
            for t, counts in sorted(e["failures"].items()):
                print(f"   {suite}:{t}\n       failed " + ", ".join(f"{n}/{e['repeat']} {target}"
                                                          for target, n in counts.items()))
            continue
        for t, r in e["runs"].items():
            c = r["counts"]
            died = f"; {t} died ({r['proxy_died']})" if r.get("proxy_died") is not None else ""
            print(f"   {t:9s} {c.get('passed', 0)} passed, {c.get('failed', 0) + c.get('error', 0)} failed, "
                  f"{c.get('skipped', 0)} skipped, {c.get('xfailed', 0)} xfailed "
                  f"({r['seconds']}s){died}")
        for other in e["runs"]:
            if f"only_{other}" in e:
                print(f"   failing only through {other}: {len(e[f'only_{other}'])}")
                for t in e[f"only_{other}"]:
                    print(f"   - {suite}:{t}")
        if "only_pgscope" not in e:
            for tgt, failed in e["failed"].items():
                for t, r in sorted(failed.items()):
                    at = where(r.get("longrepr", ""))
                    print(f"   FAIL ({tgt}) {suite}:{t}" + (f"  (at {at})" if at else "")
                          + f"\n        {first_line(r['message'])}")
            continue
        confirmed = e.get("confirmed")
        print(f"   failing only through pgscope: {len(e['only_pgscope'])}"
              + (f" ({len(confirmed)} again when re-run alone)" if confirmed is not None else ""))
        for t in e["only_pgscope"]:
            r = e["details"][t]["pgscope"]
            mark = "" if confirmed is None else ("  [again alone]" if t in confirmed else "  [not alone]")
            at = where(r.get("longrepr", ""))
            print(f"   - {suite}:{t}{mark}\n       {r['outcome']} ({r['phase']}"
                  + (f", at {at}" if at else "") + "): " + textwrap.shorten(r["message"], 400))
        if e["only_direct"]:
            print(f"   failing only directly: {len(e['only_direct'])}")
            for t in e["only_direct"]:
                r = e["details"][t]["direct"]
                print(f"   - {suite}:{t}\n       {r['outcome']} ({r['phase']}): " + textwrap.shorten(r["message"], 300))
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
