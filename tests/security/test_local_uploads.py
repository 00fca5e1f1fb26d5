"""The embedded object store's signed upload URLs (``PUT /v1/uploads/{key}``): a URL
signed for one key, size, method and time takes nothing else, and takes bytes only while
its attachment is pending. The endpoint runs as the gateway mounts it, on a real
PostgreSQL (the attachment records) and real files; what the check pipeline would do on a
report is done here by the store's own claim and finish."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette

from adapters.objects import LocalObjectStore
from adapters.postgres.attachments import PostgresAttachments
from adapters.postgres.chats import PostgresChats
from deployments.gateway.uploads_api import UploadsApi
from stages.attachments import ready_key
from stages.ports import AttachmentRecord
from tests.security.uploads import PNG

HTML = b"<html><script>alert(1)</script>".ljust(len(PNG), b" ")


@dataclass
class Store:
    http: httpx.AsyncClient
    objects: LocalObjectStore
    attachments: PostgresAttachments
    chat: str
    reported: list[tuple[str, str]]

    async def attachment(self, uploader: str = "alice") -> tuple[AttachmentRecord, str]:
        """A pending attachment and its upload URL (as the ack gives it)."""
        aid = str(uuid.uuid4())
        rec = AttachmentRecord(
            id=aid, chat_id=self.chat, uploader=uploader, client_id=aid,
            object_key=f"{self.chat}/{aid}/cat.png", file_name="cat.png",
            content_type="image/png", size=len(PNG), state="pending", upload_token="t",
            expires_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 900)))
        ((made, _),) = await self.attachments.create([rec])
        return made, await self.objects.upload_url(made.object_key, "image/png", len(PNG), 900)

    async def put(self, url: str, data: bytes = PNG) -> httpx.Response:
        return await self.http.put(url, content=data, headers={"Content-Type": "image/png"})

    async def bytes_at(self, key: str) -> bytes | None:
        p = self.objects.path(key)
        return p.read_bytes() if p.exists() else None


@pytest.fixture
async def store(db_pool: asyncpg.Pool, tmp_path: Path) -> AsyncIterator[Store]:
    objects = LocalObjectStore(tmp_path / "objects", "http://api", b"k" * 32)
    objects.root.mkdir()
    attachments = PostgresAttachments(db_pool)
    reported: list[tuple[str, str]] = []

    async def uploaded(records: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """What the attachment_uploaded pipeline does to the record: claim it, keep a
        copy at the server's key, finish it ready."""
        reported.extend(records)
        for aid, _ in records:
            rec = await attachments.claim(aid, 300)
            assert rec is not None and rec.claim is not None
            assert await objects.copy(rec.object_key, ready_key(rec))
            assert await attachments.finish(aid, rec.claim, "ready")
        return [{"attachmentId": aid, "state": "ready"} for aid, _ in records]

    app = Starlette(routes=UploadsApi(objects, attachments, uploaded).routes())
    chat = await PostgresChats(db_pool).create_chat("alice", ["bob"], None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://api") as http:
        yield Store(http, objects, attachments, chat, reported)


def with_query(url: str, **changes: Any) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update({k: str(v) for k, v in changes.items() if v is not None})
    for k in [k for k, v in changes.items() if v is None]:
        query.pop(k, None)
    return f"{parts.scheme}://{parts.netloc}{parts.path}?" + "&".join(
        f"{k}={quote(v)}" for k, v in query.items())


def refused(r: httpx.Response, status: int, code: str) -> None:
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text


async def test_a_signed_url_takes_one_upload_while_its_attachment_is_pending(
        store: Store) -> None:
    rec, url = await store.attachment()
    r = await store.put(url)
    assert r.status_code == 200, r.text
    assert store.reported == [(rec.id, "alice")]
    assert await store.bytes_at(ready_key(rec)) == PNG
    # Replayed once the attachment left pending: refused, nothing written or reported.
    refused(await store.put(url, HTML), 409, "conflict")
    assert store.reported == [(rec.id, "alice")]
    assert await store.bytes_at(ready_key(rec)) == PNG
    assert await store.bytes_at(rec.object_key) == PNG  # the first upload, not the replay


@pytest.mark.parametrize("state", ["verifying", "expired"])
async def test_an_upload_url_is_refused_once_the_attachment_is_checked_or_expired(
        store: Store, db_pool: asyncpg.Pool, state: str) -> None:
    rec, url = await store.attachment()
    if state == "verifying":
        assert await store.attachments.claim(rec.id, 300) is not None
    else:
        await db_pool.execute("UPDATE attachments SET expires_at = now() - interval '1 hour'"
                              " WHERE id = $1", rec.id)
        assert [r.id for r in await store.attachments.expire(0)] == [rec.id]
    refused(await store.put(url), 409, "conflict")
    assert store.reported == [] and await store.bytes_at(rec.object_key) is None
    assert (await store.attachments.get([rec.id]))[rec.id].state == state


async def test_tampered_swapped_or_expired_signatures_are_refused(store: Store) -> None:
    rec, url = await store.attachment()
    other, other_url = await store.attachment()
    sig = parse_qs(urlsplit(url).query)["sig"][0]
    expired = await store.objects.upload_url(rec.object_key, "image/png", len(PNG), -5)
    get_url = await store.objects.download_url(rec.object_key, 300)
    forged = {
        "another attachment's signature": with_query(other_url, sig=sig),
        "another attachment's key": url.replace(quote(rec.object_key), quote(other.object_key)),
        "a larger size": with_query(url, size=len(PNG) * 100),
        "a later expiry": with_query(url, expires=int(time.time()) + 10**6),
        "an expired URL": expired,
        "a download URL": get_url,
        "the checked copy's download URL": await store.objects.download_url(ready_key(rec), 300),
        "no signature": with_query(url, sig=None),
        "no expiry": with_query(url, expires=None),
        "a signature that is not hex": with_query(url, sig="zz" * 32),
        "an empty signature": with_query(url, sig=""),
    }
    for case, bad in forged.items():
        refused(await store.put(bad), 403, "forbidden")
        assert store.reported == [], case
    # Downloads need the GET signature: an upload URL reads nothing.
    refused(await store.http.get(url), 403, "forbidden")
    for key in (rec.object_key, other.object_key, ready_key(rec)):
        assert await store.bytes_at(key) is None
    for r in (rec, other):
        assert (await store.attachments.get([r.id]))[r.id].state == "pending"
    # The genuine URLs still work: the refusals were the tampering's.
    assert (await store.put(other_url)).status_code == 200
    assert store.reported == [(other.id, "alice")]
