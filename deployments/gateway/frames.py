"""Client frames in: size check, JSON parsing, the checks every frame passes, and the
typed ``error`` a bad frame gets (PROTOCOL.md: the connection stays open)."""

from __future__ import annotations

from typing import Any

import orjson

# Frames the gateway answers itself; everything else must have a pipeline.
LOCAL_TYPES = frozenset({"ping", "sync"})
MAX_CLIENT_ID = 64
# Deepest nesting of arrays and objects a frame may have. The parser allows ~1024 levels,
# but a frame's fields cross process boundaries pickled, and pickling recurses: a few
# hundred levels fail it, and a durable batch that cannot be sent is retried forever.
MAX_DEPTH = 32
# U+0000 as JSON writes it (the only way into a parsed string: raw control characters
# are not valid JSON).
_NUL_ESCAPE_TEXT = "\\u0000"
_NUL_ESCAPE = _NUL_ESCAPE_TEXT.encode()


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
    # PostgreSQL text cannot hold U+0000: a durable batch carrying one would fail at
    # every retry and wedge its type's pipeline. The walk runs only when the text has the
    # escape.
    if _deeper_than(frame, MAX_DEPTH):
        raise FrameError("invalid", f"frame is nested deeper than {MAX_DEPTH} levels",
                         frame_id(frame))
    escaped = _NUL_ESCAPE in data if isinstance(data, bytes) else _NUL_ESCAPE_TEXT in data
    if escaped and _has_nul(frame):
        raise FrameError("invalid", "strings must not contain U+0000", frame_id(frame))
    return frame



def _deeper_than(frame: dict[str, Any], limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` levels (the frame is level 1)."""
    stack: list[tuple[Any, int]] = [(v, 2) for v in frame.values() if isinstance(v, (dict, list))]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _has_nul(value: Any) -> bool:
    """Whether any string in ``value`` (keys included) contains U+0000. Iterative: a
    frame's nesting is bounded by the parser, but recursion here need not be."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


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
