"""A cumulative-bucket histogram, cheap enough for the hot path.

Observing is a bisect and two additions; exporters read ``buckets``,
``counts`` (per bucket, not cumulative), ``sum`` and ``count`` at scrape time.
``Hist`` is the compiled twin (proxy/protocol/_core.pyx, which the pool's
checkout and the inspection statistics call in C) when the relay core is
compiled, else ``PyHist`` below, the reference.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from proxy.protocol.native import core as _core

# seconds; from 100 µs to 60 s
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)


class PyHist:
    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last slot is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le)
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def observe_many(self, values: list[float], total: float | None = None) -> None:
        """Observe every value of ``values`` (``total``: their sum, if known)."""
        n = len(values)
        counts = self.counts
        buckets = self.buckets
        if n <= 16:
            for v in values:
                counts[bisect_left(buckets, v)] += 1
        else:  # a sorted copy and one bisect per bound: per-value work stays in C
            ordered = sorted(values)
            prev = 0
            for i, bound in enumerate(buckets):
                k = bisect_right(ordered, bound)  # values <= bound (le)
                if k != prev:
                    counts[i] += k - prev
                    prev = k
                    if k == n:
                        break
            if prev != n:
                counts[-1] += n - prev
        self.sum += sum(values) if total is None else total
        self.count += n

    def cumulative(self) -> list[tuple[str, int]]:
        """[(le, cumulative count)] including "+Inf", as Prometheus wants."""
        out = []
        acc = 0
        for bound, c in zip(self.buckets, self.counts):
            acc += c
            out.append((repr(float(bound)), acc))
        acc += self.counts[-1]
        out.append(("+Inf", acc))
        return out


if _core is not None:
    class Hist(_core.Hist):  # type: ignore[name-defined]
        __slots__ = ()

        def __init__(self, buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
            super().__init__(buckets)
else:
    Hist = PyHist  # type: ignore[misc]
