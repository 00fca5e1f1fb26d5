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


async def collect(store: LocalObjectStore | S3ObjectStore, key: str, size: int) -> list[bytes]:
    return [c async for c in store.chunks(key, size)]


async def test_local_copy_is_a_snapshot_and_chunks_stream(tmp_path: Path) -> None:
    store = LocalObjectStore.from_data_dir(tmp_path, "http://app")
    assert await store.copy("c/a/missing.png", "ready/a/missing.png") is False
    await store.write("c/a/cat.png", chunks(b"\x89PNG", b"\r\n\x1a\n"), "image/png", 8)
    assert await store.copy("c/a/cat.png", "ready/a/cat.png") is True
    # A later upload to the same key does not change the copy.
    await store.write("c/a/cat.png", chunks(b"<html>x</html>"), "text/html", 100)
    info = await store.stat("ready/a/cat.png")
    assert info is not None and (info.size, info.content_type) == (8, "image/png")
    assert await collect(store, "ready/a/cat.png", 3) == [b"\x89PN", b"G\r\n", b"\x1a\n"]
    # A re-upload without a content type does not keep the old one.
    await store.write("c/a/cat.png", chunks(b"abc"), None, 100)
    info = await store.stat("c/a/cat.png")
    assert info is not None and info.content_type is None
    url = await store.download_url("ready/a/cat.png", 60, "ignored.png")
    assert "/v1/uploads/ready/a/cat.png?" in url
    assert not list(tmp_path.glob("objects/**/*.part"))


async def test_s3_copy_chunks_and_download_as_attachment(s3: str) -> None:
    store = S3ObjectStore(s3, "test", "test-secret", "objects-copy")
    url = await store.upload_url("c/a/photo.png", "image/png", 0, 60)
    body = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 10
    async with httpx.AsyncClient() as http:
        assert (await http.put(url, content=body, headers={"Content-Type": "image/png"})
                ).status_code == 200
        assert await store.copy("c/a/missing.png", "ready/a/missing.png") is False
        assert await store.copy("c/a/photo.png", "ready/a/photo.png") is True
        # The presigned PUT still works after the copy: the copy does not change.
        assert (await http.put(url, content=b"<html>", headers={"Content-Type": "text/html"})
                ).status_code == 200
        info = await store.stat("ready/a/photo.png")
        assert info is not None and (info.size, info.content_type) == (len(body), "image/png")
        got = await collect(store, "ready/a/photo.png", 1000)
        assert b"".join(got) == body and [len(c) for c in got] == [1000, 1000, 568]
        r = await http.get(await store.download_url("ready/a/photo.png", 60, "фото 1.png"))
    assert r.status_code == 200 and r.content == body
    assert r.headers["content-disposition"] == (
        "attachment; filename=\"1.png\"; filename*=UTF-8''%D1%84%D0%BE%D1%82%D0%BE%201.png")
