"""Attachments in two phases against the Serve app, a real S3 API (moto) and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from tests.client import WsClient, create_chat
from tests.conftest import WEBHOOK_SECRET, App

pytestmark = pytest.mark.e2e

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(200)


def user() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


def minio_event(key: str, size: int, name: str = "s3:ObjectCreated:Put") -> dict[str, Any]:
    """The JSON a MinIO bucket notification (webhook target) posts."""
    return {
        "EventName": name,
        "Key": f"conveyor-attachments/{key}",
        "Records": [{
            "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "",
            "eventTime": "2026-11-23T00:00:00.000Z", "eventName": name,
            "userIdentity": {"principalId": "minio"},
            "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
                   "bucket": {"name": "conveyor-attachments",
                              "arn": "arn:aws:s3:::conveyor-attachments"},
                   "object": {"key": key.replace("/", "%2F"), "size": size,
                              "contentType": "image/png", "sequencer": "1"}},
        }],
    }


async def start_upload(c: WsClient, chat: str, name: str, ctype: str, size: int
                       ) -> dict[str, Any]:
    cid = f"att-{uuid.uuid4().hex[:8]}"
    await c.send({"type": "attachment", "id": cid, "chatId": chat, "fileName": name,
                  "contentType": ctype, "size": size})
    return await c.ack(cid)


async def webhook(app: App, key: str, size: int, secret: str = WEBHOOK_SECRET) -> httpx.Response:
    async with httpx.AsyncClient(base_url=app.base_url) as http:
        return await http.post("/v1/storage/events", json=minio_event(key, size),
                               headers={"Authorization": f"Bearer {secret}"})


async def put(url: str, data: bytes, ctype: str) -> int:
    async with httpx.AsyncClient() as http:
        r = await http.put(url, content=data, headers={"Content-Type": ctype})
        return r.status_code


async def object_key(app_db: Any, attachment_id: str) -> str:
    return str(await app_db.fetchval("SELECT object_key FROM attachments WHERE id=$1",
                                     attachment_id))


async def test_attachment_round_trip_through_s3_and_the_storage_webhook(
    conveyor: App, app_db: Any
) -> None:
    alice, bob = user(), user()
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [bob])
    a = await WsClient.connect(conveyor.ws_url, conveyor.token(alice))
    b = await WsClient.connect(conveyor.ws_url, conveyor.token(bob))
    ack = await start_upload(a, chat, "cat.png", "image/png", len(PNG))
    assert ack["status"] == "accepted" and ack["uploadUrl"].startswith("http://127.0.0.1")
    assert ack["attachmentId"] and ack["uploadToken"] and ack["expiresAt"]
    assert await put(ack["uploadUrl"], PNG, "image/png") == 200  # straight to S3
    key = await object_key(app_db, ack["attachmentId"])

    r = await webhook(conveyor, key, len(PNG), secret="forged")
    assert r.status_code == 401
    r = await webhook(conveyor, key, len(PNG))
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["state"] == "ready"

    msg = await b.message(kind="attachment")
    assert msg["attachment"]["attachmentId"] == ack["attachmentId"]
    assert msg["attachment"]["fileName"] == "cat.png" and msg["attachment"]["size"] == len(PNG)
    await b.receipt([msg["messageId"]])
    # A repeated event makes no second message.
    r = await webhook(conveyor, key, len(PNG))
    assert r.json()["results"][0]["state"] == "ready"
    assert await app_db.fetchval(
        "SELECT count(*) FROM messages WHERE chat_id=$1 AND kind='attachment'", chat) == 1
    assert not [f for f in await b.drain(1.0) if f["type"] == "message"]
    async with httpx.AsyncClient(base_url=conveyor.base_url) as http:
        r = await http.get(msg["attachment"]["url"], headers=conveyor.auth(bob))
        assert r.status_code == 307
        got = await http.get(r.headers["location"])
        assert got.content == PNG
        outsider = await http.get(msg["attachment"]["url"], headers=conveyor.auth(user()))
        assert outsider.status_code == 404
    for c in (a, b):
        await c.close()


async def test_complete_endpoint_and_refusals(conveyor: App, app_db: Any) -> None:
    alice, bob = user(), user()
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [bob])
    a = await WsClient.connect(conveyor.ws_url, conveyor.token(alice))
    b = await WsClient.connect(conveyor.ws_url, conveyor.token(bob))
    async with httpx.AsyncClient(base_url=conveyor.base_url, headers=conveyor.auth(alice)) as http:
        # Not uploaded yet: 409, and the attachment stays pending.
        pending = await start_upload(a, chat, "doc.pdf", "application/pdf", 9)
        r = await http.post(f"/v1/attachments/{pending['attachmentId']}/complete")
        assert r.status_code == 409 and r.json()["error"]["code"] == "not_uploaded"
        assert await put(pending["uploadUrl"], b"%PDF-1.7\n", "application/pdf") == 200
        r = await http.post(f"/v1/attachments/{pending['attachmentId']}/complete")
        assert r.status_code == 200 and r.json()["state"] == "ready"
        assert (await b.message(kind="attachment"))["attachment"]["fileName"] == "doc.pdf"

        # Larger than declared: refused, never reaches the chat; the uploader is told.
        big = await start_upload(a, chat, "big.png", "image/png", 10)
        assert await put(big["uploadUrl"], PNG, "image/png") == 200
        r = await http.post(f"/v1/attachments/{big['attachmentId']}/complete")
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_large"
        told = await a.expect(lambda f: f["type"] == "system"
                              and f["event"] == "attachment_rejected")
        assert told["data"]["attachmentId"] == big["attachmentId"]

        # Declared a PNG, uploaded an executable: the scan stage refuses it.
        fake = b"MZ" + bytes(50)
        liar = await start_upload(a, chat, "cute.png", "image/png", len(fake))
        assert await put(liar["uploadUrl"], fake, "image/png") == 200
        r = await http.post(f"/v1/attachments/{liar['attachmentId']}/complete")
        assert r.status_code == 422 and r.json()["error"]["code"] == "type_mismatch"
        assert await app_db.fetchval("SELECT state FROM attachments WHERE id=$1",
                                     liar["attachmentId"]) == "rejected"
        # Someone else's attachment: not found.
        r = await http.post(f"/v1/attachments/{pending['attachmentId']}/complete",
                            headers=conveyor.auth(bob))
        assert r.status_code == 404

    bad = await start_upload(a, chat, "x.exe", "application/x-msdownload", 10)
    assert bad["status"] == "rejected" and bad["error"]["code"] == "invalid"
    huge = await start_upload(a, chat, "x.png", "image/png", 10**12)
    assert huge["status"] == "rejected" and huge["error"]["code"] == "invalid"
    stranger = await WsClient.connect(conveyor.ws_url, conveyor.token(user()))
    assert (await start_upload(stranger, chat, "x.png", "image/png", 5))["error"]["code"] == \
        "forbidden"
    assert await app_db.fetchval(
        "SELECT count(*) FROM messages WHERE chat_id=$1 AND kind='attachment'", chat) == 1
    for c in (a, b, stranger):
        await c.close()


async def test_expired_never_uploaded_attachments_are_cleaned_up(
    conveyor: App, app_db: Any
) -> None:
    import ray

    alice = user()
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [user()])
    a = await WsClient.connect(conveyor.ws_url, conveyor.token(alice))
    ack = await start_upload(a, chat, "later.png", "image/png", 10)
    await app_db.execute("UPDATE attachments SET expires_at = now() - interval '1 second'"
                         " WHERE id = $1", ack["attachmentId"])
    relay = ray.serve.get_deployment_handle("OutboxRelay", app_name="conveyor")
    assert await relay.expire_attachments.remote() >= 1
    assert await app_db.fetchval("SELECT state FROM attachments WHERE id=$1",
                                 ack["attachmentId"]) == "expired"
    await asyncio.sleep(0)
    await a.close()
