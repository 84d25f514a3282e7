"""Authentication exchanges as pure state machines, and PgBouncer-style auth files.

``ClientAuthenticator``: the proxy checking a client (trust, cleartext, md5,
SCRAM-SHA-256), with PostgreSQL's rules and messages.  ``UpstreamAuthenticator``:
the proxy logging in to PostgreSQL.  Both take message bodies and return the
bytes to send; neither touches a socket.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from proxy.protocol import messages as m
from proxy.protocol.errors import INVALID_AUTHORIZATION, INVALID_PASSWORD, PROTOCOL_VIOLATION
from proxy.protocol.scram import (
    MECHANISM, ScramClient, ScramError, ScramServer, keys, parse_verifier,
)

_I32 = struct.Struct("!i")

AUTH_OK, AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 0, 3, 5, 10, 11, 12
METHODS = ("trust", "plain", "md5", "scram-sha-256")


class AuthFailed(Exception):
    """A failed login.  ``message`` is what the peer sees; ``reason`` is for our logs only."""

    def __init__(self, sqlstate: str, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.reason = reason or message


def _password_failed(user: str, reason: str) -> AuthFailed:
    return AuthFailed(INVALID_PASSWORD, f'password authentication failed for user "{user}"', reason)


# ------------------------------------------------------------------ secrets

def md5_password(user: str, password: str) -> str:
    """The ``md5…`` form PostgreSQL stores: md5(password || user)."""
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def md5_response(user: str, secret: str, salt: bytes) -> str:
    """What a client answers to AuthenticationMD5Password, from a plaintext or md5 secret."""
    stored = secret if secret_kind(secret) == "md5" else md5_password(user, secret)
    return "md5" + hashlib.md5(stored[3:].encode() + salt).hexdigest()


def secret_kind(secret: str) -> str:
    if len(secret) == 35 and secret.startswith("md5") and all(c in "0123456789abcdef" for c in secret[3:]):
        return "md5"
    if secret.startswith(MECHANISM + "$") and parse_verifier(secret) is not None:
        return "scram"
    return "plain"


def parse_userlist(text: str, source: str = "auth file") -> dict[str, str]:
    """PgBouncer's ``userlist.txt``: ``"user" "password"`` per line, ``""`` is a literal quote."""
    users: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s[0] in ";#":
            continue
        fields: list[str] = []
        i = 0
        while i < len(s) and len(fields) < 2:
            if s[i].isspace():
                i += 1
                continue
            if s[i] != '"':
                raise ValueError(f"{source}:{lineno}: expected a double-quoted field")
            i += 1
            buf = []
            while True:
                if i >= len(s):
                    raise ValueError(f"{source}:{lineno}: unterminated quoted field")
                if s[i] == '"':
                    if i + 1 < len(s) and s[i + 1] == '"':
                        buf.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(s[i])
                i += 1
            fields.append("".join(buf))
        if len(fields) != 2:
            raise ValueError(f"{source}:{lineno}: expected \"user\" \"password\"")
        users[fields[0]] = fields[1]
    return users


def load_userlist(path: str) -> dict[str, str]:
    with open(path, encoding="utf-8") as f:
        return parse_userlist(f.read(), path)


def _auth_msg(code: int, payload: bytes = b"") -> bytes:
    return m.frame(b"R", _I32.pack(code) + payload)


# ------------------------------------------------------- the proxy as server

class ClientAuthenticator:
    """Check one client.  ``start()`` → first bytes; ``feed()`` each 'p' message; ``done`` at the end."""

    def __init__(self, method: str, user: str, secret: str | None) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown auth method {method!r}")
        self.user = user
        self.secret = secret
        kind = secret_kind(secret) if secret is not None else None
        # PostgreSQL: md5 with a SCRAM-stored secret runs SCRAM instead
        if method == "md5" and kind == "scram":
            method = "scram-sha-256"
        self.method = method
        self.kind = kind
        self.done = False
        self._salt = b""
        self._scram: ScramServer | None = None
        self._step = 0

    def start(self) -> bytes:
        if self.method == "trust":
            self.done = True
            return m.auth_ok()
        if self.method == "plain":
            return _auth_msg(AUTH_CLEARTEXT)
        if self.method == "md5":
            self._salt = os.urandom(4)
            return _auth_msg(AUTH_MD5, self._salt)
        return _auth_msg(AUTH_SASL, MECHANISM.encode() + b"\0\0")

    def feed(self, type_byte: bytes, body: bytes) -> bytes:
        if self.done:
            raise AuthFailed(PROTOCOL_VIOLATION, "unexpected message after authentication")
        if type_byte != b"p":
            raise AuthFailed(PROTOCOL_VIOLATION,
                             f"expected password response, got message type {type_byte[:1].decode('latin-1')!r}")
        if self.method == "plain":
            return self._check_cleartext(body)
        if self.method == "md5":
            return self._check_md5(body)
        return self._scram_step(body)

    def _ok(self) -> bytes:
        self.done = True
        return m.auth_ok()

    def _check_cleartext(self, body: bytes) -> bytes:
        given = body.rstrip(b"\0").decode("utf-8", "surrogateescape")
        secret, kind = self.secret, self.kind
        if secret is None:
            raise _password_failed(self.user, "unknown user")
        if kind == "plain":
            ok = hmac.compare_digest(given.encode("utf-8", "surrogateescape"), secret.encode("utf-8", "surrogateescape"))
        elif kind == "md5":
            ok = hmac.compare_digest(md5_password(self.user, given), secret)
        else:
            it, salt, stored, _ = parse_verifier(secret)  # type: ignore[misc]
            ok = hmac.compare_digest(keys(given, salt, it)[1], stored)
        if not ok:
            raise _password_failed(self.user, "wrong password")
        return self._ok()

    def _check_md5(self, body: bytes) -> bytes:
        given = body.rstrip(b"\0").decode("ascii", "replace")
        if self.secret is None:
            raise _password_failed(self.user, "unknown user")
        expected = md5_response(self.user, self.secret, self._salt)
        if not hmac.compare_digest(given, expected):
            raise _password_failed(self.user, "wrong password")
        return self._ok()

    def _scram_step(self, body: bytes) -> bytes:
        if self._step == 0:
            try:
                mech, pos = m.cstr(body)
                (n,) = _I32.unpack_from(body, pos)
                data = body[pos + 4: pos + 4 + n] if n >= 0 else b""
            except (ValueError, struct.error, IndexError):
                raise AuthFailed(PROTOCOL_VIOLATION, "malformed SASLInitialResponse message") from None
            if mech != MECHANISM:
                raise AuthFailed(PROTOCOL_VIOLATION,
                                 "client selected an invalid SASL authentication mechanism")
            if self.secret is None:
                self._scram = ScramServer.for_mock(self.user)
                self._why = "unknown user"
            elif self.kind == "md5":
                self._scram = ScramServer.for_mock(self.user)
                self._why = "user has an md5 secret: SCRAM cannot use it"
            else:
                self._scram = ScramServer.from_secret(self.secret)
                self._why = "wrong password"
            try:
                first = self._scram.server_first(data)
            except ScramError as e:
                raise AuthFailed(PROTOCOL_VIOLATION, f"malformed SCRAM message: {e}") from None
            self._step = 1
            return _auth_msg(AUTH_SASL_CONTINUE, first)
        if self._step == 1:
            assert self._scram is not None
            try:
                final = self._scram.server_final(body)
            except ScramError as e:
                if str(e) == "wrong password":
                    raise _password_failed(self.user, self._why) from None
                raise AuthFailed(PROTOCOL_VIOLATION, f"malformed SCRAM message: {e}") from None
            self._step = 2
            return _auth_msg(AUTH_SASL_FINAL, final) + self._ok()
        raise AuthFailed(PROTOCOL_VIOLATION, "unexpected SASL response")


# ------------------------------------------------------- the proxy as client

class UpstreamAuthenticator:
    """Log in to PostgreSQL: feed each AuthenticationXXX body, send what comes back."""

    def __init__(self, user: str, password: str | None) -> None:
        self.user = user
        self.password = password
        self.done = False
        self._scram: ScramClient | None = None

    def _need_password(self) -> str:
        if not self.password:
            raise AuthFailed(INVALID_PASSWORD,
                             f'no password configured for user "{self.user}" (upstream URL or auth file)',
                             "server asked for a password")
        return self.password

    def feed(self, body: bytes) -> bytes | None:
        if len(body) < 4:
            raise AuthFailed(PROTOCOL_VIOLATION, "malformed authentication request from server")
        (code,) = _I32.unpack_from(body)
        if code == AUTH_OK:
            if self._scram is not None and self._scram_pending:
                raise AuthFailed(PROTOCOL_VIOLATION, "server skipped SCRAM server-final-message")
            self.done = True
            return None
        if code == AUTH_CLEARTEXT:
            return m.frame(b"p", self._need_password().encode() + b"\0")
        if code == AUTH_MD5:
            return m.frame(b"p", md5_response(self.user, self._need_password(), body[4:8]).encode() + b"\0")
        if code == AUTH_SASL:
            mechs = [x.decode("utf-8", "replace") for x in body[4:].split(b"\0") if x]
            if MECHANISM not in mechs:
                raise AuthFailed(PROTOCOL_VIOLATION,
                                 f"server offered no supported SASL mechanism ({', '.join(mechs)})")
            password = self._need_password()
            if secret_kind(password) != "plain":
                raise AuthFailed(INVALID_AUTHORIZATION,
                                 f'SCRAM login to the server needs the plaintext password of "{self.user}"',
                                 "only a hash is configured")
            self._scram = ScramClient(password)
            self._scram_pending = True
            first = self._scram.client_first()
            return m.frame(b"p", MECHANISM.encode() + b"\0" + _I32.pack(len(first)) + first)
        if code == AUTH_SASL_CONTINUE and self._scram is not None:
            try:
                return m.frame(b"p", self._scram.client_final(body[4:]))
            except ScramError as e:
                raise AuthFailed(PROTOCOL_VIOLATION, str(e)) from None
        if code == AUTH_SASL_FINAL and self._scram is not None:
            try:
                self._scram.verify_server_final(body[4:])
            except ScramError as e:
                raise AuthFailed(PROTOCOL_VIOLATION, str(e)) from None
            self._scram_pending = False
            return None
        raise AuthFailed(PROTOCOL_VIOLATION, f"unsupported authentication method {code} requested by server")

    _scram_pending = False
