"""What a file really is, from its first bytes (magic numbers)."""

from __future__ import annotations

SIGNATURES: list[tuple[bytes, int, str]] = [
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"GIF87a", 0, "image/gif"),
    (b"GIF89a", 0, "image/gif"),
    (b"%PDF-", 0, "application/pdf"),
    (b"PK\x03\x04", 0, "application/zip"),
    (b"ID3", 0, "audio/mpeg"),
    (b"\x7fELF", 0, "application/x-executable"),
    (b"MZ", 0, "application/x-msdownload"),
    (b"ftyp", 4, "video/mp4"),
]


def sniff(head: bytes) -> str | None:
    """The content type the bytes show, or None when nothing is recognised."""
    for magic, offset, ctype in SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return ctype
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head and b"\x00" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 4:  # not just a multibyte char cut at the end
                return None
        return "text/plain"
    return None


def matches(declared: str, head: bytes) -> tuple[bool, str | None]:
    """Whether the declared type agrees with the bytes; unknown formats are accepted only
    when nothing contradicts them (no executable, no other known type)."""
    found = sniff(head)
    if found is None:
        return declared not in ("text/plain",), None
    return found == declared, found
