"""A throwaway PostgreSQL for the demo, the benchmarks and the tests.

Found in this order: local server binaries (``pg_config --bindir``, then the
newest ``/usr/lib/postgresql/*/bin``) for a cluster in a temp dir on a free
port (as root, run as the ``postgres`` OS user); testcontainers' PostgreSQL
when a Docker engine answers; the ``pgserver`` wheel, which bundles a server.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

HBA = """\
local all all trust
host all pgscope_md5 127.0.0.1/32 md5
host all pgscope_scram 127.0.0.1/32 scram-sha-256
host all pgscope_plain 127.0.0.1/32 password
host all pgscope_aq_md5 127.0.0.1/32 md5
host all pgscope_aq_scram,pgscope_aq_pass 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
host all all ::1/128 trust
"""

CONF = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{sockdir}'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
log_min_messages = warning
logging_collector = off
password_encryption = 'scram-sha-256'
shared_buffers = 128MB
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    host: str
    port: int
    superuser: str
    how: str  # "dsn", "binaries", "testcontainers", "pgserver"
    managed: bool
    datadir: str | None = None
    bindir: str | None = None
    _stop: Callable[[], None] | None = field(default=None, repr=False)
    _restart: Callable[[], None] | None = field(default=None, repr=False)

    password: str | None = None  # the superuser's, when the server needs one

    def dsn(self, user: str | None = None, password: str | None = None, dbname: str = "postgres") -> str:
        auth = user or self.superuser
        if password is None and user in (None, self.superuser):
            password = self.password
        if password is not None:
            auth += f":{password}"
        if self.host.startswith("/"):
            return f"postgresql://{auth}@/{dbname}?host={self.host}&port={self.port}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None

    def restart(self) -> None:
        if self._restart is None:
            raise RuntimeError(f"cannot restart a {self.how} server")
        self._restart()


def find_bindir() -> str | None:
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and os.path.exists(os.path.join(out.stdout.strip(), "initdb")):
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    found = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if os.path.exists(os.path.join(d, "initdb"))]
    found.sort(key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0)
    return found[-1] if found else None


def _as_postgres() -> tuple[Callable[[], None] | None, int | None]:
    """As root, PostgreSQL refuses to run: switch to the postgres OS user in the child."""
    if os.geteuid() != 0:
        return None, None
    pw = pwd.getpwnam("postgres")

    def demote() -> None:
        os.setgid(pw.pw_gid)
        os.initgroups("postgres", pw.pw_gid)
        os.setuid(pw.pw_uid)
    return demote, pw.pw_uid


def start_binaries(bindir: str) -> Cluster:
    demote, uid = _as_postgres()
    base = tempfile.mkdtemp(prefix="pgscope-pg-")
    datadir = os.path.join(base, "data")
    if uid is not None:
        gid = pwd.getpwnam("postgres").pw_gid
        os.chown(base, uid, gid)
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    env.pop("PGDATA", None)

    def run(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(args, preexec_fn=demote, env=env, capture_output=True, text=True,
                              timeout=timeout, check=check, cwd=base)

    try:
        run(os.path.join(bindir, "initdb"), "-D", datadir, "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--no-sync")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {e.stderr.strip()}") from None
    except BaseException:  # Ctrl-C, timeout: leave no temp dir behind
        shutil.rmtree(base, ignore_errors=True)
        raise
    port = free_port()
    with open(os.path.join(datadir, "postgresql.conf"), "a") as f:
        f.write(CONF.format(port=port, sockdir=base))
    with open(os.path.join(datadir, "pg_hba.conf"), "w") as f:
        f.write(HBA)
    logfile = os.path.join(base, "postgres.log")
    pg_ctl = os.path.join(bindir, "pg_ctl")

    def start() -> None:
        r = run(pg_ctl, "-D", datadir, "-l", logfile, "-w", "-t", "60", "start", check=False)
        if r.returncode != 0:
            log = open(logfile).read()[-2000:] if os.path.exists(logfile) else ""
            raise RuntimeError(f"pg_ctl start failed: {r.stderr.strip()} {log}")

    def stop() -> None:
        run(pg_ctl, "-D", datadir, "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(base, ignore_errors=True)

    def restart() -> None:
        r = run(pg_ctl, "-D", datadir, "-l", logfile, "-m", "fast", "-w", "-t", "60", "restart", check=False)
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl restart failed: {r.stderr.strip()}")

    try:
        start()
    except BaseException:  # a failed or interrupted start: stop whatever did start, remove the files
        try:
            stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)
        raise
    return Cluster("127.0.0.1", port, "postgres", "binaries", True, datadir, bindir, stop, restart)


def _docker_answers() -> bool:
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        path = host[7:]
    elif host:
        return True
    else:
        path = "/var/run/docker.sock"
    if not os.path.exists(path):
        return False
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(path)
            s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            return b"OK" in s.recv(1024)
    except OSError:
        return False


def start_testcontainers() -> Cluster:
    from testcontainers.postgres import PostgresContainer

    c = PostgresContainer("postgres:16", username="postgres", password="postgres", dbname="postgres")
    c.start()
    host, port = c.get_container_host_ip(), int(c.get_exposed_port(5432))
    return Cluster(host, port, "postgres", "testcontainers", True, _stop=c.stop, password="postgres")


def start_pgserver() -> Cluster:
    import pgserver  # type: ignore[import-not-found]

    base = tempfile.mkdtemp(prefix="pgscope-pgserver-")
    srv = pgserver.get_server(base, cleanup_mode="stop")
    uri = srv.get_uri()
    from urllib.parse import parse_qs, urlsplit

    u = urlsplit(uri)
    q = parse_qs(u.query)
    host = q.get("host", [u.hostname or "127.0.0.1"])[0]
    # pgserver listens on a unix socket only: the proxy and the clients can use it as host=/dir

    def stop() -> None:
        try:
            srv.cleanup()
        finally:
            shutil.rmtree(base, ignore_errors=True)
    return Cluster(host, u.port or 5432, u.username or "postgres", "pgserver", True, _stop=stop)


def start_postgres(errors: list[str] | None = None) -> Cluster:
    """The first server that works, by the order above; RuntimeError naming what was tried."""
    tried: list[str] = [] if errors is None else errors
    bindir = find_bindir()
    if bindir:
        try:
            return start_binaries(bindir)
        except Exception as e:  # noqa: BLE001 - try the next way
            tried.append(f"local binaries in {bindir}: {e}")
    else:
        tried.append("local binaries: no pg_config --bindir and no /usr/lib/postgresql/*/bin")
    if _docker_answers():
        try:
            return start_testcontainers()
        except Exception as e:  # noqa: BLE001
            tried.append(f"testcontainers: {e}")
    else:
        tried.append("testcontainers: no Docker engine answers")
    try:
        return start_pgserver()
    except Exception as e:  # noqa: BLE001
        tried.append(f"pgserver wheel: {e}")
    raise RuntimeError("no PostgreSQL available; tried: " + "; ".join(tried))


def wait_connectable(connect: Callable[[], Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect().close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
