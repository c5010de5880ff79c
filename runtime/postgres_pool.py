"""psycopg_pool's ``ConnectionPool`` with its reconnect backoff capped.

After a connection breaks, the pool reconnects in the background with exponential backoff: 1 s,
then 2, 4, 8, 16 s and so on, uncapped until ``reconnect_timeout`` (5 minutes). A database that is
down for 40 s was then back for another 21-25 s before the store served again (bench/db_outage.py),
up to a whole outage's length more for longer ones: webhooks kept answering 503 while the database
was fine. Capping each wait at ``RECONNECT_MAX_DELAY`` bounds that lag to about that long, for one
failed connection attempt every few seconds per pool while the database is down.

psycopg_pool offers no setting for the cap; ``_add_connection`` is the one place that creates the
reconnect attempt (pinned psycopg-pool 3.3; tests/test_postgres_store.py checks the lag).
"""

from __future__ import annotations

from typing import Any

from psycopg_pool import ConnectionPool
from psycopg_pool.base import AttemptWithBackoff

RECONNECT_MAX_DELAY = 2.0   # seconds between reconnect attempts at most


class CappedAttempt(AttemptWithBackoff):
    """A reconnect attempt whose waits double from 1 s up to ``RECONNECT_MAX_DELAY``."""

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, RECONNECT_MAX_DELAY)


class Pool(ConnectionPool):  # type: ignore[type-arg]
    """A ``ConnectionPool`` whose background reconnects use ``CappedAttempt``."""

    def _add_connection(self, attempt: Any, growing: bool = False) -> None:
        super()._add_connection(attempt or CappedAttempt(timeout=self.reconnect_timeout), growing=growing)
