"""SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, both roles, no I/O.

PostgreSQL uses no channel binding here (gs2 header ``n,,``) and ignores the
user name in client-first (libpq sends ``n=``).  Verifiers are stored as
``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` (base64 parts).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import unicodedata

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096
_B64 = base64.b64encode
_UNB64 = base64.b64decode
_MOCK_SECRET = secrets.token_bytes(32)  # makes unknown users' fake salts stable per process


class ScramError(ValueError):
    pass


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def saslprep(password: str) -> bytes:
    """A light SASLprep: NFKC; PostgreSQL itself falls back to the raw bytes when prep fails."""
    try:
        return unicodedata.normalize("NFKC", password).encode("utf-8")
    except UnicodeError:
        return password.encode("utf-8", "surrogateescape")


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)


def keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey)."""
    sp = salted_password(password, salt, iterations)
    client_key = _hmac(sp, b"Client Key")
    return client_key, _h(client_key), _hmac(sp, b"Server Key")


def make_verifier(password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS) -> str:
    salt = salt if salt is not None else os.urandom(16)
    _, stored, server = keys(password, salt, iterations)
    return (f"{MECHANISM}${iterations}:{_B64(salt).decode()}"
            f"${_B64(stored).decode()}:{_B64(server).decode()}")


def parse_verifier(s: str) -> tuple[int, bytes, bytes, bytes] | None:
    """(iterations, salt, StoredKey, ServerKey), or None if ``s`` is not a verifier."""
    try:
        mech, iter_salt, key_pair = s.split("$")
        if mech != MECHANISM:
            return None
        it, salt = iter_salt.split(":")
        stored, server = key_pair.split(":")
        out = (int(it), _UNB64(salt, validate=True), _UNB64(stored, validate=True),
               _UNB64(server, validate=True))
    except (ValueError, TypeError):
        return None
    if out[0] < 1 or len(out[2]) != 32 or len(out[3]) != 32:
        return None
    return out


def _attrs(msg: bytes) -> dict[str, str]:
    try:
        text = msg.decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError("malformed SCRAM message") from None
    out = {}
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ScramError("malformed SCRAM message")
        out[part[0]] = part[2:]
    return out


class ScramClient:
    """The client role: the proxy logging in to PostgreSQL."""

    def __init__(self, password: str, nonce: str | None = None) -> None:
        self.password = password
        self.nonce = nonce or _B64(secrets.token_bytes(18)).decode()
        self._first_bare = f"n=,r={self.nonce}"
        self._server_signature = b""

    def client_first(self) -> bytes:
        return f"n,,{self._first_bare}".encode()

    def client_final(self, server_first: bytes) -> bytes:
        a = _attrs(server_first)
        try:
            nonce, salt, iterations = a["r"], _UNB64(a["s"]), int(a["i"])
        except (KeyError, ValueError):
            raise ScramError("malformed SCRAM server-first-message") from None
        if not nonce.startswith(self.nonce) or len(nonce) == len(self.nonce) or iterations < 1:
            raise ScramError("invalid SCRAM server nonce or iteration count")
        client_key, stored_key, server_key = keys(self.password, salt, iterations)
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._first_bare},{server_first.decode()},{without_proof}".encode()
        proof = _xor(client_key, _hmac(stored_key, auth_message))
        self._server_signature = _hmac(server_key, auth_message)
        return f"{without_proof},p={_B64(proof).decode()}".encode()

    def verify_server_final(self, server_final: bytes) -> None:
        a = _attrs(server_final)
        if "e" in a:
            raise ScramError(f"SCRAM error from server: {a['e']}")
        try:
            sig = _UNB64(a["v"])
        except (KeyError, ValueError):
            raise ScramError("malformed SCRAM server-final-message") from None
        if not self._server_signature or not hmac.compare_digest(sig, self._server_signature):
            raise ScramError("invalid SCRAM server signature")


class ScramServer:
    """The server role: the proxy checking a client's password."""

    def __init__(self, iterations: int, salt: bytes, stored_key: bytes, server_key: bytes,
                 mock: bool = False, nonce: str | None = None) -> None:
        self.iterations = iterations
        self.salt = salt
        self.stored_key = stored_key
        self.server_key = server_key
        self.mock = mock  # an unknown user or an unusable secret: go through the motions, then fail
        self.nonce = nonce or _B64(secrets.token_bytes(18)).decode()
        self._client_first_bare = ""
        self._server_first = ""
        self._full_nonce = ""

    @classmethod
    def from_secret(cls, secret: str, **kw) -> "ScramServer":
        """From a stored verifier or a plaintext password (a fresh salt each time)."""
        v = parse_verifier(secret)
        if v is not None:
            return cls(*v, **kw)
        salt = os.urandom(16)
        _, stored, server = keys(secret, salt, DEFAULT_ITERATIONS)
        return cls(DEFAULT_ITERATIONS, salt, stored, server, **kw)

    @classmethod
    def for_mock(cls, user: str, **kw) -> "ScramServer":
        """Stable fake parameters for ``user``, so probing cannot tell who exists."""
        salt = _hmac(_MOCK_SECRET, user.encode("utf-8", "surrogateescape"))[:16]
        return cls(DEFAULT_ITERATIONS, salt, b"\0" * 32, b"\0" * 32, mock=True, **kw)

    def server_first(self, client_first: bytes) -> bytes:
        text = client_first.decode("utf-8", "replace")
        if text.startswith(("p=", "y,")):
            raise ScramError("channel binding is not supported")
        if not text.startswith("n,"):
            raise ScramError("malformed SCRAM client-first-message")
        try:
            bare = text[text.index(",", 2) + 1:]
        except ValueError:
            raise ScramError("malformed SCRAM client-first-message") from None
        a = _attrs(bare.encode())
        client_nonce = a.get("r", "")
        if not client_nonce:
            raise ScramError("malformed SCRAM client-first-message")
        self._client_first_bare = bare
        self._full_nonce = client_nonce + self.nonce
        self._server_first = f"r={self._full_nonce},s={_B64(self.salt).decode()},i={self.iterations}"
        return self._server_first.encode()

    def server_final(self, client_final: bytes) -> bytes:
        """Check the proof; return server-final-message.  Raises ScramError on a wrong password."""
        text = client_final.decode("utf-8", "replace")
        idx = text.rfind(",p=")
        if idx < 0:
            raise ScramError("malformed SCRAM client-final-message")
        without_proof = text[:idx]
        a = _attrs(without_proof.encode())
        if a.get("c") != "biws":
            raise ScramError("unexpected SCRAM channel-binding attribute")
        if a.get("r") != self._full_nonce:
            raise ScramError("SCRAM nonce mismatch")
        try:
            proof = _UNB64(text[idx + 3:], validate=True)
        except ValueError:
            raise ScramError("malformed SCRAM proof") from None
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        client_key = _xor(proof, _hmac(self.stored_key, auth_message))
        if self.mock or len(proof) != 32 or not hmac.compare_digest(_h(client_key), self.stored_key):
            raise ScramError("wrong password")
        return f"v={_B64(_hmac(self.server_key, auth_message)).decode()}".encode()
