"""PgBouncer's averages (proxy/admin/stats.py), on numbers worked out by hand: the window starts
at the copy before the last, the three times are means over the same change."""

from __future__ import annotations

from proxy.admin.stats import COUNTS, StatsWindow


def _counts(**kw: float) -> dict[str, float]:
    return {**dict.fromkeys(COUNTS, 0), **kw}


def test_averages_start_at_the_copy_before_the_last():
    w = StatsWindow(now=100.0)  # until the first copies: since a second before start
    cur = {"db": _counts(xact_count=30, xact_time=3000, bytes_received=600)}
    avg = w.of("db", cur["db"], now=102.0)
    assert (avg["xact_count"], avg["xact_time"], avg["bytes_received"]) == (10, 100, 200)
    w.refresh(cur, now=160.0)  # first period: the copy before it is the empty start
    cur2 = {"db": _counts(xact_count=90, xact_time=4200, server_assignment_count=4, wait_time=2000)}
    assert w.of("db", cur2["db"], now=199.0)["xact_count"] == 1  # (90 - 0) / (199 - 100) rounds to 1
    w.refresh(cur2, now=220.0)  # now the averages start at the copy taken at 160
    cur3 = {"db": _counts(xact_count=150, xact_time=4800, server_assignment_count=4, wait_time=2000)}
    avg = w.of("db", cur3["db"], now=220.0)
    assert avg["xact_count"] == 2  # (150 - 30) / 60
    assert avg["xact_time"] == 15  # (4800 - 3000) / (150 - 30): a mean, not a rate
    assert avg["wait_time"] == 500 and avg["server_assignment_count"] == 0  # (2000 - 0) / 4 checkouts; 4 / 60
    total, overall = w.overall({**cur3, "other": _counts(xact_count=60)}, now=220.0)
    assert total["xact_count"] == 210 and overall["xact_count"] == 3  # (210 - 30) / 60
    # a count that went down (a pool removed by a reload): no negative average
    assert w.of("db", _counts(), now=230.0)["xact_count"] == 0


def test_a_fault_while_copying_is_logged_and_the_next_period_tries_again():
    import asyncio
    from types import SimpleNamespace

    from proxy.admin.stats import keep

    calls, logged = [], []
    log = SimpleNamespace(info=lambda event, **kw: logged.append((event, kw)),
                          error=lambda event, **kw: logged.append((event, kw)))

    def current():
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("xact_count")
        return {"db": _counts(xact_count=5)}

    async def run():
        w = StatsWindow(now=0.0)
        task = asyncio.ensure_future(keep(w, current, lambda: SimpleNamespace(stats_period=0.01, log_stats=True), log))
        while len(calls) < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        return w

    w = asyncio.run(run())
    assert logged[0] == ("stats_failed", {"error": "KeyError"}), logged
    assert w.newer == {"db": _counts(xact_count=5)} and logged[1][0] == "stats"  # the next period went on
