"""What an ``Idempotency-Key`` header may hold: one rule for the server and its OpenAPI
document (the schema's ``pattern`` is this very expression)."""

from __future__ import annotations

import re

# 1..255 printable ASCII characters (RFC 9110 field-value characters without obs-text or
# tabs). Neither the first nor the last is a space: HTTP strips them before the server
# sees the value, so a key with one would arrive as another key.
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]([ -~]{0,253}[!-~])?$"
_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)


def valid_idempotency_key(key: str) -> bool:
    """Whether ``key`` (a header value as the server decoded it) fits the pattern."""
    return _KEY.fullmatch(key) is not None
