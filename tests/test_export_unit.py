"""Export units, no PostgreSQL: the Prometheus collector (checked by promtool), the JSON API and the
small HTTP server, including what it does with hostile peers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.export.api import build_routes
from proxy.export.http import ExportServer, json_response
from proxy.export.metrics import build_registry, query_label
from proxy.hist import Hist
from proxy.protocol.records import ClientInfo, StatementEvent
from proxy.inspect.consumer import ApiList, Consumer, MetricRows
from proxy.inspect.inspector import Inspector
from proxy.inspect.pipeline import EventSink
from tests.support.tools import require

CLIENT = ClientInfo(1, "app", "alice", "web", "127.0.0.1:5000")
# label values straight from clients: quotes, backslashes, a newline, non-ASCII
ODD = ClientInfo(2, 'd"b\\x\ny', "bøb", "batch", "unix")
METRICS_CTYPE = "text/plain; version=0.0.4; charset=utf-8"


def settings(**kw):
    base = dict(enabled=True, queue_size=100, flush_interval_ms=10, slow_query_ms=500.0, max_fingerprints=5000,
                export_top_k=100, query_label_max=200, log_parameters=False, slow_log_rate=10.0,
                fingerprint_cache_size=100)
    base.update(kw)
    return SimpleNamespace(**base)


def event(query, dur=0.001, rows=1, sqlstate=None, client=CLIENT, tag="SELECT"):
    start = time.monotonic()
    return StatementEvent(client, query, 0, False, "", None, 42, start, start + dur, 0.0, tag, rows, sqlstate, False)


def workload(insp: Inspector) -> None:
    long_query = "select\n\t" + ",\n  ".join(f"c_{i}" for i in range(200)) + " from wide where x = 'é'"
    insp.process([
        event("select * from t where id = 1", dur=0.002),
        event("select * from t where id = 2", dur=0.004),
        event("insert into t values (1, 'x\"y')", dur=0.003, tag="INSERT"),
        event("update t set a = 1", dur=0.01, rows=3, tag="UPDATE"),
        event("delete from t where id = 9", dur=0.001, tag="DELETE"),
        event("select * from missing", dur=0.001, sqlstate="42P01", tag=""),
        event("vacuum t", dur=0.2, tag="VACUUM"),
        event(long_query, dur=0.02),
        event("selec broken 'secret'", dur=0.001, sqlstate="42601", tag=""),
        event("select 1", dur=0.6, client=ODD),
    ], now=time.monotonic())


from proxy.protocol.ledger import TRAFFIC  # noqa: E402

def registry_for(insp, ready=True):
    pool_wait = Hist()
    pool_wait.observe(0.0)
    pool_wait.observe(0.003)
    pools = [("app", "alice"), (ODD.db, ODD.user)]
    return build_registry(insp, client_counts=lambda: {"active": 1, "idle": 2, "waiting": 0, "login": 0},
                          server_counts=lambda: {("app", "alice"): {"active": 1, "idle": 3},
                                                 (ODD.db, ODD.user): {"connecting": 1}},
                          pool_waiting=lambda: {("app", "alice"): 0, (ODD.db, ODD.user): 2},
                          pool_wait_hists=lambda: {("app", "alice"): pool_wait, (ODD.db, ODD.user): Hist()},
                          pool_sizes=lambda: {p: 20 for p in pools},
                          server_connect_failures=lambda: {(ODD.db, ODD.user): 4},
                          clients_refused=lambda: {"max_client_conn": 3, "tls_required": 1},
                          client_auth_failures=lambda: 5, max_client_connections=lambda: 200,
                          traffic=lambda: {"app": dict.fromkeys(TRAFFIC + ("client_connect_count",), 2)},
                          ready=lambda: ready)


async def always_ready():
    return True


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fams, name):
    return [(s.name, s.labels, s.value) for f in fams.values() for s in f.samples if s.name == name]


def promtool_check(text: str) -> None:
    promtool = require("promtool")  # a skip here, a failure in CI
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


# ------------------------------------------------------------------ HTTP plumbing


async def raw_request(port: int, data: bytes, timeout: float = 15.0, eof: bool = False) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(data)
        await w.drain()
        if eof:
            w.write_eof()
    except ConnectionError:
        pass
    try:
        return await asyncio.wait_for(r.read(), timeout)
    except ConnectionError:
        return b""
    finally:
        w.close()


def parse(resp: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    assert int(headers["content-length"]) == len(body) or not body
    return status, headers, body


async def get(port: int, target: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return parse(await raw_request(port, f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))


def serve(routes, scenario, **kw):
    """Run ``scenario(server)`` against an ExportServer on an ephemeral port."""
    async def main():
        srv = ExportServer("127.0.0.1", 0, routes, **kw)
        await srv.start()
        assert srv.port > 0
        try:
            return await scenario(srv)
        finally:
            await srv.close()
    return asyncio.run(main())


# ------------------------------------------------------------------ tests


@pytest.mark.promtool
def test_metrics_endpoint_exposes_everything_and_passes_promtool():
    insp = Inspector(settings(), EventSink())
    insp.sink.dropped = 3
    workload(insp)
    routes = build_routes(insp, registry_for(insp), always_ready)

    async def scenario(srv):
        return await get(srv.port, "/metrics")

    status, headers, body = serve(routes, scenario)
    assert status == 200 and headers["content-type"] == METRICS_CTYPE
    text = body.decode()
    fams = families(text)
    for name in ("pgscope_statement_calls", "pgscope_statement_duration_seconds", "pgscope_statement_rows",
                 "pgscope_statement_errors", "pgscope_slow_statements", "pgscope_statement_info",
                 "pgscope_query_duration_seconds", "pgscope_client_connections", "pgscope_server_connections",
                 "pgscope_pool_waiting_clients", "pgscope_pool_wait_seconds", "pgscope_inspect_dropped",
                 "pgscope_inspect_events", "pgscope_inspect_fingerprints", "pgscope_inspect_evictions",
                 "process_cpu_seconds", "python_info"):
        assert name in fams, name
    assert fams["pgscope_statement_calls"].type == "counter"
    assert fams["pgscope_query_duration_seconds"].type == "histogram"
    calls = samples(fams, "pgscope_statement_calls_total")
    assert sum(v for _, _, v in calls) == 10
    sel = [lb for _, lb, v in calls if v == 2]
    assert sel and sel[0]["db"] == "app" and sel[0]["user"] == "alice"
    odd = [lb for _, lb, _ in calls if lb["user"] == "bøb"]
    assert odd and odd[0]["db"] == ODD.db  # escaped on the wire, intact after parsing
    assert samples(fams, "pgscope_slow_statements_total") and sum(
        v for _, _, v in samples(fams, "pgscope_slow_statements_total")) == 1
    assert sum(v for _, _, v in samples(fams, "pgscope_statement_errors_total")) == 2
    info = {lb["fingerprint"]: lb["query"] for _, lb, _ in samples(fams, "pgscope_statement_info")}
    assert "SELECT * FROM t WHERE id = $1" in info.values() or "select * from t where id = $1" in info.values()
    assert all(len(q) <= 200 and "\n" not in q and "\t" not in q and "  " not in q for q in info.values())
    assert not any("secret" in q for q in info.values())
    commands = {lb["command"] for _, lb, _ in samples(fams, "pgscope_query_duration_seconds_count")}
    assert commands == {"SELECT", "INSERT", "UPDATE", "DELETE", "OTHER"}
    # an error goes by its statement's keyword: the failed SELECT is a SELECT
    sel_count = [v for _, lb, v in samples(fams, "pgscope_query_duration_seconds_count")
                 if lb == {"db": "app", "command": "SELECT"}]
    assert sel_count == [4]  # two of t, the failed one, the wide one
    assert samples(fams, "pgscope_inspect_dropped_total")[0][2] == 3
    assert samples(fams, "pgscope_inspect_events_total")[0][2] == 10
    assert {(lb["db"], lb["user"]): v for _, lb, v in samples(fams, "pgscope_pool_wait_seconds_count")} == {
        ("app", "alice"): 2, (ODD.db, ODD.user): 0}
    assert {lb["state"] for _, lb, _ in samples(fams, "pgscope_client_connections")} == {
        "active", "idle", "waiting", "login"}
    # the process, its limits and what it refused
    from proxy import __version__
    assert samples(fams, "pgscope_build_info") == [("pgscope_build_info", {"version": __version__}, 1)]
    assert samples(fams, "pgscope_ready") == [("pgscope_ready", {}, 1)]
    assert samples(fams, "pgscope_max_client_connections")[0][2] == 200
    assert samples(fams, "pgscope_inspect_queue_capacity")[0][2] == insp.sink.maxsize == 10000
    assert {lb["db"]: v for _, lb, v in samples(fams, "pgscope_pool_size")} == {"app": 20, ODD.db: 20}
    assert {lb["db"]: v for _, lb, v in samples(fams, "pgscope_pool_waiting_clients")} == {"app": 0, ODD.db: 2}
    assert samples(fams, "pgscope_server_connect_failures_total") == [
        ("pgscope_server_connect_failures_total", {"db": ODD.db, "user": ODD.user}, 4)]
    assert {lb["reason"]: v for _, lb, v in samples(fams, "pgscope_clients_refused_total")} == {
        "max_client_conn": 3, "tls_required": 1}
    assert samples(fams, "pgscope_client_auth_failures_total")[0][2] == 5
    for name, kind in (("pgscope_build_info", "gauge"), ("pgscope_ready", "gauge"), ("pgscope_pool_size", "gauge"),
                       ("pgscope_clients_refused", "counter"), ("pgscope_pool_wait_seconds", "histogram"),
                       ("pgscope_server_connect_failures", "counter"), ("pgscope_inspect_queue_capacity", "gauge")):
        assert fams[name].type == kind, name
    promtool_check(text)
    not_ready = families(build_routes(insp, registry_for(insp, ready=False), always_ready)["/metrics"]({})[2].decode())
    assert samples(not_ready, "pgscope_ready") == [("pgscope_ready", {}, 0)]


@pytest.mark.promtool
def test_top_k_folds_the_rest_into_other_and_counters_never_decrease():
    insp = Inspector(settings(export_top_k=2, max_fingerprints=4), EventSink())
    registry = registry_for(insp)
    names = ["alpha", "beta", "gamma", "delta"]
    insp.process([event(f"select * from {n}", dur=0.01 * (i + 1)) for i, n in enumerate(names)],
                 now=time.monotonic())
    routes = build_routes(insp, registry, always_ready)

    def scrape():
        status, ctype, body = routes["/metrics"]({})
        assert status == 200 and ctype == METRICS_CTYPE
        text = body.decode()
        promtool_check(text)
        return {tuple(sorted(lb.items())): v for _, lb, v in samples(families(text), "pgscope_statement_calls_total")}

    first = scrape()
    own = [k for k in first if dict(k)["fingerprint"] != "_other"]
    assert len(own) == 2
    other = [v for k, v in first.items() if dict(k)["fingerprint"] == "_other"]
    assert other == [2]
    info_count = sum(1 for f in text_string_to_metric_families(routes["/metrics"]({})[2].decode())
                     for s in f.samples if s.name == "pgscope_statement_info")
    assert info_count == 2  # the query text only for exported fingerprints
    # more, costlier statements: everything scraped before gets evicted
    seen = dict(first)
    for round_ in range(5):
        insp.process([event(f"select * from r{round_}_{n}", dur=0.1 * (round_ + 1)) for n in names],
                     now=time.monotonic())
        now = scrape()
        for k, v in now.items():
            if k in seen:
                assert v >= seen[k], k
        assert sum(now.values()) == 4 + 4 * (round_ + 1)
        seen.update(now)
    assert insp.stats.evictions > 0


def test_statements_api():
    insp = Inspector(settings(), EventSink())
    workload(insp)
    routes = build_routes(insp, registry_for(insp), always_ready)

    async def scenario(srv):
        out = {}
        out["default"] = await get(srv.port, "/api/statements")
        out["calls"] = await get(srv.port, "/api/statements?order=calls&limit=1")
        out["mean"] = await get(srv.port, "/api/statements?order=mean_time&limit=2")
        for bad in ("order=nope", "limit=0", "limit=abc", "limit=100001", "order="):
            out[bad] = await get(srv.port, "/api/statements?" + bad)
        return out

    out = serve(routes, scenario)
    status, headers, body = out["default"]
    assert status == 200 and headers["content-type"].startswith("application/json")
    rows = json.loads(body)["statements"]
    assert len(rows) == 9
    assert set(rows[0]) == {"fingerprint", "query", "db", "user", "calls", "total_ms", "mean_ms", "min_ms", "max_ms",
                            "stddev_ms", "rows", "errors", "errors_by_class", "slow", "first_seen", "last_seen", "lock_wait_ms"}
    assert [r["total_ms"] for r in rows] == sorted((r["total_ms"] for r in rows), reverse=True)
    assert rows[0]["user"] == "bøb" and rows[0]["slow"] == 1
    assert abs(rows[0]["last_seen"] - time.time()) < 60
    top_calls = json.loads(out["calls"][2])["statements"]
    assert len(top_calls) == 1 and top_calls[0]["calls"] == 2 and top_calls[0]["query"].endswith("$1")
    means = json.loads(out["mean"][2])["statements"]
    assert [r["mean_ms"] for r in means] == [600.0, 200.0]
    for bad in ("order=nope", "limit=0", "limit=abc", "limit=100001", "order="):
        status, headers, body = out[bad]
        assert status == 400 and "error" in json.loads(body), bad


@pytest.mark.promtool
def test_statements_api_and_metrics_without_an_inspector():
    routes = build_routes(None, build_registry(None, client_counts=lambda: {"active": 0}), always_ready)
    status, ctype, body = routes["/api/statements"]({})
    assert status == 200 and json.loads(body) == {"statements": []}
    status, ctype, body = routes["/metrics"]({})
    fams = families(body.decode())
    assert "pgscope_client_connections" in fams and "pgscope_statement_calls" not in fams
    promtool_check(body.decode())


def test_health_ready_and_errors():
    state = {"ready": True}

    async def ready():
        return state["ready"]

    routes = build_routes(None, build_registry(None), ready)

    async def scenario(srv):
        out = {"health": await get(srv.port, "/healthz"), "ready": await get(srv.port, "/readyz")}
        state["ready"] = False
        out["notready"] = await get(srv.port, "/readyz")
        out["missing"] = await get(srv.port, "/nope")
        out["post"] = parse(await raw_request(srv.port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"))
        out["head"] = await get(srv.port, "/healthz", method="HEAD")
        return out

    out = serve(routes, scenario)
    assert out["health"][0] == 200 and out["health"][2] == b"ok\n"
    assert out["ready"][0] == 200 and out["ready"][2] == b"ready\n"
    assert out["notready"][0] == 503 and out["notready"][2] == b"not ready\n"
    assert out["missing"][0] == 404 and json.loads(out["missing"][2]) == {"error": "not found"}
    assert out["post"][0] == 405 and "error" in json.loads(out["post"][2])
    assert out["head"][0] == 200 and out["head"][2] == b"" and out["head"][1]["content-length"] == "3"
    assert out["health"][1]["connection"] == "close"


def test_routes_are_extensible_by_consumers():
    class Things(Consumer):
        def feed(self, ev, info, now):
            pass

        def api_lists(self):
            return [ApiList("/api/things", "things", lambda limit: [1, 2, 3][:limit]),
                    ApiList("/api/all", "all", lambda limit: [limit], takes_limit=False)]

    insp = Inspector(settings(), EventSink())
    insp.add_consumer(Things())
    routes = build_routes(insp, build_registry(insp), always_ready)
    assert {"/api/things", "/api/all", "/api/statements", "/metrics"} <= set(routes)

    # the server takes any handler: a coroutine function, or one answering (status, content type, body)
    async def slow_list(params):
        await asyncio.sleep(0)
        return {"items": [params.get("q")]}

    routes["/api/slow"] = slow_list
    routes["/api/tuple"] = lambda params: json_response({"ok": True}, 202)

    async def scenario(srv):
        return [await get(srv.port, path) for path in (
            "/api/things?limit=2", "/api/things?limit=0", "/api/all?limit=x", "/api/slow?q=a%20b&q=c", "/api/tuple")]

    things, bad_limit, whole, slow, tup = serve(routes, scenario)
    assert things[0] == 200 and json.loads(things[2]) == {"things": [1, 2]}
    assert bad_limit[0] == 400 and "limit" in json.loads(bad_limit[2])["error"]
    assert whole[0] == 200 and json.loads(whole[2]) == {"all": [None]}  # no limit: parameters ignored
    assert json.loads(slow[2]) == {"items": ["c"]}
    assert tup[0] == 202


def test_handler_exception_is_a_500_without_a_traceback():
    logged = []

    class Log:
        def error(self, event, **kw):
            logged.append((event, kw))

    def broken(params):
        raise RuntimeError("secret internals")

    async def broken_async(params):
        raise KeyError("more internals")

    routes = {"/boom": broken, "/aboom": broken_async, "/healthz": lambda p: (200, "text/plain", b"ok\n")}

    async def scenario(srv):
        return [await get(srv.port, "/boom"), await get(srv.port, "/aboom"), await get(srv.port, "/healthz")]

    boom, aboom, health = serve(routes, scenario, log=Log())
    for status, headers, body in (boom, aboom):
        assert status == 500 and json.loads(body) == {"error": "internal error"}
        assert b"internals" not in body and b"Traceback" not in body
    assert health[0] == 200
    assert [e for e, _ in logged] == ["http_handler_error", "http_handler_error"]


def test_server_survives_garbage_oversize_and_slow_peers():
    routes = {"/healthz": lambda p: (200, "text/plain", b"ok\n")}

    async def scenario(srv):
        out = {}
        out["garbage"] = await raw_request(srv.port, b"\x00\x01garbage\r\n\r\n")
        out["binary"] = await raw_request(srv.port, bytes(range(256)) * 4 + b"\r\n\r\n")
        out["no_version"] = await raw_request(srv.port, b"GET /healthz\r\n\r\n")
        out["huge"] = await raw_request(srv.port, b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
        out["half"] = await raw_request(srv.port, b"GET /healthz HTT", eof=True)
        # slowloris: a head that never ends is cut at the header timeout
        t0 = time.monotonic()
        out["slow"] = await raw_request(srv.port, b"GET /healthz HTTP/1.1\r\nX-Slow: 1\r\n")
        out["slow_took"] = time.monotonic() - t0
        out["after"] = await get(srv.port, "/healthz")
        return out

    out = serve(routes, scenario, header_timeout=0.3)
    assert parse(out["garbage"])[0] == 400
    assert parse(out["binary"])[0] == 400
    assert parse(out["no_version"])[0] == 400
    assert out["huge"] == b"" or parse(out["huge"])[0] == 431  # the peer may see a reset first
    assert parse(out["half"])[0] == 400
    assert parse(out["slow"])[0] == 408 and out["slow_took"] < 5
    assert out["after"][0] == 200


def test_oversize_header_gets_431():
    routes = {"/healthz": lambda p: (200, "text/plain", b"ok\n")}

    async def scenario(srv):
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 9000)  # over 8 KiB, no end in sight
        await w.drain()
        data = await asyncio.wait_for(r.read(), 15)
        w.close()
        return data, await get(srv.port, "/healthz")

    data, after = serve(routes, scenario)
    assert parse(data)[0] == 431 and after[0] == 200


def test_connection_cap_and_close_with_idle_peers():
    routes = {"/healthz": lambda p: (200, "text/plain", b"ok\n")}

    async def scenario(srv):
        idle = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(3)]
        await asyncio.sleep(0.05)
        refused = await get(srv.port, "/healthz")
        for _, w in idle:
            w.close()
        await asyncio.sleep(0.05)
        ok = await get(srv.port, "/healthz")
        # idle peers do not hold up close()
        more = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(2)]
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await srv.close()
        took = time.monotonic() - t0
        for _, w in more:
            w.close()
        return refused, ok, took

    refused, ok, took = serve(routes, scenario, max_connections=3)
    assert refused[0] == 503 and ok[0] == 200 and took < 2.5


def test_query_label_is_one_short_line():
    assert query_label("select\n  1,\t2\r\n", 200) == "select 1, 2"
    cut = query_label("select " + "x, " * 500, 200)
    assert len(cut) == 200 and cut.endswith("…")
    assert query_label("select 1", 8) == "select 1"


# ------------------------------------------------------------------ per-fingerprint consumer series


def test_fingerprint_fold_never_decreases_and_loses_nothing():
    import random

    from prometheus_client.core import CounterMetricFamily

    from proxy.export.metrics import FingerprintFold

    rng = random.Random(7)
    fold = FingerprintFold()
    counts: dict[tuple[str, str], float] = {}
    gone_total = 0.0
    prev: dict[tuple, float] = {}
    own_prev: set[tuple] = set()
    scraped: dict[tuple[str, str], float] = {}
    for _ in range(300):
        for _ in range(rng.randrange(5)):  # new counts, new fingerprints
            key = (f"fp{rng.randrange(12)}", rng.choice(["a", "b"]))
            counts[key] = counts.get(key, 0.0) + rng.randrange(1, 4)
        if counts and rng.random() < 0.05:  # the consumer forgets one: what a scrape saw of it stays
            key = rng.choice(sorted(counts))
            gone_total += scraped.get(key, 0.0)
            del counts[key]
        fam = CounterMetricFamily("pgscope_x", "x", labels=["fingerprint", "db"])
        for (fp, db), n in sorted(counts.items()):
            fam.add_metric([fp, db], n)
        kept = {f"fp{i}" for i in rng.sample(range(12), 3)}
        out = fold.fold(fam, lambda lb: lb["fingerprint"] in kept)
        now = {tuple(sorted(s.labels.items())): s.value for s in out.samples}
        assert all(s.name == "pgscope_x_total" for s in out.samples)
        assert {dict(k)["fingerprint"] for k in now} <= kept | {"_other"}
        # nothing is lost or counted twice
        assert sum(now.values()) == sum(counts.values()) + gone_total
        for k, v in now.items():
            if dict(k)["fingerprint"] == "_other" or k in own_prev:
                assert v >= prev.get(k, 0.0), k  # _other always, own series while they last
        own_prev = {k for k in now if dict(k)["fingerprint"] != "_other"}
        prev = now
        scraped = dict(counts)


class _LoopCounter(Consumer):
    """A consumer with per-fingerprint counters, as the N+1 detector and the EXPLAIN sampler have."""

    def __init__(self):
        self.counts: dict[tuple[str, str], int] = {}

    def feed(self, ev, info, now):
        if info is not None:
            key = (info.fingerprint, ev.client.db)
            self.counts[key] = self.counts.get(key, 0) + 1

    def metric_rows(self):
        return [MetricRows("pgscope_loop_things", "Per-fingerprint things.", "counter", ("fingerprint", "db"),
                           sorted(self.counts.items()))]


@pytest.mark.promtool
def test_consumer_fingerprint_series_are_capped_to_the_exported_statements():
    insp = Inspector(settings(export_top_k=2), EventSink())
    loops = _LoopCounter()
    insp.add_consumer(loops)
    routes = build_routes(insp, registry_for(insp), always_ready)
    insp.process([event("select * from big", dur=0.5), event("select * from bigger", dur=0.9)]
                 + [event(f"select * from small_{i}", dur=0.001) for i in range(30)], now=time.monotonic())

    def scrape():
        text = routes["/metrics"]({})[2].decode()
        fams = families(text)
        top = {lb["fingerprint"] for _, lb, _ in samples(fams, "pgscope_statement_calls_total")}
        mine = {lb["fingerprint"]: v for _, lb, v in samples(fams, "pgscope_loop_things_total")}
        return text, top, mine

    text, top, mine = scrape()
    assert set(mine) == top and len(mine) == 3  # the two exported fingerprints and _other
    assert mine["_other"] == 30 and sum(mine.values()) == 32
    promtool_check(text)
    # the small ones become the costliest: they take over the top-K, their past stays in _other
    insp.process([event(f"select * from small_{i}", dur=2.0) for i in range(2)], now=time.monotonic())
    _, top2, mine2 = scrape()
    assert set(mine2) == top2 and top2 != top
    assert mine2["_other"] >= mine["_other"] and sum(mine2.values()) == 34
    # promoted: their own series start at zero (what they had, the new call included, stays in _other)
    assert all(mine2[fp] == 0 for fp in top2 - {"_other"} if fp not in top)
    insp.process([event(f"select * from small_{i}", dur=2.0) for i in range(2)], now=time.monotonic())
    _, top3, mine3 = scrape()
    assert top3 == top2 and all(mine3[fp] == mine2[fp] + (fp not in top) for fp in top3 - {"_other"})
    assert mine3["_other"] == mine2["_other"]


def test_every_metric_and_api_field_of_the_installed_consumers_is_documented():
    """docs/metrics.md lists every pgscope metric family and every /api/* field (consumers as the proxy installs them)."""
    import re
    from pathlib import Path

    from proxy.config import load_settings
    from proxy.inspect.advisor import IndexAdvisor
    from proxy.inspect.explain import ExplainSampler
    from proxy.inspect.locks import LockTracker
    from proxy.inspect.nplusone import NPlusOneDetector

    full = load_settings(None, env={}, overrides={})
    insp = Inspector(full.inspect, EventSink())
    advisor = IndexAdvisor(full, insp.stats)
    insp.add_consumer(ExplainSampler(full, lambda db, user: None, advisor=advisor))
    nplusone = NPlusOneDetector(full)
    insp.add_consumer(nplusone)
    locks = LockTracker(full, fingerprinter=insp.fingerprinter)
    insp.add_consumer(locks)
    from proxy.inspect.findings_setup import add_findings

    add_findings(insp, full, insp.consumers[0], nplusone, locks)
    workload(insp)
    docs = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    text = build_routes(insp, registry_for(insp), always_ready)["/metrics"]({})[2].decode()
    names = [f.name for f in text_string_to_metric_families(text) if f.name.startswith("pgscope_")]
    assert "pgscope_lock_sample_errors" in names and "pgscope_inspect_errors" in names and "pgscope_findings" in names
    assert "pgscope_transactions" in names and "pgscope_client_bytes_sent" in names
    for name in names:
        assert re.search(r"`%s(_total)?[`{]" % name, docs), f"{name} is not in docs/metrics.md"
    cells = re.findall(r"^\| `([^|]+)` \|", docs, re.M)  # the first cell of each table row
    documented = {f.strip(" `") for cell in cells for f in cell.split(",")}
    for key in insp.statements("calls", 1)[0]:
        assert key in documented, f"/api/statements field {key} is not in docs/metrics.md"
