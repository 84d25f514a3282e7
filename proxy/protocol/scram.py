"""SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, both roles, no I/O.

PostgreSQL uses no channel binding here (gs2 header ``n,,``; ``y,,`` is
accepted too since no ``-PLUS`` mechanism is offered) and ignores the user
name in client-first (libpq sends ``n=``).  Verifiers are stored as
``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` (base64 parts).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import secrets
import unicodedata
from dataclasses import dataclass, field

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096
SALT_LEN = 16
_PROCESS_SECRET = secrets.token_bytes(32)  # keys the stable fake/derived salts of this process


class ScramError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ScramKeys:
    """A user's ClientKey and ServerKey with the salt and iteration count they belong to:
    enough to log in to a server holding that verifier, without the password.

    Recovered from a client's proof during its SCRAM exchange (pass-through);
    kept in memory only, and never shown: ``repr`` hides the keys.
    """

    client_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)
    salt: bytes = field(repr=False)
    iterations: int = field(repr=False)

    def __repr__(self) -> str:
        return "ScramKeys(<hidden>)"

    __str__ = __repr__


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ScramError("invalid base64 in SCRAM message") from None


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def saslprep(password: str) -> bytes:
    """A light SASLprep (NFKC); like PostgreSQL, fall back to the raw bytes when prep fails."""
    try:
        return unicodedata.normalize("NFKC", password).encode("utf-8")
    except UnicodeError:
        return password.encode("utf-8", "surrogateescape")


def keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey) for ``password``."""
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return client_key, _h(client_key), _hmac(salted, b"Server Key")


def stable_salt(*parts: str) -> bytes:
    """A salt fixed by ``parts`` for the life of this process, unguessable from outside."""
    return _hmac(_PROCESS_SECRET, "\0".join(parts).encode("utf-8", "surrogateescape"))[:SALT_LEN]


def make_verifier(password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS) -> str:
    """PostgreSQL's stored form of ``password`` (what ``ALTER ROLE … PASSWORD`` keeps)."""
    salt = os.urandom(SALT_LEN) if salt is None else salt
    _, stored, server = keys(password, salt, iterations)
    return f"{MECHANISM}${iterations}:{_b64(salt)}${_b64(stored)}:{_b64(server)}"


def parse_verifier(s: str) -> tuple[int, bytes, bytes, bytes] | None:
    """(iterations, salt, StoredKey, ServerKey), or None if ``s`` is not a valid verifier."""
    try:
        mech, iter_salt, key_pair = s.split("$")
        it_text, salt_b64 = iter_salt.split(":")
        stored_b64, server_b64 = key_pair.split(":")
        if mech != MECHANISM or not it_text.isdigit():
            return None
        iterations = int(it_text)
        salt, stored, server = _unb64(salt_b64), _unb64(stored_b64), _unb64(server_b64)
    except ValueError:  # includes ScramError
        return None
    if iterations < 1 or not salt or len(stored) != 32 or len(server) != 32:
        return None
    return iterations, salt, stored, server


def _attrs(text: str) -> dict[str, str]:
    """``a=1,b=2`` → {"a": "1", "b": "2"}; attribute names are single letters."""
    out: dict[str, str] = {}
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not part[0].isalpha():
            raise ScramError("malformed SCRAM message")
        out[part[0]] = part[2:]
    return out


def _text(msg: bytes) -> str:
    try:
        return msg.decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError("malformed SCRAM message: not UTF-8") from None


def _new_nonce() -> str:
    return _b64(secrets.token_bytes(18))


class ScramClient:
    """The client role: the proxy logging in to PostgreSQL.

    ``password`` is the plaintext, or the ``ScramKeys`` of the server's own
    verifier (SCRAM pass-through: the server's salt and iteration count must
    then be the keys').  ``nonce`` and ``user`` exist for test vectors;
    PostgreSQL clients send ``n=``.
    """

    def __init__(self, password: str | ScramKeys, nonce: str | None = None, user: str = "") -> None:
        self.password = password
        self.nonce = nonce or _new_nonce()
        self._first_bare = f"n={user},r={self.nonce}"
        self._server_signature = b""

    def client_first(self) -> bytes:
        """The SASLInitialResponse payload."""
        return f"n,,{self._first_bare}".encode()

    def client_final(self, server_first: bytes) -> bytes:
        """The SASLResponse payload, from the AuthenticationSASLContinue payload."""
        text = _text(server_first)
        a = _attrs(text)
        try:
            nonce, salt, iterations = a["r"], _unb64(a["s"]), int(a["i"])
        except (KeyError, ValueError):
            raise ScramError("malformed SCRAM server-first-message") from None
        if not nonce.startswith(self.nonce) or len(nonce) == len(self.nonce):
            raise ScramError("invalid SCRAM nonce from server")
        if iterations < 1 or not salt:
            raise ScramError("invalid SCRAM salt or iteration count from server")
        client_key, stored_key, server_key = self._keys(salt, iterations)
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._first_bare},{text},{without_proof}".encode()
        proof = _xor(client_key, _hmac(stored_key, auth_message))
        self._server_signature = _hmac(server_key, auth_message)
        return f"{without_proof},p={_b64(proof)}".encode()

    def _keys(self, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
        k = self.password
        if not isinstance(k, ScramKeys):
            return keys(k, salt, iterations)
        if not (hmac.compare_digest(salt, k.salt) and iterations == k.iterations):
            raise ScramError("the server's SCRAM salt or iteration count is not the stored verifier's "
                             "(the password changed on the server?)")
        return k.client_key, _h(k.client_key), k.server_key

    def verify_server_final(self, server_final: bytes) -> None:
        """Check the AuthenticationSASLFinal payload: the server must prove it knows the password."""
        a = _attrs(_text(server_final))
        if "e" in a:
            raise ScramError(f"SCRAM error from server: {a['e']}")
        if "v" not in a or not self._server_signature:
            raise ScramError("malformed SCRAM server-final-message")
        if not hmac.compare_digest(_unb64(a["v"]), self._server_signature):
            raise ScramError("server signature mismatch")


@functools.lru_cache(maxsize=1024)
def _cached_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    return keys(password, salt, iterations)[1:]


class ScramServer:
    """The server role: the proxy checking a client's password.

    Build it from stored keys, ``from_verifier``, ``from_password`` or ``mock``.
    ``server_final`` raises ``ScramError("wrong password")`` when the proof is wrong.
    """

    def __init__(self, stored_key: bytes, server_key: bytes, salt: bytes,
                 iterations: int = DEFAULT_ITERATIONS, *, nonce: str | None = None) -> None:
        self.stored_key = stored_key
        self.server_key = server_key
        self.salt = salt
        self.iterations = iterations
        self.nonce = nonce or _new_nonce()
        self.is_mock = False  # go through the motions, then fail
        self.client_key = b""  # the client's ClientKey, once its proof checked out
        self._client_first_bare = ""
        self._server_first = ""
        self._cbind = ""
        self._full_nonce = ""

    @classmethod
    def from_verifier(cls, verifier: str, *, nonce: str | None = None) -> ScramServer:
        v = parse_verifier(verifier)
        if v is None:
            raise ScramError("not a SCRAM-SHA-256 verifier")
        iterations, salt, stored, server = v
        return cls(stored, server, salt, iterations, nonce=nonce)

    @classmethod
    def from_password(cls, password: str, salt: bytes | None = None,
                      iterations: int = DEFAULT_ITERATIONS, *, nonce: str | None = None) -> ScramServer:
        """From a plaintext password.  Pass a fixed salt (see ``stable_salt``) so that the
        salt does not change between attempts; the key derivation is then cached."""
        if salt is None:
            salt = os.urandom(SALT_LEN)
            stored, server = keys(password, salt, iterations)[1:]
        else:
            stored, server = _cached_keys(password, salt, iterations)
        return cls(stored, server, salt, iterations, nonce=nonce)

    @classmethod
    def mock(cls, user: str, *, nonce: str | None = None) -> ScramServer:
        """Stable fake parameters for ``user``; always fails at the proof, like a wrong password."""
        s = cls(b"\0" * 32, b"\0" * 32, stable_salt("mock", user), DEFAULT_ITERATIONS, nonce=nonce)
        s.is_mock = True
        return s

    def server_first(self, client_first: bytes) -> bytes:
        """AuthenticationSASLContinue payload for the SASLInitialResponse payload."""
        text = _text(client_first)
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise ScramError("malformed SCRAM client-first-message")
        cbind, authzid, bare = parts
        if cbind.startswith("p="):
            raise ScramError("channel binding is not supported")
        if cbind not in ("n", "y"):
            raise ScramError("malformed SCRAM client-first-message")
        if authzid:
            raise ScramError("client uses authorization identity, but it is not supported")
        if bare.startswith("m="):
            raise ScramError("client requires an unsupported SCRAM extension")
        a = _attrs(bare)
        if "n" not in a or not a.get("r") or not a["r"].isprintable() or "," in a["r"]:
            raise ScramError("malformed SCRAM client-first-message")
        self._cbind = _b64(f"{cbind},,".encode())
        self._client_first_bare = bare
        self._full_nonce = a["r"] + self.nonce
        self._server_first = f"r={self._full_nonce},s={_b64(self.salt)},i={self.iterations}"
        return self._server_first.encode()

    def server_final(self, client_final: bytes) -> bytes:
        """AuthenticationSASLFinal payload; raises ``ScramError("wrong password")`` on a bad proof."""
        if not self._server_first:
            raise ScramError("SCRAM client-final-message before client-first-message")
        text = _text(client_final)
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        if not sep:
            raise ScramError("malformed SCRAM client-final-message")
        a = _attrs(without_proof)
        if a.get("c") != self._cbind:
            raise ScramError("unexpected SCRAM channel-binding attribute")
        if a.get("r") != self._full_nonce:
            raise ScramError("SCRAM nonce mismatch")
        proof = _unb64(proof_b64)
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        client_key = _xor(proof, _hmac(self.stored_key, auth_message))
        ok = hmac.compare_digest(_h(client_key), self.stored_key) and len(proof) == 32
        if self.is_mock or not ok:
            raise ScramError("wrong password")
        self.client_key = client_key
        return f"v={_b64(_hmac(self.server_key, auth_message))}".encode()
