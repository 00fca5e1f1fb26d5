"""Ports of the event bus (out), the Kafka ingress (in) and the chat cache, with what each
guarantees. Adapters: ``adapters/kafka_events.py``, ``event_outbox.py``, ``event_relay.py``,
``kafka_ingress.py``, ``redis_cache.py``; their integration tests check this text.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from stages.ports import StoredMessage


class EventPublisher(Protocol):
    """Publishes encoded ``conveyor.events`` records (key, JSON value)."""

    async def publish(self, records: Sequence[tuple[str, bytes]]) -> None:
        """Returns only after the broker acknowledged every record (``acks=all``), else
        raises; after a failure any part may have been written, and publishing the same
        records again is the recovery (at-least-once: a repeat carries the same
        ``eventId``). One key's records keep the order given, also across a failure and
        its retry (first occurrences stay in order)."""
        ...


class Intake(StrEnum):
    """A pipeline's answer to one batch of ingress records."""

    ACCEPTED = "accepted"  # applied: commit, keep reading
    SATURATED = "saturated"  # applied, and the pipeline is now at its limit: commit, pause
    REFUSED = "refused"  # not applied (the pipeline is full): pause, then re-read the batch


@dataclass(frozen=True, slots=True)
class IngressRecord:
    """A valid ingress record: ``type`` (system, chat, notification), the producer's ``id``
    (the dedup key) and the type's validated fields, with where it was read."""

    type: str
    id: str
    fields: dict[str, Any]
    topic: str
    partition: int
    offset: int
    key: str | None = None
    raw: bytes | None = None  # the record's value as read (for a dead letter)


IngressHandler = Callable[[list[IngressRecord]], Awaitable[Intake | None]]
"""Takes one batch into the pipelines. Returning (``ACCEPTED``/``SATURATED``/None) means
every record is applied or durably queued: the consumer commits the offsets. ``REFUSED``
or raising means nothing was applied: the batch is read again later. A record may be
handed over again after a crash between acceptance and commit: the handler dedupes by
record ``id`` (chat: (senderId, id) in the store; notification: id per subject; system:
the dedup window)."""


class CacheUnavailable(Exception):
    """The cache did not answer in time (down, unreachable, overloaded): use PostgreSQL."""


class ChatCache(Protocol):
    """Recent rows of each chat and members' unread counters, never the source of truth.

    Every method raises ``CacheUnavailable`` within the adapter's timeout when the cache
    cannot be reached; it never hangs. Writes that failed are undone (the chat dropped)
    before the same process serves from the cache again.
    """

    async def ping(self) -> None:
        """Returns when the cache answers; raises ``CacheUnavailable`` otherwise."""
        ...

    async def append(self, rows: Sequence[StoredMessage]) -> None:
        """Rows ``persist`` committed (messages and commands). Idempotent and order
        tolerant: a row seen before changes nothing; a row after a gap restarts the chat's
        window at that row. Commands are applied to their cached target as the store
        applied them (edit body, tombstone, reaction counts)."""
        ...

    async def fill(self, chat_id: str, rows: Sequence[StoredMessage]) -> None:
        """Rows read from the store (contiguous, ascending, up to the chat's last seq);
        kept only if the chat is cold, since a warm window may hold newer effects."""
        ...

    async def fill_unread(self, user_id: str, chats: Sequence[Mapping[str, Any]]) -> None:
        """Counters from the store's chat list (``chatId``, ``unreadCount``, ``lastSeq``,
        ``readSeq``, one snapshot); a counter cached at a later seq is kept."""
        ...

    async def mark_read(self, chat_id: str, user_id: str, read_seq: int) -> None:
        """The member's read pointer moved to ``read_seq``: the counter drops exactly, or
        goes cold when the rows in between are no longer cached."""
        ...

    async def recent(self, chat_id: str, after_seq: int, limit: int) -> list[StoredMessage] | None:
        """What ``MessageStore.messages_after`` returns for the same arguments, or ``None``
        when the cached window does not cover the range (read the store instead)."""
        ...

    async def unread(self, user_id: str, chat_ids: Sequence[str],
                     at_least: Mapping[str, tuple[int, int]] | None = None
                     ) -> dict[str, int] | None:
        """The member's unread count per chat, as the store's chat list counts it, or
        ``None`` when any of them is not cached, or (``at_least``: per chat the last seq
        and read seq of a store read) is behind that read."""
        ...
