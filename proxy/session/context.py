"""What a client session may use of the process: one small object the listener builds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from proxy.protocol.ledger import TRAFFIC


@dataclass(eq=False)
class Counters:
    """Login outcomes and per-database traffic the listener exports (plain additions on the session's side)."""

    refused: dict[str, int] = field(default_factory=dict)  # reason -> clients refused at login
    auth_failures: int = 0
    logins: dict[str, int] = field(default_factory=dict)  # database -> client logins
    # database -> the TRAFFIC counts of the clients that have left (the live ones: their relays)
    retired: dict[str, dict[str, float]] = field(default_factory=dict)

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def login(self, db: str) -> None:
        self.logins[db] = self.logins.get(db, 0) + 1

    def retire(self, db: str, relay: Any) -> None:
        """A client left: keep what its relay counted."""
        _add(self.retired, db, relay)

    def traffic(self, sessions: Any) -> dict[str, dict[str, float]]:
        """Per database: PgBouncer's SHOW STATS counts (TRAFFIC, and ``client_connect_count``) since start,
        the clients that left and the live ones together."""
        out = {db: dict(t) for db, t in self.retired.items()}
        for sess in sessions:
            relay, info = getattr(sess, "relay", None), getattr(sess, "info", None)
            if relay is not None and info is not None:
                _add(out, info.db, relay)
        for db in set(out) | set(self.logins):
            out.setdefault(db, dict.fromkeys(TRAFFIC, 0))["client_connect_count"] = self.logins.get(db, 0)
        return out


def _add(into: dict[str, dict[str, float]], db: str, relay: Any) -> None:
    t = into.get(db)
    if t is None:
        t = into[db] = dict.fromkeys(TRAFFIC, 0)
    for k in TRAFFIC:
        t[k] += getattr(relay, k)


@dataclass(eq=False)
class SessionContext:
    settings: Any  # the frozen Settings; the listener swaps it on SIGHUP
    pools: Any  # proxy.pool.manager.PoolManager
    authenticator: Callable[[str, str], Any]  # (user, auth method) -> ClientAuthenticator
    cancel: Any  # proxy.session.cancel.CancelRegistry
    rules: Any  # proxy.session.rules.SessionStateGuard
    emit: Callable[[object], None] | None  # the inspection queue's put; None: inspection off
    log: Any
    client_ssl: Any = None  # ssl.SSLContext when clients may use TLS
    sessions: set = field(default_factory=set)  # the live client sessions
    counters: Counters = field(default_factory=Counters)
    draining: bool = False
    secrets: Any = None  # proxy.credentials.Credentials: auth_query lookups, secrets kept for upstream logins
    console: Any = None  # the admin console's factory (proxy.admin; see session/local.py); None: none
