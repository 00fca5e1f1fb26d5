"""Client frames in: size check, JSON parsing, the checks every frame passes, and the
typed ``error`` a bad frame gets (PROTOCOL.md: the connection stays open)."""

from __future__ import annotations

from typing import Any

import orjson

# Frames the gateway answers itself; everything else must have a pipeline.
LOCAL_TYPES = frozenset({"ping", "sync"})
MAX_CLIENT_ID = 64


class FrameError(Exception):
    """A frame refused before it reached a pipeline: answered with an ``error`` frame."""

    def __init__(self, code: str, message: str, frame_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frame_id = frame_id

    def frame(self) -> dict[str, Any]:
        err: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message}
        if self.frame_id is not None:
            err["id"] = self.frame_id
        return err


def read_frame(message: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """The JSON object of an ASGI ``websocket.receive`` message (text or binary), with a
    string ``type``; ``FrameError`` otherwise. An oversized frame is refused unparsed."""
    raw = message.get("text")
    if raw is None:
        data: str | bytes = message.get("bytes") or b""
        too_large = len(data) > max_bytes
    else:
        data = raw
        # characters ≤ bytes: the exact check only when it could matter
        too_large = len(raw) > max_bytes or len(raw.encode()) > max_bytes
    if too_large:
        raise FrameError("too_large", f"frame exceeds {max_bytes} bytes")
    try:
        frame = orjson.loads(data or b"")
    except orjson.JSONDecodeError:
        raise FrameError("bad_frame", "frame is not valid JSON") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise FrameError("bad_frame", "frame must be a JSON object with a string 'type'")
    return frame


def frame_id(frame: dict[str, Any]) -> str | None:
    fid = frame.get("id")
    return fid if isinstance(fid, str) else None


def check_client_id(frame: dict[str, Any]) -> str:
    """The frame's client id (the sender's dedup key), or ``FrameError``. The
    ``attachment:`` prefix is the server's own key space."""
    fid = frame_id(frame)
    if fid is None or not 0 < len(fid) <= MAX_CLIENT_ID or fid.startswith("attachment:"):
        raise FrameError("invalid", f"'id' must be a string of 1..{MAX_CLIENT_ID} characters"
                         " not starting with 'attachment:'", fid)
    return fid
