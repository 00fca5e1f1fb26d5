"""Attachments: object storage, the virus scanner, and attachment records."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    size: int
    content_type: str | None


class ObjectStore(Protocol):
    """S3-compatible object storage for attachments.

    ``upload_url`` returns a URL the client PUTs the bytes to directly (valid ``expires_s``);
    the store itself never proxies uploads. ``stat`` is None for a missing object. ``head``
    reads at most ``n`` first bytes; ``chunks`` streams a whole object in pieces of at most
    ``chunk_size`` bytes. ``copy`` makes ``dst`` a snapshot of ``src`` (data and content
    type, atomically: a concurrent overwrite of ``src`` is either wholly in the copy or not
    at all) and returns False when ``src`` does not exist. ``download_url`` serves the
    object as a download (``Content-Disposition: attachment`` with ``file_name``).
    ``delete`` is idempotent.
    """

    async def upload_url(self, key: str, content_type: str, size: int, expires_s: int) -> str: ...

    async def download_url(self, key: str, expires_s: int, file_name: str | None = None) -> str: ...

    async def stat(self, key: str) -> ObjectInfo | None: ...

    async def head(self, key: str, n: int) -> bytes: ...

    def chunks(self, key: str, chunk_size: int = 256 * 1024) -> AsyncIterator[bytes]: ...

    async def copy(self, src: str, dst: str) -> bool: ...

    async def delete(self, key: str) -> None: ...

    async def ping(self) -> None:
        """Raises when the store cannot be reached (readiness)."""
        ...


class ScanLimitExceeded(Exception):
    """The virus scanner refused the stream as larger than it is configured to scan."""


class VirusScanner(Protocol):
    """A virus scanner (ClamAV's clamd). ``scan`` reads the whole stream and returns None
    when it is clean, else the signature found; it raises ``ScanLimitExceeded`` when the
    stream is over the scanner's size limit, and any other exception when the scan could
    not run (scanner unreachable, timeout): the file is then neither clean nor infected."""

    async def scan(self, chunks: AsyncIterable[bytes]) -> str | None: ...


@dataclass(frozen=True, slots=True)
class AttachmentRecord:
    id: str
    chat_id: str
    uploader: str
    client_id: str
    object_key: str
    file_name: str
    content_type: str
    size: int
    state: str  # pending | verifying | ready | rejected | expired | deleted
    upload_token: str
    expires_at: str
    message_id: str | None = None
    claim: str | None = None  # while verifying: the token of the processing that holds it


class AttachmentStore(Protocol):
    """Attachment records.

    - ``create`` is idempotent on (uploader, client id): a repeat returns the first record
      with ``duplicate`` True.
    - ``claim`` moves a ``pending`` record (or a ``verifying`` one whose claim is older than
      ``lease_s``: its processing died) to ``verifying`` under a fresh claim token, atomically:
      of two concurrent claims one gets the record, the other None. Only the holder of the
      claim may ``finish`` the record (to ``ready`` or ``rejected``) or ``release`` it back to
      ``pending``; both return False when the claim was lost. That is what makes repeated
      storage events harmless and keeps expiry from racing an upload being processed.
    - ``link`` records the chat message of a ready attachment.
    """

    async def create(self, records: Sequence[AttachmentRecord]
                     ) -> list[tuple[AttachmentRecord, bool]]: ...

    async def get(self, ids: Sequence[str]) -> dict[str, AttachmentRecord]: ...

    async def claim(self, attachment_id: str, lease_s: float) -> AttachmentRecord | None: ...

    async def release(self, attachment_id: str, claim: str) -> bool: ...

    async def finish(self, attachment_id: str, claim: str, state: str,
                     reason: str | None = None) -> bool: ...

    async def link(self, attachment_id: str, message_id: str) -> None: ...

    async def by_key(self, key: str) -> AttachmentRecord | None:
        """The record whose upload goes to ``key`` (storage events name keys)."""
        ...

    async def expire(self, grace_s: float = 0.0, lease_s: float = 300.0, limit: int = 100
                     ) -> list[AttachmentRecord]:
        """Mark ``expired`` the pending records ``grace_s`` past their upload expiry (and
        verifying ones whose claim is older than ``lease_s``); returns them, at most
        ``limit``. A record being checked under a live claim is never expired."""
        ...

    async def deleted(self, limit: int = 100) -> list[AttachmentRecord]:
        """Records whose message was deleted and whose bytes were not removed yet."""
        ...

    async def removed(self, ids: Sequence[str]) -> None:
        """The bytes of these deleted records are gone (they leave ``deleted``)."""
        ...


class UploadEndpoint(Protocol):
    """The embedded object store's own upload endpoint (when there is no S3): signed
    URLs the app itself serves. ``verify`` checks a URL's signature and expiry for a
    method (``PUT``/``GET``), key and size; ``write`` stores a stream under ``key``,
    refusing (``ValueError``) more than ``limit`` bytes; ``path`` is where a stored
    object's bytes are on disk (for serving them)."""

    def verify(self, method: str, key: str, expires: int, size: int, sig: str) -> bool: ...

    async def write(self, key: str, chunks: AsyncIterator[bytes], content_type: str | None,
                    limit: int) -> int: ...

    async def stat(self, key: str) -> ObjectInfo | None: ...

    def path(self, key: str) -> Path: ...
