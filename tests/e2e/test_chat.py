"""The chat route end to end, against the Serve app on a local Ray (two gateway replicas)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
import websockets

from client import WsClient, create_chat
from tests.client import chat_of_two, user
from tests.conftest import App

pytestmark = pytest.mark.e2e


async def connect(app: App, who: str) -> WsClient:
    return await WsClient.connect(app.ws_url, app.token(who))


async def test_message_is_acked_delivered_and_receipted(conveyor: App, app_db: Any) -> None:
    chat, alice, bob, a, b = await chat_of_two(conveyor)
    cid = await a.chat(chat, "hello bob")
    ack = await a.ack(cid)
    assert ack["status"] == "accepted" and ack["chatId"] == chat and ack["seq"] == 1
    msg = await b.message(messageId=ack["messageId"])
    assert msg["body"] == "hello bob" and msg["senderId"] == alice and msg["seq"] == 1
    await b.receipt([msg["messageId"]], "read")
    for _ in range(50):
        row = await app_db.fetchrow(
            "SELECT delivered_seq, read_seq FROM chat_members WHERE chat_id=$1 AND user_id=$2", chat, bob)
        if row["read_seq"] == 1:
            break
        await asyncio.sleep(0.1)
    assert (row["delivered_seq"], row["read_seq"]) == (1, 1)
    # The sender hears where Bob's pointers now stand (for delivered/read ticks)...
    told = await a.expect(lambda f: f.get("event") == "receipt"
                          and f["data"].get("readSeq") == 1, timeout=10)
    assert told["data"] == {"chatId": chat, "userId": bob, "deliveredSeq": 1, "readSeq": 1}
    # ...and reads the same from the chat list after a reload.
    async with httpx.AsyncClient(base_url=conveyor.base_url, headers=conveyor.auth(alice)) as h:
        (listed,) = [c for c in (await h.get("/v1/chats")).json()["chats"] if c["chatId"] == chat]
    assert listed["peers"] == [{"userId": bob, "deliveredSeq": 1, "readSeq": 1}]
    # The sender's own message is not echoed on the connection that sent it.
    assert not [f for f in await a.drain(0.5) if f["type"] == "message"]
    await a.close()
    await b.close()


async def test_sender_and_recipient_on_different_gateway_replicas(conveyor: App) -> None:
    alice, bob = user(), user()
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [bob])
    a = await connect(conveyor, alice)
    spare: list[WsClient] = []
    b = None
    for _ in range(30):
        c = await connect(conveyor, bob)
        if c.gateway != a.gateway:
            b = c
            break
        spare.append(c)
    assert b is not None, "the proxy never placed a connection on the second gateway replica"
    for c in spare:
        await c.close()
    ack = await a.ack(await a.chat(chat, "across replicas"))
    msg = await b.message(messageId=ack["messageId"])
    assert msg["body"] == "across replicas" and b.gateway != a.gateway
    await a.close()
    await b.close()


async def test_unreceipted_message_is_redelivered_while_connected(conveyor: App) -> None:
    chat, _, _, a, b = await chat_of_two(conveyor)
    ack = await a.ack(await a.chat(chat, "please ack me"))
    first = await b.message(messageId=ack["messageId"])
    # No receipt: after the backoff (1 s in the test settings) the same message comes again.
    again = await b.message(messageId=ack["messageId"], timeout=10)
    assert again["seq"] == first["seq"] == 1
    await b.receipt([again["messageId"]])
    await asyncio.sleep(0.3)
    later = [f for f in await b.drain(3.0) if f["type"] == "message"]
    assert later == [], "a receipted message must not be redelivered"
    await a.close()
    await b.close()


async def test_message_is_redelivered_after_receiver_drops_before_receipt(conveyor: App) -> None:
    chat, _, bob, a, b = await chat_of_two(conveyor)
    ack = await a.ack(await a.chat(chat, "lost in transit"))
    await b.message(messageId=ack["messageId"])
    await b.close()  # dropped before sending the receipt
    b2 = await connect(conveyor, bob)
    msg = await b2.message(messageId=ack["messageId"])
    assert msg["seq"] == 1 and msg["body"] == "lost in transit"
    await a.close()
    await b2.close()


async def test_pending_messages_are_replayed_in_order_on_reconnect(conveyor: App) -> None:
    alice, bob = user(), user()
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [bob])
    a = await connect(conveyor, alice)
    acks = []
    for i in range(12):
        acks.append(await a.ack(await a.chat(chat, f"m{i}")))
    assert [x["seq"] for x in acks] == list(range(1, 13))
    b = await connect(conveyor, bob)
    got = [await b.message(chatId=chat) for _ in range(12)]
    assert [m["seq"] for m in got] == list(range(1, 13))
    assert [m["body"] for m in got] == [f"m{i}" for i in range(12)]
    await b.receipt([got[-1]["messageId"]])  # cumulative: acknowledges 1..12
    await asyncio.sleep(0.5)
    await b.close()
    b2 = await connect(conveyor, bob)
    assert not [f for f in await b2.drain(1.5) if f["type"] == "message"]
    await a.close()
    await b2.close()


async def test_resent_client_id_is_a_duplicate_and_delivered_once(conveyor: App, app_db: Any) -> None:
    chat, _, _, a, b = await chat_of_two(conveyor)
    first = await a.ack(await a.chat(chat, "once", client_id="same-id"))
    await a.chat(chat, "once", client_id="same-id")
    second = await a.ack("same-id")
    assert first["status"] == "accepted" and second["status"] == "duplicate"
    assert second["messageId"] == first["messageId"] and second["seq"] == first["seq"]
    msg = await b.message(messageId=first["messageId"])
    await b.receipt([msg["messageId"]])
    extra = [f for f in await b.drain(1.0) if f["type"] == "message"]
    assert extra == []
    assert await app_db.fetchval("SELECT count(*) FROM messages WHERE chat_id=$1", chat) == 1
    await a.close()
    await b.close()


async def test_non_member_is_forbidden_and_unknown_chat_not_found(conveyor: App, app_db: Any) -> None:
    alice, bob, mallory = user(), user(), user()
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [bob])
    m = await connect(conveyor, mallory)
    ack = await m.ack(await m.chat(chat, "let me in"))
    assert ack["status"] == "rejected" and ack["error"]["code"] == "forbidden"
    ack = await m.ack(await m.chat(str(uuid.uuid4()), "anyone?"))
    assert ack["status"] == "rejected" and ack["error"]["code"] == "not_found"
    ack = await m.ack(await m.chat(chat, ""))
    assert ack["status"] == "rejected" and ack["error"]["code"] == "invalid"
    assert await app_db.fetchval("SELECT count(*) FROM messages WHERE chat_id=$1", chat) == 0
    await m.close()


async def test_bad_frames_get_errors_and_the_connection_stays_usable(
    conveyor: App, app_db: Any
) -> None:
    alice, bob = user(), user()
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [bob])
    a = await connect(conveyor, alice)
    await a.send("{not json")
    assert (await a.expect(lambda f: f["type"] == "error"))["code"] == "bad_frame"
    await a.send('["an", "array"]')
    assert (await a.expect(lambda f: f["type"] == "error"))["code"] == "bad_frame"
    await a.send({"type": "teleport", "id": "t1"})
    err = await a.expect(lambda f: f["type"] == "error")
    assert err["code"] == "unknown_type" and err["id"] == "t1"
    await a.send({"type": "chat", "id": "big", "chatId": chat, "body": "x" * 70_000})
    err = await a.expect(lambda f: f["type"] == "error")
    assert err["code"] == "too_large"
    await a.send({"type": "chat", "chatId": chat, "body": "no id"})
    assert (await a.expect(lambda f: f["type"] == "error"))["code"] == "invalid"
    await a.send({"type": "ping"})
    await a.expect(lambda f: f["type"] == "pong")
    assert await app_db.fetchval("SELECT count(*) FROM messages WHERE chat_id=$1", chat) == 0
    ack = await a.ack(await a.chat(chat, "still works"))
    assert ack["status"] == "accepted" and ack["seq"] == 1
    await a.close()


@pytest.mark.parametrize("case", ["missing", "garbage", "expired"])
async def test_bad_token_is_rejected_at_connect(conveyor: App, case: str) -> None:
    token = {"missing": "", "garbage": "not.a.jwt", "expired": conveyor.token("x", ttl_s=-60)}[case]
    url = conveyor.ws_url + (f"?access_token={token}" if token else "")
    async with websockets.connect(url) as ws:
        with pytest.raises(websockets.ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 4401


async def test_history_and_sync_return_the_stored_messages(conveyor: App) -> None:
    alice, bob, eve = user(), user(), user()
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [bob])
    a = await connect(conveyor, alice)
    for i in range(5):
        await a.ack(await a.chat(chat, f"h{i}"))
    async with httpx.AsyncClient(base_url=conveyor.base_url) as http:
        r = await http.get(f"/v1/chats/{chat}/messages", params={"afterSeq": 1, "limit": 3},
                           headers=conveyor.auth(bob))
        assert r.status_code == 200
        page = r.json()
        assert [m["seq"] for m in page["messages"]] == [2, 3, 4] and page["hasMore"] is True
        r = await http.get(f"/v1/chats/{chat}/messages", headers=conveyor.auth(eve))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = await http.get(f"/v1/chats/{chat}/messages")
        assert r.status_code == 401
        r = await http.get("/v1/chats", headers=conveyor.auth(bob))
        mine = [c for c in r.json()["chats"] if c["chatId"] == chat]
        assert mine and mine[0]["lastSeq"] == 5 and mine[0]["unreadCount"] == 5
    await a.send({"type": "sync", "id": "s1", "chatId": chat, "afterSeq": 1, "limit": 3})
    sync = await a.expect(lambda f: f["type"] == "sync")
    assert sync["id"] == "s1" and sync["messages"] == page["messages"] and sync["hasMore"] is True
    # Not a member: an error frame, no history; the connection stays usable.
    e = await connect(conveyor, eve)
    await e.send({"type": "sync", "id": "s2", "chatId": chat, "afterSeq": 0, "limit": 50})
    err = await e.expect(lambda f: f["type"] in ("sync", "error"))
    assert err["type"] == "error" and err["code"] == "forbidden" and err["id"] == "s2"
    await e.send({"type": "sync", "id": "s3", "chatId": str(uuid.uuid4()), "afterSeq": 0,
                  "limit": 50})
    err = await e.expect(lambda f: f["type"] in ("sync", "error"))
    assert err["type"] == "error" and err["code"] == "not_found" and err["id"] == "s3"
    await e.send({"type": "ping"})
    await e.expect(lambda f: f["type"] == "pong")
    await a.close()
    await e.close()


async def test_seq_is_gap_free_and_ordered_with_concurrent_senders(conveyor: App) -> None:
    alice, bob, carol = user(), user(), user()
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [bob, carol])
    a, c = await connect(conveyor, alice), await connect(conveyor, carol)
    b = await connect(conveyor, bob)
    n = 40
    for i in range(n):
        await a.chat(chat, f"a{i}", client_id=f"a{i}")
        await c.chat(chat, f"c{i}", client_id=f"c{i}")
    # Bob sends no receipt: under load the server may repeat a message (same id) before
    # the rest arrive; what is checked is the order of first sightings.
    got = [await b.next_message(chat_id=chat, timeout=20) for _ in range(2 * n)]
    assert [m["seq"] for m in got] == list(range(1, 2 * n + 1))
    # Each sender's messages keep the order they were sent in.
    assert [m["body"] for m in got if m["senderId"] == alice] == [f"a{i}" for i in range(n)]
    assert [m["body"] for m in got if m["senderId"] == carol] == [f"c{i}" for i in range(n)]
    for x in (a, b, c):
        await x.close()


async def test_health_endpoints(conveyor: App) -> None:
    async with httpx.AsyncClient(base_url=conveyor.base_url) as http:
        assert (await http.get("/health/live")).status_code == 200
        r = await http.get("/health/ready")
        assert r.status_code == 200, r.text
        assert r.json()["checks"]["database"]["status"] == "up"


async def test_outbox_relay_delivers_what_the_fast_path_left_behind(
    conveyor: App, app_db: Any
) -> None:
    """A batch committed but never handed to the hub (its replica died in between)."""
    alice, bob = user(), user()
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [bob])
    b = await connect(conveyor, bob)
    async with app_db.transaction():
        await app_db.execute("UPDATE chats SET last_seq = 1 WHERE id = $1", chat)
        await app_db.execute(
            "INSERT INTO messages(chat_id, seq, id, sender_id, client_id, body, created_at)"
            " VALUES ($1, 1, $2, $3, 'orphan', 'from the outbox', now())",
            chat, f"orphan-{chat}", alice)
        await app_db.execute(
            "INSERT INTO outbox(chat_id, from_seq, to_seq, created_at, available_at)"
            " VALUES ($1, 1, 1, now() - interval '1 minute', now() - interval '1 minute')", chat)
    msg = await b.message(messageId=f"orphan-{chat}", timeout=15)
    assert msg["body"] == "from the outbox" and msg["seq"] == 1
    for _ in range(50):
        if await app_db.fetchval("SELECT count(*) FROM outbox WHERE chat_id=$1", chat) == 0:
            break
        await asyncio.sleep(0.1)
    assert await app_db.fetchval("SELECT count(*) FROM outbox WHERE chat_id=$1", chat) == 0
    await b.close()
