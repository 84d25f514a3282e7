"""The bounded hand-off between the relay and the inspection consumers."""

from __future__ import annotations

from collections import deque
from typing import Any


class EventSink:
    """A bounded FIFO the relay appends to without ever waiting.

    ``emit`` is the only method the relay calls: an append, or a counted drop
    when the queue is full.  A consumer drains it in batches with ``drain``.
    """

    __slots__ = ("_q", "maxsize", "dropped", "_append")

    def __init__(self, maxsize: int = 10000) -> None:
        self._q: deque[Any] = deque()
        self._append = self._q.append
        self.maxsize = maxsize
        self.dropped = 0

    def emit(self, event: Any) -> None:
        if len(self._q) < self.maxsize:
            self._append(event)
        else:
            self.dropped += 1

    def drain(self, limit: int = 1 << 30) -> list[Any]:
        q = self._q
        if limit >= len(q):
            out = list(q)
            q.clear()
            return out
        popleft = q.popleft
        return [popleft() for _ in range(limit)]

    def __len__(self) -> int:
        return len(self._q)
