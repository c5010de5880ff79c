"""The retry policy (attempts, exponential ceiling, jitter range, budgets) and the Retry-After parser."""

from __future__ import annotations

import math
import random

import pytest

from runtime.retry import RetryPolicy, parse_retry_after


def test_the_delay_grows_exponentially_up_to_the_cap_within_the_jitter_range() -> None:
    policy = RetryPolicy(base=1.0, cap=30.0, jitter=0.5)
    rng = random.Random(7)
    for retry in range(1, 12):
        ceiling = min(30.0, 2.0 ** (retry - 1))
        delays = [policy.delay(retry, elapsed=0.0, rng=rng) for _ in range(200)]
        assert all(d is not None and ceiling * 0.5 <= d <= ceiling for d in delays)
        assert max(d for d in delays if d is not None) - min(d for d in delays if d is not None) > ceiling * 0.3


def test_no_jitter_gives_the_ceiling() -> None:
    policy = RetryPolicy(base=2.0, cap=10.0, jitter=0.0)
    assert [policy.delay(r, elapsed=0, rng=random.Random()) for r in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 10.0]


def test_attempts_count_the_first_one() -> None:
    policy = RetryPolicy(attempts=3, jitter=0.0)
    rng = random.Random()
    assert policy.delay(1, elapsed=0, rng=rng) is not None
    assert policy.delay(2, elapsed=0, rng=rng) is not None
    assert policy.delay(3, elapsed=0, rng=rng) is None   # three attempts made: give up


def test_the_time_budget_gives_up_before_a_retry_that_would_end_past_it() -> None:
    policy = RetryPolicy(base=4.0, jitter=0.0, budget=10.0)
    rng = random.Random()
    assert policy.delay(1, elapsed=6.0, rng=rng) == 4.0        # ends at 10 s: still within
    assert policy.delay(1, elapsed=6.5, rng=rng) is None


def test_retry_after_is_honoured_up_to_the_cap_without_a_budget() -> None:
    policy = RetryPolicy(base=1.0, cap=30.0, jitter=0.0)
    rng = random.Random()
    assert policy.delay(1, elapsed=0, rng=rng, retry_after=7.0) == 7.0
    assert policy.delay(1, elapsed=0, rng=rng, retry_after=0.1) == 1.0     # never shorter than the backoff
    assert policy.delay(1, elapsed=0, rng=rng, retry_after=90.0) == 30.0   # capped


def test_retry_after_beyond_its_budget_gives_up_at_once() -> None:
    policy = RetryPolicy(attempts=2, base=0.0, cap=math.inf, jitter=0.0, retry_after_budget=2.0)
    rng = random.Random()
    assert policy.delay(1, elapsed=0, rng=rng, retry_after=1.5) == 1.5
    assert policy.delay(1, elapsed=0, rng=rng, retry_after=2.5) is None
    assert policy.delay(2, elapsed=0, rng=rng, retry_after=1.0) is None   # honoured only once


@pytest.mark.parametrize("bad", [dict(attempts=0), dict(base=-1.0), dict(jitter=1.5), dict(cap=-2.0)])
def test_a_nonsense_policy_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**bad)   # type: ignore[arg-type]


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "1.5", "retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412480.0) == 10.0
    assert parse_retry_after({"retry-after": "-4"}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "inf"}) is None
    assert parse_retry_after({"retry-after": "nan"}) is None
    assert parse_retry_after({}) is None
    assert parse_retry_after(None) is None
