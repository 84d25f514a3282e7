"""The bounded hand-off between the relay and the inspection consumers.

``EventSink`` is the compiled twin from proxy/protocol/_core.pyx when it is
built (proxy.protocol.native), else ``PyEventSink`` below, the reference.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from proxy.protocol.native import core as _core


class PyEventSink:
    """A bounded FIFO the relay appends to without ever waiting.

    ``emit`` is the only method the relay calls: an append, or a counted drop
    when the queue is full.  A consumer drains it in batches with ``drain``.
    ``on_batch``, when set, is called (on the relay's stack, so it must only
    schedule work) each time the queue reaches ``batch`` records: the consumer
    can then process them while they are still in the CPU caches, in a small
    slice, instead of a large cold batch at its next periodic drain.
    """

    __slots__ = ("_q", "maxsize", "dropped", "_append", "_kick_at", "on_batch")

    def __init__(self, maxsize: int = 10000) -> None:
        self._q: deque[Any] = deque()
        self._append = self._q.append
        self.maxsize = maxsize
        self.dropped = 0
        self._kick_at = -1  # queue length that triggers on_batch (-1: never)
        self.on_batch: Callable[[], None] | None = None

    def set_batch_callback(self, batch: int, callback: Callable[[], None] | None) -> None:
        self.on_batch = callback
        self._kick_at = batch - 1 if callback is not None and batch > 0 else -1

    def emit(self, event: Any) -> None:
        q = self._q
        n = len(q)
        if n < self.maxsize:
            self._append(event)
            if n == self._kick_at:
                self.on_batch()  # type: ignore[misc]
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


EventSink = _core.EventSink if _core is not None else PyEventSink
