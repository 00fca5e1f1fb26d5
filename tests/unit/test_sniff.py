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
    assert matches("application/zip", b"\x00\x01\x02") == (True, None)  # nothing contradicts
