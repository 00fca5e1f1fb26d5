"""The frame parser (``deployments/gateway/frames.py``) on arbitrary input: every ASGI
message either parses into an object with a string ``type`` or is refused with a typed
``FrameError``; nothing else escapes it."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.gateway.frames import MAX_DEPTH, FrameError, check_client_id, read_frame

MAX = 512
CODES = {"bad_frame", "too_large", "invalid"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=5),
    max_leaves=30)
objects = st.dictionaries(st.sampled_from(["type", "id", "chatId", "body", "x"]) | st.text(max_size=8),
                          json_values, max_size=6)
messages = st.one_of(
    st.text(max_size=3 * MAX).map(lambda t: {"type": "websocket.receive", "text": t}),
    st.binary(max_size=3 * MAX).map(lambda b: {"type": "websocket.receive", "bytes": b}),
    objects.map(lambda o: {"type": "websocket.receive", "text": orjson.dumps(o).decode()}),
    objects.map(lambda o: {"type": "websocket.receive", "bytes": orjson.dumps(o)}),
    st.just({"type": "websocket.receive"}),
)


def strings_with_nul(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if "\x00" in value else []
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in strings_with_nul(k) + strings_with_nul(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_with_nul(v)]
    return []


def parse(message: dict[str, Any]) -> dict[str, Any] | FrameError:
    try:
        return read_frame(message, MAX)
    except FrameError as exc:
        return exc


def size(message: dict[str, Any]) -> int:
    if message.get("text") is not None:
        return len(message["text"].encode())
    return len(message.get("bytes") or b"")


@settings(max_examples=300, deadline=None)
@given(messages)
def test_every_message_parses_or_is_refused_with_a_typed_error(message: dict[str, Any]) -> None:
    got = parse(message)
    if size(message) > MAX:
        assert isinstance(got, FrameError) and got.code == "too_large"
        assert "id" not in got.frame()  # refused unparsed
    elif isinstance(got, FrameError):
        assert got.code in CODES
        frame = got.frame()
        assert frame["type"] == "error" and frame["code"] == got.code and frame["message"]
    else:
        assert isinstance(got, dict) and isinstance(got["type"], str)
        assert not strings_with_nul(got)


@settings(max_examples=100, deadline=None)
@given(objects, st.text(max_size=5))
def test_a_nul_anywhere_in_a_string_is_refused(obj: dict[str, Any], around: str) -> None:
    obj = {**obj, "type": "chat", "id": "c-1", "nested": [{f"k{around}": f"{around}\x00"}]}
    with pytest.raises(FrameError) as info:
        read_frame({"type": "websocket.receive", "text": orjson.dumps(obj).decode()}, 1 << 20)
    assert info.value.code == "invalid" and info.value.frame()["id"] == "c-1"


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_client_ids_are_strings_of_1_to_64_characters(fid: Any) -> None:
    frame = {"type": "chat", "id": fid}
    ok = isinstance(fid, str) and 0 < len(fid) <= 64 and not fid.startswith("attachment:")
    try:
        assert check_client_id(frame) == fid and ok
    except FrameError as exc:
        assert not ok and exc.code == "invalid"


def test_deep_nesting_huge_numbers_and_lone_surrogates_are_bad_frames() -> None:
    nested = '{"type":"chat","x":' + "[" * 1500 + "]" * 1500 + "}"
    for text in (nested, '{"type":"ping","n":1e400}', '{"type":"ping","n":NaN}',
                 '{"type":"ping","s":"\\ud800"}'):
        with pytest.raises(FrameError) as info:
            read_frame({"type": "websocket.receive", "text": text}, 10_000)
        assert info.value.code == "bad_frame"
    # Invalid UTF-8 can only arrive in a binary frame (text frames are decoded by then).
    with pytest.raises(FrameError) as info:
        read_frame({"type": "websocket.receive", "bytes": b'{"type":"\xff\xfe"}'}, 10_000)
    assert info.value.code == "bad_frame"


def nested(depth: int) -> str:
    """JSON text of arrays and objects nested ``depth`` levels (built as text: orjson's
    encoder stops at 255)."""
    opening = "".join('[' if i % 2 else '{"k":' for i in range(depth))
    closing = "".join(']' if i % 2 else '}' for i in reversed(range(depth)))
    return f'{opening}"leaf"{closing}'


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH, 600, 1000])
def test_nesting_deeper_than_the_limit_is_refused_with_the_frames_id(depth: int) -> None:
    """A frame's fields are pickled on their way to a stage host, and pickling recurses:
    a few hundred levels fail it, so deep frames are refused at the door."""
    import ray.cloudpickle

    text = f'{{"type":"chat","id":"c-1","extra":{nested(depth)}}}'
    if depth + 1 <= MAX_DEPTH:  # the frame itself is one level
        frame = read_frame({"type": "websocket.receive", "text": text}, 1 << 20)
        ray.cloudpickle.dumps([frame])
        return
    with pytest.raises(FrameError) as info:
        read_frame({"type": "websocket.receive", "text": text}, 1 << 20)
    assert info.value.code == "invalid" and info.value.frame()["id"] == "c-1"
