"""The one token-bucket arithmetic (credits, rate gates): debits, refills, reservations
into debt, the GCRA window bound, and forgetting idle keys."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.buckets import TokenBuckets
from stages.ports import Debit


def test_a_debit_is_all_or_nothing_and_a_refusal_says_when_to_retry() -> None:
    b = TokenBuckets(capacity=5, refill=2, interval_s=10.0)
    assert b.debit("u", 4, 0.0) == Debit(True, 1, 0.0)
    refused = b.debit("u", 4, 3.0)  # 1 left, 3 missing: two refills of 2, at 10 and 20
    assert refused == Debit(False, 1, 17.0)
    assert b.level("u", 3.0) == 1.0  # a refusal takes nothing
    assert b.debit("u", 1, 3.0) == Debit(True, 0, 0.0)
    assert b.debit("u", 6, 3.0) == Debit(False, 0, math.inf)  # more than capacity: never
    assert b.debit("other", 5, 3.0) == Debit(True, 0, 0.0)  # keys are independent


def test_refills_are_discrete_and_capped_at_capacity() -> None:
    b = TokenBuckets(capacity=3, refill=2, interval_s=10.0)
    b.debit("u", 3, 0.0)
    assert [b.level("u", t) for t in (0.0, 9.99, 10.0, 19.99, 20.0, 100.0)] == [0, 0, 2, 2, 3, 3]
    assert b.debit("u", 1, 9.99) == Debit(False, 0, pytest.approx(0.01))


def test_a_bucket_that_sat_full_saves_nothing_up() -> None:
    """The refill clock starts when a full bucket is drawn from: meeting a key again after a
    long quiet spell is the same as meeting it for the first time."""
    b = TokenBuckets(capacity=1, refill=1, interval_s=1.0)
    b.debit("u", 1, 0.0)
    assert b.debit("u", 1, 1.9).granted  # refilled at 1.0, full since
    refused = b.debit("u", 1, 2.0)  # the next refill is 1 s after 1.9, not at 2.0
    assert not refused.granted and refused.retry_after == pytest.approx(0.9)


def test_no_refills_means_never() -> None:
    for b in (TokenBuckets(2, 0, 10.0), TokenBuckets(2, 1, 0.0)):
        assert b.debit("u", 2, 0.0).granted
        assert b.debit("u", 1, 1e9).retry_after == math.inf
        assert b.reserve("u", 1, 1e9) == math.inf


def test_reserve_books_into_debt_and_queues_later_callers() -> None:
    b = TokenBuckets(capacity=2, refill=1, interval_s=0.5)  # 2 per second, burst 2
    assert [b.reserve("p", 1, 100.0) for _ in range(5)] == [0.0, 0.0, 0.5, 1.0, 1.5]
    assert b.level("p", 100.0) == -3.0
    assert b.level("p", 101.0) == -1.0  # two refills since
    assert b.debit("p", 1, 101.0) == Debit(False, 0, 1.0)  # the debt is paid first
    assert b.reserve("p", 1, 101.0) == 1.0
    assert b.reserve("p", 3, 101.0) == 2.5  # a larger cost waits for all of it
    assert b.level("p", 120.0) == 2.0  # paid off, full again


def test_forget_idle_drops_only_buckets_that_are_full_again() -> None:
    b = TokenBuckets(capacity=2, refill=1, interval_s=1.0)
    b.reserve("busy", 4, 0.0)  # in debt until 2.0, full at 4.0
    b.debit("idle", 1, 0.0)  # full at 1.0
    b.forget_idle(1.5)
    assert set(b) == {"busy"} and len(b) == 1
    assert b.reserve("busy", 1, 1.5) == 1.5  # still owed: kept exactly
    assert b.reserve("idle", 2, 1.5) == 0.0  # forgotten = full
    b.forget_idle(1000.0)
    assert len(b) == 0


def gcra(rate: float, burst: int, times: list[float]) -> list[float]:
    """Reference GCRA (virtual scheduling, one theoretical arrival time per key)."""
    interval, tolerance, tat, out = 1.0 / rate, (burst - 1) / rate, None, []
    for now in times:
        t = now if tat is None else max(tat, now)
        out.append(max(now, t - tolerance) - now)
        tat = t + interval
    return out


arrivals = st.lists(st.floats(min_value=0.0, max_value=0.8, allow_nan=False), min_size=1,
                    max_size=120)
rates = st.sampled_from([0.5, 1.0, 2.0, 3.0, 10.0])
bursts = st.integers(min_value=1, max_value=5)


def due_times(rate: float, burst: int, gaps: list[float]) -> tuple[list[float], list[float]]:
    b = TokenBuckets(capacity=burst, refill=1, interval_s=1.0 / rate)
    now, times, waits = 0.0, [], []
    for gap in gaps:
        now += gap
        times.append(now)
        waits.append(b.reserve("k", 1, now))
    return times, waits


@settings(max_examples=200, deadline=None)
@given(rate=rates, burst=bursts, gaps=arrivals)
def test_reservations_never_exceed_burst_plus_rate_times_any_window(
        rate: float, burst: int, gaps: list[float]) -> None:
    times, waits = due_times(rate, burst, gaps)
    sends = sorted(t + w for t, w in zip(times, waits, strict=True))
    for i, start in enumerate(sends):
        for j in range(i, len(sends)):  # the window [start, sends[j]] is the tightest
            w = sends[j] - start
            assert j - i + 1 <= burst + rate * w + 1e-6, (start, w, j - i + 1)


@settings(max_examples=200, deadline=None)
@given(rate=rates, burst=bursts, gaps=arrivals)
def test_unit_reservations_are_exactly_gcra(rate: float, burst: int, gaps: list[float]) -> None:
    times, waits = due_times(rate, burst, gaps)
    assert waits == pytest.approx(gcra(rate, burst, times), abs=1e-9)
    assert all(w >= 0.0 for w in waits)
