"""What the protocol client raises: one base class, one subclass per way a call fails."""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Base of every error the client raises on its own account."""


class HandshakeRefused(ClientError):
    """The server refused the WebSocket: an HTTP status before the upgrade, or a close
    code (4401: bad or missing token) instead of the ``connected`` frame."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class ProtocolError(ClientError):
    """The server sent something ``PROTOCOL.md`` does not allow where it was sent."""


class ReplyTimeout(ClientError, TimeoutError):
    """No reply within the time given. Also a :class:`TimeoutError`, so code that waits
    with ``asyncio.timeout`` semantics keeps working."""

    def __init__(self, what: str, timeout: float) -> None:
        super().__init__(f"no {what} within {timeout:g} s")
        self.what = what
        self.timeout = timeout


class ServerError(ClientError):
    """The server refused a request: an ``error`` frame answering a frame's ``id``, or an
    HTTP error response (``{"error": {"code", "message"}}``).

    ``code`` is the protocol's error code (``forbidden``, ``not_found``, ``invalid``, …);
    ``status`` the HTTP status when it came over HTTP; ``detail`` the frame or body."""

    def __init__(self, code: str, message: str, *, status: int | None = None,
                 detail: Any = None) -> None:
        super().__init__(f"{code}: {message}" if status is None else f"{status} {code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.detail = detail
