"""Run a real pgscope proxy for tests: in a background thread with its own event loop.

The proxy under test is the real thing (same classes as `pgscope run`), in front
of the real PostgreSQL from the `pg` fixture.  Tests reach it only through its
sockets: PostgreSQL clients on ``port`` and HTTP on ``metrics_port``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from typing import Any


class RunningProxy:
    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.loop: asyncio.AbstractEventLoop | None = None
        self.proxy = None
        self._thread = threading.Thread(target=self._run, name="pgscope-test-proxy", daemon=True)
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    # -- lifecycle
    def _run(self) -> None:
        import uvloop

        loop = uvloop.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        except BaseException as e:  # surfaced by start()
            self._error = e
            self._started.set()
        finally:
            loop.close()

    async def _main(self) -> None:
        from proxy.listener import Proxy

        from proxy.log import set_level

        set_level(self.settings.log_level)
        self._stop = asyncio.Event()
        self.proxy = Proxy(self.settings)
        await self.proxy.start()
        self._started.set()
        await self._stop.wait()
        await self.proxy.close()

    def start(self) -> "RunningProxy":
        self._thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(15)

    def call(self, fn, *args, timeout: float = 30):
        """Run ``fn(*args)`` (sync, or a coroutine function) on the proxy's loop."""
        async def _wrap():
            r = fn(*args)
            if asyncio.iscoroutine(r):
                r = await r
            return r
        return asyncio.run_coroutine_threadsafe(_wrap(), self.loop).result(timeout)

    # -- addresses
    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def metrics_port(self) -> int:
        return self.proxy.metrics_port

    def dsn(self, user: str, password: str | None = None, dbname: str = "pgscope_test",
            **params: str) -> str:
        auth = user if password is None else f"{user}:{password}"
        from urllib.parse import quote

        q = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}" + (f"?{q}" if q else "")

    # -- HTTP
    def http(self, path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def api(self, path: str) -> Any:
        status, body = self.http(path)
        assert status == 200, (status, body)
        return json.loads(body)

    def metrics(self) -> str:
        return self.http("/metrics")[1].decode()

    def flush_inspection(self) -> None:
        """Process every event the relay has queued so far (tests only)."""
        import time

        def _flush():
            insp = self.proxy.inspector
            if insp is not None:
                insp.process(self.proxy.sink.drain(), time.monotonic())
        self.call(_flush)


def make_settings(pg, **overrides: Any):
    from proxy.config import load_settings

    base: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "metrics_listen": "127.0.0.1:0",
        "upstream": pg.dsn(),
        "log_level": "warning",
        "server_check_delay": 30.0,
    }
    inspect_over = {k[len("inspect."):]: overrides.pop(k) for k in list(overrides) if k.startswith("inspect.")}
    base.update(overrides)
    if inspect_over:
        base["inspect"] = {**base.get("inspect", {}), **inspect_over}
    return load_settings(None, env={}, overrides=base)


class ProxyProcess:
    """``pgscope run`` as a child process (for signals, the CLI and logs)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        import os
        import socket
        import subprocess
        import sys
        import tempfile

        def free_port() -> int:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return s.getsockname()[1]

        self.port = free_port()
        self.metrics_port = free_port()
        fd, self.log_path = tempfile.mkstemp(prefix="pgscope-log-", suffix=".jsonl")
        self._log = os.fdopen(fd, "wb")
        self._final_logs: str | None = None
        full = [sys.executable, "-m", "proxy", "run", "--listen", f"127.0.0.1:{self.port}",
                "--metrics-listen", f"127.0.0.1:{self.metrics_port}", *args]
        e = {k: v for k, v in os.environ.items()
             if not k.startswith("PGSCOPE_") or k.startswith("PGSCOPE_TEST_") or k == "PGSCOPE_NO_EXTENSIONS"}
        e.update(env or {})
        self.proc = subprocess.Popen(full, stdout=self._log, stderr=subprocess.STDOUT, env=e)

    def wait_ready(self, timeout: float = 20) -> "ProxyProcess":
        import socket
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgscope exited {self.proc.returncode}: {self.logs()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"pgscope did not listen: {self.logs()}")

    def logs(self) -> str:
        if self._final_logs is not None:  # stopped: the file is gone, its text kept
            return self._final_logs
        self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def events(self) -> list[dict]:
        out = []
        for line in self.logs().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def wait_event(self, name: str, timeout: float = 10, **match: Any) -> dict:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events():
                if ev.get("event") == name and all(ev.get(k) == v for k, v in match.items()):
                    return ev
            time.sleep(0.05)
        raise AssertionError(f"no {name} event in logs: {self.logs()[-3000:]}")

    def dsn(self, user: str, password: str | None = None, dbname: str = "pgscope_test") -> str:
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20) -> int:
        import os
        import signal as _signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(_signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self._final_logs is None:
            with open(self.log_path, "rb") as f:
                self._final_logs = f.read().decode(errors="replace")
            os.unlink(self.log_path)  # leave nothing in the temp dir
        return self.proc.returncode
