"""Authorization on every frame type and endpoint, as a table. Alice and Bob share a chat
holding Alice's text message and Alice's attachment; Alice has a notification. Mallory is
in no chat with them. Each row is one attempt by Mallory (or by Bob on what only Alice may
do, or towards Mallory, who is not his contact) and the typed refusal PROTOCOL.md (or the
README's extensions) gives it; after each, the chat, its attachments, the notifications
and everything on Mallory's account are exactly as before, and nobody was sent anything."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from client import WsClient
from tests.client import chat_of_two, user
from tests.conftest import App
from tests.security.uploads import PNG, announce, complete, put

pytestmark = pytest.mark.e2e


@dataclass
class World:
    app: App
    db: asyncpg.Connection
    chat: str
    alice: str
    bob: str
    mallory: str
    a: WsClient
    b: WsClient
    m: WsClient
    text: str  # Alice's text message
    att: dict[str, Any]  # the ack of Alice's attachment (attachmentId, uploadToken)
    att_message: str  # the attachment's message
    notification: str  # Alice's notification


@pytest.fixture(scope="module")
async def world(conveyor: App) -> AsyncIterator[World]:
    chat, alice, bob, a, b = await chat_of_two(conveyor)
    mallory = user("mallory")
    m = await WsClient.connect(conveyor.ws_url, conveyor.token(mallory))
    text = (await a.ack(await a.chat(chat, "the original")))["messageId"]
    att = await announce(a, chat)
    assert await put(att["uploadUrl"]) == 200
    r = await complete(conveyor, alice, att["attachmentId"], att["uploadToken"])
    assert r.status_code == 200, r.text
    att_message = r.json()["messageId"]
    for mid in (text, att_message):
        await b.message(messageId=mid)
    await a.message(messageId=att_message)  # posted by the server: Alice gets it too
    for c in (a, b):
        await c.receipt([att_message], "read")  # nothing left to redeliver to either
    async with httpx.AsyncClient(base_url=conveyor.base_url, headers=conveyor.auth(alice)) as http:
        r = await http.post("/v1/notifications", json={
            "contacts": [{"type": "email", "value": "alice@example.com"}], "message": "hi"})
        assert r.status_code == 202, r.text
        notification = r.json()["details"][0]["notification"]["id"]
        assert (await http.get(f"/v1/notifications/{notification}")).status_code == 200
    db = await asyncpg.connect(conveyor.dsn)
    w = World(conveyor, db, chat, alice, bob, mallory, a, b, m, text, att, att_message,
              notification)
    await quiet(w)
    yield w
    await db.close()
    for c in (a, b, m):
        await c.close()


async def quiet(w: World) -> None:
    """Let the setup's own frames (receipts, presence) arrive and discard them."""
    await asyncio.gather(*(c.drain(0.5) for c in (w.a, w.b, w.m)))


async def snapshot(w: World) -> dict[str, Any]:
    """Everything an attempt could have changed (pointers aside: receipts move them)."""
    db, chat = w.db, w.chat
    rows = await db.fetch(
        "SELECT id, seq, kind, sender_id, body, attachment::text, edited_at, deleted_at"
        " FROM messages WHERE chat_id = $1 ORDER BY seq", chat)
    return {
        "messages": [tuple(r) for r in rows],
        "last_seq": await db.fetchval("SELECT last_seq FROM chats WHERE id = $1", chat),
        "members": [r[0] for r in await db.fetch(
            "SELECT user_id FROM chat_members WHERE chat_id = $1 ORDER BY user_id", chat)],
        "reactions": [tuple(r) for r in await db.fetch(
            "SELECT r.message_id, r.user_id, r.emoji FROM reactions r JOIN messages m"
            " ON m.id = r.message_id WHERE m.chat_id = $1 ORDER BY 1, 2, 3", chat)],
        "attachments": [tuple(r) for r in await db.fetch(
            "SELECT id, state, message_id, uploader FROM attachments WHERE chat_id = $1"
            " ORDER BY id", chat)],
        "mallory": await db.fetchval(
            "SELECT (SELECT count(*) FROM messages WHERE sender_id = $1)"
            " + (SELECT count(*) FROM attachments WHERE uploader = $1)"
            " + (SELECT count(*) FROM chat_members WHERE user_id = $1)"
            " + (SELECT count(*) FROM reactions WHERE user_id = $1)", w.mallory),
        "notifications": [tuple(r) for r in await db.fetch(
            "SELECT subject_id, count(*) FROM notifications WHERE subject_id = ANY($1::text[])"
            " GROUP BY 1 ORDER BY 1", [w.alice, w.bob, w.mallory])],
    }


def leaked(frames: list[dict[str, Any]], w: World) -> list[dict[str, Any]]:
    """Frames that an attempt must not have caused: chat content or signals, and receipt
    news about Mallory or Bob."""
    return [f for f in frames if f["type"] in ("message", "command", "signal", "ack", "sync")
            or (f["type"] == "system" and f.get("event") == "receipt"
                and f["data"].get("userId") in (w.mallory, w.bob))]


# --- the table -----------------------------------------------------------------------------
# Frames: (case, sender, frame, expected answer). The answer is ("ack", code): an ack
# rejected with that code; ("error", code): an ``error`` frame; ("none", None): no answer
# (receipts have none) and nothing else happens.
Frame = Callable[[World], dict[str, Any]]
FRAMES: list[tuple[str, str, Frame, tuple[str, str | None]]] = [
    ("chat message by a non-member", "mallory",
     lambda w: {"type": "chat", "chatId": w.chat, "body": "let me in"}, ("ack", "forbidden")),
    ("attachment by a non-member", "mallory",
     lambda w: {"type": "attachment", "chatId": w.chat, "fileName": "x.png",
                "contentType": "image/png", "size": 10}, ("ack", "forbidden")),
    ("edit by a non-member", "mallory",
     lambda w: {"type": "command", "op": "edit", "messageId": w.text, "body": "pwned"},
     ("ack", "forbidden")),
    ("delete by a non-member", "mallory",
     lambda w: {"type": "command", "op": "delete", "messageId": w.text}, ("ack", "forbidden")),
    ("react by a non-member", "mallory",
     lambda w: {"type": "command", "op": "react", "messageId": w.text, "emoji": "💩"},
     ("ack", "forbidden")),
    ("react to the attachment by a non-member", "mallory",
     lambda w: {"type": "command", "op": "react", "messageId": w.att_message, "emoji": "💩"},
     ("ack", "forbidden")),
    ("delete of the attachment by a non-member", "mallory",
     lambda w: {"type": "command", "op": "delete", "messageId": w.att_message},
     ("ack", "forbidden")),
    ("edit of another member's message", "bob",
     lambda w: {"type": "command", "op": "edit", "messageId": w.text, "body": "Alice said"},
     ("ack", "forbidden")),
    ("delete of another member's message", "bob",
     lambda w: {"type": "command", "op": "delete", "messageId": w.text}, ("ack", "forbidden")),
    ("edit of another member's attachment", "bob",
     lambda w: {"type": "command", "op": "edit", "messageId": w.att_message, "body": "x"},
     ("ack", "forbidden")),
    ("delete of another member's attachment", "bob",
     lambda w: {"type": "command", "op": "delete", "messageId": w.att_message},
     ("ack", "forbidden")),
    ("sync by a non-member", "mallory",
     lambda w: {"type": "sync", "chatId": w.chat, "afterSeq": 0, "limit": 50},
     ("error", "forbidden")),
    ("read receipt by a non-member", "mallory",
     lambda w: {"type": "receipt", "messageIds": [w.text, w.att_message], "status": "read"},
     ("none", None)),
    ("server-only attachment_uploaded frame", "mallory",
     lambda w: {"type": "attachment_uploaded", "attachmentId": w.att["attachmentId"]},
     ("error", "unknown_type")),
    ("server-only notification frame", "mallory",
     lambda w: {"type": "notification", "contacts": [{"type": "email", "value": "a@b.c"}],
                "message": "spoofed"}, ("error", "unknown_type")),
    ("server-only presence frame", "mallory",
     lambda w: {"type": "presence", "userId": w.alice, "online": False},
     ("error", "unknown_type")),
    ("signal to a user sharing no chat with the sender", "mallory",
     lambda w: {"type": "signal", "to": w.alice, "payload": {"typing": True}},
     ("ack", "forbidden")),
    ("typing signal naming the chat, by a non-member", "mallory",
     lambda w: {"type": "signal", "to": w.bob, "payload": {"typing": True, "chatId": w.chat}},
     ("ack", "forbidden")),
    ("signal by a member to a stranger", "bob",
     lambda w: {"type": "signal", "to": w.mallory, "payload": {"sdp": "v=0"}},
     ("ack", "forbidden")),
]

# HTTP: (case, caller, method, path, headers, expected status, expected code). Refusals of
# a resource named by id the caller may not see are 404 (its existence is not disclosed);
# a chat's history says 403 to a non-member, as PROTOCOL.md has it.
Path = Callable[[World], str]
Headers = Callable[[World], dict[str, str]]
NO_HEADERS: Headers = lambda w: {}  # noqa: E731
HTTP: list[tuple[str, str, str, Path, Headers, int, str]] = [
    ("history by a non-member", "mallory", "GET",
     lambda w: f"/v1/chats/{w.chat}/messages", NO_HEADERS, 403, "forbidden"),
    ("history page by a non-member", "mallory", "GET",
     lambda w: f"/v1/chats/{w.chat}/messages?afterSeq=1&limit=1", NO_HEADERS, 403, "forbidden"),
    ("attachment download by a non-member", "mallory", "GET",
     lambda w: f"/v1/attachments/{w.att['attachmentId']}/content", NO_HEADERS, 404, "not_found"),
    ("attachment confirmation by a non-member holding the token", "mallory", "POST",
     lambda w: f"/v1/attachments/{w.att['attachmentId']}/complete",
     lambda w: {"X-Upload-Token": w.att["uploadToken"]}, 404, "not_found"),
    ("attachment confirmation by a member who did not upload it", "bob", "POST",
     lambda w: f"/v1/attachments/{w.att['attachmentId']}/complete",
     lambda w: {"X-Upload-Token": w.att["uploadToken"]}, 404, "not_found"),
    ("another subject's notification status", "bob", "GET",
     lambda w: f"/v1/notifications/{w.notification}", NO_HEADERS, 404, "not_found"),
    ("another subject's notification status, by a stranger", "mallory", "GET",
     lambda w: f"/v1/notifications/{w.notification}", NO_HEADERS, 404, "not_found"),
    ("presence of a user sharing no chat with the caller", "mallory", "GET",
     lambda w: f"/v1/presence?userId={w.alice}", NO_HEADERS, 403, "forbidden"),
    ("presence of a chat partner and a stranger in one request", "bob", "GET",
     lambda w: f"/v1/presence?userId={w.alice}&userId={w.mallory}", NO_HEADERS, 403,
     "forbidden"),
]


def error_code(body: dict[str, Any]) -> str:
    """The code of an error body: the gateway's shape, or the seed's (notifications)."""
    err = body.get("error")
    return str(err["code"] if isinstance(err, dict) else body["code"])


async def refused_without_trace(w: World, attempt: Callable[[], Any]) -> None:
    before = await snapshot(w)
    await attempt()
    await asyncio.sleep(0.3)  # anything the attempt set off has had time to land
    assert await snapshot(w) == before
    a_frames, b_frames, m_frames = await asyncio.gather(*(c.drain(0.2) for c in (w.a, w.b, w.m)))
    assert leaked(a_frames + b_frames + m_frames, w) == []


@pytest.mark.parametrize(("case", "who", "frame", "expected"), FRAMES, ids=[f[0] for f in FRAMES])
async def test_frame_is_refused_and_leaves_no_trace(world: World, case: str, who: str,
                                                    frame: Frame,
                                                    expected: tuple[str, str | None]) -> None:
    w = world
    c = {"mallory": w.m, "bob": w.b}[who]

    async def attempt() -> None:
        body = frame(w)
        if body["type"] != "receipt":
            body["id"] = c.new_id()
        await c.send(body)
        kind, code = expected
        if kind == "ack":
            ack = await c.ack(body["id"])
            assert ack["status"] == "rejected" and ack["error"]["code"] == code, ack
        elif kind == "error":
            err = await c.expect(lambda f: f["type"] == "error" and f.get("id") == body["id"])
            assert err["code"] == code, err
        else:
            await c.ping()  # the connection read it and answered nothing for it
            assert [f for f in await c.drain(0.3) if f["type"] != "system"] == []

    await refused_without_trace(w, attempt)


@pytest.mark.parametrize(("case", "who", "method", "path", "headers", "status", "code"), HTTP,
                         ids=[h[0] for h in HTTP])
async def test_request_is_refused_and_leaves_no_trace(world: World, case: str, who: str,
                                                      method: str, path: Path, headers: Headers,
                                                      status: int, code: str) -> None:
    w = world

    async def attempt() -> None:
        async with httpx.AsyncClient(base_url=w.app.base_url, headers=w.app.auth(
                {"mallory": w.mallory, "bob": w.bob}[who])) as http:
            r = await http.request(method, path(w), headers=headers(w))
        assert (r.status_code, error_code(r.json())) == (status, code), r.text

    await refused_without_trace(w, attempt)


async def test_the_same_requests_by_those_entitled_succeed(world: World) -> None:
    """The table's refusals are about who asks: the members and owners get through."""
    w = world
    async with httpx.AsyncClient(base_url=w.app.base_url) as http:
        r = await http.get(f"/v1/chats/{w.chat}/messages", headers=w.app.auth(w.bob))
        assert r.status_code == 200 and len(r.json()["messages"]) == 2
        r = await http.get(f"/v1/attachments/{w.att['attachmentId']}/content",
                           headers=w.app.auth(w.bob))
        assert r.status_code == 307
        got = await http.get(r.headers["location"])
        assert got.content == PNG
        r = await http.get(f"/v1/notifications/{w.notification}", headers=w.app.auth(w.alice))
        assert r.status_code == 200 and r.json()["subject"]["id"] == w.alice
    assert (await w.b.sync(w.chat))["messages"]


async def test_a_signal_reaches_a_chat_partner_and_never_a_stranger(world: World) -> None:
    """Refused signals are acked ``forbidden`` and reach nobody, while a signal between the
    chat's members, sent at the same moment, arrives."""
    w = world

    async def attempt() -> None:
        to_stranger = await w.b.signal(w.mallory, {"typing": True, "chatId": w.chat})
        from_stranger = await w.m.signal(w.alice, {"sdp": "v=0", "kind": "offer"})
        control = await w.a.signal(w.bob, {"typing": True, "chatId": w.chat})
        for c, cid in ((w.b, to_stranger), (w.m, from_stranger)):
            ack = await c.ack(cid)
            assert (ack["status"], ack["error"]["code"]) == ("rejected", "forbidden"), ack
            assert ack["error"]["message"] == "the recipient shares no chat with the sender"
        assert (await w.a.ack(control))["status"] == "accepted"
        got = await w.b.expect(lambda f: f["type"] == "signal" and f["id"] == control)
        assert got == {"type": "signal", "id": control, "from": w.alice,
                       "payload": {"typing": True, "chatId": w.chat}}
        # The control signal has arrived; the refused ones, sent before it, never will.
        m_frames, a_frames = await asyncio.gather(w.m.drain(1.0), w.a.drain(1.0))
        assert [f for f in m_frames + a_frames if f["type"] == "signal"] == []

    await refused_without_trace(w, attempt)


async def test_a_signal_to_oneself_reaches_ones_other_devices(world: World) -> None:
    w = world
    second = await WsClient.connect(w.app.ws_url, w.app.token(w.alice))
    try:
        sid = await w.a.signal(w.alice, {"handoff": "call-1"})
        assert (await w.a.ack(sid))["status"] == "accepted"
        got = await second.expect(lambda f: f["type"] == "signal" and f["id"] == sid)
        assert got["from"] == w.alice
    finally:
        await second.close()
    await quiet(w)


async def test_presence_answers_for_oneself_and_chat_partners(world: World) -> None:
    w = world
    async with httpx.AsyncClient(base_url=w.app.base_url) as http:
        r = await http.get("/v1/presence", params=[("userId", w.alice), ("userId", w.bob)],
                           headers=w.app.auth(w.bob))
        assert r.status_code == 200, r.text
        assert [(u["userId"], u["online"]) for u in r.json()["users"]] == [
            (w.alice, True), (w.bob, True)]
        r = await http.get("/v1/presence", params={"userId": w.mallory},
                           headers=w.app.auth(w.mallory))
        assert r.status_code == 200 and r.json()["users"][0]["online"] is True
        r = await http.get("/v1/presence", params={"userId": f"{w.bob},{w.mallory}"},
                           headers=w.app.auth(w.alice))
        assert r.status_code == 403
        assert r.json() == {"error": {"code": "forbidden", "message":
                                      f"not contacts of the caller (no chat shared): {w.mallory}"}}


async def test_a_non_member_does_not_see_the_chat_in_its_list(world: World) -> None:
    w = world
    async with httpx.AsyncClient(base_url=w.app.base_url) as http:
        mine = (await http.get("/v1/chats", headers=w.app.auth(w.mallory))).json()["chats"]
        theirs = (await http.get("/v1/chats", headers=w.app.auth(w.bob))).json()["chats"]
    assert [c["chatId"] for c in mine] == []
    assert [c["members"] for c in theirs if c["chatId"] == w.chat] == [sorted([w.alice, w.bob])]


async def test_a_notification_cannot_be_posted_without_the_role_or_as_another_subject(
        world: World) -> None:
    w = world
    item = {"contacts": [{"type": "email", "value": "x@example.com"}], "message": "spoofed"}

    async def attempt() -> None:
        async with httpx.AsyncClient(base_url=w.app.base_url) as http:
            no_role = {"Authorization": f"Bearer {w.app.token(w.mallory, roles=['user'])}"}
            r = await http.post("/v1/notifications", json=item, headers=no_role)
            assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text
            r = await http.post("/v1/notifications", headers=w.app.auth(w.mallory),
                                json={**item, "subject": {"id": w.alice}})
            assert r.status_code == 400, r.text
            (detail,) = r.json()["details"]
            assert [e["code"] for e in detail["error"]] == ["unrecognized_keys"]

    await refused_without_trace(w, attempt)


async def test_idempotency_keys_are_per_subject(world: World) -> None:
    """Mallory reusing Alice's Idempotency-Key and body gets her own notification, not a
    replay of Alice's response."""
    w = world
    item = {"contacts": [{"type": "email", "value": "x@example.com"}], "message": "same body"}
    key = {"Idempotency-Key": f"k-{w.alice}"}
    async with httpx.AsyncClient(base_url=w.app.base_url) as http:
        first = await http.post("/v1/notifications", json=item,
                                headers={**w.app.auth(w.alice), **key})
        other = await http.post("/v1/notifications", json=item,
                                headers={**w.app.auth(w.mallory), **key})
    assert first.status_code == other.status_code == 202, (first.text, other.text)
    assert "idempotency-replayed" not in other.headers
    mine = other.json()["details"][0]["notification"]
    assert mine["subject"]["id"] == w.mallory
    assert mine["id"] != first.json()["details"][0]["notification"]["id"]


async def test_a_frame_cannot_name_its_sender_or_make_itself_an_attachment(
        conveyor: App) -> None:
    """Who sent a frame is the token's subject; fields claiming otherwise are not read."""
    chat, alice, bob, a, b = await chat_of_two(conveyor)
    cid = b.new_id()
    await b.send({
        "type": "chat", "id": cid, "chatId": chat, "body": "from bob", "senderId": alice,
        "from": alice, "kind": "attachment",
        "attachment": {"attachmentId": "x", "url": "https://evil.example"},
    })
    ack = await b.ack(cid)
    assert ack["status"] == "accepted"
    got = await a.message(messageId=ack["messageId"])
    assert (got["senderId"], got["kind"], "attachment" in got) == (bob, "text", False)
    db = await asyncpg.connect(conveyor.dsn)
    try:
        row = await db.fetchrow("SELECT sender_id, kind, attachment FROM messages WHERE id = $1",
                                ack["messageId"])
    finally:
        await db.close()
    assert tuple(row) == (bob, "text", None)
    for c in (a, b):
        await c.close()
