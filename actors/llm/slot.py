"""One provider as the chain sees it: its concurrency limiter, its health and its counters.

The health is three named parts: a circuit breaker (circuit.py), a stall detector (stall.py) that
opens the breaker when the provider stops answering, and the latency statistics (latency.py) the
stall limit follows. The slot composes them and keeps the counters ``ProviderStatistics`` shows.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import attrs
import trio

from .base import ErrorKind, Provider, ProviderError
from .circuit import Admission, CircuitBreaker
from .latency import LatencyStats
from .stall import StallDetector

log = logging.getLogger(__name__)
LATENCY_WINDOW = 512   # recent successful calls the latency percentiles are taken over


@attrs.frozen
class ProviderStatistics:
    """One provider's health. ``configured``: its settings are complete (e.g. it has its key);
    ``available``: configured and its circuit lets a call through now. Latencies are of successful
    calls, from a ring of the most recent ones."""

    name: str
    configured: bool
    available: bool
    circuit: str
    reopens_in_seconds: float | None
    in_flight: int
    waiting: int
    concurrency: int    # the bound now: its own, plus that of every earlier provider whose circuit is not closed
    stall_after_seconds: float | None
    stalls: int
    calls: int
    successes: int
    failures: dict[str, int]
    last_error: str | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    prompt_cache: dict[str, Any] | None = None   # the provider's CacheUsage (prompt_cache.py), when it reports one


class ProviderSlot:
    """A provider with its limiter, circuit breaker, stall detector, latencies and counters.

    One per provider account (actors/llm/accounts.py): every chain on that account shares it.
    ``name`` is what logs and statistics call it (default: the provider's name)."""

    def __init__(self, provider: Provider, *, concurrency: int, threshold: int, cooldown: float,
                 latency_window: int = LATENCY_WINDOW, stall_seconds: float, timeout: float,
                 name: str | None = None) -> None:
        self.provider = provider
        self.name = name or provider.name
        self.concurrency = concurrency
        self.limiter = trio.CapacityLimiter(concurrency)
        self.breaker = CircuitBreaker(self.name, threshold=threshold, cooldown=cooldown)
        self.latencies = LatencyStats(latency_window)
        self.stall = StallDetector(self.latencies, threshold=threshold, floor=stall_seconds, timeout=timeout)
        self.calls = 0
        self.successes = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.last_error: str | None = None

    def admit(self, now: float) -> Admission:
        """Whether a call may go to this provider now (a stall seen now opens the circuit first)."""
        stall = self.stall.check(now, watching=self.breaker.closed)
        if stall is not None:
            self.breaker.trip(now)
            self.failures[ErrorKind.TIMEOUT.value] += stall.in_flight
            self.last_error = f"stalled: {stall.stalled} calls without an answer for over {stall.limit:g}s"
            log.warning("LLM provider %s: circuit open for %gs: %d calls without an answer for over %gs; "
                        "moving its %d calls in flight to the fallback", self.name, self.breaker.cooldown,
                        stall.stalled, stall.limit, stall.in_flight)
        return self.breaker.admit(now)

    def begin(self, now: float, scope: trio.CancelScope) -> int:
        """A call starts (``scope`` is cancelled on a stall); returns its id for ``end``."""
        self.calls += 1
        return self.stall.begin(now, scope)

    def end(self, call: int, now: float, *, completed: bool) -> None:
        self.stall.end(call, now, completed=completed)

    def size_bound(self, shares: int) -> None:
        """Bound the calls in flight to ``shares`` x the configured concurrency (raising it wakes
        waiters; lowering it lets the calls in flight finish)."""
        tokens = shares * self.concurrency
        if self.limiter.total_tokens != tokens:
            self.limiter.total_tokens = tokens

    def record_success(self, latency: float) -> None:
        self.breaker.record_success()
        self.successes += 1
        self.latencies.record(latency)

    def record_failure(self, error: ProviderError, now: float, *, probe: bool) -> None:
        self.failures[error.kind.value] += 1
        self.last_error = str(error)
        if error.per_request:
            # This request's own fault (e.g. its context is too long): no verdict on the provider, so
            # it neither counts towards opening the circuit nor closes it; a probe lets the next one try.
            if probe:
                self.breaker.release_probe()
            return
        self.breaker.record_failure(now, probe=probe, at_once=error.kind is ErrorKind.AUTH, reason=error)

    def statistics(self, now: float) -> ProviderStatistics:
        state = self.breaker.state(now)
        configured = self.provider.available
        p50, p95 = self.latencies.percentiles(50, 95)
        return ProviderStatistics(
            name=self.name,
            configured=configured,
            available=configured and self.breaker.admits_a_call(now),
            circuit=state,
            reopens_in_seconds=self.breaker.reopens_in(now),
            in_flight=self.stall.in_flight,
            waiting=self.limiter.statistics().tasks_waiting,
            concurrency=int(self.limiter.total_tokens),
            stall_after_seconds=self.stall.limit(),
            stalls=self.stall.stalls,
            calls=self.calls,
            successes=self.successes,
            failures=dict(self.failures),
            last_error=self.last_error,
            latency_p50_ms=p50,
            latency_p95_ms=p95,
            prompt_cache=usage.snapshot() if (usage := getattr(self.provider, "cache_usage", None)) is not None else None,
        )
