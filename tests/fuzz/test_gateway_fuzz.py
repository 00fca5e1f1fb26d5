"""Frame fuzzing against the real gateway (the session's application, real WebSockets).

``CASES`` frames in all: every field of every client frame type of PROTOCOL.md replaced
by a value of each wrong kind or left out (a fixed sweep), then Hypothesis-generated
chunks of random JSON, wrong types, huge strings and arrays within and beyond the frame
size limit, deep nesting, U+0000, binary frames and non-JSON; text frames with invalid
UTF-8 each on a connection of their own (the protocol closes those with 1007), and one
frame beyond the proxy's message size limit (1009).

Each chunk runs as a fresh user on one connection, sent without waiting, and then:
- every frame got its answer: one ``ack``/``sync``/``error`` carrying its id when it had
  a well-formed one (exactly one: the id is unique), one typed ``error`` otherwise, a
  ``pong`` for a ``ping``, nothing for a well-formed receipt; and no answer more;
- every ``error`` code is one of PROTOCOL.md's (``internal`` would be a fault of ours);
- the connection is still usable: a ping, a sync and a message from the chat's other
  member delivered to it (so no pipeline of that replica is wedged);
- the gateway answers ``/health/live``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
import websockets
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from client import create_chat
from deployments.gateway.frames import MAX_DEPTH
from tests.client import user
from tests.conftest import App

pytestmark = pytest.mark.e2e

CASES = 10_000          # frames sent in all (the sweep, the chunks, the closing cases)
CHUNK = 200             # frames per connection
BAD_UTF8_CASES = 12     # text frames with invalid UTF-8, one connection each
SEED = 20261130         # fixed: a failure reproduces with the same command
MAX_FRAME = 64 * 1024   # the session app's max_frame_bytes (the settings default)
PROXY_MAX = 16 * 1024 * 1024  # the Serve proxy's (uvicorn's) WebSocket message limit
ANSWER_WAIT_S = 60.0    # longest wait for a chunk's answers
EXTRA_WAIT_S = 0.3      # how long to watch for answers beyond the expected ones

ERROR_CODES = {"bad_frame", "unknown_type", "too_large", "forbidden", "not_found", "invalid"}
ACK_CODES = {"credits_exhausted", "forbidden", "invalid", "overloaded", "not_found"}
ANSWERS = {"ack", "error", "sync", "pong"}

# Placeholders filled in when a chunk is sent: its chat, a real message of its user, the
# chat's other member, and a fresh client id (unique across the run).
CHAT, MID, PEER, FID = "\u2063chat", "\u2063mid", "\u2063peer", "\u2063fid"

VALID: dict[str, dict[str, Any]] = {
    "chat": {"type": "chat", "id": FID, "chatId": CHAT, "body": "hello"},
    "signal": {"type": "signal", "id": FID, "to": PEER, "payload": {"typing": True}},
    "attachment": {"type": "attachment", "id": FID, "chatId": CHAT, "fileName": "a.png",
                   "contentType": "image/png", "size": 68},
    "command": {"type": "command", "id": FID, "op": "react", "messageId": MID, "emoji": "👍"},
    "edit": {"type": "command", "id": FID, "op": "edit", "messageId": MID, "body": "hello!"},
    "receipt": {"type": "receipt", "messageIds": [MID], "status": "read"},
    "sync": {"type": "sync", "id": FID, "chatId": CHAT, "afterSeq": 0, "limit": 5},
    "ping": {"type": "ping"},
}
CLIENT_TYPES = {f["type"] for f in VALID.values()}


def nested_text(depth: int) -> str:
    """JSON text of arrays and objects nested ``depth`` levels deep."""
    opening = "".join("[" if i % 2 else '{"k":' for i in range(depth))
    closing = "".join("]" if i % 2 else "}" for i in reversed(range(depth)))
    return f'{opening}1{closing}'


def nested(depth: int) -> Any:
    return orjson.loads(nested_text(depth)) if depth <= 200 else None


# One representative of each kind of wrong value, for the sweep.
WRONG_KINDS: list[Any] = [
    None, True, 0, -1, 2**63, 2**64 - 1, 1.5, -1e300, "", "x" * 65, "x" * 129, "x" * 5000,
    "attachment:1", "a\u0000b", "\ud7ff\ue000\U0010ffff", [], [1, "a", None], {}, {"a": [{}]},
    nested(MAX_DEPTH), nested(MAX_DEPTH + 5), ["x" * 200] * 300,
]


@dataclass
class Expect:
    """What one frame must be answered with."""

    answers: int                  # 0 or 1
    fid: str | None = None        # a unique, well-formed client id the answer carries
    codes: set[str] = field(default_factory=set)  # error codes that would be right
    kind: str | None = None       # "pong" for a ping


@dataclass
class Case:
    data: str | bytes | dict[str, Any] | list[Any]
    binary: bool = False


def depth_of(value: Any) -> int:
    """Levels of arrays and objects (iterative: parsed values may nest ~1000 deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((c, depth + 1) for c in (item.values() if isinstance(item, dict) else item))
    return deepest


def strings(value: Any) -> Iterator[str]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def receipt_ok(frame: dict[str, Any]) -> bool:
    ids = frame.get("messageIds")
    return (isinstance(ids, list) and 0 < len(ids) <= 1000
            and all(isinstance(i, str) and 0 < len(i) <= 128 for i in ids)
            and frame.get("status", "delivered") in ("delivered", "read"))


def expect(raw: bytes, unique: set[str]) -> Expect:
    """The answer PROTOCOL.md calls for (an oracle written from the protocol, not from
    the gateway's code: where several refusals apply, any of their codes will do)."""
    if len(raw) > MAX_FRAME:
        return Expect(1, codes={"too_large"})
    try:
        frame = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return Expect(1, codes={"bad_frame"})
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        return Expect(1, codes={"bad_frame"})
    codes = set()
    if depth_of(frame) > MAX_DEPTH or any("\x00" in s for s in strings(frame)):
        codes.add("invalid")
    ftype = frame["type"]
    if ftype not in CLIENT_TYPES:
        codes.add("unknown_type")
    if codes:
        return Expect(1, codes=codes)
    if ftype == "ping":
        return Expect(1, kind="pong")
    if ftype == "receipt":
        return Expect(0) if receipt_ok(frame) else Expect(1, codes={"invalid"})
    fid = frame.get("id")
    if not (isinstance(fid, str) and 0 < len(fid) <= 64 and not fid.startswith("attachment:")):
        return Expect(1, codes={"invalid"})
    return Expect(1, fid=fid if fid in unique else None,
                  codes={"invalid", "not_found", "forbidden"} if ftype == "sync" else set())


def fill(value: Any, slots: dict[str, str], fresh: Iterator[str], unique: set[str]) -> Any:
    if isinstance(value, str):
        if value == FID:
            fid = next(fresh)
            unique.add(fid)
            return fid
        return slots.get(value, value)
    if isinstance(value, dict):
        return {k: fill(v, slots, fresh, unique) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, slots, fresh, unique) for v in value]
    return value


# --- the fixed sweep: every field of every type, each wrong kind, and left out ---------
def sweep() -> list[Case]:
    cases = []
    for frame in VALID.values():
        cases.append(Case(frame))
        cases.append(Case(orjson.dumps(frame), binary=True))
        for key in frame:
            cases.append(Case({k: v for k, v in frame.items() if k != key}))
            cases.extend(Case({**frame, key: wrong}) for wrong in WRONG_KINDS)
        cases.append(Case({**frame, "extra": nested(MAX_DEPTH + 1)}))
    return cases


# --- Hypothesis: random frames ------------------------------------------------------------
json_leaf = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
# Sizes (in bytes of JSON) on both sides of the body and frame limits.
SIZES = [4001, MAX_FRAME // 2, MAX_FRAME - 400, MAX_FRAME + 1, 2 * MAX_FRAME]
wrong_value = (json_value | st.sampled_from(WRONG_KINDS)
               | st.sampled_from(SIZES).map(lambda n: "é" * (n // 2))
               | st.sampled_from(SIZES).map(lambda n: [1] * (n // 2))
               | st.integers(1, 80).map(nested))


@st.composite
def mutated(draw: st.DrawFn) -> Case:
    frame = dict(draw(st.sampled_from(list(VALID.values()))))
    for _ in range(draw(st.integers(1, 3))):
        # mostly a field, sometimes the type itself
        key = draw(st.sampled_from([*(k for k in frame if k != "type")] * 4 + ["type", "extra"]))
        if draw(st.booleans()) and key in frame:
            del frame[key]
        else:
            frame[key] = draw(wrong_value)
    return Case(frame, binary=draw(st.integers(0, 9)) == 0)


raw_text = st.one_of(
    st.text(max_size=100),
    json_value.map(lambda v: orjson.dumps(v).decode()),
    st.integers(MAX_DEPTH - 2, 1200).map(lambda d: f'{{"type":"chat","id":"n","x":{nested_text(d)}}}'),
    st.integers(MAX_FRAME - 64, 2 * MAX_FRAME).map(
        lambda n: orjson.dumps({"type": "chat", "id": FID, "chatId": CHAT, "body": "b" * n}).decode()),
    st.sampled_from(["", " ", "null", "[]", '{"type":1}', '{"type":null}', "{", '{"type":"chat"',
                     '{"type":"ping","n":NaN}', '{"type":"ping","n":1e400}',
                     '{"type":"chat","id":"\\ud800"}', '{"type":"chat","id":"\\u0000"}']),
)
raw_binary = st.binary(max_size=100) | st.sampled_from(
    [b"\xff\xfe", b'{"type":"ping"}', b'{"type":"chat","id":"\xc3\x28"}', b"\x00" * 10])
cases_strategy = st.one_of(
    mutated(), mutated(), mutated(),
    st.sampled_from(list(VALID.values())).map(Case),
    raw_text.map(Case),
    raw_binary.map(lambda b: Case(b, binary=True)),
    st.builds(lambda t, v: Case({"type": t, "id": FID, "v": v}),
              st.text(max_size=12), json_value),
)


# --- running a chunk ----------------------------------------------------------------------
class Run:
    """Counts frames sent over the test, hands out unique client ids."""

    def __init__(self) -> None:
        self.sent = 0
        self._n = 0

    def ids(self, prefix: str) -> Iterator[str]:
        while True:
            self._n += 1
            yield f"{prefix}-{self._n}"


async def open_ws(app: App, who: str) -> ClientConnection:
    ws = await websockets.connect(f"{app.ws_url}?access_token={app.token(who)}", max_size=None,
                                  max_queue=None, compression=None, open_timeout=20)
    hello = orjson.loads(await asyncio.wait_for(ws.recv(), 20))
    assert hello["type"] == "system" and hello["event"] == "connected", hello
    return ws


async def next_answer(ws: ClientConnection, kind: str, pred: Any, timeout: float = 20
                      ) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            frame = orjson.loads(await ws.recv())
            if frame.get("type") == kind and pred(frame):
                return frame


def encode(case: Case, slots: dict[str, str], fresh: Iterator[str], unique: set[str]) -> bytes:
    data = case.data
    if isinstance(data, (dict, list)):
        return orjson.dumps(fill(data, slots, fresh, unique))
    text = data.encode() if isinstance(data, str) else data
    if FID.encode() in text:
        fid = next(fresh)
        unique.add(fid)
        text = text.replace(FID.encode(), fid.encode())
    for slot, value in slots.items():
        text = text.replace(slot.encode(), value.encode())
    return text


async def run_chunk(app: App, run: Run, cases: list[Case]) -> None:
    me, peer = user("fz"), user("fzp")
    chat = await create_chat(app.base_url, app.token(me), [peer])
    ws = await open_ws(app, me)
    try:
        probe = {"type": "chat", "id": f"probe-{me}", "chatId": chat, "body": "probe"}
        await ws.send(orjson.dumps(probe).decode())
        ack = await next_answer(ws, "ack", lambda f: f.get("id") == probe["id"])
        assert ack["status"] == "accepted", ack
        slots = {CHAT: chat, MID: ack["messageId"], PEER: peer}
        fresh, unique = run.ids(me), set[str]()
        expected: list[tuple[bytes, Expect]] = []
        for case in cases:
            raw = encode(case, slots, fresh, unique)
            expected.append((raw, expect(raw, unique)))
            if case.binary:
                await ws.send(raw)
            else:
                await ws.send(raw, text=True)  # as UTF-8 text (the oracle reads the bytes)
        run.sent += len(cases)
        await check_answers(ws, expected)
        await check_usable(app, ws, chat, slots[MID], peer, me)
    finally:
        await ws.close()
    async with httpx.AsyncClient(base_url=app.base_url) as http:
        assert (await http.get("/health/live")).status_code == 200


def describe(raw: bytes) -> str:
    return repr(raw[:200]) + (f"... ({len(raw)} bytes)" if len(raw) > 200 else "")


async def check_answers(ws: ClientConnection, expected: list[tuple[bytes, Expect]]) -> None:
    by_id = {e.fid: raw for raw, e in expected if e.fid is not None}
    total = sum(e.answers for _, e in expected)
    allowed = set().union(*(e.codes for _, e in expected)) | ERROR_CODES
    pongs = sum(1 for _, e in expected if e.kind == "pong")
    seen: list[dict[str, Any]] = []
    seen_ids: dict[str, dict[str, Any]] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ANSWER_WAIT_S
    quiet_until: float | None = None
    while True:
        done = len(seen) >= total and len(seen_ids) == len(by_id)
        if done and quiet_until is None:
            quiet_until = loop.time() + EXTRA_WAIT_S
        limit = quiet_until if quiet_until is not None else deadline
        try:
            async with asyncio.timeout(max(limit - loop.time(), 0)):
                frame = orjson.loads(await ws.recv())
        except TimeoutError:
            break
        if frame.get("type") not in ANSWERS:
            continue  # system, message, command events, signals: not answers
        seen.append(frame)
        fid = frame.get("id")
        if isinstance(fid, str) and fid in by_id:
            assert fid not in seen_ids, f"two answers to {describe(by_id[fid])}: " \
                                        f"{seen_ids[fid]} and {frame}"
            seen_ids[fid] = frame
    missing = [describe(raw) for fid, raw in by_id.items() if fid not in seen_ids]
    assert not missing, f"{len(missing)} frames never answered, e.g. {missing[:3]}"
    assert len(seen) == total, f"{len(seen)} answers to {len(expected)} frames, {total} expected"
    assert sum(1 for f in seen if f["type"] == "pong") == pongs
    for frame in seen:
        if frame["type"] == "error":
            assert frame["code"] in allowed and isinstance(frame["message"], str), frame
        elif frame["type"] == "ack":
            assert frame["status"] in ("accepted", "duplicate", "rejected"), frame
            if frame["status"] == "rejected":
                assert frame["error"]["code"] in ACK_CODES, frame
    for raw, e in expected:
        if e.fid is not None:
            answer = seen_ids[e.fid]
            if answer["type"] == "error":
                assert answer["code"] in e.codes, (describe(raw), answer)


async def check_usable(app: App, ws: ClientConnection, chat: str, mid: str, peer: str, me: str
                       ) -> None:
    await ws.send('{"type":"ping"}')
    await next_answer(ws, "pong", lambda f: True)
    await ws.send(orjson.dumps({"type": "sync", "id": "s-end", "chatId": chat,
                                "afterSeq": 0, "limit": 1}).decode())
    reply = await next_answer(ws, "sync", lambda f: f.get("id") == "s-end")
    assert reply["messages"][0]["messageId"] == mid  # the probe (fuzzed commands may edit it)
    other = await open_ws(app, peer)
    try:
        body = f"still there, {me}?"
        await other.send(orjson.dumps({"type": "chat", "id": "p-1", "chatId": chat,
                                       "body": body}).decode())
        ack = await next_answer(other, "ack", lambda f: f.get("id") == "p-1")
        assert ack["status"] == "accepted", ack
        await next_answer(ws, "message", lambda f: f.get("body") == body)
    finally:
        await other.close()


async def closing_case(app: App, payload: bytes, text: bool, code: int) -> None:
    """A frame the protocol answers by closing: the close code, and a new connection of
    the same user works."""
    me = user("fzc")
    ws = await open_ws(app, me)
    try:
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(30):
                await ws.send(payload, text=text)  # may fail already: the server closed
                while True:
                    await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == code, info.value
    finally:
        await ws.close()
    again = await open_ws(app, me)
    try:
        await again.send('{"type":"ping"}')
        await next_answer(again, "pong", lambda f: True)
    finally:
        await again.close()


def test_frame_fuzzing_every_bad_frame_gets_a_typed_answer_and_the_gateway_stays_usable(
        conveyor: App) -> None:
    run = Run()
    loop = asyncio.new_event_loop()
    try:
        fixed = sweep()
        for start in range(0, len(fixed), CHUNK):
            loop.run_until_complete(run_chunk(conveyor, run, fixed[start:start + CHUNK]))
        bad_utf8 = [b'{"type":"chat","body":"\xff"}', b"\xc3\x28", b"\xed\xa0\x80", b"\x80abc"]
        for i in range(BAD_UTF8_CASES):
            loop.run_until_complete(closing_case(conveyor, bad_utf8[i % len(bad_utf8)], True, 1007))
        loop.run_until_complete(closing_case(conveyor, b"[" + b"1," * (PROXY_MAX // 2) + b"1]",
                                             False, 1009))
        run.sent += BAD_UTF8_CASES + 1
        chunks = math.ceil((CASES - run.sent) / CHUNK)

        @seed(SEED)
        @settings(max_examples=chunks, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(cases_strategy, min_size=CHUNK, max_size=CHUNK))
        def chunk(cases: list[Case]) -> None:
            loop.run_until_complete(run_chunk(conveyor, run, cases))

        chunk()
    finally:
        loop.close()
    assert run.sent >= CASES, f"only {run.sent} of {CASES} cases ran"
