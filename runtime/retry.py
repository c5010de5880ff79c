"""When to try again: one retry policy for every supervisor that retries, and one Retry-After parser.

Outbound sends, CRM jobs and LLM calls all back off the same way: an exponential ceiling
(``base × 2^(retry-1)``, at most ``cap``), a jittered delay below it so that many callers failing
together do not retry together, a server's Retry-After honoured (the delay is at least that long)
when it fits ``retry_after_budget``, and a give-up once ``attempts`` or the time ``budget`` would be
exceeded. The policy is a frozen value; the caller owns the loop, the sleeping and the logging.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from typing import Mapping

import attrs

__all__ = ["RetryPolicy", "parse_retry_after"]

_JITTER = random.Random()   # the default source of jitter (tests pass a seeded one)


def _non_negative(instance: object, attribute: attrs.Attribute, value: float) -> None:  # type: ignore[type-arg]
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be 0 or more, got {value!r}")


@attrs.frozen
class RetryPolicy:
    """How many attempts, how long between them, and how long in all.

    ``attempts`` counts every attempt, the first included (None: only ``budget`` limits them).
    ``budget`` is in seconds since the first attempt: no retry starts whose delay would end past
    it. A Retry-After longer than ``retry_after_budget`` gives up at once (None: it is honoured up
    to ``cap``, like any delay).
    """

    attempts: int | None = None
    base: float = attrs.field(default=1.0, validator=_non_negative)
    cap: float = attrs.field(default=30.0, validator=_non_negative)
    jitter: float = attrs.field(default=0.5, validator=attrs.validators.and_(_non_negative, attrs.validators.le(1.0)))
    budget: float = attrs.field(default=math.inf, validator=_non_negative)
    retry_after_budget: float | None = None

    def __attrs_post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"attempts must be at least 1 (or None), got {self.attempts!r}")

    def backoff(self, retry: int, rng: random.Random = _JITTER) -> float:
        """The jittered exponential delay before retry number ``retry`` (1-based), Retry-After aside."""
        ceiling = min(self.cap, self.base * 2 ** min(retry - 1, 64))
        return ceiling * rng.uniform(1.0 - self.jitter, 1.0)

    def delay(self, retry: int, *, elapsed: float, rng: random.Random = _JITTER,
              retry_after: float | None = None) -> float | None:
        """Seconds to wait before retry number ``retry`` (1-based: after the first failed attempt),
        or None to give up. ``elapsed``: seconds since the first attempt started."""
        if self.attempts is not None and retry >= self.attempts:
            return None
        if retry_after is not None and self.retry_after_budget is not None and retry_after > self.retry_after_budget:
            return None
        delay = self.backoff(retry, rng)
        if retry_after is not None:
            delay = max(delay, retry_after)
        delay = min(delay, self.cap)
        if elapsed + delay > self.budget:
            return None
        return delay


def parse_retry_after(headers: Mapping[str, str] | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date); None if
    absent or unreadable. ``headers`` should be case-insensitive (httpx's are)."""
    if not headers:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return _finite(float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    raw = raw.strip()
    try:
        return _finite(float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _finite(seconds: float) -> float | None:
    """A usable number of seconds (negative is 0), or None for NaN and infinities."""
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)
