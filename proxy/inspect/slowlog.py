"""The ``slow_statement`` log event: one per statement slower than ``inspect.slow_query_ms``, at most
``inspect.slow_log_rate`` a second (the ones left out are counted, and told in the next event)."""

from __future__ import annotations

from typing import Any

from proxy.inspect.ratelimit import TokenBucket
from proxy.protocol.messages import decode_bind_params
from proxy.protocol.records import StatementEvent


class SlowLog:
    def __init__(self, settings: Any, logger: Any = None) -> None:
        self.settings = settings  # the [inspect] section (slow_log_rate, log_parameters)
        self.log = logger
        self.bucket = TokenBucket(settings.slow_log_rate)
        self.suppressed = 0  # events left out by the rate limit, ever
        self._suppressed_since_last = 0

    def statement(self, ev: StatementEvent, info: Any, duration: float, now: float) -> None:
        """Log one slow statement, unless the rate limit leaves it out."""
        rate = self.settings.slow_log_rate
        if not self.bucket.take(now, rate, max(rate, 1.0)):
            self.suppressed += 1
            self._suppressed_since_last += 1
            return
        if self.log is None:
            return
        c = ev.client
        fields: dict[str, Any] = dict(
            fingerprint=info.fingerprint, ms=round(duration * 1000.0, 3), db=c.db, user=c.user,
            application_name=c.application_name, client_addr=c.client_addr, query=info.normalized[:1000],
            rows=ev.rows, sqlstate=ev.sqlstate, server_pid=ev.server_pid)
        if self._suppressed_since_last:
            fields["suppressed"] = self._suppressed_since_last
            self._suppressed_since_last = 0
        if self.settings.log_parameters and ev.bind is not None:
            fields["parameters"] = bind_parameters(ev.bind)
        self.log.warning("slow_statement", **fields)


def bind_parameters(bind: bytes) -> list[str | None]:
    """Text-format Bind values as strings (binary ones described, not shown)."""
    try:
        _, _, values, fmts = decode_bind_params(bind)
    except Exception:
        return ["<undecodable>"]
    out: list[str | None] = []
    for v, f in zip(values, fmts):
        if v is None:
            out.append(None)
        elif f == 0:
            out.append(v.decode("utf-8", "replace"))
        else:
            out.append(f"<binary {len(v)} bytes>")
    return out
