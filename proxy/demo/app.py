"""The demo's sample shop: six clients in threads with psycopg, each showing one part of the inspection."""

from __future__ import annotations

import random
import threading
import time
import uuid
from typing import Any, Callable

from proxy.demo.schema import (
    APPS, CUSTOMERS, LOCKED_CUSTOMER, MIGRATION_DDL, MIGRATION_DROP, ORDERS, Q_CUSTOMER, Q_CUSTOMER_EMAIL,
    Q_EXPORT_ORDERS, Q_LATEST_ORDERS, Q_LOCK_CUSTOMER, Q_ORDER, Q_ORDER_HISTORY, Q_ORDER_PAGE, Q_PAY_ORDER,
    Q_RECENT_ORDERS, Q_RESET_PROMOS, Q_SALES_BY_STATUS, Q_SEARCH, Q_SIGNUP, Q_TOUCH_CUSTOMER,
)


class ShopApp:
    """Nine clients, each in its own thread with its own psycopg connection through the proxy."""

    def __init__(self, dsn: str, duration: float, seed: int = 7) -> None:
        self.dsn = dsn
        self.duration = duration
        self.stop = threading.Event()  # abort (Ctrl-C): every wait returns at once
        self.deadline = 0.0
        self.counts: dict[str, dict[str, int]] = {a: {"statements": 0, "errors": 0} for a in APPS}
        self.failures: list[str] = []
        self.seed = seed
        self._lock_taken = threading.Semaphore(0)
        self._mutex = threading.Lock()

    # -- helpers
    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.deadline

    def pause(self, seconds: float) -> None:
        """Wait, but not past the end of the run (nor at all once stopped)."""
        self.stop.wait(max(0.0, min(seconds, self.deadline - time.monotonic())))

    def hold(self, seconds: float) -> None:
        """Wait the whole time, even past the end of the run (a transaction finishes its work)."""
        self.stop.wait(seconds)

    def connect(self, app: str, autocommit: bool = True) -> Any:
        import psycopg

        return psycopg.connect(self.dsn, application_name=app, autocommit=autocommit, connect_timeout=15)

    def _count(self, app: str, statements: int = 1, errors: int = 0) -> None:
        with self._mutex:
            self.counts[app]["statements"] += statements
            self.counts[app]["errors"] += errors

    # -- the run
    def run(self) -> dict[str, dict[str, int]]:
        """Run every client until the deadline (or stop); blocking: call it from a worker thread."""
        self.deadline = time.monotonic() + self.duration
        clients: list[tuple[str, Callable[[], None]]] = [
            ("reports", self.reports), ("storefront", self.storefront), ("checkout", self.checkout),
            ("billing", self.billing), ("signup", self.signup), ("api", self.api), ("search", self.search),
            ("dashboard", self.dashboard), ("migration", self.migration)]
        threads = [threading.Thread(target=self._guard, args=(name, fn), name=f"demo-{name}", daemon=True)
                   for name, fn in clients]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
        return self.counts

    def _guard(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported, the other clients go on
            if not self.stop.is_set():
                self.failures.append(f"{name}: {type(e).__name__}: {str(e).strip()}")

    # -- the clients
    def reports(self) -> None:
        """Order history by customer: a sequential scan on every call (no index on orders.customer_id); now and
        then an export of two months of orders without a LIMIT (unbounded_select) and a promo reset without a
        WHERE (no_where)."""
        rng = random.Random(self.seed)
        with self.connect("reports") as c:
            n = 0
            while self.running():
                c.execute(Q_ORDER_HISTORY, (rng.randint(1, CUSTOMERS),)).fetchall()
                n += 1
                if n % 8 == 1:
                    c.execute(Q_SALES_BY_STATUS).fetchall()
                    c.execute(Q_EXPORT_ORDERS).fetchall()
                    c.execute(Q_RESET_PROMOS)
                    self._count("reports", 3)
                self._count("reports")
                self.pause(0.1)

    def storefront(self) -> None:
        """A page of recent orders, then each order's customer loaded one by one: the N+1; and the order
        archive paged with OFFSET (deep_offset)."""
        with self.connect("storefront") as c:
            page = 100
            while self.running():
                rows = c.execute(Q_RECENT_ORDERS, ("paid",)).fetchall()
                for _, customer_id, _ in rows:
                    c.execute(Q_CUSTOMER, (customer_id,)).fetchone()
                page += 1
                c.execute(Q_ORDER_PAGE, (page * 20,)).fetchall()
                self._count("storefront", 2 + len(rows))
                self.pause(1.3)  # longer than inspect.nplusone_window_ms: one page, one burst

    def checkout(self) -> None:
        """Locks a customer row, then 'calls the payment provider' for 1.5 s before committing."""
        rng = random.Random(self.seed + 1)
        with self.connect("checkout") as c:
            while self.running():
                with c.transaction():
                    c.execute(Q_LOCK_CUSTOMER, (LOCKED_CUSTOMER,)).fetchone()
                    self._lock_taken.release()
                    self.hold(1.5)
                    c.execute(Q_PAY_ORDER, (rng.randint(1, ORDERS),))
                self._count("checkout", 4)
                self.pause(3.0)

    def billing(self) -> None:
        """Updates the customer checkout has locked: waits until checkout commits."""
        with self.connect("billing") as c:
            while self.running():
                if not self._lock_taken.acquire(timeout=0.1):
                    continue
                self.hold(0.2)
                if self.stop.is_set():
                    return
                c.execute(Q_TOUCH_CUSTOMER, (LOCKED_CUSTOMER,))
                self._count("billing")

    def signup(self) -> None:
        """New customers sign up; returning ones try again with their email: unique violations."""
        import psycopg

        rng = random.Random(self.seed + 2)
        tag = uuid.uuid4().hex[:8]
        with self.connect("signup") as c:
            n = 0
            while self.running():
                n += 1
                c.execute(Q_SIGNUP, (f"newcomer {n}", f"new{n}-{tag}@example.com", "Oslo"))
                self._count("signup")
                try:
                    c.execute(Q_SIGNUP, ("returning", f"c{rng.randint(1, CUSTOMERS)}@example.com", "Lima"))
                except psycopg.errors.UniqueViolation:
                    self._count("signup", errors=1)
                self.pause(0.4)

    def api(self) -> None:
        """Orders looked up one at a time from the ids it is handed, as named prepared statements (mapped by the
        proxy across pooled servers): a loop."""
        rng = random.Random(self.seed + 3)
        with self.connect("api") as c:
            while self.running():
                row = c.execute(Q_ORDER, (rng.randint(1, ORDERS),), prepare=True).fetchone()
                c.execute(Q_CUSTOMER_EMAIL, (row[1],), prepare=True).fetchone()
                self._count("api", 2)
                self.pause(0.01)

    def search(self) -> None:
        """Customer search by the end of an email address: ILIKE '%…', a sequential scan (leading_wildcard)."""
        rng = random.Random(self.seed + 4)
        with self.connect("search") as c:
            while self.running():
                c.execute(Q_SEARCH, (f"%{rng.randint(1, 999)}@example.com",)).fetchone()
                self._count("search")
                self.pause(0.5)

    def dashboard(self) -> None:
        """The latest 20,000 orders, served by orders_created_at_idx until the migration drops it (plan_change)."""
        with self.connect("dashboard") as c:
            while self.running():
                c.execute(Q_LATEST_ORDERS).fetchall()
                self._count("dashboard")
                self.pause(0.1)

    def migration(self) -> None:
        """A deploy a quarter into the run: CREATE INDEX without CONCURRENTLY in a transaction that stays open a
        second (signup and billing wait: blocking_ddl), then DROP INDEX of one the dashboard still needs."""
        self.pause(self.duration / 4)
        if not self.running():
            return
        with self.connect("migration", autocommit=False) as c:
            with c.transaction():
                c.execute(MIGRATION_DDL)
                self.hold(1.0)  # the rest of the migration
            c.execute(MIGRATION_DROP)
            c.commit()
        self._count("migration", 4)
