"""A token bucket (the caller passes the time): what the slow-statement log and the EXPLAIN sampler
use to do at most so many things per second."""

from __future__ import annotations


class TokenBucket:
    """``take(now, rate, burst)``: whether one more thing may happen now.

    The bucket refills at ``rate`` tokens per second up to ``burst`` tokens (both passed on each
    call, so a reload applies at once); each thing that happens takes one.  It starts with
    ``tokens``; the first call only starts the clock.
    """

    __slots__ = ("tokens", "at")

    def __init__(self, tokens: float) -> None:
        self.tokens = float(tokens)
        self.at: float | None = None  # when tokens was last brought up to date

    def take(self, now: float, rate: float, burst: float) -> bool:
        if self.at is None:
            self.at = now
        self.tokens = min(burst, self.tokens + max(now - self.at, 0.0) * rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True
