"""The ``/api/databases`` route: the rows of proxy.pool.databases as JSON."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from proxy.export.http import json_response
from proxy.pool.databases import database_rows


def databases_route(settings: Callable[[], Any], pools: Any, sessions: Iterable[Any]) -> Callable[[dict], Any]:
    """The ``/api/databases`` handler: ``{"databases": database_rows(...)}``."""
    return lambda _params: json_response({"databases": database_rows(settings(), pools.all_pools(), sessions)})
