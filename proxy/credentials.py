"""Who may log in and with what secrets: the auth file (PgBouncer's userlist format), auth_query
lookups, the upstream password, and what a client's login proved (SCRAM pass-through keys)."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from proxy.pool.authquery import AuthQuery
from proxy.protocol import hba
from proxy.protocol.auth import ClientAuthenticator, load_userlist, secret_kind


class Credentials:
    """Client secrets from ``auth_file`` (plus the upstream user's password) or, for users not
    there when ``auth_user`` is set, from ``auth_query`` run through ``connect(db)``; and the
    secret pgscope logs in upstream with for a user: a configured password, else what a
    client's login left (``keep``: ScramKeys recovered from its proof, or an md5 hash),
    held in memory only."""

    def __init__(self, settings: Any, connect: Callable[[str], Awaitable[Any]] | None = None,
                 log: Any = None) -> None:
        self.settings = settings
        self.method = settings.effective_auth_type
        self.users = self._read(settings)
        self.hba = self._rules(settings)
        self.kept: dict[str, Any] = {}  # user -> secret proved by a client's login (never shown)
        self.auth_query = AuthQuery(connect, lambda: self.settings, log) if connect is not None else None

    @staticmethod
    def _read(s: Any) -> dict[str, str]:
        users: dict[str, str] = {}
        if s.auth_file:
            users.update(load_userlist(s.auth_file))
        if s.upstream_user and s.upstream_password and s.upstream_user not in users:
            users[s.upstream_user] = s.upstream_password
        return users

    @staticmethod
    def _rules(s: Any) -> tuple[hba.Rule, ...]:
        return hba.load(s.auth_hba_file) if s.effective_auth_type == "hba" else ()

    def reload(self, settings: Any) -> None:
        """Re-read the auth file and auth_hba_file (raises OSError/ValueError and keeps what it had on error)."""
        users = self._read(settings)
        self.hba = self._rules(settings)
        old = self.settings
        self.settings = settings
        self.method = settings.effective_auth_type
        for user in [u for u in self.kept if users.get(u) != self.users.get(u)]:
            del self.kept[user]  # its stored secret changed: what a login proved against the old one goes
        self.users = users
        if self.auth_query is not None and (old.auth_user, old.auth_query) != (settings.auth_user, settings.auth_query):
            self.auth_query.clear()

    def client_secret(self, user: str) -> str | None:
        return self.users.get(user)

    def login_method(self, *, unix: bool, ip: str, tls: bool, db: str, user: str, identity: hba.Identity) -> str:
        """The auth method of one login: auth_type's, or with auth_type = hba the matching rule's;
        peer and cert settled by ``identity`` (raises hba.HbaRefusal, or AuthFailed)."""
        if self.method != "hba":
            return hba.settle(self.method, user, identity)
        return hba.login_method(self.hba, unix=unix, ip=ip, tls=tls, db=db, user=user, identity=identity)

    def authenticator(self, user: str, method: str) -> ClientAuthenticator:
        return ClientAuthenticator(method, user, self.client_secret(user))

    def needs_lookup(self, user: str, method: str) -> bool:
        """The user's secret comes from auth_query (auth_user set, the user not in the auth file, and
        a password asked: trust looks nothing up)."""
        return (bool(self.settings.auth_user) and self.auth_query is not None and method != "trust"
                and user not in self.users)

    async def lookup_authenticator(self, user: str, db: str, method: str) -> ClientAuthenticator:
        """A ClientAuthenticator with the secret auth_query finds in auth_dbname, else in database
        ``db`` ("": upstream's) (a missing user: the mock exchange)."""
        assert self.auth_query is not None
        secret = await self.auth_query.secret(self.settings.auth_dbname or db, user)
        return ClientAuthenticator(method, user, secret)

    def keep(self, user: str, secret: Any) -> bool:
        """Remember what ``user``'s login proved, for upstream logins; True when it is the one
        to use (no password configured for the user)."""
        if self.configured_password(user) is not None:
            return False
        self.kept[user] = secret
        return True

    def adopt(self, pool: Any, user: str, secret: Any) -> None:
        """After ``user``'s login to ``pool``: keep ``secret``, and let the pool log in with it when
        it has no password of its own (none, or what an earlier login left)."""
        before = self.kept.get(user)
        if self.keep(user, secret) and pool.user == user and (pool.password is None or pool.password is before):
            pool.password = secret

    def configured_password(self, user: str) -> str | None:
        """The password (or md5 hash) the configuration gives for logging in upstream as ``user``."""
        s = self.settings
        if s.upstream_user == user and s.upstream_password:
            return s.upstream_password
        secret = self.users.get(user)
        if secret is not None and secret_kind(secret) != "scram":
            return secret
        if s.upstream_user is None and s.upstream_password:
            return s.upstream_password
        return None

    def upstream_password(self, user: str) -> Any:
        """What pgscope logs in upstream with as ``user``: the configured password, else what a
        client's login proved (ScramKeys or an md5 hash), else None."""
        configured = self.configured_password(user)
        return configured if configured is not None else self.kept.get(user)
