"""What pins a client to its server: statements that leave session state in transaction mode.

SET without LOCAL, RESET, LISTEN/UNLISTEN, session advisory locks, temporary
tables, WITH HOLD cursors, LOAD and SQL-level PREPARE all outlive the
transaction.  In transaction mode a client that runs one is pinned to its
server (``pin``, the default), only reported (``warn``), or refused
(``error``).  Recognition is from pglast's parse tree, behind a cheap keyword
prefilter and a per-text cache, so ordinary statements cost one dict lookup.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Callable, NamedTuple


from proxy.protocol.errors import FEATURE_NOT_SUPPORTED, PgError
from proxy.protocol.statement import CLEARING, statement_facts  # noqa: F401  (CLEARING: re-exported)

# Statements that can leave session state start with one of these words (after
# optional comments, at the start of the text or after a ';'), or call an
# advisory-lock function, or create a temporary table inside another statement
# (SELECT ... INTO TEMP).  "UPDATE t SET ..." must not match: a full parse per
# write statement would dominate transaction pooling's cost.
_PREFILTER = re.compile(
    r"(?:^|;)\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*"
    r"(?:set|reset|listen|unlisten|load|prepare|deallocate|discard|declare|create)\b"
    r"|advisory_lock|\binto\s+(?:temp|temporary)\b",
    re.IGNORECASE | re.DOTALL)

_LEADING = frozenset(("set", "reset", "listen", "unlisten", "load", "prepare", "deallocate", "discard",
                      "declare", "create"))
_WORD = re.compile(r"(\w*)")


def might_leave_state(sql: str) -> bool:
    """``_PREFILTER.search(sql)``, answered without the regex in the common case.

    The regex scans the whole text from every position (3 to 5 µs for a
    pgbench TPC-B statement, paid on every statement with inline literals,
    since each is a new text); a single statement without comments only
    needs its first word and two substring checks.
    """
    low = sql.lower()
    if "advisory_lock" in low:
        return True
    stripped = low.lstrip()
    if stripped.startswith(("--", "/*")) or ";" in low.rstrip().rstrip(";") or (
            "into" in low and "temp" in low):
        return _PREFILTER.search(sql) is not None  # comments, several statements, INTO TEMP: the regex
    m = _WORD.match(stripped)
    return m is not None and m.group(1) in _LEADING


def classify(sql: str) -> str | None:
    """The kind of session state ``sql`` creates (or clears, see CLEARING), or None.

    Behind the cheap prefilter, the answer comes from the statement's facts
    (proxy.protocol.statement: one parse per text, cached, shared with the
    inspection consumers).  A statement list that both creates and clears state
    is reported by the first kind that creates it.
    """
    if not might_leave_state(sql):
        return None
    return statement_facts(sql).session_state


class Verdict(NamedTuple):
    """What a statement means for the client's server: ``action`` is one of
    "pin" (keep this server for the client's life), "warn" (log it, go on),
    "forget" (the server's statements and/or settings are no longer what the pool
    believes: ``kind`` says which, see CLEARING)."""

    kind: str
    action: str


class SessionStateGuard:
    """Transaction mode's rule for session state, as verdicts the session applies."""

    def __init__(self, policy: Callable[[], str], cache_size: int = 10000) -> None:
        self.policy = policy  # session_state_policy, read per verdict (SIGHUP may change it)
        self._cache: OrderedDict[str, str | None] = OrderedDict()
        self._cache_size = cache_size
        self.counts: dict[str, int] = {}  # kind -> statements seen
        self.pins = 0

    def kind(self, sql: str) -> str | None:
        cache = self._cache
        try:
            return cache[sql]
        except KeyError:
            pass
        k = classify(sql)
        cache[sql] = k
        if len(cache) > self._cache_size:
            cache.popitem(last=False)
        return k

    def check(self, sql: str, pinned: bool) -> Verdict | None:
        """The verdict on one Query/Parse text of a client (``pinned``: already pinned);
        raises PgError when session_state_policy is "error"."""
        k = self.kind(sql)
        if k is None:
            return None
        if k in CLEARING:
            return Verdict(k, "forget")
        if pinned:
            return None
        self.counts[k] = self.counts.get(k, 0) + 1
        policy = self.policy()
        if policy == "pin":
            self.pins += 1
            return Verdict(k, "pin")
        if policy == "warn":
            return Verdict(k, "warn")
        raise PgError(FEATURE_NOT_SUPPORTED, f"{k} is not allowed in transaction pooling mode",
                      hint="use SET LOCAL, or a session-mode pool")


def apply_verdict(session: Any, verdict: Verdict) -> None:
    """What the session does with a verdict on one of its statements."""
    kind, action = verdict
    if action == "forget":
        # not session state the next client could see, but the server's statements or
        # settings are no longer what the pool believes
        srv = session.server
        if srv is not None:
            if kind in ("DEALLOCATE", "DISCARD"):
                srv.prepared.clear()
            if kind in ("DISCARD", "RESET"):
                # which settings went back to their defaults is not tracked: mark every
                # one unknown so the next attach SETs or RESETs each again
                srv.applied = dict.fromkeys(srv.applied)
        return
    info = session.info
    fields = dict(kind=kind, client_id=session.id, client_addr=session.addr, db=info.db, user=info.user,
                  application_name=info.application_name)
    if action == "pin":
        session.pinned = True
        session.ctx.log.info("client_pinned", **fields)
    else:
        session.ctx.log.warning("session_state_in_transaction_mode", **fields)
