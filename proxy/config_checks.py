"""Checking setting values: a raw value (TOML, environment, flag) to the key's type, per-key checks, cross-key rules.

Also the HOST:PORT and upstream URL parsers.  Each ``check_*`` returns an error
text or None; proxy.config's key table names them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from proxy.config_tables import MAX_PEER_ID, check_tables
from proxy.protocol import hba

if TYPE_CHECKING:
    from proxy.config import Key


class ConfigError(ValueError):
    pass


# ------------------------------------------------------------------ one value

_TRUE = frozenset(("1", "true", "yes", "on"))
_FALSE = frozenset(("0", "false", "no", "off"))


def convert(key: Key, value: Any, source: str) -> Any:
    def bad(expect: str) -> ConfigError:
        return ConfigError(f"{key.dotted}: expected {expect}, got {value!r} ({source})")

    t = key.type
    if key.parse is not None:  # a table ([databases], [users])
        try:
            return key.parse(value)
        except ValueError as e:
            raise ConfigError(f"{e} ({source})") from None
    if t is bool:
        if isinstance(value, bool):
            out: Any = value
        elif isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            out = value.strip().lower() in _TRUE
        else:
            raise bad("true or false")
    elif t is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            out = value
        elif isinstance(value, str):
            try:
                out = int(value.strip())
            except ValueError:
                raise bad("an integer") from None
        else:
            raise bad("an integer")
    elif t is list:  # names: a TOML list of strings, or one comma-separated string (environment, flags)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise bad("a list of names")
        out = tuple(v.strip() for v in items if v.strip())
    elif t is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                raise bad("a number") from None
        else:
            raise bad("a number")
    else:
        if not isinstance(value, str):
            raise bad("a string")
        out = value
    if t in (int, float) and key.minimum is not None and out < key.minimum:
        raise bad(f"a number >= {key.minimum:g}")
    if key.choices and out not in key.choices:
        raise bad("one of " + ", ".join(c or '""' for c in key.choices))
    if key.check is not None:
        err = key.check(out)
        if err:
            raise ConfigError(f"{key.dotted}: {err} ({source})")
    return out



def split_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("["):
        host = host.strip("[]")
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"expected HOST:PORT with a numeric port, got {value!r}") from None
    if not 0 <= p <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host, p


def check_hostport(value: str, allow_empty: bool = False) -> str | None:
    if value == "" and allow_empty:
        return None
    try:
        split_hostport(value)
    except ValueError as e:
        return str(e)
    return None


def check_upstream(value: str) -> str | None:
    try:
        parse_upstream(value)
    except ValueError as e:
        return str(e)
    return None


FINDING_KINDS = ("loop", "lock_wait", "no_where", "unbounded_select", "deep_offset", "leading_wildcard",
                 "blocking_ddl", "unused_index", "duplicate_index", "plan_change")


def check_finding_kinds(value: tuple[str, ...]) -> str | None:
    unknown = [v for v in value if v not in FINDING_KINDS]
    return f"unknown finding kind {', '.join(unknown)} (one of {', '.join(FINDING_KINDS)})" if unknown else None


def check_token(value: str) -> str | None:
    if value and not (value.isascii() and value.isprintable() and " " not in value):
        return "expected printable ASCII characters without spaces"
    return None


# ------------------------------------------------------------------ upstream URL

@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    user: str | None
    password: str | None
    dbname: str | None


def parse_upstream(url: str) -> Upstream:
    u = urlsplit(url)
    if u.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"expected a postgresql:// URL, got {redact_url(url)!r}")
    q = parse_qs(u.query)
    try:
        port = u.port or int(q.get("port", ["5432"])[0])
    except ValueError:
        raise ValueError("bad port in upstream URL") from None
    host = unquote(u.hostname or "") or q.get("host", [""])[0] or "127.0.0.1"
    if "host" in q:
        host = q["host"][0]
    dbname = unquote(u.path.lstrip("/")) or q.get("dbname", [None])[0]
    return Upstream(host, port, unquote(u.username) if u.username else q.get("user", [None])[0],
                    unquote(u.password) if u.password is not None else q.get("password", [None])[0], dbname)


def redact_url(url: str) -> str:
    u = urlsplit(url)
    if u.password is None:
        return url
    netloc = u.netloc.replace(f":{u.password}@", ":***@", 1)
    return u._replace(netloc=netloc).geturl()


# ------------------------------------------------------------------ across keys

def validate(s: Any) -> None:
    if s.min_pool_size > s.pool_size:
        raise ConfigError(f"min_pool_size: {s.min_pool_size} is more than pool_size {s.pool_size}")
    if s.client_tls_mode != "disable" and not (s.client_tls_cert and s.client_tls_key):
        raise ConfigError("client_tls_mode: needs client_tls_cert and client_tls_key")
    for name in ("explain_sample_rate",):
        if not 0 <= getattr(s.inspect, name) <= 1:
            raise ConfigError(f"inspect.{name}: expected a number between 0 and 1, got {getattr(s.inspect, name)!r}")
    if not 0 <= s.advisor.min_benefit <= 1:
        raise ConfigError(f"advisor.min_benefit: expected a number between 0 and 1, got {s.advisor.min_benefit!r}")
    if bool(s.http_tls_cert) != bool(s.http_tls_key):
        raise ConfigError("http_tls_cert: needs http_tls_key too (and the other way round)")
    if s.metrics_require_token and not s.http_token:
        raise ConfigError("metrics_require_token: needs http_token or http_token_file")
    if s.peer_id > MAX_PEER_ID:
        raise ConfigError(f"peer_id: at most {MAX_PEER_ID}, got {s.peer_id}")
    if s.server_tls_key and not s.server_tls_cert:
        raise ConfigError("server_tls_key: needs server_tls_cert")
    if s.server_tls_cert and s.server_tls_mode == "disable":
        raise ConfigError("server_tls_cert: needs server_tls_mode (prefer, require, verify-ca or verify-full)")
    if s.server_tls_mode == "verify-full" and s.upstream_host.startswith("/"):
        raise ConfigError("server_tls_mode: verify-full needs a TCP host in upstream, not a unix socket")
    if s.auth_type == "hba":
        if any(rule.method == "cert" for rule in _check_hba(s.auth_hba_file)) and not s.client_tls_ca_file:
            raise ConfigError("auth_hba_file: cert rules need client_tls_ca_file (and client_tls_mode)")
    if s.auth_type == "cert" and not (s.client_tls_ca_file and s.client_tls_mode != "disable"):
        raise ConfigError("auth_type: cert needs client_tls_ca_file and client_tls_mode")
    if s.client_tls_ca_file and s.client_tls_mode == "disable":
        raise ConfigError("client_tls_ca_file: needs client_tls_mode (and client_tls_cert, client_tls_key)")
    err = check_tables(s)
    if err:
        raise ConfigError(err)


def _check_hba(path: str) -> tuple[hba.Rule, ...]:
    if not path:
        raise ConfigError("auth_type: hba needs auth_hba_file")
    try:
        return hba.load(path)
    except OSError as e:
        raise ConfigError(f"auth_hba_file: {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"auth_hba_file: {e}") from None
