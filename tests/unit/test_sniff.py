"""Content sniffing for the scan stage."""

import pytest

from stages.sniff import matches, sniff


@pytest.mark.parametrize(("head", "kind"), [
    (b"\x89PNG\r\n\x1a\n....", "image/png"),
    (b"\xff\xd8\xff\xe0JFIF", "image/jpeg"),
    (b"GIF89a....", "image/gif"),
    (b"%PDF-1.7\n", "application/pdf"),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
    (b"\x00\x00\x00\x18ftypmp42", "video/mp4"),
    (b"ID3\x04\x00", "audio/mpeg"),
    (b"\xff\xfb\x90\x64", "audio/mpeg"),
    (b"PK\x05\x06" + bytes(18), "application/zip"),
    (b"MZ\x90\x00", "application/x-msdownload"),
    ("привет, мир".encode(), "text/plain"),
    (b"\x00\x01\x02\x03", None),
])
def test_sniff_recognises_formats_by_their_first_bytes(head: bytes, kind: str | None) -> None:
    assert sniff(head) == kind


def test_declared_type_must_agree_with_the_bytes() -> None:
    assert matches("image/png", b"\x89PNG\r\n\x1a\nxx") == (True, "image/png")
    assert matches("image/png", b"MZ\x90\x00") == (False, "application/x-msdownload")
    assert matches("text/plain", b"\x00\x01\x02") == (False, None)
    assert matches("application/zip", b"PK\x03\x04\x14\x00") == (True, "application/zip")


@pytest.mark.parametrize("declared", [
    "image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf",
    "application/zip", "audio/mpeg", "video/mp4",
])
def test_a_type_with_a_known_signature_needs_it(declared: str) -> None:
    # Zeros carry no signature at all: nothing contradicts them, and nothing confirms them.
    assert matches(declared, bytes(100)) == (False, None)


def test_a_type_without_a_known_signature_passes_only_when_nothing_contradicts_it() -> None:
    assert matches("application/octet-stream", bytes(100)) == (True, None)
    assert matches("application/octet-stream", b"MZ\x90\x00") == (False,
                                                                 "application/x-msdownload")
