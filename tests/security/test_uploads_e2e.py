"""Forged storage webhooks and replayed upload tokens, against the application on a real
S3 API (moto) with the storage webhook configured.

- ``POST /v1/storage/events`` without the exact secret as a bearer token: 401, and no
  attachment changes state.
- With the secret, events that name no pending upload (unknown keys, the server's own
  checked copy, other event kinds, malformed records) are ignored, and a replayed event
  posts nothing twice.
- ``X-Upload-Token``: another attachment's token is refused (403); a second confirmation
  of a posted file answers the same message and posts nothing; once the upload window has
  expired, it is too late (410), whatever was put at the upload URL.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from adapters.objects import S3ObjectStore
from client import WsClient
from tests.client import chat_of_two
from tests.conftest import WEBHOOK_SECRET, App
from tests.security.uploads import PNG, announce, complete, event, put, record, webhook

pytestmark = pytest.mark.e2e

HTML = b"<html><script>alert(document.cookie)</script>".ljust(len(PNG), b" ")


def bucket(app: App) -> S3ObjectStore:
    return S3ObjectStore(app.settings["s3_endpoint"], "test", "test-secret",
                         "conveyor-attachments")


async def state(app: App, attachment_id: str) -> dict[str, Any]:
    db = await asyncpg.connect(app.dsn)
    try:
        row = await db.fetchrow("SELECT * FROM attachments WHERE id = $1", attachment_id)
        assert row is not None
        posted = await db.fetchval(
            "SELECT count(*) FROM messages WHERE kind = 'attachment'"
            " AND attachment->>'attachmentId' = $1", attachment_id)
        return {**dict(row), "posted": posted}
    finally:
        await db.close()


async def uploaded_pending(app: App) -> tuple[str, str, WsClient, WsClient, dict[str, Any], str]:
    """A chat of two and an attachment whose bytes are in S3, not yet reported:
    (chat, alice, a, b, ack, object key)."""
    chat, alice, _, a, b = await chat_of_two(app)
    ack = await announce(a, chat)
    assert await put(ack["uploadUrl"]) == 200
    rec = await state(app, ack["attachmentId"])
    assert rec["state"] == "pending" and rec["posted"] == 0
    return chat, alice, a, b, ack, rec["object_key"]


FORGED: list[tuple[str, dict[str, str], dict[str, str]]] = [
    ("no credentials", {}, {}),
    ("wrong secret", {"Authorization": "Bearer not-the-secret"}, {}),
    ("secret with a suffix", {"Authorization": f"Bearer {WEBHOOK_SECRET}x"}, {}),
    ("a prefix of the secret", {"Authorization": f"Bearer {WEBHOOK_SECRET[:-1]}"}, {}),
    ("secret under another scheme", {"Authorization": f"Basic {WEBHOOK_SECRET}"}, {}),
    ("secret without a scheme", {"Authorization": WEBHOOK_SECRET}, {}),
    ("a bare scheme", {"Authorization": "Bearer"}, {}),
    ("secret in the query", {}, {"access_token": WEBHOOK_SECRET, "token": WEBHOOK_SECRET}),
    ("secret in another header", {"X-Minio-Token": WEBHOOK_SECRET}, {}),
]


async def test_forged_storage_webhooks_are_refused_and_change_nothing(conveyor: App) -> None:
    _, alice, a, b, ack, key = await uploaded_pending(conveyor)
    user_jwt = {"Authorization": f"Bearer {conveyor.token(alice)}"}
    for case, headers, params in [*FORGED, ("a user's valid JWT", user_jwt, {})]:
        r = await webhook(conveyor, event(record(key)), headers=headers, params=params)
        assert r.status_code == 401, (case, r.status_code, r.text)
        assert r.json() == {"error": {"code": "unauthorized",
                                      "message": "a valid storage webhook secret is required"}}
        rec = await state(conveyor, ack["attachmentId"])
        assert (rec["state"], rec["posted"]) == ("pending", 0), case
    assert [f for f in await b.drain(0.3) if f["type"] == "message"] == []
    # The same event with the secret is what changes it: the refusals were the forgery's.
    r = await webhook(conveyor, event(record(key)))
    assert r.status_code == 200 and r.json()["results"][0]["state"] == "ready", r.text
    assert (await b.message(kind="attachment"))["attachment"]["attachmentId"] == ack["attachmentId"]
    for c in (a, b):
        await c.close()


async def test_authentic_events_that_name_no_pending_upload_are_ignored(conveyor: App) -> None:
    chat, _, a, b, ack, key = await uploaded_pending(conveyor)
    aid = ack["attachmentId"]
    ignored = [
        ("a key no attachment has", record(f"{chat}/{uuid.uuid4()}/cat.png")),
        ("the server's own checked copy", record(f"ready/{aid}/cat.png")),
        ("the upload's key under another chat", record(key.replace(chat, str(uuid.uuid4())))),
        ("a removal, not a creation", record(key, "s3:ObjectRemoved:Delete")),
        ("a record that is not an object", "Records"),
        ("an event name that is not a string", {**record(key), "eventName": 5}),
        ("a key that is not a string", record(7)),
        ("no s3 part", {"eventName": "s3:ObjectCreated:Put", "s3": None}),
        ("an empty key", record("")),
    ]
    r = await webhook(conveyor, event(*(rec for _, rec in ignored)))
    assert r.status_code == 200, r.text
    assert r.json() == {"processed": 0, "ignored": len(ignored), "results": []}
    for body in (b"{not json", b"[]", b'{"Records": {"a": 1}}', b'{"records": []}'):
        r = await webhook(conveyor, body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid", body
    rec = await state(conveyor, aid)
    assert (rec["state"], rec["posted"]) == ("pending", 0)
    # One notification naming the same upload twice checks it once.
    r = await webhook(conveyor, event(record(key), record(key)))
    assert r.status_code == 200, r.text
    assert (r.json()["processed"], r.json()["ignored"]) == (1, 1)
    assert r.json()["results"][0]["state"] == "ready"
    for c in (a, b):
        await c.close()


async def test_an_event_for_an_upload_that_never_happened_leaves_it_pending(
        conveyor: App) -> None:
    chat, _, _, a, b = await chat_of_two(conveyor)
    ack = await announce(a, chat)
    key = (await state(conveyor, ack["attachmentId"]))["object_key"]
    r = await webhook(conveyor, event(record(key)))
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert result["state"] == "pending" and result["error"]["code"] == "not_uploaded"
    rec = await state(conveyor, ack["attachmentId"])
    assert (rec["state"], rec["posted"], rec["claim"]) == ("pending", 0, None)
    for c in (a, b):
        await c.close()


async def test_a_replayed_event_and_a_reused_upload_url_post_nothing_twice(conveyor: App) -> None:
    _, _, a, b, ack, key = await uploaded_pending(conveyor)
    aid = ack["attachmentId"]
    first = (await webhook(conveyor, event(record(key)))).json()["results"][0]
    assert first["state"] == "ready" and first["messageId"]
    msg = await b.message(kind="attachment")
    await b.receipt([msg["messageId"]])
    # The uploader puts other bytes at the same upload URL (S3 takes them), and storage
    # reports it: nothing is checked or posted again, and the new bytes are removed.
    assert await put(ack["uploadUrl"], HTML, "text/html") == 200
    for _ in range(2):
        again = (await webhook(conveyor, event(record(key)))).json()["results"][0]
        assert again == {"attachmentId": aid, "state": "ready", "messageId": first["messageId"]}
    rec = await state(conveyor, aid)
    assert (rec["state"], rec["posted"]) == ("ready", 1)
    assert await bucket(conveyor).stat(key) is None
    assert [f for f in await b.drain(0.5) if f["type"] == "message"] == []
    # What members download is still the checked file.
    async with httpx.AsyncClient(base_url=conveyor.base_url) as http:
        got = await http.get(f"/v1/attachments/{aid}/content", headers=conveyor.auth(b.user_id))
        assert got.status_code == 307
        assert (await http.get(got.headers["location"])).content == PNG
    for c in (a, b):
        await c.close()


async def test_upload_tokens_cannot_be_swapped_replayed_or_used_late(conveyor: App) -> None:
    import ray

    chat, alice, a, b, first, _ = await uploaded_pending(conveyor)
    second = await announce(a, chat, "dog.png")
    assert await put(second["uploadUrl"]) == 200
    # Another attachment's token (the same uploader's): refused, nothing checked.
    for token in (first["uploadToken"], second["uploadToken"][:-1],
                  second["uploadToken"] + "x", second["uploadToken"].swapcase()):
        r = await complete(conveyor, alice, second["attachmentId"], token)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (token, r.text)
    r = await complete(conveyor, alice, second["attachmentId"], None)
    assert r.status_code == 403
    assert (await state(conveyor, second["attachmentId"]))["state"] == "pending"
    # The right token, twice: one post; the repeat answers the same message.
    r1 = await complete(conveyor, alice, second["attachmentId"], second["uploadToken"])
    r2 = await complete(conveyor, alice, second["attachmentId"], second["uploadToken"])
    assert r1.status_code == r2.status_code == 200, (r1.text, r2.text)
    assert r1.json() == r2.json() and r1.json()["state"] == "ready"
    assert (await state(conveyor, second["attachmentId"]))["posted"] == 1
    # Too late: the upload window closed and the attachment expired. Bytes put at its URL
    # afterwards (S3 here does not check the URL's expiry) are removed, never posted.
    db = await asyncpg.connect(conveyor.dsn)
    try:
        await db.execute("UPDATE attachments SET expires_at = now() - interval '1 hour'"
                         " WHERE id = $1", first["attachmentId"])
    finally:
        await db.close()
    relay = ray.serve.get_deployment_handle("OutboxRelay", app_name="conveyor")
    assert await relay.expire_attachments.remote() >= 1
    r = await complete(conveyor, alice, first["attachmentId"], first["uploadToken"])
    assert r.status_code == 410 and r.json()["error"]["code"] == "expired", r.text
    key = (await state(conveyor, first["attachmentId"]))["object_key"]
    assert await put(first["uploadUrl"]) == 200
    result = (await webhook(conveyor, event(record(key)))).json()["results"][0]
    assert result["state"] == "expired" and result["error"]["code"] == "expired"
    rec = await state(conveyor, first["attachmentId"])
    assert (rec["state"], rec["posted"]) == ("expired", 0)
    assert await bucket(conveyor).stat(key) is None
    for c in (a, b):
        await c.close()
