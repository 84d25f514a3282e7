"""Caps across pools: max_db_connections (every pool of one alias) and max_user_connections
(every pool logging in as one user).

Only pools with a cap (``Pool.capped``) come here, and only off the fast
path: when a pool would open a server, when one of its servers closes, when
one goes back idle.  A pool at its group's cap first takes the room of an
idle server of another pool in the group (closing it), as PgBouncer evicts
one; otherwise its client waits, and the group's next freed server wakes a
waiter of each other pool in it.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

EVICTED = "closed to make room for a pool of the same database or user at its connection cap"


def _groups(pool: Any) -> list[tuple[int, list[Any]]]:
    """(cap, the pools sharing it) for each cap ``pool`` is under (its route's)."""
    out = []
    everyone = pool.mgr.all_pools()
    route = pool.route
    if route.max_db_connections:
        out.append((route.max_db_connections, [p for p in everyone if p.db == pool.db]))
    if route.max_user_connections:
        out.append((route.max_user_connections, [p for p in everyone if p.user == pool.user]))
    return out


def room_for(pool: Any, evict: bool = True) -> bool:
    """May ``pool`` open one more server?  With ``evict``, closes an idle server of another
    pool in a full group to make room; False when every server of the group is in use."""
    for cap, group in _groups(pool):
        if sum(p.total for p in group) < cap:
            continue
        victim = next((p for p in group if p is not pool and p.idle), None) if evict else None
        if victim is None:
            return False
        # the longest idle: the left end when released servers are appended, the right end under
        # server_round_robin (appended on the left): by its clock, whichever the order
        srv = min(victim.idle, key=attrgetter("last_used"))
        victim.idle.remove(srv)
        victim._drop(srv, EVICTED)
    return True


def starved(pool: Any) -> bool:
    """Does another pool of ``pool``'s group have clients waiting because the group is full
    (not because of its own pool_size)?  Then a server ``pool`` releases is closed instead of kept."""
    for cap, group in _groups(pool):
        if sum(p.total for p in group) < cap:
            continue
        if any(p is not pool and p.waiters and p.total < p.cfg.pool_size for p in group):
            return True
    return False


def wake_group(pool: Any) -> None:
    """A server of ``pool`` closed: one waiter of each other pool in its groups tries again."""
    seen = {pool}
    for _cap, group in _groups(pool):
        for p in group:
            if p not in seen:
                seen.add(p)
                p._kick()
