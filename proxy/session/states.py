"""A client's states and the transitions between them, in one table.

    STARTUP -> AUTH -> IDLE <-> WAITING -> ACTIVE -> IDLE   (transaction mode: a server per transaction)
                       ACTIVE                               (session mode: the server for the client's life)
    any state -> TERMINATING (Terminate with answers still due) -> CLOSED;  any state -> CLOSED
    AUTH -> CONSOLE (the admin console: no server) -> CLOSED

A move the table does not allow is a bug, reported as such (``advance``).
"""

from __future__ import annotations

from enum import IntEnum


class ClientState(IntEnum):
    STARTUP = 0  # reading the startup packet (SSL/GSS negotiation, cancel requests)
    AUTH = 1  # authentication exchange, then the first checkout
    IDLE = 2  # logged in, holding no server (transaction mode between transactions)
    WAITING = 3  # messages queued, a server being checked out and prepared for them
    ACTIVE = 4  # a server attached, bytes relayed both ways
    TERMINATING = 5  # Terminate received: answers the server sends unasked still go to the client
    CLOSED = 6
    CONSOLE = 7  # logged in to the admin console: answered by the proxy, no server (session/local.py)


S = ClientState
TRANSITIONS: dict[ClientState, frozenset[ClientState]] = {
    S.STARTUP: frozenset((S.AUTH, S.CLOSED)),
    S.AUTH: frozenset((S.ACTIVE, S.CONSOLE, S.CLOSED)),
    S.IDLE: frozenset((S.WAITING, S.ACTIVE, S.CLOSED)),
    S.WAITING: frozenset((S.ACTIVE, S.IDLE, S.CLOSED)),
    S.ACTIVE: frozenset((S.IDLE, S.TERMINATING, S.CLOSED)),
    S.TERMINATING: frozenset((S.CLOSED,)),
    S.CLOSED: frozenset(),
    S.CONSOLE: frozenset((S.CLOSED,)),
}
# bytes a client waiting for a server may send before it is no longer read (both hot paths)
WAIT_BUFFER = 256 * 1024
RELAYING = frozenset((S.IDLE, S.WAITING, S.ACTIVE))  # logged in, messages flowing
# what /metrics and the admin views call each state
STATE_NAMES = {S.STARTUP: "login", S.AUTH: "login", S.IDLE: "idle", S.WAITING: "waiting",
               S.ACTIVE: "active", S.TERMINATING: "active", S.CLOSED: "closed", S.CONSOLE: "console"}


class IllegalTransition(RuntimeError):
    pass


def advance(current: ClientState, new: ClientState) -> ClientState:
    """``new``, if the table allows moving there from ``current``."""
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"client state {current.name} -> {new.name}")
    return new
