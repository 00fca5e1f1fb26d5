"""Per-user connection caps (``deployments/gateway/limits.py``) on a stepped clock, and a
connection's bound on what it writes to a client that does not receipt
(``deployments/gateway/connection.py``), over a socket stand-in that records frames."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from deployments.gateway.close_codes import (
    SLOW_CONSUMER,
    TOO_MANY_ATTEMPTS,
    TOO_MANY_CONNECTIONS,
    reason,
)
from deployments.gateway.connection import Connection
from deployments.gateway.limits import ConnectionLimits
from stages.ports import Pointer, StoredMessage


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_attempts_beyond_a_minutes_worth_are_refused_until_one_is_back() -> None:
    clock = Clock()
    limits = ConnectionLimits(max_open=100, attempts_per_minute=6, clock=clock)
    assert [limits.admit("alice", 0) for _ in range(6)] == [None] * 6
    refusal = limits.admit("alice", 0)
    assert refusal is not None and refusal.code == TOO_MANY_ATTEMPTS
    assert refusal.retry_after == 10 and "retry in 10 s" in refusal.reason
    assert limits.admit("bob", 0) is None  # per user
    clock.now += 10  # one attempt back every 60 / 6 s
    assert limits.admit("alice", 0) is None
    assert limits.admit("alice", 0) is not None


def test_open_connections_beyond_the_cap_are_refused_and_count_as_attempts() -> None:
    limits = ConnectionLimits(max_open=2, attempts_per_minute=3, clock=Clock())
    refusal = limits.admit("alice", 2)
    assert refusal is not None and refusal.code == TOO_MANY_CONNECTIONS
    assert refusal.retry_after is None and "at most 2" in refusal.reason
    assert limits.admit("alice", 1) is None
    assert limits.admit("alice", 1) is None
    refusal = limits.admit("alice", 1)
    assert refusal is not None and refusal.code == TOO_MANY_ATTEMPTS


def test_idle_users_are_forgotten() -> None:
    clock = Clock()
    limits = ConnectionLimits(max_open=2, attempts_per_minute=60, clock=clock)
    for i in range(100):
        limits.admit(f"u{i}", 0)
    assert len(limits.attempts) == 100
    clock.now += 61
    limits.admit("later", 0)
    assert len(limits.attempts) == 1


def test_close_reasons_fit_a_close_frame() -> None:
    long = "é" * 100
    cut = reason(long)
    assert len(cut.encode()) <= 123 and long.startswith(cut)


class Socket:
    """Records text frames and the close; like Serve's, a write never waits."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None

    async def send_text(self, text: str) -> None:
        self.frames.append(orjson.loads(text))

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed = (code, reason or "")


class Store:
    """``messages_after`` of a chat whose messages 1..last are stored."""

    def __init__(self) -> None:
        self.last = 0
        self.reads = 0

    async def messages_after(self, chat_id: str, after: int, limit: int) -> list[StoredMessage]:
        self.reads += 1
        return [stored(seq) for seq in range(after + 1, min(self.last, after + limit) + 1)]


def frame(seq: int) -> dict[str, Any]:
    return {"type": "message", "messageId": f"m{seq}", "chatId": "c", "seq": seq,
            "senderId": "alice", "kind": "text", "body": "hi",
            "createdAt": "2026-11-30T00:00:00Z"}


def stored(seq: int) -> StoredMessage:
    return StoredMessage(f"m{seq}", "c", seq, "alice", "text", "hi", "2026-11-30T00:00:00Z")


async def settle(pred: Any) -> None:
    async with asyncio.timeout(5):
        while True:
            if pred():
                return
            await asyncio.sleep(0.005)


async def open_connection(store: Store, **kw: Any) -> tuple[Connection, Socket]:
    ws = Socket()
    conn = Connection(ws, "bob", None, store, implicit_receipt=lambda u, m: None,  # type: ignore[arg-type]
                      **{"queue_size": 64, **kw})
    conn.init_chats([Pointer("c", 0, 0, 0)])
    conn.start()
    return conn, ws


def written(ws: Socket) -> list[int]:
    return [f["seq"] for f in ws.frames if f["type"] == "message"]


async def test_a_client_that_does_not_receipt_gets_at_most_the_limit_then_the_rest_on_receipts(
) -> None:
    store = Store()
    conn, ws = await open_connection(store, unreceipted_max=5, slow_consumer_s=60)
    try:
        for seq in range(1, 13):
            store.last = seq
            conn.deliver(frame(seq), None)
        await settle(lambda: len(written(ws)) == 5)
        await asyncio.sleep(0.05)
        assert written(ws) == [1, 2, 3, 4, 5] and conn.held == {"c"} and conn.in_flight == 5
        assert store.reads == 0  # what arrives for a held chat is not read back meanwhile
        conn.on_receipt(["m3"])  # cumulative: 1..3
        await settle(lambda: len(written(ws)) == 8)
        assert written(ws) == list(range(1, 9)) and conn.in_flight == 5
        conn.on_receipt(["m8"])
        await settle(lambda: len(written(ws)) == 12)
        assert written(ws) == list(range(1, 13)) and not conn.held and not conn.closed
    finally:
        await conn.stop()


async def test_a_connection_stalled_at_the_limit_is_closed_as_a_slow_consumer() -> None:
    store = Store()
    slow: list[str] = []
    conn, ws = await open_connection(store, unreceipted_max=3, slow_consumer_s=0.2,
                                     on_slow=slow.append)
    try:
        for seq in range(1, 5):
            store.last = seq
            conn.deliver(frame(seq), None)
        await settle(lambda: len(written(ws)) == 3 and conn.held_since is not None)
        assert not conn.closed  # held back, but not for long yet
        await asyncio.sleep(0.25)
        store.last = 5
        conn.deliver(frame(5), None)
        await settle(lambda: ws.closed is not None)
        assert ws.closed is not None and ws.closed[0] == SLOW_CONSUMER
        assert ws.frames[-1]["type"] == "system" and ws.frames[-1]["event"] == "slow_consumer"
        assert ws.frames[-1]["data"]["unreceipted"] == 3 and len(slow) == 1
        assert written(ws) == [1, 2, 3]
        conn.send({"type": "pong"})  # nothing is written after the close
        await asyncio.sleep(0.05)
        assert ws.frames[-1]["type"] == "system"
    finally:
        await conn.stop()


async def test_redelivery_to_a_stalled_connection_closes_it_instead() -> None:
    store = Store()
    conn, ws = await open_connection(store, unreceipted_max=2, slow_consumer_s=0.1)
    try:
        for seq in (1, 2, 3):
            store.last = seq
            conn.deliver(frame(seq), None)
        await settle(lambda: len(written(ws)) == 2 and conn.held_since is not None)
        await asyncio.sleep(0.15)
        loop = asyncio.get_running_loop()
        assert conn.due_redelivery(loop.time() + 10**6, 0.0, 0.0) == []
        await settle(lambda: ws.closed is not None)
        assert ws.closed is not None and ws.closed[0] == SLOW_CONSUMER
    finally:
        await conn.stop()


async def test_an_overflowing_queue_of_unordered_frames_closes_the_connection() -> None:
    conn, ws = await open_connection(Store(), queue_size=4)
    try:
        # The writer is not given a chance to run: the queue fills.
        for i in range(5):
            conn.send({"type": "ack", "id": str(i), "status": "accepted"})
        assert conn.closed and conn.slow is not None
        await settle(lambda: ws.closed is not None)
        assert ws.closed is not None and ws.closed[0] == SLOW_CONSUMER
        assert ws.frames[-1]["event"] == "slow_consumer"
        assert all(f["type"] != "ack" for f in ws.frames)  # the queue was never written
    finally:
        await conn.stop()


async def test_a_burst_after_a_quiet_spell_is_not_held_against_the_client() -> None:
    store = Store()
    conn, ws = await open_connection(store, unreceipted_max=2, slow_consumer_s=0.1)
    try:
        await asyncio.sleep(0.2)  # connected, quiet for longer than slow_consumer_s
        for seq in (1, 2, 3):
            store.last = seq
            conn.deliver(frame(seq), None)
        await settle(lambda: len(written(ws)) == 2 and conn.held_since is not None)
        conn.on_receipt(["m2"])  # within slow_consumer_s of the first message held
        await settle(lambda: len(written(ws)) == 3)
        assert not conn.closed and conn.held_since is None
    finally:
        await conn.stop()


async def test_a_burst_of_messages_does_not_crowd_out_other_frames() -> None:
    store = Store()
    conn, ws = await open_connection(store, queue_size=4)
    try:
        store.last = 10
        for seq in range(1, 11):  # more than the queue takes: the rest is read back
            conn.deliver(frame(seq), None)
        for i in range(4):
            conn.send({"type": "ack", "id": str(i), "status": "accepted"})
        assert not conn.closed
        await settle(lambda: len(written(ws)) == 10
                     and sum(f["type"] == "ack" for f in ws.frames) == 4)
        assert written(ws) == list(range(1, 11))
    finally:
        await conn.stop()
