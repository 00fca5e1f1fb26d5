"""The Kafka ingress against a real Kafka-protocol broker: dead letters, commits only after
acceptance (a restarted consumer re-reads only what was not accepted), and pausing while
the pipeline is saturated, then resuming by itself."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from adapters.kafka_ingress import IngressConsumer, IngressRecord, Intake, parse_record
from tests.integration.kafka_helpers import make_topics, read_topic, topic_name, values

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def topics(kafka_broker: Any) -> tuple[str, str]:
    ingress, dlq = topic_name("conveyor.ingress"), topic_name("conveyor.ingress.dlq")
    await make_topics(kafka_broker.bootstrap, ingress, partitions=2)
    await make_topics(kafka_broker.bootstrap, dlq, partitions=1)
    return ingress, dlq


async def produce(bootstrap: str, topic: str, records: list[tuple[str, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key.encode())
    finally:
        await producer.stop()


def chat(i: int) -> tuple[str, bytes]:
    return f"c{i % 3}", orjson.dumps({"type": "chat", "id": f"m{i}", "chatId": f"c{i % 3}",
                                      "senderId": "svc", "body": f"hello {i}"})


async def until(cond: Callable[[], bool], consumer: IngressConsumer, timeout_s: float = 30) -> None:
    """Poll the consumer step by step until ``cond()`` (bounded in time and steps)."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s * 20)):
        if cond() or time.monotonic() > deadline:
            break
        await consumer.step()
    assert cond()


def test_records_are_validated_by_type() -> None:
    kind, rid, fields = parse_record(orjson.dumps(
        {"type": "notification", "id": "n1", "subject": "billing", "message": "hi",
         "contacts": [{"type": "email", "value": "a@example.com"}]}))
    assert (kind, rid, fields["subject"], fields["item"]["strategy"]) == (
        "notification", "n1", "billing", "send_to_first_available")
    kind, _, fields = parse_record(b'{"type":"system","id":"s1","to":["u1"],"event":"maintenance"}')
    assert (kind, fields) == ("system", {"to": ["u1"], "event": "maintenance", "data": {}})


async def test_invalid_records_are_dead_lettered_with_the_reason_and_the_consumer_moves_on(
        kafka_broker: Any, topics: tuple[str, str]) -> None:
    ingress, dlq = topics
    bad = {
        b"{not json": "not JSON",
        b"[1, 2]": "not a JSON object",
        b'{"type":"telegram","id":"x1"}': "unknown type",
        b'{"type":"chat","chatId":"c1","senderId":"s","body":"no id"}': "`id`",
        b'{"type":"chat","id":"x2","chatId":"c1","senderId":"s","body":5}': "`body`",
        b'{"type":"system","id":"x3","to":[],"event":"e"}': "`to`",
        b'{"type":"notification","id":"x4","subject":"s","message":"m","contacts":[]}':
            "invalid notification",
        "{\"type\":\"chat\",\"id\":\"x5\",\"body\":\"\u00e9\"}".encode(): "`chatId`",
    }
    good = [
        orjson.dumps({"type": "system", "id": "g1", "to": ["u1", "u2"], "event": "maintenance",
                      "data": {"at": "tonight"}}),
        orjson.dumps({"type": "chat", "id": "g2", "chatId": "c1", "senderId": "svc", "body": "hi"}),
        orjson.dumps({"type": "notification", "id": "g3", "subject": "billing",
                      "contacts": [{"type": "email", "value": "a@example.com"}], "message": "paid",
                      "isImmediate": True}),
    ]
    ordered = [*list(bad)[:4], *good, *list(bad)[4:]]  # valid records after invalid ones
    mixed = [("k", v) for v in ordered]
    await produce(kafka_broker.bootstrap, ingress, mixed)

    got: list[IngressRecord] = []

    async def handler(batch: list[IngressRecord]) -> Intake:
        got.extend(batch)
        return Intake.ACCEPTED

    consumer = IngressConsumer(kafka_broker.bootstrap, ingress, "g-dlq", handler, dlq_topic=dlq)
    await consumer.start()
    try:
        await until(lambda: consumer.stats.dead_lettered == len(bad) and len(got) == 3, consumer)
    finally:
        await consumer.stop()
    assert sorted(r.id for r in got) == ["g1", "g2", "g3"]
    g1 = next(r for r in got if r.id == "g1")
    assert (g1.type, g1.fields["to"], g1.fields["data"]) == ("system", ["u1", "u2"], {"at": "tonight"})

    letters = values(await read_topic(kafka_broker.bootstrap, dlq, len(bad)))
    assert len(letters) == len(bad)
    for letter in letters:
        original = letter["record"].encode()
        assert original in bad and bad[original] in letter["reason"], letter
        assert letter["topic"] == ingress and isinstance(letter["partition"], int)
        assert isinstance(letter["offset"], int)


async def test_a_restarted_consumer_rereads_only_the_records_not_accepted(
        kafka_broker: Any, topics: tuple[str, str]) -> None:
    ingress, dlq = topics
    await produce(kafka_broker.bootstrap, ingress, [chat(i) for i in range(30)])
    accepted: list[str] = []
    offered: list[str] = []

    async def first_handler(batch: list[IngressRecord]) -> Intake:
        offered.extend(r.id for r in batch)
        if len(accepted) >= 10:
            return Intake.REFUSED  # the pipeline refuses from here on
        accepted.extend(r.id for r in batch)
        return Intake.ACCEPTED

    first = IngressConsumer(kafka_broker.bootstrap, ingress, "g-restart", first_handler,
                            dlq_topic=dlq, max_batch=5, retry_s=0.2)
    await first.start()
    try:
        await until(lambda: len(accepted) >= 10 and first.stats.refused > 0, first)
    finally:
        await first.stop()
    assert set(offered) - set(accepted)  # some were offered and refused, never committed

    second_got: list[str] = []

    async def second_handler(batch: list[IngressRecord]) -> Intake:
        second_got.extend(r.id for r in batch)
        return Intake.ACCEPTED

    second = IngressConsumer(kafka_broker.bootstrap, ingress, "g-restart", second_handler,
                             dlq_topic=dlq, max_batch=5)
    await second.start()
    try:
        await until(lambda: len(second_got) >= 30 - len(accepted), second, timeout_s=60)
        for _ in range(10):  # nothing more arrives
            await second.step()
    finally:
        await second.stop()
    assert sorted(second_got) == sorted(f"m{i}" for i in range(30) if f"m{i}" not in accepted)
    assert not set(second_got) & set(accepted)


async def test_partitions_pause_while_the_pipeline_is_saturated_and_resume_by_themselves(
        kafka_broker: Any, topics: tuple[str, str]) -> None:
    ingress, dlq = topics
    n = 200
    await produce(kafka_broker.bootstrap, ingress, [chat(i) for i in range(n)])
    stage: asyncio.Queue[str] = asyncio.Queue(maxsize=30)  # an induced slow stage
    applied: list[str] = []

    async def slow_stage() -> None:
        while True:
            applied.append(await stage.get())
            await asyncio.sleep(0.01)

    async def handler(batch: list[IngressRecord]) -> Intake:
        if stage.qsize() + len(batch) > stage.maxsize:
            return Intake.REFUSED  # all or nothing: the whole batch is read again later
        for r in batch:
            stage.put_nowait(r.id)
        return Intake.SATURATED if stage.qsize() >= 20 else Intake.ACCEPTED

    consumer = IngressConsumer(kafka_broker.bootstrap, ingress, "g-pause", handler, dlq_topic=dlq,
                               saturated=lambda: stage.qsize() >= 20, max_batch=10, poll_ms=50,
                               retry_s=0.1)
    await consumer.start()
    samples: list[tuple[float, int, int]] = []  # (time, paused partitions, stage depth)
    worker = asyncio.create_task(slow_stage())
    runner = asyncio.create_task(consumer.run())
    try:
        deadline = time.monotonic() + 90
        while len(applied) < n and time.monotonic() < deadline:
            samples.append((time.monotonic(), len(consumer.paused()), stage.qsize()))
            await asyncio.sleep(0.01)
    finally:
        await consumer.stop()
        await asyncio.wait_for(runner, 15)
        worker.cancel()
    assert sorted(applied) == sorted(f"m{i}" for i in range(n))  # nothing lost, nothing twice

    # The pause and the resume, as the consumer's own partitions saw them.
    paused_at = next(t for t, p, _ in samples if p > 0)
    resumed_at = next(t for t, p, _ in samples if t > paused_at and p == 0)
    assert resumed_at > paused_at
    assert max(depth for _, _, depth in samples) <= stage.maxsize
    events = [e for _, e, _ in consumer.timeline]
    assert events.count("pause") >= 2 and events.count("resume") >= 2, consumer.timeline
    assert all(a != b for a, b in itertools.pairwise(events))  # alternating
    assert not consumer.pausing or events[-1] == "pause"
