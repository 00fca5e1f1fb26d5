"""Commands (edit, react, delete) and history sync, against the Serve app."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from client import WsClient, create_chat
from tests.client import chat_of_two, user
from tests.conftest import App

pytestmark = pytest.mark.e2e


async def command(c: WsClient, op: str, target: str, **extra: Any) -> dict[str, Any]:
    cid = f"cmd-{uuid.uuid4().hex[:8]}"
    await c.send({"type": "command", "id": cid, "op": op, "messageId": target, **extra})
    return await c.ack(cid)


async def test_edit_react_delete_are_delivered_and_reflected_in_history(conveyor: App) -> None:
    chat, alice, bob, a, b = await chat_of_two(conveyor)
    carol = user()
    m1 = (await a.ack(await a.chat(chat, "frist")))["messageId"]
    m2 = (await a.ack(await a.chat(chat, "second")))["messageId"]

    edited = await command(a, "edit", m1, body="first")
    assert edited["status"] == "accepted" and edited["seq"] == 3
    assert edited["targetMessageId"] == m1
    frame = await b.expect(lambda f: f["type"] == "command" and f["op"] == "edit")
    assert frame["messageId"] == m1 and frame["body"] == "first" and frame["by"] == alice
    assert frame["seq"] == 3 and frame["chatId"] == chat

    assert (await command(b, "edit", m1, body="hijack"))["error"]["code"] == "forbidden"
    assert (await command(b, "delete", m1))["error"]["code"] == "forbidden"
    assert (await command(b, "react", m2, emoji="👍"))["status"] == "accepted"
    toggled = await command(b, "react", m2, emoji="🎉")
    assert toggled["status"] == "accepted"
    assert (await command(b, "react", m2, emoji="🎉"))["status"] == "accepted"  # toggled off
    reacts = [await a.expect(lambda f: f["type"] == "command" and f["op"] == "react")
              for _ in range(3)]
    assert [(f["emoji"], f["added"], f["by"], f["messageId"]) for f in reacts] == [
        ("👍", True, bob, m2), ("🎉", True, bob, m2), ("🎉", False, bob, m2)]
    assert [f["seq"] for f in reacts] == [4, 5, 6]
    assert (await command(a, "delete", m1))["status"] == "accepted"
    assert (await command(a, "edit", m1, body="too late"))["error"]["code"] == "not_found"
    assert (await command(a, "react", "no-such-message", emoji="x"))["error"]["code"] == "not_found"
    outsider = await WsClient.connect(conveyor.ws_url, conveyor.token(carol))
    assert (await command(outsider, "react", m2, emoji="👀"))["error"]["code"] == "forbidden"
    bad = await command(a, "react", m2)
    assert bad["status"] == "rejected" and bad["error"]["code"] == "invalid"

    async with httpx.AsyncClient(base_url=conveyor.base_url) as http:
        r = await http.get(f"/v1/chats/{chat}/messages", headers=conveyor.auth(bob))
    rows = r.json()["messages"]
    by_id = {m.get("messageId"): m for m in rows if m["type"] == "message"}
    assert by_id[m1]["deleted"] is True and by_id[m1]["body"] is None
    assert by_id[m2]["reactions"] == {"👍": 1} and by_id[m2]["body"] == "second"
    events = [(m["op"], m["seq"]) for m in rows if m["type"] == "command"]
    assert events == [("edit", 3), ("react", 4), ("react", 5), ("react", 6), ("delete", 7)]
    assert [m["seq"] for m in rows] == list(range(1, 8))
    # Nothing of the deleted message is left: neither its body nor the edit event's body.
    edit_row = next(m for m in rows if m["type"] == "command" and m["op"] == "edit")
    assert edit_row["messageId"] == m1 and edit_row["body"] is None
    assert not [m for m in rows if "frist" in str(m) or "first" in str(m)], rows
    await a.send({"type": "sync", "id": "s", "chatId": chat, "afterSeq": 0, "limit": 100})
    sync = await a.expect(lambda f: f["type"] == "sync")
    assert sync["messages"] == rows and sync["hasMore"] is False
    for c in (a, b, outsider):
        await c.close()


async def test_commands_are_replayed_in_order_to_an_offline_member(conveyor: App, app_db: Any
                                                                   ) -> None:
    alice, bob = user(), user()
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [bob])
    a = await WsClient.connect(conveyor.ws_url, conveyor.token(alice))
    m1 = (await a.ack(await a.chat(chat, "hello")))["messageId"]
    await command(a, "edit", m1, body="hello, edited")
    await command(a, "react", m1, emoji="❤")
    b = await WsClient.connect(conveyor.ws_url, conveyor.token(bob))
    first = await b.expect(lambda f: f.get("chatId") == chat and f["seq"] == 1)
    edit = await b.expect(lambda f: f.get("chatId") == chat and f["seq"] == 2)
    react = await b.expect(lambda f: f.get("chatId") == chat and f["seq"] == 3)
    assert first["type"] == "message" and first["body"] == "hello, edited"  # current state
    assert (edit["type"], edit["op"], react["op"]) == ("command", "edit", "react")
    await b.receipt([react["eventId"]])  # cumulative receipt through the last event
    for _ in range(100):  # receipts are applied asynchronously: wait until it is stored
        if await app_db.fetchval("SELECT delivered_seq FROM chat_members WHERE chat_id=$1"
                                 " AND user_id=$2", chat, bob) == 3:
            break
        await asyncio.sleep(0.05)
    await b.close()
    b2 = await WsClient.connect(conveyor.ws_url, conveyor.token(bob))
    assert not [f for f in await b2.drain(1.5) if f.get("chatId") == chat]
    await a.close()
    await b2.close()


async def chat_entry(app: App, who: str, chat: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=app.base_url) as http:
        chats = (await http.get("/v1/chats", headers=app.auth(who))).json()["chats"]
    (mine,) = [c for c in chats if c["chatId"] == chat]
    return dict(mine)


async def test_chat_list_shows_last_seq_and_unread_count(conveyor: App, app_db: Any) -> None:
    alice, bob = user(), user()
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [bob], title="t")
    a = await WsClient.connect(conveyor.ws_url, conveyor.token(alice))
    ids = [(await a.ack(await a.chat(chat, f"x{i}")))["messageId"] for i in range(4)]
    b = await WsClient.connect(conveyor.ws_url, conveyor.token(bob))
    for i in range(4):
        await b.message(messageId=ids[i])
    await b.receipt([ids[1]], "read")
    # Bob reacts, Alice edits: events of the chat, not messages anyone has to read.
    assert (await command(b, "react", ids[0], emoji="👍"))["seq"] == 5
    assert (await command(a, "edit", ids[3], body="x3, edited"))["seq"] == 6
    for _ in range(100):  # the receipt is applied asynchronously: wait for it
        if await app_db.fetchval("SELECT read_seq FROM chat_members WHERE chat_id=$1"
                                 " AND user_id=$2", chat, bob) == 2:
            break
        await asyncio.sleep(0.05)
    mine = await chat_entry(conveyor, bob, chat)
    assert mine["lastSeq"] == 6 and mine["unreadCount"] == 2 and mine["readSeq"] == 2
    assert mine["title"] == "t" and sorted(mine["members"]) == sorted([alice, bob])
    theirs = await chat_entry(conveyor, alice, chat)
    assert theirs["unreadCount"] == 0  # Bob's reaction is not an unread message for Alice
    await a.close()
    await b.close()


async def test_an_unreceipted_command_is_redelivered_while_connected(conveyor: App) -> None:
    chat, _, _, a, b = await chat_of_two(conveyor)
    mid = (await a.ack(await a.chat(chat, "hello")))["messageId"]
    msg = await b.message(messageId=mid)
    await b.receipt([msg["messageId"]])
    edit = await command(a, "edit", mid, body="hello!")
    first = await b.expect(lambda f: f["type"] == "command" and f["op"] == "edit")
    assert first["eventId"] == edit["messageId"] and first["seq"] == 2
    # No receipt: after the redelivery backoff (1 s in the test settings) it comes again.
    again = await b.expect(lambda f: f["type"] == "command" and f["op"] == "edit", timeout=15)
    assert (again["eventId"], again["seq"], again["body"]) == (first["eventId"], 2, "hello!")
    await b.receipt([again["eventId"]])
    for c in (a, b):
        await c.close()
