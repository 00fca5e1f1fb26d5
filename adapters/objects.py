"""Object storage for attachments: S3/MinIO through the ``minio`` SDK, or local files.

Both implement ``stages.ports.ObjectStore``. The SDK is synchronous, so every call runs
in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

from stages.ports import ObjectInfo

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MISSING = ("NoSuchKey", "NoSuchObject", "NotFound", "NoSuchBucket")


def content_disposition(file_name: str) -> str:
    """``attachment`` with an ASCII fallback name and the UTF-8 original (RFC 6266)."""
    fallback = _UNSAFE.sub("_", file_name).strip("._") or "file"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(file_name, safe='')}"


class S3ObjectStore:
    def __init__(self, endpoint: str, access_key: str | None, secret_key: str | None,
                 bucket: str, region: str = "us-east-1", secure: bool = False) -> None:
        from minio import Minio

        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key,
                            secure=secure, region=region)
        self.bucket = bucket
        self._ready = False

    async def ensure_bucket(self) -> None:
        if self._ready:
            return

        def make() -> None:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)

        await asyncio.to_thread(make)
        self._ready = True

    async def upload_url(self, key: str, content_type: str, size: int, expires_s: int) -> str:
        await self.ensure_bucket()
        return await asyncio.to_thread(self.client.presigned_put_object, self.bucket, key,
                                       timedelta(seconds=expires_s))

    async def download_url(self, key: str, expires_s: int, file_name: str | None = None) -> str:
        name = file_name or key.rsplit("/", 1)[-1]
        return await asyncio.to_thread(
            self.client.presigned_get_object, self.bucket, key, timedelta(seconds=expires_s),
            response_headers={"response-content-disposition": content_disposition(name)})

    async def stat(self, key: str) -> ObjectInfo | None:
        from minio.error import S3Error

        try:
            obj = await asyncio.to_thread(self.client.stat_object, self.bucket, key)
        except S3Error as exc:
            if exc.code in MISSING:
                return None
            raise
        return ObjectInfo(int(obj.size or 0), obj.content_type)

    async def copy(self, src: str, dst: str) -> bool:
        """Server-side CopyObject: the copy is one consistent version of ``src``."""
        from minio.commonconfig import CopySource
        from minio.error import S3Error

        try:
            await asyncio.to_thread(self.client.copy_object, self.bucket, dst,
                                    CopySource(self.bucket, src))
        except S3Error as exc:
            if exc.code in MISSING:
                return False
            raise
        return True

    async def chunks(self, key: str, chunk_size: int = 256 * 1024) -> AsyncIterator[bytes]:
        """The object streamed in pieces; one GET, never the whole object in memory."""
        resp = await asyncio.to_thread(self.client.get_object, self.bucket, key)
        try:
            while True:
                data = await asyncio.to_thread(resp.read, chunk_size)
                if not data:
                    return
                yield bytes(data)
        finally:
            resp.close()
            resp.release_conn()

    async def head(self, key: str, n: int) -> bytes:
        def read() -> bytes:
            resp = self.client.get_object(self.bucket, key, offset=0, length=n)
            try:
                return bytes(resp.read())
            finally:
                resp.close()
                resp.release_conn()

        return await asyncio.to_thread(read)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.client.remove_object, self.bucket, key)

    async def ping(self) -> None:
        await asyncio.to_thread(self.client.bucket_exists, self.bucket)


class LocalObjectStore:
    """The embedded default: files under ``root``, uploaded through the app's own
    ``PUT /v1/uploads/{key}`` with an HMAC-signed, expiring URL (same two phases as S3)."""

    def __init__(self, root: Path, base_url: str, secret: bytes) -> None:
        self.root = root
        self.base_url = base_url.rstrip("/")
        self.secret = secret

    @classmethod
    def from_data_dir(cls, data_dir: Path, base_url: str) -> LocalObjectStore:
        root = data_dir / "objects"
        root.mkdir(parents=True, exist_ok=True)
        secret_file = data_dir / "objects.secret"
        if not secret_file.exists():
            tmp = secret_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(os.urandom(32))
            try:
                secret_file.hardlink_to(tmp)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        return cls(root, base_url, secret_file.read_bytes())

    def path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root.resolve() not in p.parents:
            raise ValueError("object key escapes the store")
        return p

    def sign(self, method: str, key: str, expires: int, size: int) -> str:
        msg = f"{method}\n{key}\n{expires}\n{size}".encode()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()

    def verify(self, method: str, key: str, expires: int, size: int, sig: str) -> bool:
        return expires >= time.time() and hmac.compare_digest(
            self.sign(method, key, expires, size), sig)

    async def upload_url(self, key: str, content_type: str, size: int, expires_s: int) -> str:
        exp = int(time.time()) + expires_s
        return (f"{self.base_url}/v1/uploads/{quote(key)}?expires={exp}&size={size}"
                f"&sig={self.sign('PUT', key, exp, size)}")

    async def download_url(self, key: str, expires_s: int, file_name: str | None = None) -> str:
        """Served by ``GET /v1/uploads/{key}`` as a download named after the key's last
        segment (``file_name`` is not used: the URL carries nothing unsigned)."""
        exp = int(time.time()) + expires_s
        return (f"{self.base_url}/v1/uploads/{quote(key)}?expires={exp}&size=0"
                f"&sig={self.sign('GET', key, exp, 0)}")

    async def stat(self, key: str) -> ObjectInfo | None:
        p = self.path(key)
        if not p.exists():
            return None
        meta = p.with_name(p.name + ".type")
        ctype = meta.read_text() if meta.exists() else None
        return ObjectInfo(p.stat().st_size, ctype)

    async def head(self, key: str, n: int) -> bytes:
        with self.path(key).open("rb") as f:
            return f.read(n)

    async def chunks(self, key: str, chunk_size: int = 256 * 1024) -> AsyncIterator[bytes]:
        with self.path(key).open("rb") as f:
            while True:
                data = await asyncio.to_thread(f.read, chunk_size)
                if not data:
                    return
                yield data

    async def copy(self, src: str, dst: str) -> bool:
        """A snapshot of ``src``: uploads replace files atomically (write, then rename), and
        the copy reads one open file, so it holds one whole upload, never a mix."""
        s, d = self.path(src), self.path(dst)

        def run() -> bool:
            try:
                source = s.open("rb")
            except FileNotFoundError:
                return False
            with source:
                meta = s.with_name(s.name + ".type")
                ctype = meta.read_text() if meta.exists() else None
                d.parent.mkdir(parents=True, exist_ok=True)
                tmp = d.with_name(f"{d.name}.{os.getpid()}.copy")
                try:
                    with tmp.open("wb") as out:
                        shutil.copyfileobj(source, out, 1024 * 1024)
                    tmp.replace(d)
                finally:
                    tmp.unlink(missing_ok=True)
            dmeta = d.with_name(d.name + ".type")
            if ctype is None:
                dmeta.unlink(missing_ok=True)
            else:
                dmeta.write_text(ctype)
            return True

        return await asyncio.to_thread(run)

    async def delete(self, key: str) -> None:
        p = self.path(key)
        p.unlink(missing_ok=True)
        p.with_name(p.name + ".type").unlink(missing_ok=True)

    async def write(self, key: str, chunks: AsyncIterator[bytes], content_type: str | None,
                    limit: int) -> int:
        """Store an upload; refuses (and removes) more than ``limit`` bytes. The file is
        replaced in one rename, so readers see the old upload or the new one, whole."""
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.{os.urandom(4).hex()}.part")
        meta = p.with_name(p.name + ".type")
        total = 0
        try:
            with tmp.open("wb") as f:
                async for chunk in chunks:
                    total += len(chunk)
                    if total > limit:
                        raise ValueError(f"upload exceeds the declared {limit} bytes")
                    f.write(chunk)
            if content_type:
                meta.write_text(content_type)
            else:
                meta.unlink(missing_ok=True)
            tmp.replace(p)
        finally:
            tmp.unlink(missing_ok=True)
        return total

    async def ping(self) -> None:
        if not self.root.is_dir():
            raise RuntimeError(f"object store folder {self.root} is missing")
