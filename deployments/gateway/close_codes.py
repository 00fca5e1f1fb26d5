"""WebSocket close codes the gateway uses (PROTOCOL.md, "Close codes").

Application codes are in the 4000–4999 range and echo the HTTP status of the same
meaning; 1011 and 1012 are the standard "server error" and "service restart"."""

from __future__ import annotations

BAD_TOKEN = 4401            # the token is missing, invalid or expired: sign in again
SLOW_CONSUMER = 4408        # the client did not keep up with what was written to it
TOO_MANY_CONNECTIONS = 4409  # the user holds as many open connections as allowed
TOO_MANY_ATTEMPTS = 4429    # the user opened connections too often: retry later
SERVER_ERROR = 1011         # the token could not be checked (issuer unreachable): retry
RESTARTING = 1012           # the replica is shutting down: reconnect (to another one)

# RFC 6455: a close reason is at most 123 bytes of UTF-8.
MAX_REASON_BYTES = 123


def reason(text: str) -> str:
    """``text`` cut to fit a close frame (whole characters only)."""
    raw = text.encode()[:MAX_REASON_BYTES]
    return raw.decode(errors="ignore")
