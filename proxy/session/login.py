"""A client's login as a sans-IO generator: startup packet, SSL negotiation, authentication.

The generator yields what it needs and is sent the answer, in the manner of
psycopg's generators; the session (``client.py``) drives it with sockets:

    NEED_PACKET   -> send the next whole startup-phase packet (bytes)
    NEED_MESSAGE  -> send the next whole typed message as (type, body)
    START_TLS     -> upgrade the connection (answer 'S' first); send nothing
    bytes         -> write them to the client; send nothing
    CancelStep    -> route the cancel request; the login then ends (returns None)
    LookupStep    -> look the user's secret up (auth_query); send the ClientAuthenticator

Which authentication a login gets (``LoginRules.method``) is asked once the database and
user are known: auth_type's, or with ``auth_type = hba`` the first matching rule of
auth_hba_file (a ``reject`` rule or no rule: ``Refused`` "hba"); ``peer`` and ``cert`` are
decided there, from what the connection shows (AuthFailed, or "trust").

It returns the ``LoginResult``, or raises a PgError (``Refused`` when the
client is turned away for a countable reason; ``AuthFailedError`` for bad
credentials) for the session to send before it closes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generator, NamedTuple

from proxy.protocol import messages as m
from proxy.protocol.auth import AuthFailed
from proxy.protocol.errors import FEATURE_NOT_SUPPORTED, INVALID_AUTHORIZATION, PgError
from proxy.protocol.hba import HbaRefusal

NEED_PACKET = "need packet"
NEED_MESSAGE = "need message"
START_TLS = "start tls"

# startup parameters that are not session settings
_NOT_SETTINGS = frozenset(("user", "database", "options", "replication"))


class CancelStep(NamedTuple):
    pid: int
    key: bytes


class LookupStep(NamedTuple):
    """The user's secret must be looked up (I/O) before its authentication can start."""

    user: str
    db: str
    method: str


class Refused(PgError):
    """A client turned away at login, counted by ``reason`` (max_client_conn, draining, ...)."""

    def __init__(self, reason: str, e: PgError) -> None:
        super().__init__(e.sqlstate, e.message, severity=e.severity, detail=e.detail, hint=e.hint)
        self.reason = reason


class AuthFailedError(PgError):
    """A client's failed login, as PostgreSQL reports it (no detail leaks)."""

    def __init__(self, e: AuthFailed, user: str) -> None:
        super().__init__(e.sqlstate, e.message)
        self.detail_reason = getattr(e, "reason", None)
        self.user = user


@dataclass(frozen=True, slots=True)
class LoginResult:
    user: str
    db: str
    application_name: str
    wanted: dict[str, str]  # session settings the client asked for (startup params, options -c)
    tls: bool
    upstream_secret: Any = None  # what the login proved that pgscope may log in upstream with (never shown)


@dataclass(frozen=True, slots=True)
class LoginRules:
    tls_available: bool  # a certificate is configured: SSLRequest gets 'S'
    tls_required: bool  # client_tls_mode = require (unix sockets exempt)
    unix: bool
    refusal: Refused | None  # turn the client away once its startup packet is read
    method: Callable[[str, str, bool], str]  # (database, user, tls) -> the auth method (raises HbaRefusal, AuthFailed)
    authenticator: Callable[[str, str], Any]  # (user, method) -> a ClientAuthenticator
    lookup: Callable[[str, str], bool] | None = None  # (user, method) -> its secret needs a LookupStep (auth_query)


def login(rules: LoginRules) -> Generator[Any, Any, LoginResult | None]:
    tls = False
    while True:
        pkt = m.parse_startup_packet((yield NEED_PACKET))
        if pkt.kind == "ssl" and rules.tls_available and not tls:
            yield START_TLS
            tls = True
            continue
        if pkt.kind in ("ssl", "gssenc"):
            yield b"N"
            continue
        if pkt.kind == "cancel":
            yield CancelStep(pkt.cancel_pid, pkt.cancel_key)
            return None
        if not tls and not rules.unix and rules.tls_required:
            raise Refused("tls_required", PgError(
                INVALID_AUTHORIZATION, "SSL required",
                detail="client_tls_mode = require: connect with sslmode=require"))
        break
    # refused clients still get their SSLRequest answered and their startup packet
    # read, as PostgreSQL does, so that every client shows the error
    if rules.refusal is not None:
        raise rules.refusal
    params = pkt.params
    user = params["user"]
    if "replication" in params and params["replication"].lower() not in ("false", "off", "no", "0"):
        raise Refused("replication", PgError(FEATURE_NOT_SUPPORTED,
                                             "replication connections are not supported by pgscope"))
    wanted = {k: v for k, v in params.items() if k not in _NOT_SETTINGS}
    if params.get("options"):
        wanted.update(m.parse_options(params["options"]))
    if pkt.version != m.PROTOCOL_3_0 or pkt.unsupported:
        yield m.negotiate_protocol_version(0, pkt.unsupported)
    db = params.get("database") or user
    try:
        method = rules.method(db, user, tls)
    except HbaRefusal as e:
        raise Refused("hba", e) from None
    except AuthFailed as e:  # peer: the client's operating-system user is another
        raise AuthFailedError(e, user) from None
    if rules.lookup is not None and rules.lookup(user, method):
        auth = yield LookupStep(user, db, method)
    else:
        auth = rules.authenticator(user, method)
    yield auth.start()
    while not auth.done:
        t, body = yield NEED_MESSAGE
        try:
            out = auth.feed(bytes([t]), body)
        except AuthFailed as e:
            raise AuthFailedError(e, user) from None
        if out:
            yield out
    return LoginResult(user, db, params.get("application_name", ""), wanted, tls,
                       getattr(auth, "upstream_secret", None))
