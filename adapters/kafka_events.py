"""The ``conveyor.events`` records of PROTOCOL.md and the producer that publishes them.

A record's value is a JSON object with ``eventId``, ``type``, ``at`` and the fields of its
type; its key is the chat id (message, command, receipt) or the notification id, so that
one chat's events land on one partition and keep their order.

``eventId`` is fixed when the event is built (the outbox stores the encoded value), so a
record published again after a failure is byte for byte the same: consumers dedupe by it.
For rows of a chat's seq stream (messages and commands) it is the row's id — the
``messageId`` of a message, the ``eventId`` a ``command`` frame already carries on the
WebSocket; receipts and notification status changes get a fresh UUID.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.partitioner import DefaultPartitioner

from stages.notifications import rfc3339_ms
from stages.ports import COMMAND_KINDS, ChatDraft, Stored, StoredMessage

log = logging.getLogger("conveyor.kafka.events")


def now_rfc3339() -> str:
    return rfc3339_ms(time.time())


@dataclass(frozen=True, slots=True)
class Event:
    """One ``conveyor.events`` record before it is encoded: ``key`` and the JSON object."""

    key: str
    value: dict[str, Any]

    @property
    def event_id(self) -> str:
        return str(self.value["eventId"])

    def encode(self) -> bytes:
        return orjson.dumps(self.value)


def message_event(msg: StoredMessage) -> Event:
    """A stored row of a chat's seq stream as its event: ``message`` (text, attachment) or
    ``command`` (edit, react, delete), with the fields of the WebSocket frame of the same
    name. ``eventId`` is the row's id."""
    frame = msg.frame()
    frame["eventId"] = msg.message_id
    frame["at"] = msg.created_at
    return Event(msg.chat_id, frame)


def stored_row(draft: ChatDraft, stored: Stored) -> StoredMessage:
    """The row ``persist`` just wrote for ``draft`` (not a duplicate, not refused), as
    ``messages_after`` would return it right after the commit."""
    return StoredMessage(
        message_id=stored.message_id, chat_id=stored.chat_id, seq=stored.seq,
        sender_id=draft.sender_id, kind=draft.kind, body=draft.body,
        created_at=stored.created_at, attachment=draft.attachment,
        target=draft.target if draft.kind in COMMAND_KINDS else None, data=stored.data)


def chat_events(drafts: Sequence[ChatDraft], stored: Sequence[Stored]) -> list[Event]:
    """The events of one ``persist`` batch, in seq order per chat: one per newly stored
    row; duplicates and refused drafts have none."""
    rows = [stored_row(d, s) for d, s in zip(drafts, stored, strict=True)
            if not s.duplicate and s.error is None and s.message_id]
    rows.sort(key=lambda m: (m.chat_id, m.seq))
    return [message_event(m) for m in rows]


def receipt_event(chat_id: str, user_id: str, status: str, up_to_seq: int,
                  at: str | None = None) -> Event:
    """A member's ``delivered`` or ``read`` pointer moved to ``up_to_seq``."""
    return Event(chat_id, {"eventId": str(uuid.uuid4()), "type": "receipt", "at": at or now_rfc3339(),
                           "chatId": chat_id, "userId": user_id, "status": status,
                           "upToSeq": up_to_seq})


def receipt_events(moves: Sequence[Mapping[str, Any]]) -> list[Event]:
    """The events of pointer moves: rows with ``chat_id, user_id, was_delivered,
    was_read, delivered_seq, read_seq`` (before and after); a pointer that did not move
    has no event."""
    at = now_rfc3339()
    out: list[Event] = []
    for m in sorted(moves, key=lambda m: (m["chat_id"], m["user_id"])):
        if m["delivered_seq"] > m["was_delivered"]:
            out.append(receipt_event(m["chat_id"], m["user_id"], "delivered", m["delivered_seq"], at))
        if m["read_seq"] > m["was_read"]:
            out.append(receipt_event(m["chat_id"], m["user_id"], "read", m["read_seq"], at))
    return out


def notification_event(notification_id: str, status: str, *, channel: str | None = None,
                       attempt: int | None = None, error: str | None = None,
                       at: str | None = None, **extra: Any) -> Event:
    """A notification's status changed (``accepted``, ``processing``, a final state), or
    an attempt on ``channel`` was recorded under the status it left the notification in.
    ``extra`` adds fields (protocol extensions), e.g. ``attemptStatus``."""
    value: dict[str, Any] = {"eventId": str(uuid.uuid4()), "type": "notification",
                             "at": at or now_rfc3339(), "notificationId": notification_id,
                             "status": status}
    if channel is not None:
        value["channel"] = channel
    if attempt is not None:
        value["attempt"] = attempt
    if error is not None:
        value["error"] = error
    value.update(extra)
    return Event(notification_id, value)


def attempt_event(attempt: Any, status: str, at: str | None = None) -> Event:
    """One attempt (``stages.notifications.Attempt``) under the status it left its
    notification in."""
    delivered = attempt.status.value == "delivered"
    return notification_event(
        attempt.notification_id, status, channel=attempt.channel, attempt=attempt.attempt,
        error=None if delivered else (attempt.detail or attempt.status.value), at=at,
        attemptStatus=attempt.status.value, contactIndex=attempt.contact_index)


def round_events(results: Sequence[Any],
                 recorded: Collection[tuple[str, int, int]] = frozenset()) -> list[Event]:
    """The events of dispatch rounds (``RoundResult``s): one per attempt, under the status
    the round left its notification in (``processing`` when it will be retried, else the
    final state), with ``channel``, ``attempt``, ``error`` (the detail of an attempt that
    did not deliver) and the extensions ``attemptStatus`` and ``contactIndex``; a final
    state reached without an attempt has one event of its own. Deliveries in ``recorded``
    (notification id, contact index, attempt) had their event when they were recorded
    one by one: they get none here, and a final state they alone reached gets its own."""
    at = now_rfc3339()
    out: list[Event] = []
    for r in results:
        status = r.final.value if r.final is not None else "processing"
        fresh = [a for a in r.attempts if a.status.value != "delivered"
                 or (a.notification_id, a.contact_index, a.attempt) not in recorded]
        out.extend(attempt_event(a, status, at) for a in fresh)
        if not fresh and r.final is not None:
            out.append(notification_event(r.job.id, status, at=at))
    return out


class PublishError(Exception):
    """The broker did not acknowledge every record of a batch (down, timed out, refused)."""


class EventPublisher:
    """``stages.bus.EventPublisher``: encoded events to one topic through an aiokafka
    producer.

    Guarantees of ``publish``:
    - It returns only after the broker acknowledged every record with ``acks=all`` (all
      in-sync replicas hold it); otherwise it raises ``PublishError`` and any part of the
      batch may have been written: publishing the same records again is how to recover
      (at-least-once; a repeat carries the same ``eventId``).
    - Records of one key go to one partition (Kafka's murmur2 partitioner, as Java clients
      place them) in the order given. One partition's records are sent batch after batch,
      each only after the previous one was acknowledged, so a failure never lets a later
      record of a key overtake an earlier one.
    - The producer is idempotent (``enable_idempotence``) where the broker supports it; a
      broker that refuses a producer id gets a plain ``acks=all`` producer (logged once):
      retries inside the client may then write a record twice, which consumers' dedup by
      ``eventId`` absorbs.
    - It never waits longer than ``timeout_s`` in all; the broker being down makes it fail
      fast on every call until the broker is back (the client reconnects by itself).
    """

    def __init__(self, bootstrap: str, topic: str, *, timeout_s: float = 10.0,
                 client_id: str = "conveyor-events", max_batch_bytes: int = 1024 * 1024,
                 idempotence: bool = True) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout_s = timeout_s
        self.client_id = client_id
        self.max_batch_bytes = max_batch_bytes
        self.want_idempotence = idempotence
        self.idempotent: bool | None = None  # known once started
        self._producer: AIOKafkaProducer | None = None
        self._partitioner = DefaultPartitioner()
        self._lock = asyncio.Lock()

    def _make(self, idempotence: bool) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, client_id=self.client_id, acks="all",
            enable_idempotence=idempotence, request_timeout_ms=int(self.timeout_s * 1000),
            max_batch_size=self.max_batch_bytes, max_request_size=self.max_batch_bytes * 2,
            retry_backoff_ms=100, linger_ms=0)

    async def start(self) -> None:
        """Connect (idempotently). Raises ``PublishError`` when the broker is unreachable."""
        if self._producer is not None:
            return
        idempotence = self.want_idempotence if self.idempotent is None else self.idempotent
        producer = self._make(idempotence)
        try:
            await asyncio.wait_for(producer.start(), self.timeout_s)
        except (KafkaConnectionError, TimeoutError) as e:
            await _quietly_stop(producer)
            raise PublishError(f"broker unreachable: {e!r}") from e
        except KafkaError as e:
            await _quietly_stop(producer)
            if not idempotence:
                raise PublishError(f"producer refused: {e!r}") from e
            log.warning("broker refused an idempotent producer (%r): using acks=all without it", e)
            producer = self._make(False)
            try:
                await asyncio.wait_for(producer.start(), self.timeout_s)
            except (KafkaError, TimeoutError) as e2:
                await _quietly_stop(producer)
                raise PublishError(f"broker unreachable: {e2!r}") from e2
            idempotence = False
        self.idempotent = idempotence
        self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await _quietly_stop(producer, self.timeout_s)

    async def publish(self, records: Sequence[tuple[str, bytes]]) -> None:
        """Publish ``(key, value)`` records; see the class for the guarantees."""
        if not records:
            return
        async with self._lock:  # one batch at a time keeps partitions' order across calls
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self.start()
                    producer = self._producer
                    assert producer is not None
                    partitions = sorted(await producer.partitions_for(self.topic))
                    if not partitions:
                        raise PublishError(f"topic {self.topic!r} has no partitions")
                    by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
                    for key, value in records:
                        k = key.encode()
                        p = self._partitioner(k, partitions, partitions)
                        by_partition.setdefault(p, []).append((k, value))
                    await asyncio.gather(*(self._send_in_order(producer, p, items)
                                           for p, items in by_partition.items()))
            except PublishError:
                raise
            except (KafkaError, TimeoutError, OSError) as e:
                if isinstance(e, KafkaError) and not e.retriable:
                    await self._discard()  # a fatal producer state: start afresh next time
                raise PublishError(f"not acknowledged: {e!r}") from e

    async def _discard(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            log.warning("event producer reset after a non-retriable error")
            await _quietly_stop(producer, 1.0)

    async def _send_in_order(self, producer: AIOKafkaProducer, partition: int,
                             items: list[tuple[bytes, bytes]]) -> None:
        i = 0
        while i < len(items):
            batch = producer.create_batch()
            start = i
            while i < len(items) and batch.append(key=items[i][0], value=items[i][1],
                                                  timestamp=None) is not None:
                i += 1
            if i == start:
                raise PublishError(f"record of {len(items[i][1])} bytes exceeds the batch limit")
            future = await producer.send_batch(batch, self.topic, partition=partition)
            # A timeout must not cancel the client's own future (it still owns the batch);
            # its late outcome is read here so that it is never reported as unretrieved.
            future.add_done_callback(_consume)
            await asyncio.shield(future)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _quietly_stop(producer: AIOKafkaProducer, timeout_s: float = 5.0) -> None:
    try:
        await asyncio.wait_for(producer.stop(), timeout_s)
    except Exception as e:  # closing a client whose broker is gone: nothing left to do
        log.debug("producer stop: %r", e)
