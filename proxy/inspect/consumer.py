"""The one interface of an inspection consumer (``Consumer``: every hook the pipeline, the exporter and
shutdown call) and the plain rows it hands to the exporter (``MetricRows``, ``ApiList``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping, Sequence

from proxy.hist import Hist

Wants = Literal["all", "slow", "in_transaction"]


@dataclass(frozen=True, slots=True)
class MetricRows:
    """One metric family as plain data: ``proxy.export.metrics`` makes the Prometheus family of it.

    ``rows`` pairs label values (in the order of ``labels``) with a number, or with a ``Hist`` for a
    histogram.  A counter's name has no ``_total`` suffix (the exposition adds it).
    """

    name: str
    help: str
    kind: Literal["counter", "gauge", "histogram"]
    labels: tuple[str, ...] = ()
    rows: Sequence[tuple[tuple[str, ...], float | Hist]] = ()


@dataclass(frozen=True, slots=True)
class ApiList:
    """One JSON list endpoint: GET ``path`` answers ``{key: rows(limit)}``.

    With ``takes_limit`` the endpoint takes ``?limit=`` (validated by the exporter, default 100);
    without, it answers the whole list, ``rows(None)``, whatever the parameters.  ``params`` names
    further query parameters passed to ``rows`` as keywords when given (``choices``: their allowed
    values; another value is answered 400).
    """

    path: str
    key: str
    rows: Callable[..., list[dict]]
    takes_limit: bool = True
    params: tuple[str, ...] = ()
    choices: Mapping[str, Sequence[str]] | None = None


class Consumer(ABC):
    """A consumer of the relay's records (statements, transaction-status changes, connects).

    The pipeline (``proxy.inspect.inspector``) feeds and ticks consumers, the exporter
    (``proxy.export``) reads their metric rows and API lists, and the proxy reconfigures and
    closes them: every hook any of them calls is declared here, with a default that does nothing.

    ``wants`` says which statement records ``feed`` is shown: "all", only the "slow" ones (slower
    than ``inspect.slow_query_ms``), or only those run "in_transaction" (inside a transaction
    block); the other records (``TransactionEvent``, ``ClientEvent``) always, with ``info`` None.
    A consumer with ``feeds_batches`` (and ``wants = "all"``) gets a slice's statements at once
    through ``feed_batch``, then its other records through ``feed``.
    """

    wants: ClassVar[Wants] = "all"
    feeds_batches: ClassVar[bool] = False

    @abstractmethod
    def feed(self, event: Any, info: Any, now: float) -> None:
        """One record, with its ``StatementInfo`` (None for a record that is not a statement)."""

    def feed_batch(self, events: list[Any], infos: list[Any], groups: dict[tuple[int, int], list[int]],
                   now: float) -> None:
        """A slice's statement records at once (when ``feeds_batches``): ``groups`` maps
        (id of the StatementInfo, id of the ClientInfo) to the indexes of the records, in order."""
        for ev, info in zip(events, infos):
            self.feed(ev, info, now)

    def tick(self, now: float) -> None:
        """Called after each periodic drain of the queue (``inspect.flush_interval_ms``); must not block."""

    def reconfigure(self, settings: Any) -> None:
        """New settings (SIGHUP): the whole Settings object, or the [inspect] section alone."""

    async def close(self) -> None:
        """Shutdown: stop background work and close side connections."""

    def metric_rows(self) -> Iterable[MetricRows]:
        """The consumer's metric families, read at scrape time."""
        return ()

    def api_lists(self) -> Iterable[ApiList]:
        """The consumer's JSON endpoints."""
        return ()


def api_lists(inspector: Any) -> dict[str, ApiList]:
    """Every consumer's list endpoints by key ("explains", "bursts", ...): what the JSON API serves
    and the admin console's SHOW commands read (``inspector``: None when inspection is off)."""
    if inspector is None:
        return {}
    return {api.key: api for c in inspector.consumers for api in c.api_lists()}


def inspect_settings(settings: Any) -> Any:
    """The [inspect] section of ``settings``, which may be the whole Settings or that section."""
    return settings.inspect if hasattr(settings, "inspect") else settings
