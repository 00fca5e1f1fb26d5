"""Attachments in two phases against the Serve app, a real S3 API (moto), PostgreSQL and a
fake clamd speaking clamd's protocol; and, in a second small Serve application, the
embedded local object store end to end."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from adapters.objects import S3ObjectStore
from client import WsClient, create_chat
from tests.client import chat_of_two, user
from tests.conftest import WEBHOOK_SECRET, App, side_app
from tests.fake_clamd import EICAR

pytestmark = pytest.mark.e2e

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(200)
HTML = b"<html><script>alert(document.cookie)</script>".ljust(len(PNG), b" ")


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


async def webhook(app: App, key: str, size: int, secret: str | None = WEBHOOK_SECRET
                  ) -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}"} if secret is not None else {}
    async with httpx.AsyncClient(base_url=app.base_url) as http:
        return await http.post("/v1/storage/events", json=minio_event(key, size), headers=headers)


async def put(url: str, data: bytes, ctype: str) -> int:
    async with httpx.AsyncClient() as http:
        r = await http.put(url, content=data, headers={"Content-Type": ctype})
        return r.status_code


async def complete(http: httpx.AsyncClient, ack: dict[str, Any], token: str | None = None
                   ) -> httpx.Response:
    """POST /v1/attachments/{id}/complete with the ack's upload token (or the one given)."""
    return await http.post(f"/v1/attachments/{ack['attachmentId']}/complete",
                           headers={"X-Upload-Token": token or ack["uploadToken"]})


async def download(app: App, url: str, who: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=app.base_url) as http:
        r = await http.get(url, headers=app.auth(who))
        assert r.status_code == 307, r.text
        return await http.get(r.headers["location"])


def bucket(app: App) -> S3ObjectStore:
    return S3ObjectStore(app.settings["s3_endpoint"], "test", "test-secret",
                         "conveyor-attachments")


async def row(app_db: Any, attachment_id: str) -> Any:
    return await app_db.fetchrow("SELECT * FROM attachments WHERE id=$1", attachment_id)


def ready_key(rec: Any) -> str:
    return f"ready/{rec['id']}/{rec['object_key'].rsplit('/', 1)[-1]}"


def rejected(aid: str) -> Any:
    return lambda f: (f["type"] == "system" and f["event"] == "attachment_rejected"
                      and f["data"]["attachmentId"] == aid)


async def test_attachment_round_trip_through_s3_and_the_storage_webhook(
    conveyor: App, app_db: Any
) -> None:
    chat, _, bob, a, b = await chat_of_two(conveyor)
    ack = await start_upload(a, chat, "cat.png", "image/png", len(PNG))
    assert ack["status"] == "accepted" and ack["uploadUrl"].startswith("http://127.0.0.1")
    assert ack["attachmentId"] and ack["uploadToken"] and ack["expiresAt"]
    assert await put(ack["uploadUrl"], PNG, "image/png") == 200  # straight to S3
    rec = await row(app_db, ack["attachmentId"])
    key = rec["object_key"]

    r = await webhook(conveyor, key, len(PNG), secret="forged")
    assert r.status_code == 401
    r = await webhook(conveyor, key, len(PNG), secret=None)  # no Authorization header at all
    assert r.status_code == 401
    assert (await row(app_db, ack["attachmentId"]))["state"] == "pending"
    r = await webhook(conveyor, key, len(PNG))
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["state"] == "ready"

    msg = await b.message(kind="attachment")
    assert msg["attachment"]["attachmentId"] == ack["attachmentId"]
    assert msg["attachment"]["fileName"] == "cat.png" and msg["attachment"]["size"] == len(PNG)
    await b.receipt([msg["messageId"]])
    rec = await row(app_db, ack["attachmentId"])
    assert rec["state"] == "ready" and rec["message_id"] == msg["messageId"]
    # A repeated event makes no second message.
    r = await webhook(conveyor, key, len(PNG))
    assert r.json()["results"][0]["state"] == "ready"
    assert await app_db.fetchval(
        "SELECT count(*) FROM messages WHERE chat_id=$1 AND kind='attachment'", chat) == 1
    assert not [f for f in await b.drain(1.0) if f["type"] == "message"]
    got = await download(conveyor, msg["attachment"]["url"], bob)
    assert got.content == PNG
    assert got.headers["content-disposition"].startswith('attachment; filename="cat.png"')
    async with httpx.AsyncClient(base_url=conveyor.base_url) as http:
        outsider = await http.get(msg["attachment"]["url"], headers=conveyor.auth(user()))
        assert outsider.status_code == 404
    for c in (a, b):
        await c.close()


async def test_a_checked_file_cannot_be_swapped_after_it_passed(conveyor: App, app_db: Any
                                                                ) -> None:
    chat, alice, bob, a, b = await chat_of_two(conveyor)
    ack = await start_upload(a, chat, "cat.png", "image/png", len(PNG))
    assert await put(ack["uploadUrl"], PNG, "image/png") == 200
    async with httpx.AsyncClient(base_url=conveyor.base_url, headers=conveyor.auth(alice)) as http:
        assert (await complete(http, ack)).json()["state"] == "ready"
        msg = await b.message(kind="attachment")
        await b.receipt([msg["messageId"]])
        # The presigned PUT is still valid: other bytes (another type, same size) go up...
        assert await put(ack["uploadUrl"], HTML, "text/html") == 200
        # ...and storage reports them, and the uploader asks again: nothing is re-checked,
        # nothing is posted, and the new bytes are thrown away.
        key = (await row(app_db, ack["attachmentId"]))["object_key"]
        r = await webhook(conveyor, key, len(HTML))
        assert r.json()["results"][0]["state"] == "ready"
        r = await complete(http, ack)
        assert r.status_code == 200 and r.json()["messageId"] == msg["messageId"]
    assert await bucket(conveyor).stat(key) is None
    got = await download(conveyor, msg["attachment"]["url"], bob)
    assert got.content == PNG and got.headers["content-type"] == "image/png"
    # Nothing new was posted (a redelivery of the same message, before the receipt was
    # applied, carries the same messageId).
    assert not [f for f in await b.drain(0.5)
                if f["type"] == "message" and f["messageId"] != msg["messageId"]]
    for c in (a, b):
        await c.close()


async def test_complete_endpoint_and_refusals(conveyor: App, app_db: Any) -> None:
    chat, alice, bob, a, b = await chat_of_two(conveyor)
    s3 = bucket(conveyor)
    async with httpx.AsyncClient(base_url=conveyor.base_url, headers=conveyor.auth(alice)) as http:
        # Not uploaded yet: 409, and the attachment stays pending.
        pending = await start_upload(a, chat, "doc.pdf", "application/pdf", 9)
        r = await complete(http, pending)
        assert r.status_code == 409 and r.json()["error"]["code"] == "not_uploaded"
        assert (await row(app_db, pending["attachmentId"]))["state"] == "pending"
        assert await put(pending["uploadUrl"], b"%PDF-1.7\n", "application/pdf") == 200
        # The upload token of the ack is required.
        r = await http.post(f"/v1/attachments/{pending['attachmentId']}/complete")
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = await complete(http, pending, token="not-the-token")
        assert r.status_code == 403
        assert (await row(app_db, pending["attachmentId"]))["state"] == "pending"
        r = await complete(http, pending)
        assert r.status_code == 200 and r.json()["state"] == "ready"
        assert (await b.message(kind="attachment"))["attachment"]["fileName"] == "doc.pdf"

        # Larger than declared: refused, never reaches the chat; the uploader is told.
        big = await start_upload(a, chat, "big.png", "image/png", 10)
        assert await put(big["uploadUrl"], PNG, "image/png") == 200
        r = await complete(http, big)
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_large"
        told = await a.expect(rejected(big["attachmentId"]))
        assert told["data"]["code"] == "too_large" and told["data"]["chatId"] == chat

        # Declared a PNG, uploaded an executable: the scan stage refuses it, the uploader
        # is told why, and neither the upload nor the checked copy is left in S3.
        fake = b"MZ" + bytes(50)
        liar = await start_upload(a, chat, "cute.png", "image/png", len(fake))
        assert await put(liar["uploadUrl"], fake, "image/png") == 200
        r = await complete(http, liar)
        assert r.status_code == 422 and r.json()["error"]["code"] == "type_mismatch"
        told = await a.expect(rejected(liar["attachmentId"]))
        assert told["data"]["code"] == "type_mismatch"
        assert "application/x-msdownload" in told["data"]["reason"]
        rec = await row(app_db, liar["attachmentId"])
        assert rec["state"] == "rejected"
        assert await s3.stat(rec["object_key"]) is None and await s3.stat(ready_key(rec)) is None
        # Declared a PNG, uploaded bytes with no signature at all: refused as well.
        blank = await start_upload(a, chat, "blank.png", "image/png", 100)
        assert await put(blank["uploadUrl"], bytes(100), "image/png") == 200
        r = await complete(http, blank)
        assert r.status_code == 422 and r.json()["error"]["code"] == "type_mismatch"
        # Someone else's attachment: not found.
        r = await http.post(f"/v1/attachments/{pending['attachmentId']}/complete",
                            headers={**conveyor.auth(bob), "X-Upload-Token": pending["uploadToken"]})
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


async def test_clamav_refuses_an_infected_file(conveyor: App, app_db: Any, clamd: Any) -> None:
    chat, alice, _, a, b = await chat_of_two(conveyor)
    scans_before = len(clamd.clamd.scans)
    ack = await start_upload(a, chat, "readme.txt", "text/plain", len(EICAR))
    assert await put(ack["uploadUrl"], EICAR, "text/plain") == 200
    async with httpx.AsyncClient(base_url=conveyor.base_url, headers=conveyor.auth(alice)) as http:
        r = await complete(http, ack)
    assert r.status_code == 422 and r.json()["error"]["code"] == "infected"
    told = await a.expect(rejected(ack["attachmentId"]))
    assert told["data"]["code"] == "infected" and "Eicar-Signature" in told["data"]["reason"]
    assert [s.reply for s in clamd.clamd.scans[scans_before:]] == [
        "stream: Eicar-Signature FOUND"]
    rec = await row(app_db, ack["attachmentId"])
    assert rec["state"] == "rejected" and await bucket(conveyor).stat(ready_key(rec)) is None
    assert await app_db.fetchval("SELECT count(*) FROM messages WHERE chat_id=$1", chat) == 0
    # A clean file of the same kind goes through the same scanner and reaches the chat.
    ok = await start_upload(a, chat, "notes.txt", "text/plain", 11)
    assert await put(ok["uploadUrl"], b"plain notes", "text/plain") == 200
    async with httpx.AsyncClient(base_url=conveyor.base_url, headers=conveyor.auth(alice)) as http:
        assert (await complete(http, ok)).json()["state"] == "ready"
    msg = await b.message(kind="attachment")
    assert msg["attachment"]["attachmentId"] == ok["attachmentId"]
    assert clamd.clamd.scans[-1].reply == "stream: OK"
    for c in (a, b):
        await c.close()


async def test_a_deleted_attachment_message_takes_its_file_with_it(conveyor: App, app_db: Any
                                                                   ) -> None:
    import ray

    alice, bob = user(), user()
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [bob])
    a = await WsClient.connect(conveyor.ws_url, conveyor.token(alice))
    ack = await start_upload(a, chat, "cat.png", "image/png", len(PNG))
    assert await put(ack["uploadUrl"], PNG, "image/png") == 200
    async with httpx.AsyncClient(base_url=conveyor.base_url, headers=conveyor.auth(alice)) as http:
        mid = (await complete(http, ack)).json()["messageId"]
    async with httpx.AsyncClient(base_url=conveyor.base_url) as http:
        url = f"/v1/attachments/{ack['attachmentId']}/content"
        assert (await http.get(url, headers=conveyor.auth(bob))).status_code == 307
        await a.send({"type": "command", "id": "del-1", "op": "delete", "messageId": mid})
        assert (await a.ack("del-1"))["status"] == "accepted"
        r = await http.get(url, headers=conveyor.auth(bob))
        assert r.status_code == 410 and r.json()["error"]["code"] == "gone"
    rec = await row(app_db, ack["attachmentId"])
    assert rec["state"] == "deleted" and await bucket(conveyor).stat(ready_key(rec)) is not None
    relay = ray.serve.get_deployment_handle("OutboxRelay", app_name="conveyor")
    assert await relay.expire_attachments.remote() >= 1
    assert await bucket(conveyor).stat(ready_key(rec)) is None
    assert (await row(app_db, ack["attachmentId"]))["removed_at"] is not None
    await a.close()


async def test_expired_never_uploaded_attachments_are_cleaned_up(
    conveyor: App, app_db: Any
) -> None:
    import ray

    alice = user()
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [user()])
    a = await WsClient.connect(conveyor.ws_url, conveyor.token(alice))
    late = await start_upload(a, chat, "later.png", "image/png", 10)
    recent = await start_upload(a, chat, "recent.png", "image/png", 10)
    # One expired an hour ago; the other a moment ago, still within the grace period.
    await app_db.execute("UPDATE attachments SET expires_at = now() - interval '1 hour'"
                         " WHERE id = $1", late["attachmentId"])
    await app_db.execute("UPDATE attachments SET expires_at = now() - interval '1 second'"
                         " WHERE id = $1", recent["attachmentId"])
    relay = ray.serve.get_deployment_handle("OutboxRelay", app_name="conveyor")
    assert await relay.expire_attachments.remote() >= 1
    assert (await row(app_db, late["attachmentId"]))["state"] == "expired"
    assert (await row(app_db, recent["attachmentId"]))["state"] == "pending"
    async with httpx.AsyncClient(base_url=conveyor.base_url, headers=conveyor.auth(alice)) as http:
        r = await complete(http, late)  # a late confirmation: a clear "too late"
        assert r.status_code == 410 and r.json()["error"]["code"] == "expired"
        assert r.json()["state"] == "expired"
    await a.close()


async def test_client_frames_may_not_use_the_server_dedup_prefix(conveyor: App) -> None:
    alice = user()
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [user()])
    a = await WsClient.connect(conveyor.ws_url, conveyor.token(alice))
    await a.send({"type": "chat", "id": f"attachment:{uuid.uuid4()}", "chatId": chat,
                  "body": "squatting an attachment's message key"})
    err = await a.expect(lambda f: f["type"] == "error")
    assert err["code"] == "invalid" and err["id"].startswith("attachment:")
    assert (await a.ack(await a.chat(chat, "an ordinary id")))["status"] == "accepted"
    await a.close()


# --- the embedded local object store, in a second Serve application ------------------------

@pytest.fixture(scope="module")
def local_app(conveyor: App, new_database: Any) -> Iterator[App]:
    """The app without S3: uploads go to its own PUT /v1/uploads/... (one small gateway
    replica, its own database, under /local in the same Ray)."""
    settings = {**conveyor.settings, "database_url": new_database("local"), "s3_endpoint": None,
                "s3_access_key": None, "s3_secret_key": None}
    with side_app(conveyor, "local", settings) as app:
        yield app


async def test_local_store_upload_download_and_refusals(local_app: App) -> None:
    chat, _, bob, a, b = await chat_of_two(local_app)
    ack = await start_upload(a, chat, "cat.png", "image/png", len(PNG))
    assert ack["uploadUrl"].startswith(f"{local_app.base_url}/v1/uploads/")
    async with httpx.AsyncClient() as http:
        # More bytes than declared: 413, nothing kept, still pending.
        r = await http.put(ack["uploadUrl"], content=PNG + b"extra",
                           headers={"Content-Type": "image/png"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        # A forged signature: 403.
        r = await http.put(ack["uploadUrl"].replace("sig=", "sig=0"), content=PNG)
        assert r.status_code == 403
        r = await http.put(ack["uploadUrl"], content=PNG, headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["state"] == "ready"
        msg = await b.message(kind="attachment")
        assert msg["attachment"]["attachmentId"] == ack["attachmentId"]
        # The upload URL takes nothing more once the attachment is checked.
        r = await http.put(ack["uploadUrl"], content=HTML, headers={"Content-Type": "text/html"})
        assert r.status_code == 409
        got = await download(local_app, msg["attachment"]["url"], bob)
    assert got.status_code == 200 and got.content == PNG
    assert got.headers["content-type"] == "image/png"
    assert got.headers["content-disposition"] == 'attachment; filename="cat.png"'
    assert got.headers["x-content-type-options"] == "nosniff"
    for c in (a, b):
        await c.close()
