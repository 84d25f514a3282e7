"""The listener: accepts clients, owns the pools, the session context and inspection, drains and reloads."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from proxy.admin import stats
from proxy.config_tables import resolve, side_target
from proxy.credentials import Credentials
from proxy.listening import Listeners, open_listeners, open_peer, shown
from proxy.log import allow_parameters, get_logger, set_level
from proxy.pool.manager import PoolManager
from proxy.pool.pool import PoolConfig
from proxy.pool.upstream import TCP_OPTIONS, ServerConn
from proxy.protocol.errors import ADMIN_SHUTDOWN, PgError
from proxy.session.cancel import CancelRegistry
from proxy.session.client import ClientSession
from proxy.session.context import SessionContext
from proxy.session.janitor import busy_since, check_timeouts, drain, peer_gone
from proxy.session.rules import SessionStateGuard
from proxy.readiness import Readiness
from proxy.upstreams import client_of_server_pid, other_servers
from proxy.tls import client_side_context, server_side_context, server_tls_required


SIDE_APPLICATION_NAME = "pgscope-side"  # how pgscope's own connections show in pg_stat_activity


def pool_config(settings: Any) -> PoolConfig:
    return PoolConfig(
        host=settings.upstream_host,
        port=settings.upstream_port,
        pool_size=settings.pool_size,
        min_pool_size=settings.min_pool_size,
        reserve_pool_size=settings.reserve_pool_size,
        reserve_pool_timeout=settings.reserve_pool_timeout,
        query_wait_timeout=settings.query_wait_timeout,
        server_connect_timeout=settings.server_connect_timeout,
        server_lifetime=settings.server_lifetime,
        server_idle_timeout=settings.server_idle_timeout,
        server_check_delay=settings.server_check_delay,
        server_check_query=settings.server_check_query,
        server_reset_query=settings.server_reset_query,
        server_reset_query_always=settings.server_reset_query_always,
        server_reuse=settings.server_reuse, server_round_robin=settings.server_round_robin,
        server_drain_timeout=settings.server_drain_timeout,
        **{name: getattr(settings, name) for name in TCP_OPTIONS},
        pool_mode=settings.pool_mode,
        ssl=server_side_context(settings.server_tls_mode, settings.server_tls_ca_file or None,
                                settings.server_tls_cert, settings.server_tls_key),
        ssl_required=server_tls_required(settings.server_tls_mode),
    )


def admin_console(proxy: "Proxy") -> Any:
    """The admin console (databases pgscope and pgbouncer): proxy/admin, docs/admin.md."""
    from proxy import __version__
    from proxy.admin.console import AdminContext, Console
    from proxy.config import load_settings

    return Console(AdminContext(
        settings=lambda: proxy.settings, defaults=load_settings(None, env={}), pools=proxy.pools,
        sessions=proxy.ctx.sessions, inspector=proxy.inspector, reload=proxy.reload, shutdown=proxy.shutdown,
        apply=proxy.reload, started=time.monotonic(), version=__version__, log=proxy.log,
        traffic=lambda: proxy.ctx.counters.traffic(proxy.ctx.sessions), window=proxy.stats_window))


def client_counts(sessions: Any) -> dict[str, int]:
    """Clients per state (pgscope_client_connections)."""
    out = {"active": 0, "idle": 0, "waiting": 0, "login": 0}
    for sess in sessions:
        out[sess.state_name] = out.get(sess.state_name, 0) + 1
    return out


async def wait_for_clients_then_stop(proxy: "Proxy") -> None:
    """SHUTDOWN WAIT_FOR_CLIENTS (PgBouncer's): stop accepting (and /readyz answers not ready),
    let the connected clients go on as long as they like, and shut down once the last one has
    left (console clients aside: they are closed by the shutdown). A signal meanwhile shuts
    down as it always does."""
    proxy.log.info("waiting_for_clients", clients=sum(s.state_name != "console" for s in proxy.sessions))
    proxy.readiness.stopping = True
    if proxy._listener is not None:
        proxy._listener.close()
    while any(s.state_name != "console" for s in proxy.sessions):
        if proxy.ctx.draining:
            return
        await asyncio.sleep(0.1)
    if not proxy.ctx.draining:
        proxy.shutdown()


class Proxy:
    def __init__(self, settings: Any, config_file: str | None = None) -> None:
        self.settings = settings
        self.config_file = config_file
        self.log = get_logger("pgscope")
        self._sessions_by_id: dict[int, ClientSession] = {}  # see client_busy_since
        # auth_query's side connection: as auth_user, to where clients of the database ("": upstream's) go
        self.credentials = Credentials(settings, lambda db: self.side_connect(
            db or self.settings.upstream_dbname or "postgres", self.settings.auth_user), self.log)
        self.client_ssl = None
        if settings.client_tls_mode != "disable":
            self.client_ssl = client_side_context(settings.client_tls_cert, settings.client_tls_key,
                                                  settings.client_tls_ca_file)
        self.pools = PoolManager(pool_config(settings), self.credentials.upstream_password, log=self.log)
        self.sink = None
        self.inspector = None
        if settings.inspect.enabled:
            from proxy.inspect.inspector import Inspector
            from proxy.inspect.pipeline import EventSink

            self.sink = EventSink(settings.inspect.queue_size)
            self.inspector = Inspector(settings.inspect, self.sink, logger=self.log)
            self._add_consumers(settings)
        self.ctx = SessionContext(
            settings=settings, pools=self.pools,
            authenticator=self.credentials.authenticator,
            cancel=CancelRegistry(self._open_upstream, lambda: self.pools.cfg.server_connect_timeout, self.log,
                                  lambda: self.settings.peer_id, lambda peer: open_peer(self.settings, peer)),
            rules=SessionStateGuard(lambda: self.settings.session_state_policy),
            emit=self.sink.emit if self.sink is not None else None, log=self.log, client_ssl=self.client_ssl)
        self.ctx.secrets = self.credentials  # auth_query lookups, secrets kept for upstream logins
        self.stats_window = stats.StatsWindow(time.monotonic())  # SHOW STATS's averages (stats.keep)
        self.ctx.console = admin_console(self)
        self.on_shutdown: Any = None  # the runner's SIGTERM handling, for the console's SHUTDOWN
        self._shutdown: asyncio.Task | None = None
        self._waiting: asyncio.Task | None = None  # SHUTDOWN WAIT_FOR_CLIENTS
        self._listener: Listeners | None = None
        self._export = None
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self.readiness = Readiness(self.pools, self._probe_target, self.log)
        self.port = 0
        self.metrics_port = 0

    def _add_consumers(self, settings: Any) -> None:
        from proxy.inspect.advisor import IndexAdvisor
        from proxy.inspect.explain import ExplainSampler

        from proxy.inspect.locks import LockTracker
        from proxy.inspect.nplusone import NPlusOneDetector

        insp = self.inspector
        advisor = IndexAdvisor(settings, insp.stats, logger=self.log)
        self.explain = ExplainSampler(settings, self.side_connect, logger=self.log, advisor=advisor)
        insp.add_consumer(self.explain)
        nplusone = NPlusOneDetector(settings, logger=self.log)
        insp.add_consumer(nplusone)
        s = settings
        def sampler_connection():
            return self.side_connect(s.upstream_dbname or s.upstream_user or "postgres",
                                     s.upstream_user or "postgres")
        self.locks = LockTracker(settings, sampler_connection if s.inspect.lock_sample_interval_ms > 0 else None,
                                 lambda pid, server=None: client_of_server_pid(self, pid, server), insp.fingerprinter,
                                 logger=self.log, busy_since=self.client_busy_since,
                                 other_servers=lambda: other_servers(self))
        insp.add_consumer(self.locks)
        from proxy.inspect.findings_setup import add_findings

        self.findings = add_findings(insp, settings, self.explain, nplusone, self.locks, self.log)

    def client_busy_since(self, client_id: int) -> float | None:
        """When the client's oldest request still awaiting results was sent; None when it has none.

        For the lock tracker, about transactions that look idle: an index of
        the sessions by id, rebuilt only when a client is not in it.
        """
        sess = self._sessions_by_id.get(client_id)
        if sess is None or sess not in self.sessions:
            self._sessions_by_id = {x.id: x for x in self.sessions}
            sess = self._sessions_by_id.get(client_id)
            if sess is None:
                return None
        return busy_since(sess)

    async def side_connect(self, db: str, user: str) -> ServerConn:
        """A connection of the proxy's own (EXPLAIN, HypoPG, samplers) to where clients of ``db`` go."""
        db, user, password, cfg = side_target(self.settings, self.credentials, self.pools, db, user)
        srv = await self.pools.connect(db, user, password, {"application_name": SIDE_APPLICATION_NAME}, cfg=cfg)
        self.pools.side.add(srv)  # closed when a DROP DATABASE needs its database
        return srv

    def reload_auth(self, settings: Any = None) -> bool:
        """Re-read the auth file; on error keep the users we had."""
        try:
            self.credentials.reload(settings or self.settings)
        except (OSError, ValueError) as e:
            self.log.error("reload_auth_file_failed", error=str(e))
            return False
        for pool in self.pools.all_pools():
            pool.password = getattr(pool.route, "password", None) or self.credentials.upstream_password(pool.user)
        return True

    def _probe_target(self) -> tuple[str, str, str | None]:
        s = self.settings
        user = s.upstream_user or "postgres"
        return s.upstream_dbname or user, user, self.credentials.upstream_password(user)

    @property
    def sessions(self) -> set:
        """The live client sessions."""
        return self.ctx.sessions

    @property
    def draining(self) -> bool:
        return self.ctx.draining

    def _open_upstream(self, srv: Any = None):
        """A plain stream connection to the PostgreSQL ``srv`` is on (for forwarded CancelRequests)."""
        cfg = srv.pool.cfg if getattr(srv, "pool", None) is not None else self.pools.cfg
        if cfg.host.startswith("/"):
            return asyncio.open_unix_connection(f"{cfg.host}/.s.PGSQL.{cfg.port}")
        return asyncio.open_connection(cfg.host, cfg.port)

    def shutdown(self, wait_for_clients: bool = False) -> None:
        """The console's SHUTDOWN: as SIGTERM (the runner's handler, or a drain when run without it).
        ``wait_for_clients``: stop accepting now, and shut down once the clients have left."""
        if wait_for_clients:
            if self._waiting is None and not self.ctx.draining:
                self._waiting = asyncio.get_running_loop().create_task(wait_for_clients_then_stop(self))
                self._tasks.append(self._waiting)  # (close() cancels it)
            return
        if self.on_shutdown is not None:
            self.on_shutdown()
        elif self._shutdown is None:
            self._shutdown = asyncio.get_running_loop().create_task(self.drain(self.settings.shutdown_timeout))

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        self._listener = await open_listeners(lambda: ClientSession(self.ctx), s)  # nothing to undo if it fails
        self.pools.start()
        self.port = self._listener.port
        self._tasks.append(loop.create_task(self._janitor()))
        self._tasks.append(loop.create_task(stats.keep(
            self.stats_window, lambda: stats.totals(self.pools, self.ctx.counters.traffic(self.sessions)),
            lambda: self.settings, self.log)))
        if self.inspector is not None:
            self._tasks.append(loop.create_task(self.inspector.run()))
        if s.metrics_listen:
            await self._start_export()
        self.log.info("listening", listen=f"{s.listen_host}:{self.port}", pool_mode=s.pool_mode,
                      unix_socket=shown(self._listener.unix_path) if self._listener.unix_path else None,
                      upstream=s.redacted_upstream, auth_type=self.credentials.method,
                      metrics=f"{s.metrics_host}:{self.metrics_port}" if s.metrics_listen else None)

    async def _start_export(self) -> None:
        from proxy.export.api import build_routes
        from proxy.export.databases import databases_route
        from proxy.export.http import Access, ExportServer
        from proxy.export.metrics import build_registry

        s = self.settings
        pools = self.pools
        registry = build_registry(
            self.inspector,
            client_counts=lambda: client_counts(self.sessions),
            server_counts=pools.counts,
            pool_waiting=pools.waiting_by_pool,
            pool_wait_hists=pools.wait_hists,
            pool_sizes=lambda: {key: p.cfg.pool_size for key, p in pools.pools.items()},
            server_connect_failures=lambda: pools.connect_failures,
            clients_refused=lambda: self.ctx.counters.refused,
            client_auth_failures=lambda: self.ctx.counters.auth_failures,
            auth_query_lookups=lambda: self.credentials.auth_query.counts,
            max_client_connections=lambda: self.settings.max_client_conn,
            pool_wait_timeouts=lambda: pools.wait_timeouts,
            cancel_requests=lambda: self.ctx.cancel.requests,
            session_state=lambda: self.ctx.rules.counts,
            clients_pinned=lambda: self.ctx.rules.pins, traffic=lambda: self.ctx.counters.traffic(self.sessions),
            ready=self.readiness.ready_now,
        )
        self.registry = registry
        routes = build_routes(self.inspector, registry, self.readiness.ready)
        routes["/api/databases"] = databases_route(lambda: self.settings, pools, self.sessions)
        self._export = ExportServer(
            s.metrics_host, s.metrics_port, routes,
            access=lambda: Access(self.settings.http_token, self.settings.metrics_require_token),
            ssl=client_side_context(s.http_tls_cert, s.http_tls_key) if s.http_tls_cert else None)
        await self._export.start()
        self.metrics_port = self._export.port

    async def _janitor(self) -> None:
        """Client-side timeouts, about once a second (server-side ones: PoolManager)."""
        while True:
            await asyncio.sleep(0.5)
            s = self.settings
            timeouts = s.client_idle_timeout or s.idle_transaction_timeout or s.query_timeout
            now = time.monotonic()
            for sess in list(self.sessions):
                try:
                    # a client whose reading is paused (waiting for a server, or back-pressure)
                    # would not be seen leaving until then: ask its socket
                    if sess.reading_paused and peer_gone(sess.transport):
                        sess.close("client closed the connection while waiting")
                    elif timeouts:
                        check_timeouts(sess, now, s)
                except Exception as e:  # never let one client stop the janitor
                    self.log.error("janitor_error", client_id=sess.id, error=str(e))

    async def drain(self, grace: float) -> None:
        """Stop accepting; let transactions finish up to ``grace`` seconds; close."""
        if self.ctx.draining:
            return
        self.ctx.draining = True
        self.readiness.stopping = True  # /readyz: 503 from now on
        self.log.info("draining", clients=len(self.sessions), grace_s=grace)
        if self._listener is not None:
            self._listener.close()
        for sess in list(self.sessions):
            drain(sess)
        deadline = time.monotonic() + grace
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for sess in list(self.sessions):
            sess.fail(PgError(ADMIN_SHUTDOWN, "terminating connection due to administrator command"))
        await self.close()

    async def close(self) -> None:
        """Stop everything: listener, clients, background tasks (cancelled and waited for, so none is
        left pending on the loop), inspection consumers (their ``close()``: samplers and side
        connections), pools, the export server."""
        if self._closed:
            return
        self._closed = True
        self.ctx.draining = True
        if self._listener is not None:
            self._listener.close()
        for sess in list(self.sessions):
            sess.close("shutdown")
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # the inspector stops ticking consumers
        if self.inspector is not None:
            for c in self.inspector.consumers:
                try:
                    await c.close()
                except Exception as e:  # one consumer must not keep the others open
                    self.log.error("consumer_close_failed", consumer=type(c).__name__, error=repr(e))
        await self.pools.close()
        await self.readiness.close()
        if self._export is not None:
            await self._export.close()
        self.log.info("stopped")

    # ---------------------------------------------------------------- reload

    def reload(self, new: Any = None) -> None:
        """SIGHUP: re-read the config file and apply what can change live (``new``: these
        settings instead, the admin console's SET; the next reload reads the file again)."""
        from proxy.config import ConfigError, diff_reloadable, load_settings

        try:
            new = new or load_settings(self.config_file, env=os.environ, overrides=self.overrides)
        except (ConfigError, OSError, ValueError) as e:
            self.log.error("reload_failed", error=str(e))
            return
        changed, frozen = diff_reloadable(self.settings, new)
        for key in frozen:
            self.log.warning("reload_key_needs_restart", key=key)
        if not changed:
            self.reload_auth(self.settings)  # the auth file's content may have changed all the same
            self.log.info("reloaded", changed=[])
            return
        keep = {k: getattr(self.settings, k) for k in frozen if "." not in k}
        import dataclasses

        applied = dataclasses.replace(new, **keep) if keep else new
        for section in {k.split(".", 1)[0] for k in frozen if "." in k}:
            fresh = {k.split(".", 1)[1]: getattr(getattr(self.settings, section), k.split(".", 1)[1])
                     for k in frozen if k.startswith(section + ".")}
            applied = dataclasses.replace(
                applied, **{section: dataclasses.replace(getattr(applied, section), **fresh)})
        self.settings = applied
        self.ctx.settings = applied
        old = self.pools.cfg
        cfg = dataclasses.replace(pool_config(applied), host=old.host, port=old.port, ssl=old.ssl,
                                  ssl_required=old.ssl_required)
        self.pools.configure(cfg, lambda p: resolve(applied, p.db, p.user))  # databases added, changed, removed
        self.reload_auth(applied)
        set_level(applied.log_level)
        allow_parameters(applied.inspect.log_parameters)
        if self.inspector is not None and hasattr(self.inspector, "reconfigure"):
            self.inspector.reconfigure(applied.inspect, applied)
        self.log.info("reloaded", changed=changed)

    overrides: dict[str, Any] = {}


