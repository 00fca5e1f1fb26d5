"""Dispatch strategies, retry classification, backoff, circuit breaker, rate limit."""

from __future__ import annotations

import pytest

from adapters.bitrix import TokenBucket, classify
from adapters.smtp import classify_code
from stages.notifications import (
    BreakerState,
    CircuitBreaker,
    ContactStatus,
    Delivery,
    FinalState,
    GuardedChannel,
    Job,
    RetryPolicy,
    SendResult,
    SendStatus,
    dispatch_round,
)
from tests.fakes import BrokenChannel, ScriptedChannel

OK, TRANSIENT = SendResult.ok("x"), SendResult.transient("421 busy")
PERMANENT = SendResult.permanent("550 no")
POLICY = RetryPolicy(max_attempts=3, base_s=1.0, max_s=10.0)
CONTACTS = [{"type": "email", "value": "a@b.co"}, {"type": "bitrix", "value": 7}]


def job(strategy: str, contacts: list[dict[str, object]] = CONTACTS, jid: str = "n1") -> Job:
    return Job(id=jid, contacts=list(contacts), message="hi", strategy=strategy)


async def test_first_available_stops_at_first_success() -> None:
    email, bitrix = ScriptedChannel("email", {}), ScriptedChannel("bitrix", {})
    [r] = await dispatch_round([job("send_to_first_available")], {"email": email, "bitrix": bitrix}, POLICY)
    assert r.final is FinalState.DELIVERED
    assert len(email.sent) == 1 and bitrix.sent == []
    assert [(a.channel, a.status) for a in r.attempts] == [("email", SendStatus.DELIVERED)]


async def test_first_available_falls_through_a_permanent_failure() -> None:
    email = ScriptedChannel("email", {"a@b.co": [PERMANENT]})
    bitrix = ScriptedChannel("bitrix", {})
    [r] = await dispatch_round([job("send_to_first_available")], {"email": email, "bitrix": bitrix}, POLICY)
    assert r.final is FinalState.DELIVERED
    assert [p.status for p in r.job.progress] == [ContactStatus.FAILED, ContactStatus.DELIVERED]


async def test_first_available_skips_unconfigured_and_broken_channels() -> None:
    bitrix = ScriptedChannel("bitrix", {})
    [r] = await dispatch_round([job("send_to_first_available")], {"bitrix": bitrix}, POLICY)
    assert r.final is FinalState.DELIVERED
    assert r.job.progress[0].status is ContactStatus.SKIPPED
    down = ScriptedChannel("email", {}, up=False)
    [r] = await dispatch_round([job("send_to_first_available")], {"email": down, "bitrix": bitrix}, POLICY)
    assert r.final is FinalState.DELIVERED and down.sent == []
    assert r.attempts[0].status is SendStatus.UNAVAILABLE


async def test_transient_failure_is_retried_with_backoff_then_succeeds() -> None:
    email = ScriptedChannel("email", {"a@b.co": [TRANSIENT]})
    j = job("send_to_first_available", CONTACTS[:1])
    [r] = await dispatch_round([j], {"email": email}, POLICY, rng=lambda: 0.0)
    assert r.final is None and r.retry_in_s == pytest.approx(0.5)
    assert r.job.progress[0].status is ContactStatus.PENDING
    [r] = await dispatch_round([r.job], {"email": email}, POLICY, rng=lambda: 1.0)
    assert r.final is FinalState.DELIVERED
    assert r.attempts[0].attempt == 2


async def test_transient_failures_exhaust_attempts_then_fail() -> None:
    email = ScriptedChannel("email", {"a@b.co": [TRANSIENT] * 5})
    j = job("send_to_first_available", CONTACTS[:1])
    finals = []
    for _ in range(3):
        [r] = await dispatch_round([j], {"email": email}, POLICY)
        finals.append(r.final)
        j = r.job
    assert finals == [None, None, FinalState.FAILED]
    assert j.progress[0].attempts == 3 and j.progress[0].last_error == "421 busy"


async def test_all_available_sends_every_channel_independently() -> None:
    email = ScriptedChannel("email", {"a@b.co": [PERMANENT]})
    bitrix = ScriptedChannel("bitrix", {})
    [r] = await dispatch_round([job("send_to_all_available")], {"email": email, "bitrix": bitrix}, POLICY)
    assert r.final is FinalState.PARTIALLY_DELIVERED
    assert len(email.sent) == 1 and len(bitrix.sent) == 1
    email2 = ScriptedChannel("email", {})
    [r] = await dispatch_round([job("send_to_all_available")], {"email": email2, "bitrix": bitrix}, POLICY)
    assert r.final is FinalState.DELIVERED


async def test_all_available_keeps_retrying_only_the_transient_contact() -> None:
    email = ScriptedChannel("email", {"a@b.co": [TRANSIENT]})
    bitrix = ScriptedChannel("bitrix", {})
    [r] = await dispatch_round([job("send_to_all_available")], {"email": email, "bitrix": bitrix}, POLICY)
    assert r.final is None
    [r] = await dispatch_round([r.job], {"email": email, "bitrix": bitrix}, POLICY)
    assert r.final is FinalState.DELIVERED
    assert len(bitrix.sent) == 1 and len(email.sent) == 2


async def test_no_configured_channel_fails() -> None:
    [r] = await dispatch_round([job("send_to_all_available")], {}, POLICY)
    assert r.final is FinalState.FAILED and r.attempts == []


async def test_a_batch_goes_to_each_channel_in_one_call() -> None:
    email = ScriptedChannel("email", {})
    jobs = [job("send_to_first_available", CONTACTS[:1], f"n{i}") for i in range(50)]
    results = await dispatch_round(jobs, {"email": email}, POLICY)
    assert email.batches == 1 and len(email.sent) == 50
    assert all(r.final is FinalState.DELIVERED for r in results)


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    p = RetryPolicy(max_attempts=10, base_s=1.0, max_s=8.0)
    assert [p.delay(n, lambda: 1.0) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert [p.delay(n, lambda: 0.0) for n in range(1, 5)] == [0.5, 1.0, 2.0, 4.0]


def test_breaker_opens_after_failures_and_half_opens_after_reset() -> None:
    now = [0.0]
    b = CircuitBreaker(failures=3, reset_s=10.0, clock=lambda: now[0])
    for _ in range(2):
        b.record(SendStatus.TRANSIENT)
    b.record(SendStatus.PERMANENT)  # says nothing about the channel
    assert b.state is BreakerState.CLOSED
    b.record(SendStatus.TRANSIENT)
    assert b.state is BreakerState.OPEN and not b.allow()
    now[0] = 10.0
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow() and not b.allow()  # one trial only
    b.record(SendStatus.TRANSIENT)
    assert b.state is BreakerState.OPEN
    now[0] = 20.0
    assert b.allow()
    b.record(SendStatus.DELIVERED)
    assert b.state is BreakerState.CLOSED


async def test_guarded_channel_trips_and_reports_unavailable() -> None:
    g = GuardedChannel(BrokenChannel(ConnectionRefusedError("down")),
                       CircuitBreaker(failures=2, reset_s=60.0))
    d = [Delivery("n", 0, "a@b.co", "m")]
    assert (await g.send(d))[0].status is SendStatus.TRANSIENT
    assert g.available()
    await g.send(d)
    assert not g.available()
    assert (await g.send(d))[0].status is SendStatus.UNAVAILABLE


def test_smtp_reply_classification() -> None:
    assert classify_code(421, "try later").status is SendStatus.TRANSIENT
    assert classify_code(450, "mailbox busy").status is SendStatus.TRANSIENT
    assert classify_code(550, "no such user").status is SendStatus.PERMANENT
    assert classify_code(554, "rejected").status is SendStatus.PERMANENT


def test_bitrix_answer_classification() -> None:
    assert classify(200, {"result": 17}) == SendResult.ok("17")
    assert classify(503, {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many"}).status \
        is SendStatus.TRANSIENT
    assert classify(429, {}).status is SendStatus.TRANSIENT
    assert classify(500, {"error": "INTERNAL_SERVER_ERROR"}).status is SendStatus.TRANSIENT
    assert classify(400, {"error": "USER_ID_EMPTY", "error_description": "No user"}).status \
        is SendStatus.PERMANENT
    assert classify(401, {"error": "NO_AUTH_FOUND"}).status is SendStatus.PERMANENT


async def test_token_bucket_paces_after_the_burst() -> None:
    now = [0.0]
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        await bucket.acquire()
    assert slept == [pytest.approx(0.5), pytest.approx(0.5)]  # 3 free, then 2 per second


# --- a channel passed over because its breaker is open uses no attempt -----------------------
async def test_breaker_open_pass_over_uses_no_attempt_and_waits_for_the_reset() -> None:
    """With one contact, a short outage (breaker open) must not fail the notification:
    the pass-overs use none of its attempts, and the job comes back when the breaker may
    let a trial through, not after the retry backoff."""
    now = [0.0]
    breaker = CircuitBreaker(failures=1, reset_s=30.0, clock=lambda: now[0])
    breaker.record(SendStatus.TRANSIENT)  # the channel just failed elsewhere: open
    inner = ScriptedChannel("email", {})
    email = GuardedChannel(inner, breaker)
    j = job("send_to_first_available", CONTACTS[:1])
    for n in range(POLICY.max_attempts + 2):
        now[0] = 4.0 * n  # still within the reset time
        [r] = await dispatch_round([j], {"email": email}, POLICY, rng=lambda: 0.0)
        assert r.final is None, f"failed after {n + 1} pass-overs"
        assert r.retry_in_s == pytest.approx(30.0 - now[0])  # the breaker's remaining time
        assert [(a.status, a.attempt) for a in r.attempts] == [(SendStatus.UNAVAILABLE, 0)]
        j = r.job
    assert inner.sent == [] and j.progress[0].attempts == 0 and j.round == 0
    now[0] = 30.0  # half-open: one trial goes through and succeeds
    [r] = await dispatch_round([j], {"email": email}, POLICY)
    assert r.final is FinalState.DELIVERED
    assert [(a.status, a.attempt) for a in r.attempts] == [(SendStatus.DELIVERED, 1)]
    assert breaker.state is BreakerState.CLOSED


async def test_pass_over_and_real_failure_in_one_round_back_off_normally() -> None:
    down = ScriptedChannel("email", {}, up=False)
    bitrix = ScriptedChannel("bitrix", {7: [TRANSIENT]})
    [r] = await dispatch_round([job("send_to_all_available")], {"email": down, "bitrix": bitrix},
                               POLICY, rng=lambda: 0.0)
    assert r.final is None and r.retry_in_s == pytest.approx(POLICY.delay(1, lambda: 0.0))
    assert [p.attempts for p in r.job.progress] == [0, 1] and r.job.round == 1


# --- pacing of the dispatcher's loops ------------------------------------------------------------
def test_dispatch_pacing_slows_down_under_pressure_pauses_and_recovers() -> None:
    from stages.notifications import DispatchPacer, RoundReport

    p = DispatchPacer(batch_size=100, interval_s=1.0, target_latency_s=2.0, max_interval_s=16.0)
    assert (p.batch, p.interval_s, p.state) == (100, 1.0, "normal")
    p.observe(RoundReport(latency_s=0.5, attempts=100, failures=10))  # healthy
    assert (p.batch, p.interval_s, p.state) == (100, 1.0, "normal")
    p.observe(RoundReport(latency_s=5.0, attempts=100, failures=0))  # slow round
    assert (p.batch, p.interval_s, p.state) == (50, 2.0, "throttled")
    p.observe(RoundReport(latency_s=0.1, attempts=50, failures=30))  # channels failing
    assert (p.batch, p.interval_s) == (25, 4.0)
    p.observe(RoundReport(latency_s=0.1, error=True))  # the round could not run
    assert (p.batch, p.interval_s) == (12, 8.0)
    for _ in range(3):
        p.observe(RoundReport(latency_s=0.0, attempts=10, failures=10, channels_down=True))
    assert p.paused and p.state == "paused" and p.batch == 10 and p.interval_s == 16.0
    for _ in range(12):  # channels work again: back to full pace by itself
        p.observe(RoundReport(latency_s=0.1, attempts=10, failures=0))
    assert (p.batch, p.interval_s, p.state, p.paused) == (100, 1.0, "normal", False)


def test_dispatch_pacing_ignores_a_few_failures_and_idle_rounds() -> None:
    from stages.notifications import DispatchPacer, RoundReport

    p = DispatchPacer(batch_size=10, interval_s=5.0)
    p.observe(RoundReport(latency_s=0.0))  # idle tick
    p.observe(RoundReport(latency_s=1.0, attempts=10, failures=4))  # below half failing
    assert (p.batch, p.interval_s, p.state) == (10, 5.0, "normal")
    p.observe(RoundReport(latency_s=1.0, attempts=10, failures=5))
    assert (p.batch, p.interval_s, p.state) == (5, 10.0, "throttled")
