"""The Kafka ingress: ``conveyor.ingress`` records into the pipelines (PROTOCOL.md "Kafka").

``IngressConsumer`` reads the topic in a consumer group with manual commits, parses and
validates each record, and hands the valid ones of a poll, as one batch, to an async
handler. Its guarantees:

- **At-least-once, committed only after acceptance.** The offsets of a batch are committed
  only after the handler returned without refusing it (and the batch's invalid records
  were written to the dead-letter topic). A crash, a restart, a rebalance or a refusal
  before that means the records are read again: after a restart only records whose batch
  was not accepted are re-read (a record may be handed over twice across a crash between
  acceptance and commit).
- **Dedup by record ``id`` is the handler's job**: chat records are deduped by
  (``senderId``, ``id``) in the store, like a client's frames; notifications by ``id`` per
  ``subject`` (the idempotency key); ``system`` frames by the dedup window. The consumer
  itself never drops a record it has not seen accepted.
- **Order**: one partition's records reach the handler in offset order; a refused batch is
  re-read from its first record, so nothing of a partition is skipped.
- **Backpressure.** When the pipeline is saturated — the ``saturated`` callable says so
  before a poll, or the handler answers ``Intake.SATURATED`` (accepted, now full) or
  ``Intake.REFUSED`` (not accepted: it will be re-read) — every assigned partition is
  paused (the consumer keeps polling, so it stays in its group) and resumed by the
  consumer itself once the signal clears (after at least ``retry_s`` when the batch was
  refused or failed). Each pause and resume is in ``timeline``.
- **Dead letters.** A record that does not parse or validate goes to the dead-letter
  topic as ``{"reason", "topic", "partition", "offset", "record"}`` (the original value as
  text) with the original key, acknowledged by the broker before the offset moves past
  it; the consumer then moves on.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from stages.bus import IngressHandler, IngressRecord, Intake
from stages.notifications import Limits, validate_item

log = logging.getLogger("conveyor.kafka.ingress")

MAX_ID_CHARS = 64  # as a client's frame id (PROTOCOL.md)


class InvalidRecord(ValueError):
    """A record that does not parse or validate; the message is the dead letter's reason."""


def _text(value: Any, name: str, *, limit: int | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRecord(f"`{name}` must be a non-empty string")
    if limit is not None and len(value) > limit:
        raise InvalidRecord(f"`{name}` is longer than {limit} characters")
    return value


def parse_record(value: bytes | None, limits: Limits = Limits()) -> tuple[str, str, dict[str, Any]]:
    """``(type, id, fields)`` of one record value, or ``InvalidRecord`` saying why not.

    - ``system``: ``to`` (non-empty list of user ids), ``event`` (string), ``data`` (object,
      default ``{}``);
    - ``chat``: ``chatId``, ``senderId``, ``body`` (string; length and membership are the
      chat pipeline's checks);
    - ``notification``: ``subject``, and every other key forms one seed-004 item, validated
      by its rules (fields: ``subject`` and the normalised ``item``).
    Unknown keys are allowed in ``system`` and ``chat`` records (the protocol may grow).
    """
    if value is None:
        raise InvalidRecord("empty record (no value)")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as e:
        raise InvalidRecord(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidRecord("not a JSON object")
    kind = doc.get("type")
    if kind not in ("system", "chat", "notification"):
        raise InvalidRecord(f"unknown type {kind!r}")
    rid = _text(doc.get("id"), "id", limit=MAX_ID_CHARS)
    if kind == "system":
        to = doc.get("to")
        if not isinstance(to, list) or not to or not all(isinstance(u, str) and u for u in to):
            raise InvalidRecord("`to` must be a non-empty list of user ids")
        data = doc.get("data", {})
        if not isinstance(data, dict):
            raise InvalidRecord("`data` must be an object")
        return kind, rid, {"to": to, "event": _text(doc.get("event"), "event"), "data": data}
    if kind == "chat":
        body = doc.get("body")
        if not isinstance(body, str):
            raise InvalidRecord("`body` must be a string")
        return kind, rid, {"chatId": _text(doc.get("chatId"), "chatId"),
                           "senderId": _text(doc.get("senderId"), "senderId"), "body": body}
    subject = _text(doc.get("subject"), "subject")
    item = {k: v for k, v in doc.items() if k not in ("type", "id", "subject")}
    normalised, issues = validate_item(item, limits)
    if normalised is None:
        raise InvalidRecord("invalid notification: " + "; ".join(
            f"{'.'.join(map(str, i['path'])) or '(item)'}: {i['message']}" for i in issues))
    return kind, rid, {"subject": subject, "item": normalised}


Signal = Callable[[], bool | Awaitable[bool]]


@dataclass
class IngressStats:
    batches: int = 0
    accepted: int = 0
    refused: int = 0
    failed: int = 0
    dead_lettered: int = 0
    commit_failures: int = 0
    timeline: deque[tuple[float, str, str]] = field(default_factory=lambda: deque(maxlen=1000))


class IngressConsumer:
    def __init__(self, bootstrap: str, topic: str, group_id: str, handler: IngressHandler, *,
                 dlq_topic: str, saturated: Signal | None = None, max_batch: int = 500,
                 poll_ms: int = 200, retry_s: float = 1.0, client_id: str = "conveyor-ingress",
                 limits: Limits = Limits(), timeout_s: float = 10.0) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.group_id = group_id
        self.handler = handler
        self.dlq_topic = dlq_topic
        self.saturated = saturated
        self.max_batch = max_batch
        self.poll_ms = poll_ms
        self.retry_s = retry_s
        self.client_id = client_id
        self.limits = limits
        self.timeout_s = timeout_s
        self.stats = IngressStats()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._pausing = False
        self._hold_until = 0.0  # no resume before this (monotonic)
        self._dead_sent: deque[tuple[str, int, int]] = deque(maxlen=10_000)
        self._stop = asyncio.Event()
        self._stopped = asyncio.Event()  # set while no ``run()`` loop is active
        self._stopped.set()

    # --- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            self.topic, bootstrap_servers=self.bootstrap, group_id=self.group_id,
            client_id=self.client_id, enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=self.max_batch,
            # A broker may hold a JoinGroup until its rebalance settles (members that left,
            # the initial delay): a join timed out and retried leaves one more member to
            # wait for, so a short timeout can keep the group from ever forming.
            request_timeout_ms=int(max(self.timeout_s, 40.0) * 1000))
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, client_id=f"{self.client_id}-dlq", acks="all",
            request_timeout_ms=int(self.timeout_s * 1000))
        await self._consumer.start()
        await self._producer.start()

    async def stop(self) -> None:
        """Let a running ``run()`` finish its batch, then leave the group (uncommitted
        records go to the next owner) and close."""
        self._stop.set()
        try:
            await asyncio.wait_for(self._stopped.wait(), self.timeout_s + self.poll_ms / 1000)
        except TimeoutError:
            log.warning("ingress loop did not finish its batch in time; closing anyway")
        consumer, producer = self._consumer, self._producer
        self._consumer = self._producer = None
        for client in (consumer, producer):
            if client is not None:
                try:
                    await asyncio.wait_for(client.stop(), self.timeout_s)
                except Exception as e:
                    log.debug("closing %s: %r", type(client).__name__, e)

    async def run(self) -> None:
        """Poll until ``stop()``; a failing poll is logged and retried after ``retry_s``."""
        self._stop.clear()
        self._stopped.clear()
        try:
            while not self._stop.is_set() and self._consumer is not None:
                try:
                    await self.step()
                except Exception as e:
                    log.warning("ingress poll failed: %r", e)
                    await asyncio.sleep(self.retry_s)
        finally:
            self._stopped.set()

    # --- state ----------------------------------------------------------------------
    def paused(self) -> set[TopicPartition]:
        return set(self._consumer.paused()) if self._consumer is not None else set()

    @property
    def timeline(self) -> list[tuple[float, str, str]]:
        """``(monotonic time, "pause" | "resume", reason)`` of every transition."""
        return list(self.stats.timeline)

    @property
    def pausing(self) -> bool:
        return self._pausing

    def _pause(self, reason: str, hold_s: float = 0.0) -> None:
        consumer = self._consumer
        assert consumer is not None
        self._hold_until = max(self._hold_until, time.monotonic() + hold_s)
        if not self._pausing:
            self._pausing = True
            self.stats.timeline.append((time.monotonic(), "pause", reason))
            log.info("ingress paused: %s", reason)
        consumer.pause(*consumer.assignment())  # again after a rebalance: new partitions too

    def _resume(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        self._pausing = False
        consumer.resume(*consumer.paused())
        self.stats.timeline.append((time.monotonic(), "resume", "clear"))
        log.info("ingress resumed")

    async def _signal(self) -> bool:
        if self.saturated is None:
            return False
        answer = self.saturated()
        if inspect.isawaitable(answer):
            answer = await answer
        return bool(answer)

    # --- one poll -------------------------------------------------------------------
    async def step(self) -> int:
        """One poll: pause/resume by the signal, read, dead-letter, hand over, commit.
        Returns how many records were accepted."""
        consumer = self._consumer
        assert consumer is not None
        saturated = await self._signal()
        if saturated:
            self._pause("saturated")
        elif self._pausing:
            if time.monotonic() >= self._hold_until:
                self._resume()
            else:
                consumer.pause(*consumer.assignment())
        data = await consumer.getmany(timeout_ms=self.poll_ms, max_records=self.max_batch)
        if not data:
            return 0
        self.stats.batches += 1
        valid: list[IngressRecord] = []
        dead: list[tuple[ConsumerRecord[Any, Any], str]] = []
        for tp, records in data.items():
            for r in records:
                try:
                    kind, rid, fields = parse_record(r.value, self.limits)
                except InvalidRecord as e:
                    dead.append((r, str(e)))
                    continue
                key = r.key.decode("utf-8", "replace") if r.key is not None else None
                valid.append(IngressRecord(kind, rid, fields, tp.topic, tp.partition, r.offset,
                                           key, r.value))
        try:
            await self._dead_letter_read(dead)
            verdict = await self.handler(valid) if valid else Intake.ACCEPTED
        except Exception as e:
            log.warning("ingress batch not accepted, it will be read again: %r", e)
            self.stats.failed += len(valid)
            self._rewind(data)
            self._pause(f"failed: {e!r}", self.retry_s)
            return 0
        if verdict is Intake.REFUSED:
            self.stats.refused += len(valid)
            self._rewind(data)
            self._pause("refused", self.retry_s)
            return 0
        await self._commit(data)
        self.stats.accepted += len(valid)
        if verdict is Intake.SATURATED:
            self._pause("saturated", 0.0 if self.saturated is not None else self.retry_s)
        return len(valid)

    def _rewind(self, data: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> None:
        consumer = self._consumer
        assert consumer is not None
        for tp, records in data.items():
            if records and tp in consumer.assignment():
                consumer.seek(tp, records[0].offset)

    async def _commit(self, data: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> None:
        consumer = self._consumer
        assert consumer is not None
        offsets = {tp: records[-1].offset + 1 for tp, records in data.items() if records}
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as e:
            # The group rebalanced meanwhile: the new owner reads these again and the
            # handler's dedup by id absorbs the repeat.
            self.stats.commit_failures += 1
            log.warning("ingress commit failed (records will be read again): %r", e)

    async def dead_letter_valid(self, items: Sequence[tuple[IngressRecord, str]]) -> None:
        """Records that parsed but the pipeline refused (not a member, no such chat...):
        to the dead-letter topic with the reason, as invalid ones. The handler calls this
        before it returns, so the letters are acknowledged before the offsets move."""
        await self._dead_letter([
            (r.topic, r.partition, r.offset, r.key.encode() if r.key is not None else None,
             r.raw, reason) for r, reason in items])

    async def _dead_letter_read(self, dead: Sequence[tuple[ConsumerRecord[Any, Any], str]]
                                ) -> None:
        await self._dead_letter([(r.topic, r.partition, r.offset, r.key, r.value, reason)
                                 for r, reason in dead])

    async def _dead_letter(self, dead: Sequence[tuple[str, int, int, bytes | None, bytes | None,
                                                      str]]) -> None:
        producer = self._producer
        assert producer is not None
        futures = []
        sent: list[tuple[str, int, int]] = []
        for topic, partition, offset, key, value, reason in dead:
            where = (topic, partition, offset)
            if where in self._dead_sent:  # re-read after a refused batch: written already
                continue
            text = value.decode("utf-8", "replace") if value is not None else None
            letter = orjson.dumps({"reason": reason, "topic": topic, "partition": partition,
                                   "offset": offset, "record": text})
            futures.append(await producer.send(self.dlq_topic, letter, key=key))
            sent.append(where)
        if futures:
            await asyncio.wait_for(asyncio.gather(*futures), self.timeout_s)
            self._dead_sent.extend(sent)
            self.stats.dead_lettered += len(sent)
            log.info("dead-lettered %d ingress record(s)", len(sent))
