"""A connection's receipt bookkeeping, with the real writer loop over a socket stand-in:
a ``delivered`` receipt gives stored-to-delivered latency, and a ``read`` receipt that
comes later still gives stored-to-read latency (analytics' "read" events)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from deployments.gateway import connection as connection_module
from deployments.gateway.connection import Connection
from stages.ports import Pointer


class Socket:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    async def send_text(self, text: str) -> None:
        self.frames.append(orjson.loads(text))


def message(seq: int, stored_ago_s: float) -> dict[str, Any]:
    stored = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - stored_ago_s))
    return {"type": "message", "messageId": f"m{seq}", "chatId": "c", "seq": seq,
            "senderId": "alice", "kind": "text", "body": "hi", "createdAt": f"{stored}Z"}


async def open_connection() -> tuple[Connection, Socket]:
    ws = Socket()
    conn = Connection(ws, "bob", None, None, queue_size=64,  # type: ignore[arg-type]
                      implicit_receipt=lambda user, mid: None)
    conn.init_chats([Pointer("c", 0, 0, 0)])
    conn.start()
    return conn, ws


async def written(ws: Socket, n: int) -> None:
    async with asyncio.timeout(5):
        while True:
            if len([f for f in ws.frames if f["type"] == "message"]) >= n:
                return
            await asyncio.sleep(0.01)


async def test_read_receipt_after_delivered_receipt_still_measures_stored_to_read() -> None:
    conn, ws = await open_connection()
    try:
        conn.deliver(message(1, stored_ago_s=30), None)
        conn.deliver(message(2, stored_ago_s=30), None)
        await written(ws, 2)
        delivered = conn.on_receipt(["m2"], "delivered")
        assert set(delivered) == {"m2"} and 25 < delivered["m2"] < 120
        # Cumulative: m1 is retired from redelivery by the receipt for m2 ...
        assert conn.on_receipt(["m1"], "delivered") == {}
        # ... but the read receipts, later, are still measured from the store time.
        read = conn.on_receipt(["m1", "m2"], "read")
        assert set(read) == {"m1", "m2"} and all(25 < v < 120 for v in read.values())
        # Once read, a message is not measured again.
        assert conn.on_receipt(["m1"], "read") == {}
    finally:
        await conn.stop()


async def test_unread_tracking_is_bounded(monkeypatch: Any) -> None:
    monkeypatch.setattr(connection_module, "UNREAD_TRACKED", 3)
    conn, ws = await open_connection()
    try:
        for seq in range(1, 6):
            conn.deliver(message(seq, stored_ago_s=1), None)
        await written(ws, 5)
        assert list(conn.unread) == ["m3", "m4", "m5"]
        conn.on_receipt(["m5"], "delivered")  # retires m1..m5 from redelivery
        assert set(conn.on_receipt(["m1", "m5"], "read")) == {"m5"}
    finally:
        await conn.stop()
