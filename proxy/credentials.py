"""Who may log in and with what secrets: the auth file (PgBouncer's userlist format) and the upstream password."""

from __future__ import annotations

from typing import Any

from proxy.protocol.auth import load_userlist, secret_kind


class Credentials:
    """Client secrets from ``auth_file`` (plus the upstream user's password), and the password
    pgscope logs in upstream with for a user."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.method = settings.effective_auth_type
        self.users = self._read(settings)

    @staticmethod
    def _read(s: Any) -> dict[str, str]:
        users: dict[str, str] = {}
        if s.auth_file:
            users.update(load_userlist(s.auth_file))
        if s.upstream_user and s.upstream_password and s.upstream_user not in users:
            users[s.upstream_user] = s.upstream_password
        return users

    def reload(self, settings: Any) -> None:
        """Re-read the auth file (raises OSError/ValueError and keeps what it had on error)."""
        users = self._read(settings)
        self.settings = settings
        self.method = settings.effective_auth_type
        self.users = users

    def client_secret(self, user: str) -> str | None:
        return self.users.get(user)

    def upstream_password(self, user: str) -> str | None:
        s = self.settings
        if s.upstream_user == user and s.upstream_password:
            return s.upstream_password
        secret = self.users.get(user)
        if secret is not None and secret_kind(secret) != "scram":
            return secret
        if s.upstream_user is None and s.upstream_password:
            return s.upstream_password
        return None
