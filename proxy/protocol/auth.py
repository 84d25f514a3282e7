"""Authentication exchanges as pure state machines, and PgBouncer-style auth files.

``ClientAuthenticator``: the proxy checking a client (trust, cleartext, md5,
SCRAM-SHA-256), with PostgreSQL's rules and messages.  ``UpstreamAuthenticator``:
the proxy logging in to PostgreSQL.  Both take message bodies and return the
framed bytes to send; neither touches a socket.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from proxy.protocol import messages as m
from proxy.protocol.errors import INVALID_AUTHORIZATION, INVALID_PASSWORD, PROTOCOL_VIOLATION
from proxy.protocol.scram import (
    MECHANISM, ScramClient, ScramError, ScramKeys, ScramServer, keys, parse_verifier, stable_salt,
)

_I32 = struct.Struct("!i")

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12
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


def _protocol(message: str) -> AuthFailed:
    return AuthFailed(PROTOCOL_VIOLATION, message)


# ------------------------------------------------------------------ secrets

def md5_password(user: str, password: str) -> str:
    """The ``md5…`` form PostgreSQL stores: "md5" + md5hex(password || user)."""
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def md5_response(user: str, secret: str, salt: bytes) -> str:
    """The answer to AuthenticationMD5Password, from a plaintext or an ``md5…`` secret."""
    stored = secret if secret_kind(secret) == "md5" else md5_password(user, secret)
    return "md5" + hashlib.md5(stored[3:].encode("ascii") + salt).hexdigest()


def secret_kind(secret: str) -> str:
    """"md5", "scram" (a valid verifier) or "plain"."""
    if len(secret) == 35 and secret.startswith("md5") and all(c in "0123456789abcdef" for c in secret[3:]):
        return "md5"
    if secret.startswith(MECHANISM + "$") and parse_verifier(secret) is not None:
        return "scram"
    return "plain"


def parse_userlist(text: str, source: str = "auth file") -> dict[str, str]:
    """PgBouncer's ``userlist.txt``: ``"user" "password"`` per line; ``""`` inside quotes
    is a literal quote; ``;``/``#`` comments and blank lines are skipped."""
    users: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        fields: list[str] = []
        i, n = 0, len(line)
        while len(fields) < 2:
            while i < n and line[i].isspace():
                i += 1
            if i >= n:
                raise ValueError(f'{source}:{lineno}: expected "user" "password"')
            if line[i] != '"':
                raise ValueError(f"{source}:{lineno}: expected a double-quoted field")
            i += 1
            chars: list[str] = []
            while True:
                if i >= n:
                    raise ValueError(f"{source}:{lineno}: unterminated quoted field")
                if line[i] == '"':
                    if line[i + 1 : i + 2] == '"':
                        chars.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                chars.append(line[i])
                i += 1
            fields.append("".join(chars))
        users[fields[0]] = fields[1]  # like PgBouncer, anything after the password is ignored
    return users


def load_userlist(path: str) -> dict[str, str]:
    with open(path, encoding="utf-8") as f:
        return parse_userlist(f.read(), path)


def _auth_msg(code: int, payload: bytes = b"") -> bytes:
    return m.frame(b"R", _I32.pack(code) + payload)


def _password_packet(body: bytes) -> str:
    """PasswordMessage body: one NUL-terminated string and nothing more."""
    if not body.endswith(b"\0") or b"\0" in body[:-1]:
        raise _protocol("invalid password packet size")
    return body[:-1].decode("utf-8", "surrogateescape")


# ------------------------------------------------------- the proxy as server

class ClientAuthenticator:
    """Check one client: ``start()`` → first bytes; ``feed()`` each message; ``done`` at the end.

    PostgreSQL's rules: md5 with a SCRAM secret runs SCRAM instead; SCRAM with
    an md5 secret cannot succeed; a plaintext secret works for every method.
    An unknown user (``secret`` None) goes through the same exchange with mock
    data and fails at the end with the same message as a wrong password; with
    md5 that exchange is SCRAM's, as PostgreSQL's (password_encryption's
    default), so that the method asked does not tell who exists.

    After success ``upstream_secret`` is what pgscope may log in upstream with
    as this user: the ``ScramKeys`` recovered from the client's proof (or
    cleartext password) when the secret is a SCRAM verifier, else the secret.
    """

    def __init__(self, method: str, user: str, secret: str | None) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown auth method {method!r}")
        self.user = user
        self.secret = secret or None  # an empty password is no password
        self.kind = secret_kind(secret) if secret else None
        if secret is None:
            self._why = "unknown user"
        elif not secret:
            self._why = "no password configured"
        else:
            self._why = "wrong password"
        if method == "md5" and (self.kind == "scram" or secret is None):
            method = "scram-sha-256"
        self.method = method
        self.upstream_secret: str | ScramKeys | None = None
        self._done = False
        self._salt = b""
        self._scram: ScramServer | None = None
        self._started = False

    @property
    def done(self) -> bool:
        return self._done

    def start(self) -> bytes:
        self._started = True
        if self.method == "trust":
            self._done = True
            return m.auth_ok()
        if self.method == "plain":
            return _auth_msg(AUTH_CLEARTEXT)
        if self.method == "md5":
            self._salt = os.urandom(4)
            return _auth_msg(AUTH_MD5, self._salt)
        return _auth_msg(AUTH_SASL, MECHANISM.encode() + b"\0\0")

    def feed(self, type_byte: bytes, body: bytes) -> bytes:
        if self._done or not self._started:
            raise _protocol("unexpected message during authentication")
        if type_byte != b"p":
            raise _protocol(f"expected password response, got message type {type_byte[:1].decode('latin-1')!r}")
        if self.method == "plain":
            return self._check_cleartext(_password_packet(body))
        if self.method == "md5":
            return self._check_md5(_password_packet(body))
        if self._scram is None:
            return self._scram_first(body)
        return self._scram_final(body)

    def _ok(self) -> bytes:
        self._done = True
        return m.auth_ok()

    def _check_cleartext(self, given: str) -> bytes:
        secret, kind = self.secret, self.kind
        if not given:
            raise _password_failed(self.user, "empty password returned by client")
        if secret is None:
            raise _password_failed(self.user, self._why)
        raw = given.encode("utf-8", "surrogateescape")
        if kind == "plain":
            ok = hmac.compare_digest(raw, secret.encode("utf-8", "surrogateescape"))
        elif kind == "md5":
            ok = hmac.compare_digest(md5_password(self.user, given), secret)
        else:
            it, salt, stored, server = parse_verifier(secret)  # type: ignore[misc]
            client_key, given_stored, _ = keys(given, salt, it)
            ok = hmac.compare_digest(given_stored, stored)
        if not ok:
            raise _password_failed(self.user, "wrong password")
        # a verifier: its keys (not the password the client sent) are what pgscope keeps
        self.upstream_secret = ScramKeys(client_key, server, salt, it) if kind == "scram" else secret
        return self._ok()

    def _check_md5(self, given: str) -> bytes:
        # a user without a password still gets the md5 challenge, then the same failure
        if self.secret is None:
            raise _password_failed(self.user, self._why)
        expected = md5_response(self.user, self.secret, self._salt)
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode()):
            raise _password_failed(self.user, self._why)
        self.upstream_secret = self.secret
        return self._ok()

    def _scram_first(self, body: bytes) -> bytes:
        """SASLInitialResponse: mechanism cstring, int32 length (-1: none), data."""
        try:
            mech, pos = m.cstr(body)
            (n,) = _I32.unpack_from(body, pos)
        except (ValueError, struct.error):
            raise _protocol("malformed SASLInitialResponse message") from None
        data = body[pos + 4 :] if n >= 0 else b""
        if n < -1 or (n >= 0 and len(data) != n) or (n == -1 and len(body) != pos + 4):
            raise _protocol("malformed SASLInitialResponse message")
        if mech != MECHANISM:
            raise _protocol("client selected an invalid SASL authentication mechanism")
        if self.secret is None:
            scram = ScramServer.mock(self.user)
        elif self.kind == "md5":
            scram = ScramServer.mock(self.user)
            self._why = f'user "{self.user}" does not have a valid SCRAM secret'
        elif self.kind == "scram":
            scram = ScramServer.from_verifier(self.secret)
        else:  # plaintext: a salt that stays put across attempts, like a stored verifier's
            scram = ScramServer.from_password(self.secret, stable_salt("plain", self.user, self.secret))
        try:
            first = scram.server_first(data)
        except ScramError as e:
            raise _protocol(f"malformed SCRAM message: {e}") from None
        self._scram = scram
        return _auth_msg(AUTH_SASL_CONTINUE, first)

    def _scram_final(self, body: bytes) -> bytes:
        assert self._scram is not None
        try:
            final = self._scram.server_final(body)
        except ScramError as e:
            if str(e) == "wrong password":
                raise _password_failed(self.user, self._why) from None
            raise _protocol(f"malformed SCRAM message: {e}") from None
        s = self._scram
        if self.kind == "scram":  # the server's own verifier: its keys log in there too
            self.upstream_secret = ScramKeys(s.client_key, s.server_key, s.salt, s.iterations)
        else:
            self.upstream_secret = self.secret
        return _auth_msg(AUTH_SASL_FINAL, final) + self._ok()


# ------------------------------------------------------- the proxy as client

class UpstreamAuthenticator:
    """Log in to PostgreSQL: ``feed`` each AuthenticationXXX body, send what comes back.

    ``password`` may be plaintext, an ``md5…`` hash (enough for md5 only), or
    the ``ScramKeys`` of the server's verifier (enough for SCRAM only).
    """

    def __init__(self, user: str, password: str | ScramKeys | None) -> None:
        self.user = user
        self.password = password
        self._done = False
        self._scram: ScramClient | None = None
        self._scram_state = ""  # "", "first sent", "final sent", "verified"

    @property
    def done(self) -> bool:
        return self._done

    def _need_password(self) -> str:
        if isinstance(self.password, ScramKeys):
            raise AuthFailed(INVALID_AUTHORIZATION,
                             f'the server asks user "{self.user}" for a password other than by SCRAM, and '
                             "pgscope holds only SCRAM keys for it (no plaintext password configured)",
                             "server asked for cleartext or md5 with SCRAM pass-through keys")
        if not self.password:
            raise AuthFailed(PROTOCOL_VIOLATION,
                             f'no password configured for user "{self.user}" (upstream URL or auth file)',
                             "server asked for a password")
        return self.password

    def feed(self, body: bytes) -> bytes | None:
        if len(body) < 4:
            raise _protocol("malformed authentication request from server")
        (code,) = _I32.unpack_from(body)
        payload = body[4:]
        if self._done:
            raise _protocol("authentication request from server after AuthenticationOk")
        if code == AUTH_OK:
            if self._scram_state not in ("", "verified"):
                raise _protocol("server sent AuthenticationOk before the SCRAM exchange completed")
            self._done = True
            return None
        if code == AUTH_CLEARTEXT:
            return m.frame(b"p", self._need_password().encode() + b"\0")
        if code == AUTH_MD5:
            if len(payload) != 4:
                raise _protocol("malformed AuthenticationMD5Password message")
            return m.frame(b"p", md5_response(self.user, self._need_password(), payload).encode() + b"\0")
        if code == AUTH_SASL:
            return self._sasl_start(payload)
        if code == AUTH_SASL_CONTINUE:
            if self._scram is None or self._scram_state != "first sent":
                raise _protocol("unexpected AuthenticationSASLContinue from server")
            try:
                final = self._scram.client_final(payload)
            except ScramError as e:
                if isinstance(self.password, ScramKeys):  # stale pass-through keys
                    raise AuthFailed(INVALID_PASSWORD, f'password authentication failed for user "{self.user}"',
                                     str(e)) from None
                raise _protocol(str(e)) from None
            self._scram_state = "final sent"
            return m.frame(b"p", final)
        if code == AUTH_SASL_FINAL:
            if self._scram is None or self._scram_state != "final sent":
                raise _protocol("unexpected AuthenticationSASLFinal from server")
            try:
                self._scram.verify_server_final(payload)
            except ScramError as e:
                raise AuthFailed(PROTOCOL_VIOLATION, "server signature mismatch", str(e)) from None
            self._scram_state = "verified"
            return None
        raise _protocol(f"unsupported authentication method {code} requested by server")

    def _sasl_start(self, payload: bytes) -> bytes:
        if self._scram is not None:
            raise _protocol("server restarted the SASL exchange")
        mechs = [x.decode("utf-8", "replace") for x in payload.split(b"\0") if x]
        if MECHANISM not in mechs:
            raise _protocol(f"server offered no supported SASL mechanism ({', '.join(mechs) or 'none'})")
        password: str | ScramKeys = self.password if isinstance(self.password, ScramKeys) else self._need_password()
        if isinstance(password, str) and secret_kind(password) != "plain":
            raise AuthFailed(INVALID_AUTHORIZATION,
                             f'SCRAM login to the server needs the plaintext password of user "{self.user}"',
                             "only a hash is configured")
        self._scram = ScramClient(password)
        self._scram_state = "first sent"
        first = self._scram.client_first()
        return m.frame(b"p", MECHANISM.encode() + b"\0" + _I32.pack(len(first)) + first)
