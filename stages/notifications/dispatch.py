"""Dispatch: a strategy over each notification's contacts, one round at a time."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from stages.notifications.ports import (
    Channel,
    Delivery,
    DeliveryJournal,
    ResultCallback,
    SendResult,
    SendStatus,
)
from stages.notifications.resilience import RetryPolicy

log = logging.getLogger("conveyor.notifications")


class ContactStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    SKIPPED = "skipped"  # no channel configured for this contact type


class FinalState(StrEnum):
    DELIVERED = "delivered"
    PARTIALLY_DELIVERED = "partially_delivered"
    FAILED = "failed"


@dataclass
class ContactProgress:
    status: ContactStatus = ContactStatus.PENDING
    attempts: int = 0
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status.value, "attempts": self.attempts, "lastError": self.last_error}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ContactProgress:
        return cls(ContactStatus(data.get("status", "pending")), int(data.get("attempts", 0)),
                   data.get("lastError"))


@dataclass
class Job:
    """A notification being dispatched, with what earlier rounds achieved."""

    id: str
    contacts: list[dict[str, Any]]
    message: str
    strategy: str
    subject_name: str | None = None
    round: int = 0
    progress: list[ContactProgress] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.progress:
            self.progress = [ContactProgress() for _ in self.contacts]


@dataclass(frozen=True, slots=True)
class Attempt:
    notification_id: str
    contact_index: int
    channel: str
    attempt: int
    status: SendStatus
    detail: str | None
    duration_s: float


@dataclass
class RoundResult:
    job: Job
    attempts: list[Attempt]
    final: FinalState | None  # None: not finished, retry after ``retry_in_s``
    retry_in_s: float = 0.0


def final_state(job: Job) -> FinalState | None:
    """The final state ``job``'s progress implies, or None while it has contacts to try.

    ``send_to_first_available`` is delivered as soon as one contact is, and failed when
    none is pending; ``send_to_all_available`` is final when none is pending: delivered
    when every contact tried was, partially delivered when some were, else failed."""
    statuses = [p.status for p in job.progress]
    delivered = statuses.count(ContactStatus.DELIVERED)
    pending = statuses.count(ContactStatus.PENDING)
    if job.strategy == "send_to_first_available":
        if delivered:
            return FinalState.DELIVERED
        return None if pending else FinalState.FAILED
    if pending:
        return None
    tried = [s for s in statuses if s is not ContactStatus.SKIPPED]
    if delivered and delivered == len(tried):
        return FinalState.DELIVERED
    return FinalState.PARTIALLY_DELIVERED if delivered else FinalState.FAILED


def _settle(job: Job, policy: RetryPolicy, rng: Callable[[], float]) -> tuple[FinalState | None, float]:
    final = final_state(job)
    return final, (policy.delay(job.round, rng) if final is None else 0.0)


def adopt_recorded(result: RoundResult, recorded: Sequence[ContactProgress]) -> RoundResult:
    """``result`` with every contact that ``recorded`` (the stored progress) shows delivered
    kept delivered, and its final state recomputed when that changed anything.

    A delivered contact never goes back: a round that started from older progress (its
    lease ran out while it worked and another dispatcher delivered meanwhile) must not
    overwrite a delivery recorded since. Returns ``result`` itself when nothing changes."""
    progress = list(result.job.progress)
    changed = False
    for i, stored in enumerate(recorded[:len(progress)]):
        mine = progress[i]
        if stored.status is ContactStatus.DELIVERED and mine.status is not ContactStatus.DELIVERED:
            progress[i] = ContactProgress(ContactStatus.DELIVERED, max(mine.attempts, stored.attempts))
            changed = True
    if not changed:
        return result
    job = replace(result.job, progress=progress)
    final = final_state(job)
    return RoundResult(job, result.attempts, final, result.retry_in_s if final is None else 0.0)


def _to_try(job: Job) -> list[int]:
    """The contacts a round tries for ``job``, in order: its pending ones, none when a
    ``send_to_first_available`` job already reached a contact (an earlier round recorded
    the delivery but did not finish: its process died)."""
    if job.strategy == "send_to_first_available" and any(
            p.status is ContactStatus.DELIVERED for p in job.progress):
        return []
    return [i for i, p in enumerate(job.progress) if p.status is ContactStatus.PENDING]


def _recorder(journal: DeliveryJournal, kind: str, items: Sequence[tuple[Job, int]],
              started: float, clock: Callable[[], float],
              recorded: dict[int, Attempt]) -> ResultCallback:
    """The ``on_result`` of one channel batch: each delivered result is recorded through
    ``journal`` as it arrives (kept in ``recorded`` by batch index). A failed record is
    logged and the batch goes on: the send happened, and the round's ``finish_round``
    records it again; only a crash before that could repeat it."""
    arrived = 0

    async def on_result(k: int, res: SendResult) -> None:
        nonlocal arrived
        arrived += 1
        if res.status is not SendStatus.DELIVERED:
            return
        job, i = items[k]
        # The mean time per result so far: the same measure as the round's other attempts.
        attempt = Attempt(job.id, i, kind, job.progress[i].attempts + 1, res.status, res.detail,
                          (clock() - started) / arrived)
        recorded[k] = attempt
        try:
            await journal.record_delivered(attempt)
        except Exception:
            log.warning("recording the delivery of %s contact %d failed; the round's end "
                        "records it", job.id, i, exc_info=True, extra={"trace_id": job.id})

    return on_result


SKIP_WAIT_MIN_S = 1.0  # a passed-over job comes back no sooner than this


def _retry_after(channel: Channel) -> float:
    hint = getattr(channel, "retry_after_s", None)
    try:
        return float(hint()) if callable(hint) else 0.0
    except Exception:
        return 0.0


async def dispatch_round(
    jobs: Sequence[Job],
    channels: Mapping[str, Channel],
    policy: RetryPolicy,
    *,
    journal: DeliveryJournal | None = None,
    rng: Callable[[], float] = random.random,
    clock: Callable[[], float] = time.monotonic,
) -> list[RoundResult]:
    """One dispatch round over a batch of jobs; sends are batched per channel.

    ``send_to_first_available``: contacts are tried in order, one at a time; the first
    success ends the job. A contact whose channel is not configured is skipped for good;
    one whose channel is not working now (breaker open) or that failed transiently is
    passed over for this round (the next contact is tried) and retried next round. A
    permanent failure fails that contact.
    ``send_to_all_available``: every pending contact is tried in the same round,
    independently.
    Every contact really sent to in a round uses one of its ``policy.max_attempts``
    attempts; a contact out of attempts has failed. A contact passed over because its
    channel is not working (``unavailable``) uses none: the pass-over is recorded (with
    the number of attempts used so far) but a short outage fails nothing. Jobs with
    pending contacts come back with ``retry_in_s``: backoff + jitter after a real attempt,
    else the time until a passed-over channel may be tried again (its breaker's remaining
    reset time). ``job.round`` counts rounds with at least one real attempt.

    With a ``journal``, every delivered send is recorded through it as soon as the
    channel reports it, before that channel's lane sends anything else (see
    ``Channel.send``): a round cut short (its process killed) leaves every delivery it
    achieved recorded but at most those in flight at that instant, and a job claimed
    again never sends to a contact recorded delivered.
    """
    attempts: dict[str, list[Attempt]] = {j.id: [] for j in jobs}
    tried: set[str] = set()  # jobs with at least one real send this round
    waits: dict[str, float] = {}  # job → seconds until a passed-over channel may work
    for job in jobs:
        for i, contact in enumerate(job.contacts):
            if job.progress[i].status is ContactStatus.PENDING and contact.get("type") not in channels:
                job.progress[i].status = ContactStatus.SKIPPED
                job.progress[i].last_error = f"no {contact.get('type')} channel is configured"
    # Which contacts each job still has to try this round (in order).
    queue: dict[str, list[int]] = {j.id: _to_try(j) for j in jobs}
    by_id = {j.id: j for j in jobs}
    while True:
        wave: dict[str, list[tuple[Job, int]]] = {}
        for job in jobs:
            todo = queue[job.id]
            if not todo:
                continue
            if job.strategy == "send_to_first_available":
                picks = [todo.pop(0)]
            else:
                picks, queue[job.id] = list(todo), []
            for i in picks:
                wave.setdefault(job.contacts[i]["type"], []).append((job, i))
        if not wave:
            break
        for kind, items in wave.items():
            channel = channels[kind]
            t0 = clock()
            recorded: dict[int, Attempt] = {}  # batch index → its delivery, as recorded
            if channel.available():
                on_result = (None if journal is None
                             else _recorder(journal, kind, items, t0, clock, recorded))
                results = await channel.send([
                    Delivery(job.id, i, job.contacts[i]["value"], job.message, job.subject_name)
                    for job, i in items
                ], on_result)
            else:
                results = [SendResult(SendStatus.UNAVAILABLE, f"{kind} channel is not working")
                           ] * len(items)
            took = (clock() - t0) / max(1, len(items))
            for k, ((job, i), res) in enumerate(zip(items, results, strict=True)):
                prog = job.progress[i]
                done = recorded.get(k)
                if done is not None:  # recorded delivered: the stored truth for this contact
                    res = SendResult(SendStatus.DELIVERED, done.detail)
                if res.status is SendStatus.UNAVAILABLE:
                    # Passed over, not tried: no attempt is used.
                    prog.last_error = res.detail
                    attempts[job.id].append(Attempt(job.id, i, kind, prog.attempts, res.status,
                                                    res.detail, 0.0))
                    wait = max(SKIP_WAIT_MIN_S, _retry_after(channel))
                    waits[job.id] = min(waits.get(job.id, wait), wait)
                    continue
                tried.add(job.id)
                prog.attempts += 1
                attempts[job.id].append(done or Attempt(job.id, i, kind, prog.attempts, res.status,
                                                        res.detail, took))
                if res.status is SendStatus.DELIVERED:
                    prog.status = ContactStatus.DELIVERED
                    prog.last_error = None
                    queue[job.id] = []  # first_available: done; all: nothing left queued
                    continue
                prog.last_error = res.detail
                if res.status is SendStatus.PERMANENT or prog.attempts >= policy.max_attempts:
                    prog.status = ContactStatus.FAILED
    out: list[RoundResult] = []
    for job_id, tries in attempts.items():
        job = by_id[job_id]
        if job_id in tried:
            job.round += 1
        final, delay = _settle(job, policy, rng)
        if final is None and job_id not in tried and job_id in waits:
            # Only passed over: come back when the channel may work again (a little
            # jitter spreads the jobs that wait for the same breaker).
            delay = waits[job_id] * (1.0 + 0.1 * rng())
        if final is None and job.round >= policy.max_attempts * max(1, len(job.contacts)):
            # Safety net: never keep a job forever (rounds with real attempts only).
            for p in job.progress:
                if p.status is ContactStatus.PENDING:
                    p.status = ContactStatus.FAILED
            final, delay = _settle(job, policy, rng)
        out.append(RoundResult(job, tries, final, delay))
    return out
