"""A circuit breaker for one provider, so a dead provider does not add its timeout to every message.

Closed: every call passes. ``threshold`` consecutive failures (or one that counts at once, such as an
auth failure) open it for ``cooldown`` seconds: no call passes. After the cool-down it is half-open:
exactly one call, the probe, passes; its answer closes the circuit, its failure opens it again, and
a probe that ends undecided (cancelled, or a failure of its own request) lets the next caller probe.
Times are the caller's clock (``trio.current_time()``).
"""

from __future__ import annotations

import enum
import logging

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Admission(enum.Enum):
    """What the breaker lets a call do."""

    DENY = "deny"
    PASS = "pass"
    PROBE = "probe"   # the one call of a half-open circuit; it decides the circuit


class CircuitBreaker:
    """Closed / open / half-open with one probe; ``name`` is the provider's, for the log lines."""

    def __init__(self, name: str, *, threshold: int, cooldown: float) -> None:
        self.name = name
        self.threshold = threshold
        self.cooldown = cooldown
        self._state = CLOSED
        self._open_until = 0.0
        self._probing = False
        self._consecutive_failures = 0

    @property
    def closed(self) -> bool:
        return self._state == CLOSED

    def state(self, now: float) -> str:
        if self._state == OPEN and now >= self._open_until:
            return HALF_OPEN
        return self._state

    def admits_a_call(self, now: float) -> bool:
        """Closed, or half-open with its probe not taken yet (what ``admit`` would let through)."""
        state = self.state(now)
        return state == CLOSED or (state == HALF_OPEN and not self._probing)

    def reopens_in(self, now: float) -> float | None:
        """Seconds until an open circuit lets a probe through; None when it is not open."""
        return round(self._open_until - now, 3) if self.state(now) == OPEN else None

    def admit(self, now: float) -> Admission:
        state = self.state(now)
        if state == CLOSED:
            return Admission.PASS
        if state == OPEN or self._probing:
            return Admission.DENY
        self._state, self._probing = HALF_OPEN, True
        return Admission.PROBE

    def still_admits(self, admission: Admission, now: float) -> bool:
        """After waiting for a concurrency slot: did the circuit open meanwhile?"""
        return admission is Admission.PROBE or self.state(now) == CLOSED

    def record_success(self) -> None:
        if self._state != CLOSED:
            log.info("LLM provider %s recovered: circuit closed", self.name)
        self._state, self._probing, self._consecutive_failures = CLOSED, False, 0

    def record_failure(self, now: float, *, probe: bool, at_once: bool, reason: object) -> None:
        """A failure that speaks of the provider's health; ``at_once`` opens without waiting for the
        threshold (``reason`` is logged)."""
        self._consecutive_failures += 1
        if probe or at_once or self._consecutive_failures >= self.threshold:
            if self._state == CLOSED or probe:
                log.warning(
                    "LLM provider %s: circuit open for %gs after %d consecutive failure(s) (last: %s)",
                    self.name, self.cooldown, self._consecutive_failures, reason,
                )
            self._open(now)

    def trip(self, now: float) -> None:
        """Open at once, whatever the failure count (the caller logs why)."""
        self._open(now)

    def release_probe(self) -> None:
        """A probe ended before it decided anything: let the next caller probe."""
        self._probing = False

    def _open(self, now: float) -> None:
        self._state, self._open_until, self._probing = OPEN, now + self.cooldown, False
