"""Waiting for a full pool's next server without a task (transaction mode's common wait).

``Handoff`` and ``wait_nowait`` are the compiled twins from proxy/pool/_hot.pyx when built (see
proxy.pool.hot), else ``PyHandoff`` and ``py_wait_nowait`` below, the reference.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from proxy.pool import hot

_monotonic = time.monotonic


class PyHandoff:
    """A waiter without a task: a client queued for a server of a full pool, answered by a
    callback.  It stands in the pool's ``waiters`` beside the futures of ``acquire`` and
    answers what they answer (``done``, ``set_result``), so release, ``_kick``, PAUSE and
    the query_wait_timeout timer treat both alike; ``set_result`` calls ``deliver(result,
    seconds waited)`` at once with a server, or None (look again: a slot was freed, or the
    pool was paused); ``expire`` calls ``deliver(PgError, -1.0)`` (query_wait_timeout).
    Times are ``time.monotonic()``."""

    __slots__ = ("pool", "deliver", "t0", "deadline", "_done")

    def __init__(self, pool: Any, deliver: Any, t0: float, deadline: float) -> None:
        self.pool = pool
        self.deliver = deliver
        self.t0 = t0
        self.deadline = deadline  # query_wait_timeout (the pool's one timer watches the oldest)
        self._done = False

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def set_result(self, srv: Any) -> None:
        if self._done:
            return
        self._done = True
        pool = self.pool
        pool.waiting -= 1
        waited = 0.0
        if srv is not None:
            waited = _monotonic() - self.t0
            pool.wait_hist.observe(waited)
        self.deliver(srv, waited)

    def withdraw(self) -> None:
        """The client gave up (it left): out of the queue, nothing delivered."""
        if self._done:
            return
        self._done = True
        self.pool.waiting -= 1
        try:
            self.pool.waiters.remove(self)
        except ValueError:
            pass

    def expire(self) -> None:
        """query_wait_timeout: out of the queue, the client gets the error."""
        if self._done:
            return
        self.withdraw()
        self.deliver(self.pool._wait_timeout(), -1.0)


def expire_handoffs(pool: Any) -> None:
    """query_wait_timeout for Handoffs: one timer per pool, at the oldest one's deadline
    (they queue in the order they expire), instead of a timer per waiting transaction."""
    pool._expiry = None
    now = _monotonic()
    nxt = math.inf
    for h in list(pool.waiters):
        if type(h) is Handoff and not h._done:  # (the twin in use: one kind is ever made)
            if h.deadline <= now:
                h.expire()
            else:
                nxt = min(nxt, h.deadline)
    if nxt != math.inf:
        _arm(pool, nxt)


def _arm(pool: Any, deadline: float) -> None:
    if pool._expiry is not None:
        pool._expiry.cancel()
    pool._expiry = asyncio.get_running_loop().call_later(max(0.0, deadline - _monotonic()), expire_handoffs, pool)
    pool._expiry_at = deadline


def py_wait_nowait(pool: Any, deliver: Any, waiter: Any = None) -> PyHandoff | None:
    """Queue a client for the next released server of a full ``pool`` without a task: the
    returned Handoff calls ``deliver``.  None when the pool cannot simply be waited on (an
    idle server needs a check, it can open a server, it is paused, closed, capped or
    retired, or it has a reserve): ``acquire`` then does the whole job.  (``waiter``: the compiled
    twin answers it with a C call instead of ``deliver``; here ``deliver`` is always called.)"""
    cfg = pool.cfg
    if (pool.idle or pool.paused or pool.closed or pool.capped or pool.retired or cfg.reserve_pool_size > 0
            or pool.connecting + len(pool.active) < cfg.pool_size):
        return None
    t0 = _monotonic()
    qwt = cfg.query_wait_timeout
    h = PyHandoff(pool, deliver, t0, t0 + qwt if qwt > 0 else math.inf)
    if qwt > 0 and (pool._expiry is None or h.deadline < pool._expiry_at):  # (lowered by SIGHUP)
        _arm(pool, h.deadline)
    pool.waiters.append(h)
    pool.waiting += 1
    return h


if hot.PoolCore is hot.PyPoolCore:  # the pool core's choice (it has warned if it had to)
    Handoff, wait_nowait = PyHandoff, py_wait_nowait
else:
    from proxy.pool import _hot

    Handoff, wait_nowait = _hot.Handoff, _hot.wait_nowait
