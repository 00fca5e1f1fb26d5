"""What a file really is, from its first bytes (magic numbers)."""

from __future__ import annotations

SIGNATURES: list[tuple[bytes, int, str]] = [
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"GIF87a", 0, "image/gif"),
    (b"GIF89a", 0, "image/gif"),
    (b"%PDF-", 0, "application/pdf"),
    (b"PK\x03\x04", 0, "application/zip"),
    (b"PK\x05\x06", 0, "application/zip"),  # an empty archive
    (b"PK\x07\x08", 0, "application/zip"),  # a spanned archive
    (b"ID3", 0, "audio/mpeg"),
    (b"\xff\xfb", 0, "audio/mpeg"),  # MPEG-1 layer III frame without an ID3 tag
    (b"\xff\xf3", 0, "audio/mpeg"),
    (b"\xff\xf2", 0, "audio/mpeg"),
    (b"\x7fELF", 0, "application/x-executable"),
    (b"MZ", 0, "application/x-msdownload"),
    (b"ftyp", 4, "video/mp4"),
]

# Types whose files always start with a signature above: such a declared type needs it.
SIGNED_TYPES = frozenset({ctype for _, _, ctype in SIGNATURES} | {"image/webp"})


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
    """Whether the declared type agrees with the bytes. A type with a known signature (every
    image, pdf, zip, mp3, mp4 type) needs that signature; ``text/plain`` needs UTF-8 text; a
    type we know no signature of is accepted only when the bytes show no known type."""
    found = sniff(head)
    if found is None:
        return declared not in SIGNED_TYPES and declared != "text/plain", None
    return found == declared, found
