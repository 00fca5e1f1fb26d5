"""The notification service's ports and the values they carry: the store, the
dispatcher hand-off, channels and their results."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from stages.notifications.dispatch import Attempt, Job, RoundResult


@dataclass(frozen=True, slots=True)
class NotificationDraft:
    """A validated notification about to be stored."""

    id: str
    subject_id: str
    subject_name: str | None
    contacts: list[dict[str, Any]]
    message: str
    is_immediate: bool
    strategy: str
    created_at: float  # seconds since the epoch


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """The final response of a request that carried an ``Idempotency-Key``, stored in the
    same transaction as the notifications it accepted. ``claim`` identifies this request's
    hold on the key (another request may have taken an abandoned key over)."""

    subject_id: str
    key: str
    claim: str
    status: int
    body: bytes


class IdempotencyLost(Exception):
    """The key is no longer held by this request: nothing was stored."""


@dataclass(frozen=True)
class IdempotencyClaim:
    """``new``: go ahead (the key is now in flight for us); ``replay``: answer the stored
    response; ``conflict``: same key, different body (422); ``in_flight``: 409."""

    outcome: str
    status: int | None = None
    body: bytes | None = None
    claim: str | None = None  # for ``new``: this request's hold on the key


class NotificationStore(Protocol):
    """Where accepted notifications live until they reach a final state.

    Guarantees: ``accept`` stores the notifications *and* their outbox entries in one
    transaction — when it returns, every one of them will be dispatched even if this
    process dies right after (the dispatcher's outbox loop resumes it); when it raises,
    none was stored. Storing an id twice is refused (the whole call raises). With an
    ``idempotency`` record, the key is marked done with its response in that same
    transaction, so a repeat of the request after the commit always replays the response
    and never stores (sends) again; if the key is no longer held by ``record.claim`` it
    raises ``IdempotencyLost`` and stores nothing.
    """

    async def accept(self, drafts: Sequence[NotificationDraft],
                     idempotency: IdempotencyRecord | None = None) -> None: ...


class DispatchKick(Protocol):
    """Asks the dispatcher to send these (immediate) notifications now.

    Best effort and non-blocking: a kick may be lost; the outbox loop still sends every
    stored notification, only later.
    """

    def kick(self, ids: Sequence[str]) -> None: ...


class SendStatus(StrEnum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"  # may succeed later: retried with backoff
    PERMANENT = "permanent"  # will not succeed: this contact has failed
    UNAVAILABLE = "unavailable"  # the channel is not working now (breaker open)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message to one contact on one channel."""

    notification_id: str
    contact_index: int
    address: str | int
    message: str
    subject_name: str | None = None


@dataclass(frozen=True, slots=True)
class SendResult:
    status: SendStatus
    detail: str | None = None  # error text, or the provider's id on success

    @classmethod
    def ok(cls, detail: str | None = None) -> SendResult:
        return cls(SendStatus.DELIVERED, detail)

    @classmethod
    def transient(cls, detail: str) -> SendResult:
        return cls(SendStatus.TRANSIENT, detail)

    @classmethod
    def permanent(cls, detail: str) -> SendResult:
        return cls(SendStatus.PERMANENT, detail)


ResultCallback = Callable[[int, SendResult], Awaitable[None]]
"""``on_result(index, result)``: the result of ``deliveries[index]``, as soon as it is known."""


class Channel(Protocol):
    """A way to reach a contact (``kind`` is the contact type it serves).

    Guarantees: ``send`` returns exactly one result per delivery, in the same order, and
    classifies every failure as transient (worth retrying: timeouts, connection errors,
    SMTP 4xx, HTTP 5xx/429, rate limits) or permanent (SMTP 5xx, a rejected recipient);
    it raises only when the whole batch could not be attempted, which callers treat as
    transient for every item. Delivery is at-least-once: a message sent just before the
    process died may be sent again when the outbox resumes it. ``available`` is False
    while the channel should not be tried (its circuit breaker is open); a channel may
    also say how long that lasts with ``retry_after_s()`` (see ``GuardedChannel``).

    ``on_result``, when given, is awaited once per delivery with its index in
    ``deliveries`` and the same result ``send`` returns for it, as soon as that result is
    known and before ``send`` returns (in completion order, not list order). A channel
    starts no further send on the lane (connection, request sequence) that produced a
    result until ``on_result`` for it has returned, so a caller that records each result
    there has, at any instant, at most the channel's concurrent sends done but not yet
    recorded. ``on_result`` should not raise: an exception from it propagates out of
    ``send``. A ``send`` that raises may have reported some deliveries already.
    """

    kind: str

    def available(self) -> bool: ...

    async def send(self, deliveries: Sequence[Delivery],
                   on_result: ResultCallback | None = None) -> list[SendResult]: ...


async def report_all(results: Sequence[SendResult], on_result: ResultCallback | None,
                     skip: frozenset[int] = frozenset()) -> None:
    """Report results not reported yet (indexes not in ``skip``) through ``on_result``:
    for channels that know a batch's results all at once (a breaker refusing it, a batch
    that failed as a whole)."""
    if on_result is None:
        return
    for i, result in enumerate(results):
        if i not in skip:
            await on_result(i, result)


class NotificationApiStore(NotificationStore, Protocol):
    """What the HTTP API reads and writes besides accepting notifications."""

    async def ping(self) -> None:
        """Raises when the store cannot be reached."""
        ...

    async def get(self, notification_id: str) -> dict[str, Any] | None:
        """The notification as the API shows it (status, attempts per contact); None
        when there is no such notification. Reads committed state."""
        ...

    async def idempotency_begin(self, subject_id: str, key: str, request_hash: str,
                                ttl_s: float, lease_s: float) -> IdempotencyClaim:
        """Claim ``key`` of ``subject_id`` for one request, atomically: of concurrent
        requests with the same key one gets ``new`` (with a claim token), the others
        ``in_flight``; a key done before answers ``replay`` (same body) or ``conflict``
        (another body). A claim older than ``lease_s`` (its request died) is taken over."""
        ...

    async def idempotency_finish(self, subject_id: str, key: str, status: int, body: bytes,
                                 claim: str | None = None) -> bool:
        """Store the response of a request that stored no notification (a 400): only a
        key still held (by ``claim``, when given) is updated; returns whether it was."""
        ...

    async def idempotency_release(self, subject_id: str, key: str,
                                  claim: str | None = None) -> None:
        """The request failed before anything was stored: the key may be used again. A
        key already done (its notifications committed) is kept, so repeats replay it."""
        ...


class DeliveryJournal(Protocol):
    """Where a dispatcher records each delivered send the moment it completes."""

    async def record_delivered(self, attempt: Attempt) -> None:
        """Record that ``attempt`` (status ``delivered``) reached its contact: the contact
        is marked delivered with ``attempt.attempt`` attempts and the attempt is stored,
        in one committed transaction before this returns. From then on a claim of the
        notification sees the contact delivered and no round sends to it again, and a
        later ``finish_round`` never turns it back (even one holding older progress).
        Idempotent: recording the same attempt again changes nothing."""
        ...


class DispatchQueue(DeliveryJournal, Protocol):
    """The dispatcher's view of the notification outbox.

    Claims are leases (``lease_s``): claimed notifications are handed to no one else
    until the lease runs out, so a dead dispatcher's work is resumed by another after it
    (at-least-once). ``record_delivered`` commits each delivered send as it completes, so
    a resumed notification repeats at most the sends whose record had not committed when
    the dispatcher died. ``finish_round`` records the round's other attempts and each
    job's new state or next due time in one transaction.
    """

    async def claim_ids(self, ids: Sequence[str], lease_s: float) -> list[Job]:
        """These notifications, if they are due and nobody holds them."""
        ...

    async def claim_urgent(self, limit: int, lease_s: float) -> list[Job]:
        """Immediate notifications (a lost hand-off, a dead process) and due retries."""
        ...

    async def claim_queued(self, limit: int, lease_s: float) -> list[Job]:
        """Queued notifications never tried yet (the batch flush), oldest first."""
        ...

    async def finish_round(self, results: Sequence[RoundResult]) -> None:
        """Store every attempt of the round (one already recorded by ``record_delivered``
        is not stored twice), each job's progress (a contact recorded delivered stays
        delivered, and a job's final state accounts for it) and either its final state
        (the job leaves the outbox) or its next due time, in one transaction."""
        ...

    async def release(self, ids: Sequence[str]) -> None:
        """Give claimed jobs back (a round could not run): claimable again at once."""
        ...

    async def purge_expired(self) -> int:
        """Remove expired idempotency keys; returns how many."""
        ...

    async def stats(self) -> dict[str, float]:
        """Counts by state, for metrics."""
        ...
