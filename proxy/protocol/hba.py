"""Host-based authentication rules (``auth_type = hba``): the ``auth_hba_file`` parsed, and the rule
that decides one login. Sans-IO: text in, rules out; a connection's facts in, a rule (or None) out.

The format is pg_hba.conf's, as PgBouncer reads it: one rule a line,
``TYPE DATABASE USER [ADDRESS [MASK]] METHOD``, the first rule that matches decides, and a
login that matches none is refused.

- TYPE: ``local`` (the Unix socket), ``host``, ``hostssl``, ``hostnossl``.
- DATABASE and USER: comma-separated names, ``all``, ``sameuser`` (database only: the
  database named as the user), ``replication`` (database only; pgscope refuses replication
  connections anyway), ``@file`` (names read from a file beside this one). A name in double
  quotes is a name even when it spells a keyword, and may hold spaces and commas.
- ADDRESS: ``all``, ``10.0.0.0/8``, ``::1/128``, or an address and a netmask (two fields).
  Host names, ``samehost`` and ``samenet`` are refused, as by PgBouncer.
- METHOD: ``trust``, ``reject``, ``md5``, ``password``, ``scram-sha-256``, ``peer`` (``local``
  only: the client's operating-system user must be the user it logs in as) and ``cert``
  (``hostssl`` only: a client certificate verified against client_tls_ca_file whose common name
  is the user). ``ldap`` and the others, and options after the method (``map=``...), are refused
  with the line's number.

``#`` starts a comment outside quotes; a line ending in a backslash continues on the next.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Callable, Iterator

from proxy.protocol.auth import AuthFailed
from proxy.protocol.errors import INVALID_AUTHORIZATION, PgError

TYPES = ("local", "host", "hostssl", "hostnossl")
# the method names of the file -> pgscope's auth methods ("plain" is PostgreSQL's "password")
METHODS = {"trust": "trust", "reject": "reject", "md5": "md5", "password": "plain",
           "scram-sha-256": "scram-sha-256", "peer": "peer", "cert": "cert"}
_UNSUPPORTED = {
    "ident": "use peer on the Unix socket instead",
    "ldap": "LDAP is not supported by pgscope", "radius": "RADIUS is not supported by pgscope",
    "gss": "GSSAPI is not supported by pgscope", "sspi": "SSPI is not supported by pgscope",
    "pam": "PAM is not supported by pgscope", "bsd": "BSD authentication is not supported by pgscope",
    "oauth": "OAuth is not supported by pgscope",
}
_KEYWORD_ADDRESSES = ("samehost", "samenet")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class HbaError(ValueError):
    """A line of the file that pgscope cannot follow; the message names the file and line."""


class HbaRefusal(PgError):
    """A login that a ``reject`` rule, or no rule, turns away (28000, as PostgreSQL's)."""

    def __init__(self, message: str) -> None:
        super().__init__(INVALID_AUTHORIZATION, message)


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    quoted: bool

    def keyword(self, word: str) -> bool:
        return not self.quoted and self.text == word


@dataclass(frozen=True, slots=True)
class Names:
    """A DATABASE or USER field."""

    every: bool = False
    sameuser: bool = False
    names: frozenset[str] = frozenset()

    def match(self, name: str, user: str = "") -> bool:
        return self.every or (self.sameuser and name == user) or name in self.names


@dataclass(frozen=True, slots=True)
class Rule:
    line: int
    kind: str  # one of TYPES
    databases: Names
    users: Names
    network: Network | None  # None: every address (and for local rules)
    method: str  # a value of METHODS

    def matches(self, *, unix: bool, ip: str, tls: bool, db: str, user: str) -> bool:
        if unix != (self.kind == "local"):
            return False
        if (self.kind == "hostssl" and not tls) or (self.kind == "hostnossl" and tls):
            return False
        if self.network is not None and not _in(ip, self.network):
            return False
        return self.databases.match(db, user) and self.users.match(user)


def decide(rules: tuple[Rule, ...], *, unix: bool, ip: str, tls: bool, db: str, user: str) -> Rule | None:
    """The first rule that matches the login, or None (the login is refused)."""
    for rule in rules:
        if rule.matches(unix=unix, ip=ip, tls=tls, db=db, user=user):
            return rule
    return None


@dataclass(frozen=True, slots=True)
class Identity:
    """What the connection itself says of the client, asked only by the methods that need it."""

    peer_user: Callable[[], str | None]  # the operating-system user of a Unix-socket client
    cert_name: Callable[[], str | None]  # the common name of a verified TLS client certificate


def login_method(rules: tuple[Rule, ...], *, unix: bool, ip: str, tls: bool, db: str, user: str,
                 identity: Identity) -> str:
    """The auth method for one login: the matching rule's, settled (``settle``) when the
    connection itself proves the user. Raises HbaRefusal (a reject rule, no rule) or AuthFailed."""
    rule = decide(rules, unix=unix, ip=ip, tls=tls, db=db, user=user)
    where = ('host "[local]"' if unix else f'host "{ip}"') + f', user "{user}", database "{db}"'
    where += ", SSL encryption" if tls else ", no encryption"
    if rule is None:
        raise HbaRefusal(f"no auth_hba_file entry for {where}")
    if rule.method == "reject":
        raise HbaRefusal(f"auth_hba_file rejects connection for {where}")
    return settle(rule.method, user, identity, f"auth_hba_file line {rule.line}")


def settle(method: str, user: str, identity: Identity, why: str = "auth_type") -> str:
    """``peer`` and ``cert`` are decided by the connection: "trust" when its identity is ``user``,
    else AuthFailed (28000, PostgreSQL's words); any other method is returned as it is."""
    if method == "peer":
        os_user = identity.peer_user()
        if os_user != user:
            raise AuthFailed(INVALID_AUTHORIZATION, f'Peer authentication failed for user "{user}"',
                             f"{why}: the client runs as operating-system user "
                             + (repr(os_user) if os_user is not None else "unknown"))
        return "trust"
    if method == "cert":
        name = identity.cert_name()
        if name is None:
            raise AuthFailed(INVALID_AUTHORIZATION, "connection requires a valid client certificate",
                             f"{why}: no verified client certificate")
        if name != user:
            raise AuthFailed(INVALID_AUTHORIZATION, f'certificate authentication failed for user "{user}"',
                             f"{why}: the certificate's common name is {name!r}")
        return "trust"
    return method


def load(path: str) -> tuple[Rule, ...]:
    with open(path, encoding="utf-8") as f:
        return parse(f.read(), path)


def parse(text: str, path: str = "auth_hba_file",
          read: Callable[[str], str] | None = None) -> tuple[Rule, ...]:
    """The rules of ``text`` (the file ``path``); ``read`` opens an ``@file`` (named relative to
    ``path``'s directory). Raises HbaError at the first line it cannot follow."""
    read = read or _read_text
    rules = []
    for number, fields in _lines(text, path):
        try:
            rules.append(_rule(number, fields, path, read))
        except HbaError:
            raise
        except (ValueError, OSError) as e:
            raise HbaError(f"{path}:{number}: {e}") from None
    return tuple(rules)


# -- reading


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _lines(text: str, path: str) -> list[tuple[int, list[list[Token]]]]:
    """(line number, fields) for each rule line; a field is its comma-separated tokens."""
    out = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        if raw.endswith("\\"):
            pending += raw[:-1]
            continue
        fields = _fields(pending + raw, path, start)
        pending = ""
        if fields:
            out.append((start, fields))
    if pending:
        fields = _fields(pending, path, start)
        if fields:
            out.append((start, fields))
    return out


def _fields(line: str, path: str, number: int) -> list[list[Token]]:
    """Split one logical line into fields of comma-separated tokens, honouring double quotes
    and ``#`` comments."""
    fields: list[list[Token]] = []
    field: list[Token] = []
    buf: list[str] = []
    quoted = in_quotes = False
    i, n = 0, len(line)

    def end_token() -> None:
        nonlocal buf, quoted
        if buf or quoted:
            field.append(Token("".join(buf), quoted))
        buf, quoted = [], False

    while i < n:
        c = line[i]
        if in_quotes:
            if c == '"':
                in_quotes = False
            else:
                buf.append(c)
        elif c == '"':
            in_quotes = quoted = True
        elif c == "#":
            break
        elif c == ",":
            end_token()
        elif c in " \t\r":
            end_token()
            if field:
                fields.append(field)
                field = []
        else:
            buf.append(c)
        i += 1
    if in_quotes:
        raise HbaError(f"{path}:{number}: unterminated quoted string")
    end_token()
    if field:
        fields.append(field)
    return fields


def _rule(number: int, fields: list[list[Token]], path: str, read: Callable[[str], str]) -> Rule:
    words = iter(fields)
    kind = _single(next(words), "connection type")
    if kind.quoted or kind.text not in TYPES:
        raise HbaError(f"{path}:{number}: unknown connection type {kind.text!r} (local, host, hostssl, hostnossl)")
    try:
        databases = _names(next(words), path, True, read)
        users = _names(next(words), path, False, read)
        network = None
        if kind.text != "local":
            network = _network(words)
        method_token = _single(next(words), "method")
    except StopIteration:
        raise HbaError(f"{path}:{number}: missing fields (TYPE DATABASE USER [ADDRESS] METHOD)") from None
    word = method_token.text
    if word in _UNSUPPORTED:
        raise HbaError(f"{path}:{number}: method {word}: {_UNSUPPORTED[word]}")
    if word not in METHODS:
        raise HbaError(f"{path}:{number}: unknown method {word!r} ({', '.join(METHODS)})")
    method = METHODS[word]
    if method == "peer" and kind.text != "local":
        raise HbaError(f"{path}:{number}: peer authentication is only supported on local (Unix socket) rules")
    if method == "cert" and kind.text != "hostssl":
        raise HbaError(f"{path}:{number}: cert authentication is only supported on hostssl rules")
    rest = list(words)
    if rest:
        extra = ",".join(t.text for t in rest[0])
        raise HbaError(f"{path}:{number}: options after the method are not supported ({extra})")
    return Rule(number, kind.text, databases, users, network, method)


def _single(field: list[Token], what: str) -> Token:
    if len(field) != 1:
        raise ValueError(f"the {what} is one word, not a list")
    return field[0]


def _names(field: list[Token], path: str, database: bool, read: Callable[[str], str]) -> Names:
    every = sameuser = False
    names: set[str] = set()
    for token in field:
        if token.keyword("all"):
            every = True
        elif database and token.keyword("sameuser"):
            sameuser = True
        elif database and token.keyword("replication"):
            continue  # matches replication connections only, which pgscope never lets in
        elif not token.quoted and token.text in ("samerole", "samegroup") and database:
            raise ValueError(f"{token.text} is not supported (no role membership is known to pgscope)")
        elif not token.quoted and token.text.startswith("+"):
            raise ValueError(f"group names ({token.text}) are not supported")
        elif not token.quoted and token.text.startswith("@"):
            included = os.path.join(os.path.dirname(path), token.text[1:])
            for line_fields in _fields_of_file(read(included), included):
                for t in line_fields:
                    names.add(t.text)
        else:
            names.add(token.text)
    return Names(every, sameuser, frozenset(names))


def _fields_of_file(text: str, path: str) -> list[list[Token]]:
    return [field for _, fields in _lines(text, path) for field in fields]


def _network(words: Iterator[list[Token]]) -> Network | None:
    """ADDRESS (and MASK, when the address has no /bits): None for ``all``. Bits set past the
    mask are ignored, as PostgreSQL does."""
    token = _single(next(words), "address")
    if token.keyword("all"):
        return None
    if not token.quoted and token.text in _KEYWORD_ADDRESSES:
        raise ValueError(f"{token.text} is not supported; write the network (10.0.0.0/8)")
    text = token.text
    if "/" in text:
        return ipaddress.ip_network(text, strict=False)
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address (host names are not supported)") from None
    mask_text = _single(next(words), "netmask").text
    mask = int(ipaddress.ip_address(mask_text))
    bits = addr.max_prefixlen
    prefix = bits - (((1 << bits) - 1 - mask).bit_length())
    if mask != ((1 << bits) - 1) ^ ((1 << (bits - prefix)) - 1) or ipaddress.ip_address(mask_text).version != addr.version:
        raise ValueError(f"invalid netmask {mask_text}")
    return ipaddress.ip_network(f"{addr}/{prefix}", strict=False)


def _in(ip: str, net: Network) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None and net.version == 4:
        addr = addr.ipv4_mapped  # ::ffff:10.1.2.3 from a dual-stack listener
    return addr.version == net.version and addr in net
