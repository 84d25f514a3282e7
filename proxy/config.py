"""Settings: one frozen object from defaults < TOML file < environment < flags.

A single key table drives everything: loading, environment names
(``PGSCOPE_<KEY>``, ``PGSCOPE_<SECTION>_<KEY>``), validation, the example file
and docs/configuration.md.  A new key is one new row.

    python3 -m proxy.config --toml      # config/pgscope.example.toml
    python3 -m proxy.config --markdown  # the table in docs/configuration.md
"""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs, unquote, urlsplit

ENV_PREFIX = "PGSCOPE_"
ENV_IGNORED_PREFIX = "PGSCOPE_TEST_"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Key:
    section: str  # "" for top level
    name: str
    type: type
    default: Any
    reloadable: bool
    doc: str
    choices: tuple[str, ...] = ()
    minimum: float | None = 0
    check: Callable[[Any], str | None] | None = None  # returns an error text or None

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name

    @property
    def env(self) -> str:
        return ENV_PREFIX + (f"{self.section}_{self.name}" if self.section else self.name).upper()


def _hostport(value: str, allow_empty: bool = False) -> str | None:
    if value == "" and allow_empty:
        return None
    try:
        host, port = split_hostport(value)
    except ValueError as e:
        return str(e)
    return None


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


def _upstream_check(value: str) -> str | None:
    try:
        parse_upstream(value)
    except ValueError as e:
        return str(e)
    return None


def _token_check(value: str) -> str | None:
    if value and not (value.isascii() and value.isprintable() and " " not in value):
        return "expected printable ASCII characters without spaces"
    return None


S, I, F, B = str, int, float, bool
KEYS: tuple[Key, ...] = (
    # -- listening and upstream
    Key("", "listen", S, "127.0.0.1:6432", False, "Address clients connect to (HOST:PORT; [::1]:6432 for IPv6; port 0 picks a free one).",
        check=_hostport),
    Key("", "upstream", S, "postgresql://postgres@127.0.0.1:5432/postgres", False,
        "PostgreSQL to pool: postgresql://user[:password]@host[:port][/dbname]; ?host=/dir for a unix socket. The user and password are used to log in upstream for that user.",
        check=_upstream_check),
    Key("", "pool_mode", S, "session", False, "session: a server per client for the client's life; transaction: a server per transaction.",
        choices=("session", "transaction")),
    Key("", "metrics_listen", S, "127.0.0.1:9930", False, "Address of /metrics, /healthz, /readyz and /api/* (empty disables).",
        check=lambda v: _hostport(v, allow_empty=True)),
    # -- the HTTP endpoint's protection
    Key("", "http_token", S, "", True, "Bearer token that /api/* (and /metrics with metrics_require_token) ask for in an Authorization header; empty: open. Better given as PGSCOPE_HTTP_TOKEN or http_token_file than in the file.",
        check=_token_check),
    Key("", "http_token_file", S, "", True, "File whose first line is http_token (read at start and on SIGHUP); set this or http_token, not both."),
    Key("", "metrics_require_token", B, False, True, "/metrics asks for http_token too (/healthz and /readyz never do)."),
    Key("", "http_tls_cert", S, "", False, "Certificate (PEM, chain) to serve metrics_listen over HTTPS; empty: plain HTTP."),
    Key("", "http_tls_key", S, "", False, "Private key (PEM) for http_tls_cert."),
    # -- auth
    Key("", "auth_type", S, "", True, "How clients authenticate: trust, plain, md5, scram-sha-256; empty means scram-sha-256 when auth_file is set, else trust.",
        choices=("", "trust", "plain", "md5", "scram-sha-256")),
    Key("", "auth_file", S, "", True, 'PgBouncer-style userlist: lines of "user" "password" (plaintext, md5… or SCRAM-SHA-256$… verifier).'),
    Key("", "allow_trust_remote", B, False, False, "Allow auth_type trust on a non-loopback listen address (refused by default)."),
    # -- TLS
    Key("", "client_tls_mode", S, "disable", False, "TLS from clients: disable, allow/prefer (TLS when asked), require (refuse plain TCP).",
        choices=("disable", "allow", "prefer", "require")),
    Key("", "client_tls_cert", S, "", False, "Certificate (PEM, chain) presented to clients."),
    Key("", "client_tls_key", S, "", False, "Private key (PEM) for client_tls_cert."),
    Key("", "server_tls_mode", S, "disable", False, "TLS to PostgreSQL, as libpq's sslmode: disable, allow/prefer (TLS if offered), require, verify-ca, verify-full.",
        choices=("disable", "allow", "prefer", "require", "verify-ca", "verify-full")),
    Key("", "server_tls_ca_file", S, "", False, "CA bundle to verify PostgreSQL's certificate (verify-ca, verify-full); empty: the system store."),
    # -- logs
    Key("", "log_format", S, "json", False, "json (one object per line) or console.", choices=("json", "console")),
    Key("", "log_level", S, "info", True, "debug, info, warning or error.", choices=("debug", "info", "warning", "error")),
    # -- pool
    Key("", "pool_size", I, 20, True, "Server connections per (database, user).", minimum=1),
    Key("", "min_pool_size", I, 0, True, "Server connections kept open per (database, user) even when idle."),
    Key("", "reserve_pool_size", I, 0, True, "Extra servers a pool may open when a client has waited reserve_pool_timeout."),
    Key("", "reserve_pool_timeout", F, 5.0, True, "Seconds a client waits before the reserve pool is used."),
    Key("", "max_client_conn", I, 200, True, "Client connections accepted in all; more are refused with 53300.", minimum=1),
    Key("", "query_wait_timeout", F, 120.0, True, "Seconds a client may wait for a server before 08P01 query_wait_timeout (0: forever)."),
    Key("", "server_reset_query", S, "DISCARD ALL", True, "Run on a server when a session-mode client leaves (empty: none)."),
    Key("", "server_reset_query_always", B, False, True, "Also run server_reset_query after every transaction in transaction mode."),
    Key("", "server_lifetime", F, 3600.0, True, "Close a server once it is this old and idle (0: never)."),
    Key("", "server_idle_timeout", F, 600.0, True, "Close a server idle this long (0: never)."),
    Key("", "server_connect_timeout", F, 15.0, True, "Seconds to connect and log in to PostgreSQL.", minimum=0.001),
    Key("", "server_drain_timeout", F, 5.0, True, "Seconds a server whose client left mid-request (Terminate or a closed socket with a query running, an unsynced batch, a COPY) may take to answer what it was sent, answers discarded, before it is closed instead of given back; also how long a Terminate waits for answers due to the client.", minimum=0.0),
    Key("", "server_check_delay", F, 30.0, True, "Health-check an idle server with server_check_query before reuse when idle longer than this (0: always)."),
    Key("", "server_check_query", S, "select 1", True, "Health-check query (empty: no check)."),
    # -- client timeouts
    Key("", "client_idle_timeout", F, 0.0, True, "Close a client idle (outside a transaction) this long, with 57P05 (0: off)."),
    Key("", "idle_transaction_timeout", F, 0.0, True, "Close a client idle inside a transaction this long, with 25P03 (0: off)."),
    Key("", "query_timeout", F, 0.0, True, "Cancel a statement running this long, with 57014 (0: off)."),
    Key("", "shutdown_timeout", F, 30.0, True, "On SIGTERM/SIGINT, seconds running transactions get to finish."),
    # -- transaction pooling
    Key("", "max_prepared_statements", I, 200, True, "Prepared statements cached per server in transaction mode (LRU); 0 turns named-statement support off."),
    Key("", "session_state_policy", S, "pin", True, "Transaction mode, on SET/LISTEN/advisory lock/temp table…: pin (client keeps its server), warn, error.",
        choices=("pin", "warn", "error")),
    # -- [inspect]
    Key("inspect", "enabled", B, True, False, "Fingerprint and time every statement."),
    Key("inspect", "queue_size", I, 10000, False, "Statement records buffered between relay and inspection; more are dropped and counted.", minimum=1),
    Key("inspect", "flush_interval_ms", I, 200, True, "How often the inspection pipeline drains what is left in the queue and runs its periodic checks; under load it also processes every 256 records as they arrive.", minimum=1),
    Key("inspect", "slow_query_ms", F, 500.0, True, "A statement slower than this counts as slow (logged, EXPLAIN-sampled)."),
    Key("inspect", "max_fingerprints", I, 5000, True, "(fingerprint, db, user) entries kept; the least total time is evicted beyond.", minimum=1),
    Key("inspect", "export_top_k", I, 100, True, "Entries with their own Prometheus series (by total time); the rest sum into fingerprint=\"_other\"."),
    Key("inspect", "query_label_max", I, 200, True, "Characters of normalized query text in pgscope_statement_info.", minimum=1),
    Key("inspect", "log_parameters", B, False, True, "Show statement values: Bind parameter values in slow-statement logs, and the values in sampled EXPLAIN plans (off: plans show $n where a value was)."),
    Key("inspect", "slow_log_rate", F, 10.0, True, "At most this many slow_statement log events per second."),
    Key("inspect", "fingerprint_cache_size", I, 10000, True, "Distinct statement texts whose fingerprint is cached.", minimum=1),
    Key("inspect", "explain_enabled", B, True, True, "Sample EXPLAIN plans of slow statements on a side connection."),
    Key("inspect", "explain_sample_rate", F, 1.0, True, "Fraction of eligible slow statements whose plan is sampled (0..1)."),
    Key("inspect", "explain_cooldown_s", F, 60.0, True, "Seconds before the same fingerprint is sampled again."),
    Key("inspect", "explain_max_per_minute", I, 12, True, "Plans sampled per minute at most, across all fingerprints."),
    Key("inspect", "explain_timeout_ms", I, 2000, True, "statement_timeout for EXPLAIN and HypoPG work on the side connection.", minimum=1),
    Key("inspect", "explain_analyze", B, False, True, "Use EXPLAIN ANALYZE for read-only SELECTs (never for anything else), in a read-only transaction."),
    Key("inspect", "explain_keep", I, 100, True, "Sampled plans kept for /api/explains.", minimum=1),
    Key("inspect", "nplusone_threshold", I, 5, True, "Repetitions of one SELECT in a client's loop that make an N+1 burst.", minimum=2),
    Key("inspect", "nplusone_window_ms", F, 1000.0, True, "Most time between two repetitions of the loop."),
    Key("inspect", "nplusone_min_total_ms", F, 50.0, True, "Least summed time of the repetitions for a burst."),
    Key("inspect", "nplusone_max_interleave", I, 2, True, "Other statements allowed between two repetitions (related-row lookups)."),
    Key("inspect", "nplusone_allow_fingerprints", S, "", True, "Comma-separated fingerprints never reported as N+1 (known batch jobs)."),
    Key("inspect", "nplusone_allow_apps", S, "", True, "Comma-separated application_names never reported as N+1."),
    Key("inspect", "nplusone_keep", I, 100, True, "Bursts kept for /api/nplusone.", minimum=1),
    Key("inspect", "lock_hold_ms", F, 1000.0, True, "Report transactions holding locks, and clients idle in a transaction, past this."),
    Key("inspect", "lock_sample_interval_ms", F, 1000.0, True, "How often pg_locks and pg_blocking_pids() are sampled (0: never).", minimum=0),
    Key("inspect", "locks_keep", I, 100, True, "Lock reports kept for /api/locks.", minimum=1),
    Key("advisor", "enabled", B, True, True, "Derive index recommendations from sampled plans."),
    Key("advisor", "min_benefit", F, 0.5, True, "Recommend only when the estimated total cost falls by at least this fraction (0..1)."),
    Key("advisor", "min_table_rows", I, 10000, True, "Ignore sequential scans of tables with fewer (estimated) rows."),
    Key("advisor", "use_hypopg", B, True, True, "Verify candidates with HypoPG hypothetical indexes where the server has it (CREATE EXTENSION is tried once)."),
)
SECTIONS = ("", "inspect", "advisor")
_BY_NAME = {(k.section, k.name): k for k in KEYS}
_BY_ENV = {k.env: k for k in KEYS}


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


# ------------------------------------------------------------------ the settings classes

def _fields(section: str) -> list[tuple[str, type, Any]]:
    return [(k.name, k.type, dataclasses.field(default=k.default)) for k in KEYS if k.section == section]


InspectSettings = dataclasses.make_dataclass("InspectSettings", _fields("inspect"), frozen=True)
InspectSettings.__doc__ = "The [inspect] section."
AdvisorSettings = dataclasses.make_dataclass("AdvisorSettings", _fields("advisor"), frozen=True)
AdvisorSettings.__doc__ = "The [advisor] section."
SECTION_CLASSES = {"inspect": InspectSettings, "advisor": AdvisorSettings}


class _Derived:
    """Read-only values computed from the keys."""

    @property
    def listen_host(self) -> str:
        return split_hostport(self.listen)[0]  # type: ignore[attr-defined]

    @property
    def listen_port(self) -> int:
        return split_hostport(self.listen)[1]  # type: ignore[attr-defined]

    @property
    def metrics_host(self) -> str | None:
        return split_hostport(self.metrics_listen)[0] if self.metrics_listen else None  # type: ignore[attr-defined]

    @property
    def metrics_port(self) -> int:
        return split_hostport(self.metrics_listen)[1] if self.metrics_listen else 0  # type: ignore[attr-defined]

    @property
    def _up(self) -> Upstream:
        return parse_upstream(self.upstream)  # type: ignore[attr-defined]

    @property
    def upstream_host(self) -> str:
        return self._up.host

    @property
    def upstream_port(self) -> int:
        return self._up.port

    @property
    def upstream_user(self) -> str | None:
        return self._up.user

    @property
    def upstream_password(self) -> str | None:
        return self._up.password

    @property
    def upstream_dbname(self) -> str | None:
        return self._up.dbname

    @property
    def redacted_upstream(self) -> str:
        return redact_url(self.upstream)  # type: ignore[attr-defined]

    @property
    def effective_auth_type(self) -> str:
        if self.auth_type:  # type: ignore[attr-defined]
            return self.auth_type  # type: ignore[attr-defined]
        return "scram-sha-256" if self.auth_file else "trust"  # type: ignore[attr-defined]


Settings = dataclasses.make_dataclass(
    "Settings", _fields("") + [(name, cls, dataclasses.field(default_factory=cls))
                               for name, cls in SECTION_CLASSES.items()],
    bases=(_Derived,), frozen=True)
Settings.__doc__ = "Every setting of a pgscope process (frozen; a reload builds a new one)."


# ------------------------------------------------------------------ loading

_TRUE = frozenset(("1", "true", "yes", "on"))
_FALSE = frozenset(("0", "false", "no", "off"))


def _convert(key: Key, value: Any, source: str) -> Any:
    def bad(expect: str) -> ConfigError:
        return ConfigError(f"{key.dotted}: expected {expect}, got {value!r} ({source})")

    t = key.type
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


def _apply(values: dict[tuple[str, str], Any], data: Mapping[str, Any], source: str) -> None:
    for name, value in data.items():
        if name in SECTIONS and name and isinstance(value, Mapping):
            for sub, v in value.items():
                key = _BY_NAME.get((name, sub))
                if key is None:
                    raise ConfigError(f'unknown key "{name}.{sub}" ({source})')
                if v is not None:
                    values[(name, sub)] = _convert(key, v, source)
            continue
        key = _BY_NAME.get(("", name))
        if key is None:
            raise ConfigError(f'unknown key "{name}" ({source})')
        if value is not None:
            values[("", name)] = _convert(key, value, source)


def load_settings(path: str | None, env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Any:
    """Build Settings: defaults < file ``path`` < ``env`` (PGSCOPE_*) < ``overrides`` (flags)."""
    values: dict[tuple[str, str], Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        except OSError as e:
            raise ConfigError(f"{path}: {e.strerror or e}") from None
        _apply(values, data, f"from {path}")
    for name, value in (env or {}).items():
        if not name.startswith(ENV_PREFIX) or name.startswith(ENV_IGNORED_PREFIX):
            continue
        key = _BY_ENV.get(name)
        if key is None:
            raise ConfigError(f'unknown key "{name}" (from environment)')
        values[(key.section, key.name)] = _convert(key, value, f"from environment {name}")
    if overrides:
        _apply(values, overrides, "from command line")
    _read_token_file(values)
    return _build(values)


def _read_token_file(values: dict[tuple[str, str], Any]) -> None:
    """http_token_file's first line becomes http_token (so a changed file shows as a changed key)."""
    path = values.get(("", "http_token_file"))
    if not path:
        return
    if values.get(("", "http_token")):
        raise ConfigError("http_token_file: set http_token or http_token_file, not both")
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"http_token_file: {path}: {getattr(e, 'strerror', None) or e}") from None
    if not token:
        raise ConfigError(f"http_token_file: {path} is empty")
    err = _token_check(token)
    if err:
        raise ConfigError(f"http_token_file: {path}: {err}")
    values[("", "http_token")] = token


def _build(values: dict[tuple[str, str], Any]) -> Any:
    sections = {name: cls(**{n: v for (sec, n), v in values.items() if sec == name})
                for name, cls in SECTION_CLASSES.items()}
    settings = Settings(**{n: v for (sec, n), v in values.items() if sec == ""}, **sections)
    validate(settings)
    return settings


def get(settings: Any, key: Key) -> Any:
    return getattr(getattr(settings, key.section), key.name) if key.section else getattr(settings, key.name)


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
    if s.server_tls_mode == "verify-full" and s.upstream_host.startswith("/"):
        raise ConfigError("server_tls_mode: verify-full needs a TCP host in upstream, not a unix socket")


def diff_reloadable(old: Any, new: Any) -> tuple[list[str], list[str]]:
    """Keys whose value differs: (applied live, needing a restart)."""
    changed: list[str] = []
    frozen: list[str] = []
    for k in KEYS:
        a, b = get(old, k), get(new, k)
        if a != b:
            (changed if k.reloadable else frozen).append(k.dotted)
    return changed, frozen


def as_dict(s: Any, redact: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in KEYS:
        v = get(s, k)
        if redact and k.name == "upstream":
            v = redact_url(v)
        elif redact and k.name == "http_token" and v:
            v = "***"
        out[k.dotted] = v
    return out


# ------------------------------------------------------------------ generated docs

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def generate_example() -> str:
    lines = ["# pgscope configuration: every key with its default.",
             "# Generated by `python3 -m proxy.config --toml`; precedence: flags > PGSCOPE_* environment > this file > defaults.",
             "# Keys marked [reload] take effect on SIGHUP; the others need a restart.", ""]
    for section in SECTIONS:
        if section:
            lines += ["", f"[{section}]"]
        for k in KEYS:
            if k.section != section:
                continue
            lines.append(f"# {k.doc}{' [reload]' if k.reloadable else ''}")
            lines.append(f"{k.name} = {_toml_value(k.default)}")
    return "\n".join(lines) + "\n"


def generate_markdown() -> str:
    rows = ["| key | type | default | environment | SIGHUP | description |",
            "|---|---|---|---|---|---|"]
    for k in KEYS:
        default = _toml_value(k.default).replace("|", "\\|")
        choices = f" One of: {', '.join('`' + c + '`' for c in k.choices if c)}." if k.choices else ""
        rows.append(f"| `{k.dotted}` | {k.type.__name__} | `{default}` | `{k.env}` | "
                    f"{'yes' if k.reloadable else 'restart'} | {k.doc.replace('|', '/')}{choices} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:] == ["--toml"]:
        sys.stdout.write(generate_example())
    elif sys.argv[1:] == ["--markdown"]:
        sys.stdout.write(generate_markdown())
    else:
        sys.exit("usage: python3 -m proxy.config --toml | --markdown")
