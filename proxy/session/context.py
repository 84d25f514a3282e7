"""What a client session may use of the process: one small object the listener builds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(eq=False)
class Counters:
    """Login outcomes the listener exports (plain additions on the session's side)."""

    refused: dict[str, int] = field(default_factory=dict)  # reason -> clients refused at login
    auth_failures: int = 0

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


@dataclass(eq=False)
class SessionContext:
    settings: Any  # the frozen Settings; the listener swaps it on SIGHUP
    pools: Any  # proxy.pool.manager.PoolManager
    authenticator: Callable[[str], Any]  # user -> ClientAuthenticator
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
