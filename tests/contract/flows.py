"""What the contract tests share: the bytes of an upload that passes the checks and of one
that does not, and the uploader's two steps after an attachment's ack."""

from __future__ import annotations

from typing import Any

import httpx

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(200)
NOT_PNG = b"plain text, not an image".ljust(len(PNG), b" ")


async def put_upload(ack: dict[str, Any], data: bytes, ctype: str) -> None:
    """The bytes, straight to the object store's upload URL of the ack."""
    async with httpx.AsyncClient() as storage:
        put = await storage.put(ack["uploadUrl"], content=data, headers={"Content-Type": ctype})
    assert put.status_code == 200, put.text


async def complete(http: httpx.AsyncClient, ack: dict[str, Any],
                   headers: dict[str, str] | None = None) -> httpx.Response:
    """``POST /v1/attachments/{id}/complete`` with the ack's upload token (and ``headers``,
    e.g. the uploader's authorization)."""
    return await http.post(f"/v1/attachments/{ack['attachmentId']}/complete",
                           headers={**(headers or {}), "X-Upload-Token": ack["uploadToken"]})


async def upload(http: httpx.AsyncClient, ack: dict[str, Any], data: bytes, ctype: str,
                 headers: dict[str, str] | None = None) -> httpx.Response:
    await put_upload(ack, data, ctype)
    return await complete(http, ack, headers)
