"""Stall detection for one provider: a provider that hangs is seen long before its calls time out.

A provider that hangs (accepts connections, never answers) produces no failure until its calls
time out, and meanwhile every concurrency slot is held by a hung call with new turns queueing
behind them. So when at least ``threshold`` calls have been in flight for longer than the stall
limit and no call at all completed meanwhile, the provider counts as stalled: every call in flight
is cancelled at once (the younger ones wait on the same dead provider too), and the caller opens
the circuit, so their turns move on to the fallback instead of waiting out the timeout.

A call cancelled from outside (the loser of a hedge, a turn past its deadline) says nothing of the
provider: it is no completion and no failure. It stays watched as a *ghost*, as if it still ran,
until the provider completes any call (or the ghost's timeout passes): hedging a call away neither
hides a hang from the detector nor makes the provider look worse than the call itself would have.

The limit follows the provider's latency: ``STALL_FACTOR`` x the larger of its recent p95 and the
slowest of its last ``latency.RECENT_ANSWERS`` answers, at least ``floor`` (CIRCUIT_STALL_SECONDS)
and at most the call timeout. The slowest recent answer counts so that one success past the old
limit raises it at once: a provider that became slower but stays healthy is not taken for a dead
one again. Until something is known of the provider's latency (or with ``floor`` 0) there is no
limit, and the timeout decides.
"""

from __future__ import annotations

import attrs
import trio

from .latency import LatencyStats

STALL_FACTOR = 3.0   # a call this many times slower than the recent p95, with no other answer meanwhile, is stalled


@attrs.frozen
class Stall:
    """What ``check`` found: ``stalled`` calls past ``limit`` seconds, ``in_flight`` calls cancelled."""

    stalled: int
    in_flight: int
    limit: float


class StallDetector:
    """The calls in flight to one provider, oldest first, and when the last one completed."""

    def __init__(self, latencies: LatencyStats, *, threshold: int, floor: float, timeout: float) -> None:
        self._latencies = latencies
        self.threshold = threshold
        self.floor = floor
        self.timeout = timeout
        # Calls in flight: start time and the scope that cancels the call on a stall.
        self._running: dict[int, tuple[float, trio.CancelScope]] = {}
        self._ghosts: dict[int, float] = {}   # calls cancelled from outside before any completion: start time
        self._next_call = 0
        self._last_completion = 0.0
        self.stalls = 0

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def begin(self, now: float, scope: trio.CancelScope) -> int:
        """A call starts; ``scope`` is cancelled if the provider stalls. Returns the call's id."""
        self._next_call += 1
        self._running[self._next_call] = (now, scope)
        return self._next_call

    def end(self, call: int, now: float, *, completed: bool) -> None:
        """A call ends; ``completed``: the provider answered or failed it. One cancelled from outside
        becomes a ghost (see the module docstring); one cancelled by a stall is simply gone."""
        started, scope = self._running.pop(call)
        if completed:
            self._last_completion = now
            self._ghosts.clear()
        elif not scope.cancel_called:
            self._ghosts[call] = started

    def limit(self) -> float | None:
        """Seconds in flight, with no other call completing, after which calls count as stalled."""
        if self.floor <= 0 or not self._latencies:
            return None   # disabled, or nothing known of this provider's latency yet: the timeout decides
        # a recent slow answer counts before the p95 moves
        typical = max(self._latencies.p95_ms(), self._latencies.slowest_recent_ms())
        return min(self.timeout, max(self.floor, STALL_FACTOR * typical / 1000.0))

    def check(self, now: float, *, watching: bool) -> Stall | None:
        """When the provider stopped answering: cancel every call in flight and say so.
        ``watching``: the circuit is closed (an open one lets no new call wait on the provider)."""
        limit = self.limit()
        if self._ghosts:
            self._ghosts = {call: started for call, started in self._ghosts.items() if now - started < self.timeout}
        if limit is None or not watching or len(self._running) + len(self._ghosts) < self.threshold:
            return None
        if now - self._last_completion < limit:
            return None
        starts = [started for started, _ in self._running.values()] + list(self._ghosts.values())
        stalled = sum(1 for started in starts if now - started >= limit)
        if stalled < self.threshold:
            return None
        self.stalls += 1
        self._ghosts.clear()
        for _, scope in self._running.values():
            scope.cancel()
        return Stall(stalled=stalled, in_flight=len(self._running), limit=limit)
