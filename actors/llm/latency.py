"""One provider's answer latencies: percentiles over a ring of recent answers, and its slowest latest ones.

Only successful calls are recorded (a failure's duration says nothing about how fast the provider
answers). The stall detector reads the p95 on every admission, so it is cached and recomputed only
while the ring is small or every ``_P95_EVERY`` answers after that.
"""

from __future__ import annotations

import collections
import math
from typing import Sequence

RECENT_ANSWERS = 16   # how many latest answers ``slowest_recent_ms`` covers
_P95_EVERY = 64


def percentile(ordered: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence; None when empty."""
    if not ordered:
        return None
    return round(ordered[max(0, math.ceil(pct / 100.0 * len(ordered)) - 1)], 3)


class LatencyStats:
    """The latencies (ms) of the last ``window`` answers and of the last RECENT_ANSWERS."""

    def __init__(self, window: int) -> None:
        self._window: collections.deque[float] = collections.deque(maxlen=window)
        self._recent: collections.deque[float] = collections.deque(maxlen=RECENT_ANSWERS)
        self._recorded = 0
        self._p95: float | None = None   # cached; None: recompute

    def __bool__(self) -> bool:
        """Something is known of this provider's latency."""
        return bool(self._window)

    def record(self, seconds: float) -> None:
        self._window.append(seconds * 1000.0)
        self._recent.append(seconds * 1000.0)
        self._recorded += 1
        if len(self._window) < _P95_EVERY or self._recorded % _P95_EVERY == 0:
            self._p95 = None   # recomputed from the ring at the next read

    def p95_ms(self) -> float:
        """The (cached) p95 of the ring; 0 when nothing was recorded yet."""
        if self._p95 is None:
            self._p95 = percentile(sorted(self._window), 95) or 0.0
        return self._p95

    def slowest_recent_ms(self) -> float:
        """The slowest of the last RECENT_ANSWERS answers; 0 when nothing was recorded yet."""
        return max(self._recent, default=0.0)

    def percentiles(self, *pcts: float) -> tuple[float | None, ...]:
        """Fresh (uncached) percentiles of the ring, one sort for all."""
        ordered = sorted(self._window)
        return tuple(percentile(ordered, pct) for pct in pcts)
