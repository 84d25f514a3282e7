"""HTTP routes (a plain dict path -> handler, see ``proxy.export.http``): Prometheus exposition, health,
readiness, ``/api/statements`` and one JSON list endpoint per ``ApiList`` an inspection consumer declares."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from prometheus_client.exposition import generate_latest

from proxy.export.http import json_response
from proxy.inspect.consumer import ApiList, api_lists

MAX_LIMIT = 10000
# The classic text format (what generate_latest writes); prometheus-client's
# CONTENT_TYPE_LATEST names version 1.0.0 in recent releases.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TEXT = "text/plain; charset=utf-8"


def int_param(params: dict[str, str], name: str, default: int, lo: int = 1, hi: int = MAX_LIMIT) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}")
    return v


def list_route(key: str, rows: Callable[..., list], names: tuple[str, ...] = (),
               choices: Any = None) -> Callable[[dict[str, str]], tuple[int, str, bytes]]:
    """GET handler for ``{key: rows(limit, **named)}`` with a validated ``limit`` parameter and the
    parameters ``names`` (checked against ``choices[name]`` when given)."""
    def handler(params: dict[str, str]) -> tuple[int, str, bytes]:
        try:
            limit = int_param(params, "limit", 100)
        except ValueError as e:
            return json_response({"error": str(e)}, 400)
        named = {n: params[n] for n in names if n in params}
        for n, v in named.items():
            allowed = (choices or {}).get(n)
            if allowed is not None and v not in allowed:
                return json_response({"error": f"{n} must be one of {', '.join(allowed)}"}, 400)
        return json_response({key: rows(limit, **named)})
    return handler


def api_list_route(api: ApiList) -> Callable[[dict[str, str]], tuple[int, str, bytes]]:
    """The GET handler of a consumer's list endpoint."""
    if api.takes_limit:
        return list_route(api.key, api.rows, api.params, api.choices)
    return lambda _params: json_response({api.key: api.rows(None)})


def build_routes(inspector: Any, registry: Any, ready: Callable[[], Awaitable[bool]]) -> dict[str, Any]:
    """``/metrics``, ``/healthz``, ``/readyz``, ``/api/statements`` and every consumer's ``api_lists()``."""

    def metrics(_params: dict[str, str]) -> tuple[int, str, bytes]:
        return 200, METRICS_CONTENT_TYPE, generate_latest(registry)

    def healthz(_params: dict[str, str]) -> tuple[int, str, bytes]:
        return 200, TEXT, b"ok\n"

    async def readyz(_params: dict[str, str]) -> tuple[int, str, bytes]:
        if await ready():
            return 200, TEXT, b"ready\n"
        return 503, TEXT, b"not ready\n"

    def statements(params: dict[str, str]) -> tuple[int, str, bytes]:
        order = params.get("order", "total_time")
        try:
            limit = int_param(params, "limit", 50)
            rows = inspector.statements(order, limit) if inspector is not None else []
        except ValueError as e:
            return json_response({"error": str(e)}, 400)
        return json_response({"statements": rows})

    routes: dict[str, Any] = {"/metrics": metrics, "/healthz": healthz, "/readyz": readyz,
                              "/api/statements": statements}
    for api in api_lists(inspector).values():
        routes[api.path] = api_list_route(api)
    return routes
