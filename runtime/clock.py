"""Wall-clock time derived from trio's clock, so trio's MockClock moves it in tests."""

from __future__ import annotations

import time

import trio


class Clock:
    """``now()`` is Unix time that advances with ``trio.current_time()``. Create it inside ``trio.run``."""

    def __init__(self) -> None:
        self._offset = time.time() - trio.current_time()

    def now(self) -> float:
        """Seconds since the epoch, moving with trio's clock."""
        return self._offset + trio.current_time()

    @staticmethod
    def monotonic() -> float:
        """trio's monotonic clock (for deadlines and intervals)."""
        return trio.current_time()
