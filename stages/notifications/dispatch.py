"""Dispatch: a strategy over each notification's contacts, one round at a time."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from stages.notifications.ports import Channel, Delivery, SendResult, SendStatus
from stages.notifications.resilience import RetryPolicy


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


def _settle(job: Job, policy: RetryPolicy, rng: Callable[[], float]) -> tuple[FinalState | None, float]:
    statuses = [p.status for p in job.progress]
    delivered = statuses.count(ContactStatus.DELIVERED)
    pending = statuses.count(ContactStatus.PENDING)
    if job.strategy == "send_to_first_available":
        if delivered:
            return FinalState.DELIVERED, 0.0
        if pending:
            return None, policy.delay(job.round, rng)
        return FinalState.FAILED, 0.0
    if pending:
        return None, policy.delay(job.round, rng)
    tried = [s for s in statuses if s is not ContactStatus.SKIPPED]
    if delivered and delivered == len(tried):
        return FinalState.DELIVERED, 0.0
    if delivered:
        return FinalState.PARTIALLY_DELIVERED, 0.0
    return FinalState.FAILED, 0.0


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
    queue: dict[str, list[int]] = {
        j.id: [i for i, p in enumerate(j.progress) if p.status is ContactStatus.PENDING]
        for j in jobs
    }
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
            if channel.available():
                results = await channel.send([
                    Delivery(job.id, i, job.contacts[i]["value"], job.message, job.subject_name)
                    for job, i in items
                ])
            else:
                results = [SendResult(SendStatus.UNAVAILABLE, f"{kind} channel is not working")
                           ] * len(items)
            took = (clock() - t0) / max(1, len(items))
            for (job, i), res in zip(items, results, strict=True):
                prog = job.progress[i]
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
                attempts[job.id].append(Attempt(job.id, i, kind, prog.attempts, res.status,
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
