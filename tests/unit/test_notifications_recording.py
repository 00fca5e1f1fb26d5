"""Each delivered send is recorded as it completes: a round cut short (its process killed)
resumes from the store's state and repeats at most the sends in flight at the kill."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence

import pytest

from stages.notifications import (
    Attempt,
    CircuitBreaker,
    ContactProgress,
    ContactStatus,
    Delivery,
    FinalState,
    GuardedChannel,
    Job,
    ResultCallback,
    RetryPolicy,
    RoundResult,
    SendResult,
    SendStatus,
    adopt_recorded,
    dispatch_round,
)
from tests.fakes import BrokenChannel, FakeDispatchQueue, ScriptedChannel

POLICY = RetryPolicy(max_attempts=3, base_s=1.0, max_s=10.0)


def email_jobs(n: int, strategy: str = "send_to_first_available") -> list[Job]:
    return [Job(id=f"n{i}", contacts=[{"type": "email", "value": f"u{i}@example.com"}],
                message="hi", strategy=strategy) for i in range(n)]


class SentAtRecord(FakeDispatchQueue):
    """Notes, at each record, how many deliveries the channel had attempted by then."""

    def __init__(self, channel: ScriptedChannel, jobs: Sequence[Job]) -> None:
        super().__init__(jobs)
        self.channel = channel
        self.sent_when_recorded: list[int] = []

    async def record_delivered(self, attempt: Attempt) -> None:
        self.sent_when_recorded.append(len(self.channel.sent))
        await super().record_delivered(attempt)


async def test_each_delivery_is_recorded_as_it_arrives_before_the_next_send() -> None:
    jobs = email_jobs(5)
    busy = SendResult.transient("421 busy")
    email = ScriptedChannel("email", {"u2@example.com": [busy]})
    queue = SentAtRecord(email, jobs)
    results = await dispatch_round(jobs, {"email": email}, POLICY, journal=queue)
    # One record per delivery, made right after its send and before the next one.
    assert [(a.notification_id, a.contact_index, a.attempt) for a in queue.recorded] == [
        ("n0", 0, 1), ("n1", 0, 1), ("n3", 0, 1), ("n4", 0, 1)]
    assert queue.sent_when_recorded == [1, 2, 4, 5]
    assert all(a.status is SendStatus.DELIVERED for a in queue.recorded)
    # The round's attempts are the recorded ones (the transient one is left to finish_round).
    delivered = [a for r in results for a in r.attempts if a.status is SendStatus.DELIVERED]
    assert delivered == queue.recorded
    # The store already knows: n0's contact is delivered before the round is finished.
    assert queue.jobs["n0"].progress[0].status is ContactStatus.DELIVERED
    assert queue.jobs["n2"].progress[0].status is ContactStatus.PENDING
    await queue.finish_round(results)
    assert sorted(queue.finished) == ["n0", "n1", "n3", "n4"]
    assert len(queue.attempts) == 5  # every attempt stored once, deliveries included


class Stuck(Exception):
    pass


class HoldsAfter(ScriptedChannel):
    """Stops for good (a process about to die) once ``k`` sends have been made and
    ``in_flight`` is False: before the next send; else right after the next send, before
    its result is reported (its record never starts)."""

    def __init__(self, k: int, in_flight: bool) -> None:
        super().__init__("email", {})
        self.k = k
        self.in_flight = in_flight
        self.stopped = asyncio.Event()

    async def send(self, deliveries: Sequence[Delivery],
                   on_result: ResultCallback | None = None) -> list[SendResult]:
        out: list[SendResult] = []
        for i, d in enumerate(deliveries):
            if len(self.sent) == self.k and not self.in_flight and not self.stopped.is_set():
                self.stopped.set()
                await asyncio.Event().wait()
            self.sent.append(d)
            out.append(SendResult.ok("250"))
            if len(self.sent) == self.k + 1 and self.in_flight and not self.stopped.is_set():
                self.stopped.set()
                await asyncio.Event().wait()
            if on_result is not None:
                await on_result(i, out[-1])
        return out


@pytest.mark.parametrize("in_flight", [False, True], ids=["between-sends", "send-not-recorded"])
async def test_a_round_killed_part_way_resumes_with_the_rest_only(in_flight: bool) -> None:
    n, k = 12, 5
    jobs = email_jobs(n)
    queue = FakeDispatchQueue(jobs)
    email = HoldsAfter(k, in_flight)
    task = asyncio.create_task(dispatch_round(queue.unfinished(), {"email": email}, POLICY,
                                              journal=queue))
    await asyncio.wait_for(email.stopped.wait(), 5)
    task.cancel()  # the process is killed: no finish_round
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(queue.recorded) == k and not queue.finished
    # Another dispatcher claims the same jobs once their lease runs out.
    resumed = ScriptedChannel("email", {})
    results = await dispatch_round(queue.unfinished(), {"email": resumed}, POLICY, journal=queue)
    await queue.finish_round(results)
    assert queue.finished == {j.id: "delivered" for j in jobs}
    first = {d.notification_id for d in email.sent}
    again = [d.notification_id for d in resumed.sent]
    # The rest is sent, and the only repeat is the send whose record had not committed.
    assert set(again) == {j.id for j in jobs} - first | ({email.sent[-1].notification_id}
                                                         if in_flight else set())
    assert len(again) == n - k
    copies = Counter(d.notification_id for d in [*email.sent, *resumed.sent])
    assert sum(c - 1 for c in copies.values()) == (1 if in_flight else 0)


async def test_a_first_available_job_with_a_recorded_delivery_sends_nothing_more() -> None:
    job = Job(id="n1", contacts=[{"type": "email", "value": "a@example.com"},
                                 {"type": "email", "value": "b@example.com"}],
              message="hi", strategy="send_to_first_available",
              progress=[ContactProgress(ContactStatus.FAILED, 1, "550 no"), ContactProgress()])
    queue = FakeDispatchQueue([job])
    await queue.record_delivered(Attempt("n1", 1, "email", 1, SendStatus.DELIVERED, "250", 0.1))
    email = ScriptedChannel("email", {})
    [r] = await dispatch_round(queue.unfinished(), {"email": email}, POLICY, journal=queue)
    assert email.sent == [] and r.attempts == [] and r.final is FinalState.DELIVERED


async def test_a_failed_record_is_logged_and_the_round_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    jobs = email_jobs(3)
    queue = FakeDispatchQueue(jobs)
    queue.fail_records = True
    email = ScriptedChannel("email", {})
    with caplog.at_level(logging.WARNING, logger="conveyor.notifications"):
        results = await dispatch_round(jobs, {"email": email}, POLICY, journal=queue)
    assert len(email.sent) == 3 and len(queue.recorded) == 3
    assert sum("recording the delivery" in r.getMessage() for r in caplog.records) == 3
    assert all(r.final is FinalState.DELIVERED for r in results)
    queue.fail_records = False
    await queue.finish_round(results)  # the round's end records what the records missed
    assert queue.finished == {j.id: "delivered" for j in jobs}
    assert [a.status for a in queue.attempts] == [SendStatus.DELIVERED] * 3


async def test_a_repeated_record_changes_nothing() -> None:
    queue = FakeDispatchQueue(email_jobs(1))
    attempt = Attempt("n0", 0, "email", 1, SendStatus.DELIVERED, "250", 0.1)
    await queue.record_delivered(attempt)
    await queue.record_delivered(attempt)
    assert queue.attempts == [attempt]
    assert queue.jobs["n0"].progress[0] == ContactProgress(ContactStatus.DELIVERED, 1)


def test_a_stored_delivery_is_adopted_and_settles_the_job() -> None:
    job = Job(id="n1", contacts=[{"type": "email", "value": "a@example.com"},
                                 {"type": "bitrix", "value": 7}],
              message="hi", strategy="send_to_all_available",
              progress=[ContactProgress(), ContactProgress(ContactStatus.FAILED, 3, "550")])
    stale = RoundResult(job, [], FinalState.FAILED)
    stored = [ContactProgress(ContactStatus.DELIVERED, 1), ContactProgress()]
    r = adopt_recorded(stale, stored)
    assert [p.status for p in r.job.progress] == [ContactStatus.DELIVERED, ContactStatus.FAILED]
    assert r.final is FinalState.PARTIALLY_DELIVERED
    assert job.progress[0].status is ContactStatus.PENDING  # the round's own job is untouched
    pending = RoundResult(Job(id="n2", contacts=job.contacts, message="hi",
                              strategy="send_to_first_available"), [], None, 3.0)
    r = adopt_recorded(pending, stored)
    assert (r.final, r.retry_in_s) == (FinalState.DELIVERED, 0.0)
    assert adopt_recorded(stale, [ContactProgress(), ContactProgress()]) is stale


async def test_guarded_channel_keeps_deliveries_reported_before_the_batch_failed() -> None:
    seen: list[tuple[int, SendStatus]] = []

    async def on_result(i: int, r: SendResult) -> None:
        seen.append((i, r.status))

    g = GuardedChannel(BrokenChannel(ConnectionResetError("server went away"), reported=1),
                       CircuitBreaker(failures=2, reset_s=60.0))
    batch = [Delivery(f"n{i}", 0, f"u{i}@example.com", "hi") for i in range(3)]
    results = await g.send(batch, on_result)
    assert [r.status for r in results] == [SendStatus.DELIVERED] + [SendStatus.TRANSIENT] * 2
    assert seen == [(0, SendStatus.DELIVERED), (1, SendStatus.TRANSIENT), (2, SendStatus.TRANSIENT)]


async def test_guarded_channel_reports_a_refused_batch() -> None:
    breaker = CircuitBreaker(failures=1, reset_s=60.0)
    breaker.record(SendStatus.TRANSIENT)
    g = GuardedChannel(ScriptedChannel("email", {}), breaker)
    seen: list[int] = []

    async def on_result(i: int, r: SendResult) -> None:
        assert r.status is SendStatus.UNAVAILABLE
        seen.append(i)

    await g.send([Delivery("n", 0, "a@example.com", "hi")] * 2, on_result)
    assert seen == [0, 1]
