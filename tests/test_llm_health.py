"""The named parts of a provider's health: circuit breaker, stall detector, latency statistics.

The chain's behaviour with real SDKs is in test_chain.py; these pin each part on its own, with
explicit times instead of a clock.
"""

from __future__ import annotations

import trio

from actors.llm.circuit import Admission, CircuitBreaker
from actors.llm.latency import RECENT_ANSWERS, LatencyStats, percentile
from actors.llm.stall import STALL_FACTOR, StallDetector


def test_the_circuit_opens_after_the_threshold_and_lets_one_probe_through_after_the_cooldown() -> None:
    breaker = CircuitBreaker("p", threshold=3, cooldown=30.0)
    for _ in range(2):
        breaker.record_failure(0.0, probe=False, at_once=False, reason="500")
    assert breaker.admit(1.0) is Admission.PASS
    breaker.record_failure(1.0, probe=False, at_once=False, reason="500")
    assert (breaker.state(1.0), breaker.admit(1.0), breaker.reopens_in(1.0)) == ("open", Admission.DENY, 30.0)
    assert breaker.state(31.0) == "half_open" and breaker.admits_a_call(31.0)
    assert breaker.admit(31.0) is Admission.PROBE
    assert breaker.admit(31.0) is Admission.DENY and not breaker.admits_a_call(31.0)   # one probe at a time
    breaker.record_failure(32.0, probe=True, at_once=False, reason="500")   # the probe failed: open again
    assert breaker.state(61.9) == "open" and breaker.admit(62.0) is Admission.PROBE
    breaker.record_success()
    assert breaker.closed and breaker.admit(62.0) is Admission.PASS


def test_a_released_probe_lets_the_next_caller_probe_and_at_once_skips_the_threshold() -> None:
    breaker = CircuitBreaker("p", threshold=3, cooldown=10.0)
    breaker.record_failure(0.0, probe=False, at_once=True, reason="401")
    assert breaker.state(0.0) == "open"
    assert breaker.admit(10.0) is Admission.PROBE
    breaker.release_probe()
    assert breaker.admit(10.0) is Admission.PROBE


def test_a_call_admitted_while_closed_is_refused_once_the_circuit_opened_but_a_probe_is_not() -> None:
    breaker = CircuitBreaker("p", threshold=1, cooldown=10.0)
    admitted = breaker.admit(0.0)
    breaker.trip(0.0)
    assert not breaker.still_admits(admitted, 0.0)
    assert breaker.still_admits(Admission.PROBE, 0.0)


def test_latency_percentiles_are_nearest_rank_and_the_recent_ring_forgets_old_answers() -> None:
    assert percentile([], 95) is None
    assert percentile([10.0, 20.0, 30.0, 40.0], 50) == 20.0
    assert percentile([10.0, 20.0, 30.0, 40.0], 95) == 40.0
    latencies = LatencyStats(window=512)
    assert not latencies and latencies.p95_ms() == 0.0 and latencies.slowest_recent_ms() == 0.0
    latencies.record(5.0)
    for _ in range(RECENT_ANSWERS):
        latencies.record(0.1)
    assert latencies.slowest_recent_ms() == 100.0   # the 5 s answer left the recent ring
    assert latencies.percentiles(50, 100) == (100.0, 5000.0)   # but not the window


def test_the_stall_limit_follows_the_latency_between_the_floor_and_the_timeout() -> None:
    latencies = LatencyStats(window=512)
    detector = StallDetector(latencies, threshold=3, floor=2.0, timeout=20.0)
    assert detector.limit() is None   # nothing known of the latency: the timeout decides
    latencies.record(0.2)
    assert detector.limit() == 2.0   # 3 x 0.2 s is below the floor
    latencies.record(1.5)
    assert detector.limit() == STALL_FACTOR * 1.5
    latencies.record(10.0)
    assert detector.limit() == 20.0
    assert StallDetector(latencies, threshold=3, floor=0.0, timeout=20.0).limit() is None   # turned off


async def test_a_stall_cancels_every_call_in_flight_only_when_enough_are_past_the_limit_with_no_answer() -> None:
    latencies = LatencyStats(window=512)
    latencies.record(0.2)
    detector = StallDetector(latencies, threshold=3, floor=2.0, timeout=20.0)
    scopes = [trio.CancelScope() for _ in range(4)]
    calls = [detector.begin(at, scope) for at, scope in zip((0.0, 0.5, 1.0, 2.5), scopes)]
    assert detector.check(2.9, watching=True) is None   # only two calls past 2 s
    assert detector.check(3.0, watching=False) is None   # an open circuit is not watched
    stall = detector.check(3.0, watching=True)
    assert stall is not None and (stall.stalled, stall.in_flight, stall.limit) == (3, 4, 2.0)
    assert all(scope.cancel_called for scope in scopes) and detector.stalls == 1
    for call in calls:
        detector.end(call, 3.1, completed=False)
    assert detector.in_flight == 0

    fresh = [trio.CancelScope() for _ in range(3)]
    calls = [detector.begin(10.0, scope) for scope in fresh]
    detector.end(calls[0], 11.0, completed=True)   # an answer 1 s before the check: the provider still answers
    detector.begin(10.0, trio.CancelScope())
    assert detector.check(12.5, watching=True) is None
    assert not any(scope.cancel_called for scope in fresh)
