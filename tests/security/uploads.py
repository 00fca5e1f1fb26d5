"""Attachment helpers of the security tests: announce, upload straight to S3, confirm,
and the bucket notification MinIO would post."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from client import WsClient
from tests.conftest import WEBHOOK_SECRET, App

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(200)


async def announce(c: WsClient, chat: str, name: str = "cat.png", ctype: str = "image/png",
                   size: int = len(PNG)) -> dict[str, Any]:
    """The ack of an ``attachment`` frame (``attachmentId, uploadUrl, uploadToken``)."""
    cid = f"att-{uuid.uuid4().hex[:8]}"
    await c.send({"type": "attachment", "id": cid, "chatId": chat, "fileName": name,
                  "contentType": ctype, "size": size})
    return await c.ack(cid)


async def put(url: str, data: bytes = PNG, ctype: str = "image/png") -> int:
    async with httpx.AsyncClient() as http:
        return (await http.put(url, content=data, headers={"Content-Type": ctype})).status_code


async def complete(app: App, who: str, attachment_id: str, token: str | None) -> httpx.Response:
    headers = {**app.auth(who), **({"X-Upload-Token": token} if token is not None else {})}
    async with httpx.AsyncClient(base_url=app.base_url) as http:
        return await http.post(f"/v1/attachments/{attachment_id}/complete", headers=headers)


def record(key: Any, name: str = "s3:ObjectCreated:Put") -> dict[str, Any]:
    """One record of a MinIO bucket notification (``key`` as the event carries it)."""
    return {"eventVersion": "2.0", "eventSource": "minio:s3", "eventName": name,
            "s3": {"bucket": {"name": "conveyor-attachments"},
                   "object": {"key": key.replace("/", "%2F") if isinstance(key, str) else key,
                              "size": len(PNG), "contentType": "image/png"}}}


def event(*records: dict[str, Any]) -> dict[str, Any]:
    return {"EventName": "s3:ObjectCreated:Put", "Records": list(records)}


async def webhook(app: App, body: Any, headers: dict[str, str] | None = None,
                  params: dict[str, str] | None = None) -> httpx.Response:
    """POST /v1/storage/events; with the configured secret unless ``headers`` are given."""
    if headers is None:
        headers = {"Authorization": f"Bearer {WEBHOOK_SECRET}"}
    async with httpx.AsyncClient(base_url=app.base_url) as http:
        if isinstance(body, bytes):
            return await http.post("/v1/storage/events", content=body, headers=headers,
                                   params=params)
        return await http.post("/v1/storage/events", json=body, headers=headers, params=params)
