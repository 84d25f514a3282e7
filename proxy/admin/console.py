"""The admin console: who may open it, and one console client's conversation (simple query protocol).

The listener builds a ``Console`` over an ``AdminContext`` and puts it in the
session context; a client whose startup packet names database ``pgscope`` or
``pgbouncer`` authenticates as usual, then ``open`` lets in users listed in
``admin_users`` (every command) or ``stats_users`` (SHOW only) and turns the
others away with 28000.  Nothing here runs SQL on a server.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from proxy.admin import act, insight, show, wire
from proxy.admin.parse import SYNTAX_ERROR, parse, split_statements
from proxy.admin.stats import StatsWindow
from proxy.protocol import messages as m
from proxy.protocol.errors import (
    FEATURE_NOT_SUPPORTED, INTERNAL_ERROR, INVALID_AUTHORIZATION, PgError, ProtocolViolation,
)

INSUFFICIENT_PRIVILEGE = "42501"
SHOWS: dict[str, Callable[[Any], tuple[list, list]]] = {
    "POOLS": show.show_pools, "CLIENTS": show.show_clients, "SERVERS": show.show_servers,
    "STATS": show.show_stats, "STATS_TOTALS": show.show_stats_totals, "STATS_AVERAGES": show.show_stats_averages,
    "DATABASES": show.show_databases,
    "USERS": show.show_users, "CONFIG": show.show_config, "LISTS": show.show_lists,
    "VERSION": show.show_version, "STATE": show.show_state, "TOTALS": show.show_totals,
    "PEERS": show.show_peers,
}
KNOWN = ([f"SHOW {name}" for name in ("HELP", *SHOWS, "QUERIES", *insight.LISTS)]
         + ["PAUSE [db]", "RESUME [db]", "DISABLE db", "ENABLE db", "RECONNECT [db]", "KILL [db]",
            "KILL_CLIENT id", "WAIT_CLOSE [db]", "RELOAD", "SHUTDOWN [mode]",
            "SET key = value"])
# PgBouncer's commands that pgscope does not have, and why (0A000 instead of "unknown command")
UNSUPPORTED = {
    "SUSPEND": "pgscope cannot hand its sockets to a new process (PgBouncer's online restart); "
               "PAUSE, then restart, or run two and move clients with the load balancer",
    "SHOW FDS": "the online restart's socket list: pgscope has no online restart",
    "SHOW MEM": "pgscope's memory is Python's: see process_resident_memory_bytes on /metrics",
    "SHOW DNS_HOSTS": "pgscope keeps no DNS cache: the system resolver answers each connect",
    "SHOW DNS_ZONES": "pgscope keeps no DNS cache: the system resolver answers each connect",
    "SHOW SOCKETS": "SHOW CLIENTS and SHOW SERVERS list every socket, with PgBouncer's columns",
    "SHOW ACTIVE_SOCKETS": "SHOW CLIENTS and SHOW SERVERS list every socket, with PgBouncer's columns",
    "SHOW PEER_POOLS": "pgscope keeps no connections to its peers: it opens one per forwarded cancel "
                       "(SHOW PEERS lists them)",
}
_EXTENDED = frozenset((m.F_PARSE, m.F_BIND, m.F_DESCRIBE, m.F_EXECUTE, m.F_CLOSE))


@dataclass(eq=False)
class AdminContext:
    """What the console may see and do of the process (the listener fills it)."""

    settings: Callable[[], Any]  # the running Settings
    defaults: Any  # the Settings of an empty config (SHOW CONFIG's default column)
    pools: Any  # proxy.pool.manager.PoolManager
    sessions: set  # the live client sessions
    inspector: Any  # proxy.inspect.inspector.Inspector, or None
    reload: Callable[[], None]  # as SIGHUP
    shutdown: Callable[[bool], None]  # as SIGTERM; True: once the clients have left (WAIT_FOR_CLIENTS)
    apply: Callable[[Any], None]  # new Settings -> live, as a reload applies them
    started: float  # time.monotonic() at start
    version: str
    log: Any
    # database -> PgBouncer's SHOW STATS counts of its clients since start (SessionContext's Counters.traffic)
    traffic: Callable[[], dict[str, dict[str, float]]] = dict
    # the copies the averages of SHOW STATS and SHOW TOTALS start from (the listener refreshes it
    # every stats_period)
    window: StatsWindow = field(default_factory=lambda: StatsWindow(time.monotonic()))


class Console:
    """The factory the session context holds (see proxy.session.local)."""

    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx

    def serves(self, db: str) -> bool:
        return db in show.CONSOLE_DBS

    def open(self, user: str, session: Any) -> "ConsoleClient":
        s = self.ctx.settings()
        if user in s.admin_users:
            admin = True
        elif user in s.stats_users:
            admin = False
        else:
            raise PgError(INVALID_AUTHORIZATION, f'user "{user}" may not use the admin console',
                          hint="list the user in admin_users or stats_users")
        self.ctx.log.info("admin_login", user=user, admin=admin, client_addr=session.addr)
        return ConsoleClient(self.ctx, user, admin, lambda: session.state_name == "console")


class ConsoleClient:
    """One console client: answers each message (see proxy.session.local for the I/O)."""

    def __init__(self, ctx: AdminContext, user: str, admin: bool, alive: Callable[[], bool]) -> None:
        self.ctx = ctx
        self.user = user
        self.admin = admin
        self.alive = alive
        self.closing = False
        self._skip_to_sync = False  # an extended-protocol message was refused: ignore up to Sync

    def greeting(self) -> bytes:
        params = {"server_version": f"{self.ctx.version}/pgscope", "server_encoding": "UTF8",
                  "client_encoding": "UTF8", "DateStyle": "ISO", "integer_datetimes": "on",
                  "standard_conforming_strings": "on", "TimeZone": "UTC", "application_name": "",
                  "is_superuser": "on" if self.admin else "off", "session_authorization": self.user}
        return (b"".join(m.parameter_status(k, v) for k, v in params.items())
                + m.backend_key_data(0, os.urandom(4)) + m.ready_for_query(b"I"))

    async def handle(self, t: int, body: bytes) -> bytes:
        if t == m.F_QUERY:
            return await self.query(body) + m.ready_for_query(b"I")
        if t == m.F_SYNC:
            self._skip_to_sync = False
            return m.ready_for_query(b"I")
        if t == m.F_FLUSH:
            return b""
        if t in _EXTENDED or t == m.F_FUNCTION_CALL:
            out = b""
            if not self._skip_to_sync:
                out = m.error_from(PgError(FEATURE_NOT_SUPPORTED, "the admin console takes the simple query "
                                           "protocol only", severity="ERROR",
                                           hint="psql works; in a driver, send plain queries (no parameters)"))
            if t == m.F_FUNCTION_CALL:
                return out + m.ready_for_query(b"I")
            self._skip_to_sync = True
            return out
        self.closing = True
        return m.error_from(ProtocolViolation(f"unexpected message type 0x{t:02x} on the admin console"))

    async def query(self, body: bytes) -> bytes:
        try:
            sql = body[:-1].decode("utf-8") if body.endswith(b"\0") else body.decode("utf-8")
            statements = split_statements(sql)
        except UnicodeDecodeError:
            return m.error_from(PgError("22021", "invalid UTF-8 in the query", severity="ERROR"))
        except PgError as e:
            return m.error_from(e)
        if not statements:
            return m.frame(b"I")  # EmptyQueryResponse
        out = []
        for text in statements:
            try:
                out.append(await self.run(text))
            except PgError as e:  # like PostgreSQL: the rest of the query string is not run
                e.severity = "ERROR"
                out.append(m.error_from(e))
                break
            except Exception as e:  # a fault of pgscope's own: this command fails, the console goes on
                self.ctx.log.error("admin_command_failed", user=self.user, error=type(e).__name__)
                out.append(m.error_from(PgError(INTERNAL_ERROR, "internal error in the admin console",
                                                severity="ERROR")))
                break
        return b"".join(out)

    async def run(self, text: str) -> bytes:
        cmd = parse(text)
        why = UNSUPPORTED.get(cmd.verb)
        if why is not None:
            raise act.error(f"{cmd.verb} is not supported by pgscope", FEATURE_NOT_SUPPORTED, hint=why)
        if cmd.verb.startswith("SHOW "):
            what = cmd.verb[5:]
            if what == "HELP":  # as PgBouncer: a notice, then an empty SHOW
                return m.notice_response("00000", "Console usage", "NOTICE",
                                         detail="".join(f"\n\t{k}" for k in KNOWN)) + wire.command_complete("SHOW")
            if what in SHOWS:
                if cmd.args:
                    raise act.error(f"{cmd.verb} takes no arguments", SYNTAX_ERROR)
                cols, rows = SHOWS[what](self.ctx)
            elif what == "QUERIES":
                cols, rows = insight.show_queries(self.ctx, cmd.args)
            elif what in insight.LISTS:
                cols, rows = insight.show_list(self.ctx, what, cmd.args)
            else:
                raise self.unknown(cmd.verb)
            return wire.result(cols, rows)
        action = act.ACTIONS.get(cmd.verb)
        if action is None:
            raise self.unknown(cmd.verb)
        if not self.admin:
            raise act.error(f"{cmd.verb} needs admin access (admin_users); {self.user} is in stats_users",
                            INSUFFICIENT_PRIVILEGE)
        if cmd.verb != "SET":
            self.ctx.log.info("admin_command", user=self.user, command=cmd.verb, args=list(cmd.args))
        return wire.command_complete(await action(self.ctx, cmd.args, self.alive))

    @staticmethod
    def unknown(verb: str) -> PgError:
        return act.error(f'unknown admin console command "{verb}"', SYNTAX_ERROR,
                         detail="known commands: " + ", ".join(KNOWN))
