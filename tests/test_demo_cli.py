"""``pgscope demo`` as a user runs it in a terminal: the text report, ``--keep`` (everything stays up
until Ctrl-C), ``--verbose`` (the proxy's warnings on stderr), and Ctrl-C (SIGINT) at any time cleaning up: no PostgreSQL or proxy left running,
nothing left in the temp dir. (tests/test_demo.py has the --json run and what it shows.)"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request

import psycopg
import pytest

from tests.support.wire import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Demo:
    """``pgscope demo`` in a child process with a temp dir of its own, its output read as it comes."""

    def __init__(self, *args: str) -> None:
        # traversable by the postgres OS user the cluster runs as under root; must be empty at the end
        self.tmp = tempfile.mkdtemp(prefix="pgscope-demo-cli-")
        os.chmod(self.tmp, 0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGSCOPE_") or k.startswith("PGSCOPE_TEST_")}
        env["TMPDIR"] = self.tmp
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy", "demo", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(s, buf), daemon=True)
                         for s, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, buf: list[str]) -> None:
        for line in stream:
            buf.append(line)

    def stdout(self) -> str:
        return "".join(self.out)

    def stderr(self) -> str:
        return "".join(self.err)

    def wait_output(self, pattern: str, stream: str = "stdout", timeout: float = 180) -> re.Match:
        def found():
            if self.proc.poll() is not None and not any(t.is_alive() for t in self._readers):
                text = getattr(self, stream)()
                m = re.search(pattern, text, re.M)
                assert m, f"demo exited {self.proc.returncode}:\n{self.stderr()[-3000:]}\n{self.stdout()[-2000:]}"
                return m
            return re.search(pattern, getattr(self, stream)(), re.M)
        return wait_for(found, timeout=timeout, what=f"{pattern!r} on the demo's {stream}", interval=0.1)

    def interrupt(self, timeout: float = 90) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout)
        for t in self._readers:
            t.join(10)
        return code

    def cleanup(self) -> list[str]:
        """Kill the demo if still running; what was left in its temp dir (then removed)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        left = os.listdir(self.tmp)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return left


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _assert_gone(demo: Demo, ports: list[int], left: list[str]) -> None:
    assert left == [], f"left behind in TMPDIR: {left}"
    assert _processes_mentioning(demo.tmp) == []  # no postgres -D <tmp>/..., nothing else of the demo's
    for port in ports:
        assert not _accepts(port), f"port {port} still answers"


def _skip_without_postgres(demo: Demo) -> None:
    if demo.proc.poll() == 1 and "no PostgreSQL server could be started" in demo.stderr():
        pytest.skip("no PostgreSQL for the demo: " + demo.stderr()[-500:])  # a failure under CI=true


def test_demo_text_report_then_keep_until_ctrl_c():
    demo = Demo("--duration", "2", "--keep", "--verbose")
    left: list[str] = []
    try:
        try:
            m = demo.wait_output(r"^  proxy:\s+(postgresql://\S+)")
        except AssertionError:
            _skip_without_postgres(demo)
            raise
        proxy_dsn = m.group(1)
        pg_dsn = demo.wait_output(r"^  postgres:\s+(postgresql://\S+)").group(1)
        metrics = demo.wait_output(r"^  metrics:\s+(http://\S+)").group(1)
        text = demo.stdout()
        # the text report, every section with what the sample shop makes
        assert re.search(r"^Top statements by total time", text, re.M), text
        assert "Slow statements and their plans" in text and "costliest: Seq Scan orders" in text, text
        assert "CREATE INDEX CONCURRENTLY ON orders (customer_id);" in text, text
        assert re.search(r"^  storefront: \d+ loops?, \d+ queries", text, re.M), text
        assert re.search(r"^\s+\d+ ms  checkout \(", text, re.M) and "billing" in text, text
        assert "still up, see below." in text
        # --verbose: the proxy's warnings on stderr, in the console format (the shop's slow lookups)
        assert re.search(r"\[warning\s*\] slow_statement\s", demo.stderr()), demo.stderr()[-2000:]
        # --keep: the proxy, its HTTP endpoint and PostgreSQL stay up after the report
        with psycopg.connect(proxy_dsn, autocommit=True) as c:
            assert c.execute("select count(*) > 0 from orders").fetchone() == (True,)
        with psycopg.connect(pg_dsn, autocommit=True) as c:
            assert c.execute("select 1").fetchone() == (1,)
        with urllib.request.urlopen(metrics, timeout=10) as r:
            assert b"pgscope_statement_calls_total" in r.read()
        assert demo.proc.poll() is None
        ports = [int(re.search(r":(\d+)/", d).group(1)) for d in (proxy_dsn, pg_dsn)]
        ports.append(int(re.search(r":(\d+)/", metrics).group(1)))
        # Ctrl-C: everything stops and goes
        assert demo.interrupt() == 0, demo.stderr()[-3000:]
        assert "stopped pgscope and the throwaway PostgreSQL, removed its files" in demo.stderr()
    finally:
        left = demo.cleanup()
    _assert_gone(demo, ports, left)


def test_demo_ctrl_c_during_the_workload_cleans_up():
    demo = Demo("--duration", "60")
    left: list[str] = []
    try:
        try:
            m = demo.wait_output(r"pgscope listens on 127\.0\.0\.1:(\d+) .* metrics and API on http://127\.0\.0\.1:(\d+)",
                                 stream="stderr")
        except AssertionError:
            _skip_without_postgres(demo)
            raise
        ports = [int(m.group(1)), int(m.group(2))]
        demo.wait_output(r"^running the sample shop", stream="stderr")
        assert _processes_mentioning(demo.tmp), "the demo's PostgreSQL should be running under its temp dir"
        assert demo.interrupt() == 130, demo.stderr()[-3000:]
        err = demo.stderr()
        assert "pgscope demo: interrupted" in err
        assert "stopped pgscope and the throwaway PostgreSQL, removed its files" in err
        assert "Traceback" not in err, err
        assert "Top statements" not in demo.stdout()  # no report for an interrupted run
    finally:
        left = demo.cleanup()
    _assert_gone(demo, ports, left)
