"""The notification service's ports and the values they carry: the store, the
dispatcher hand-off, channels and their results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from stages.notifications.dispatch import Job, RoundResult


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
    """

    kind: str

    def available(self) -> bool: ...

    async def send(self, deliveries: Sequence[Delivery]) -> list[SendResult]: ...


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


class DispatchQueue(Protocol):
    """The dispatcher's view of the notification outbox.

    Claims are leases (``lease_s``): claimed notifications are handed to no one else
    until the lease runs out, so a dead dispatcher's work is resumed by another after it
    (at-least-once: a send just before the death may be repeated). ``finish_round``
    records every attempt and each job's new state or next due time in one transaction.
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

    async def finish_round(self, results: Sequence[RoundResult]) -> None: ...

    async def release(self, ids: Sequence[str]) -> None:
        """Give claimed jobs back (a round could not run): claimable again at once."""
        ...

    async def purge_expired(self) -> int:
        """Remove expired idempotency keys; returns how many."""
        ...

    async def stats(self) -> dict[str, float]:
        """Counts by state, for metrics."""
        ...
