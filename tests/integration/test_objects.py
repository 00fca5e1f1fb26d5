"""Object stores: the local default, and S3 through the minio SDK against moto's server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from adapters.objects import LocalObjectStore, S3ObjectStore


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


async def test_local_store_signs_urls_and_refuses_more_than_declared(tmp_path: Path) -> None:
    store = LocalObjectStore.from_data_dir(tmp_path, "http://app")
    url = await store.upload_url("c/a/file.txt", "text/plain", 5, 60)
    assert url.startswith("http://app/v1/uploads/c/a/file.txt?")
    q = dict(p.split("=") for p in url.split("?")[1].split("&"))
    assert store.verify("PUT", "c/a/file.txt", int(q["expires"]), 5, q["sig"])
    assert not store.verify("PUT", "c/a/other.txt", int(q["expires"]), 5, q["sig"])
    assert not store.verify("GET", "c/a/file.txt", int(q["expires"]), 5, q["sig"])
    assert not store.verify("PUT", "c/a/file.txt", int(time.time()) - 1, 5,
                            store.sign("PUT", "c/a/file.txt", int(time.time()) - 1, 5))
    assert await store.write("c/a/file.txt", chunks(b"he", b"llo"), "text/plain", 5) == 5
    info = await store.stat("c/a/file.txt")
    assert info is not None and (info.size, info.content_type) == (5, "text/plain")
    assert await store.head("c/a/file.txt", 2) == b"he"
    with pytest.raises(ValueError, match="exceeds"):
        await store.write("c/a/big.txt", chunks(b"123", b"456"), None, 5)
    assert await store.stat("c/a/big.txt") is None
    with pytest.raises(ValueError, match="escapes"):
        store.path("../../etc/passwd")
    await store.delete("c/a/file.txt")
    await store.delete("c/a/file.txt")  # idempotent
    assert await store.stat("c/a/file.txt") is None
    # The secret persists: a second process signs the same way.
    again = LocalObjectStore.from_data_dir(tmp_path, "http://app")
    assert again.sign("PUT", "k", 1, 1) == store.sign("PUT", "k", 1, 1)


async def test_s3_store_presigned_put_stat_head_delete(s3: str) -> None:
    store = S3ObjectStore(s3, "test", "test-secret", "objects-test")
    url = await store.upload_url("chat/att/photo.png", "image/png", 12, 60)
    async with httpx.AsyncClient() as http:
        r = await http.put(url, content=b"\x89PNG\r\n\x1a\nabcd", headers={"Content-Type": "image/png"})
    assert r.status_code == 200
    info = await store.stat("chat/att/photo.png")
    assert info is not None and info.size == 12 and info.content_type == "image/png"
    assert await store.head("chat/att/photo.png", 8) == b"\x89PNG\r\n\x1a\n"
    assert await store.stat("chat/att/missing.png") is None
    await store.delete("chat/att/photo.png")
    assert await store.stat("chat/att/photo.png") is None
    await store.ping()
