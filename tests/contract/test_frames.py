"""Real frames against the AsyncAPI document the application serves: two people chat,
sign, attach, edit, react, sync, run out of credits and send bad frames over the real
WebSocket, and every frame either side saw is validated against its message's payload
schema (``jsonschema``, with formats checked)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator, FormatChecker

from client import WsClient, create_chat
from serve_app.asyncapi import message_for
from tests.client import chat_of_two, user
from tests.conftest import App
from tests.contract.flows import NOT_PNG, PNG, upload

pytestmark = pytest.mark.e2e
BAD_IDS = ("t-1", "big")  # client frames sent to be refused

class Recorder:
    """Every frame a set of clients sent (``out``) and read (``in``)."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, dict[str, Any]]] = []

    def attach(self, client: WsClient) -> WsClient:
        self.frames.append(("in", client.hello))  # read before an observer could be set
        client.on_frame = lambda direction, frame: self.frames.append((direction, frame))
        return client

    def received(self) -> Iterator[dict[str, Any]]:
        return (f for d, f in self.frames if d == "in")


@pytest.fixture(scope="module")
async def asyncapi(conveyor: App) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=conveyor.base_url) as http:
        r = await http.get("/asyncapi.json")
    assert r.status_code == 200
    return dict(r.json())


def validate_frame(doc: dict[str, Any], frame: dict[str, Any], direction: str) -> str:
    """The message name describing ``frame``, after validating it; AssertionError if none
    does or the frame does not fit."""
    name = message_for(doc, frame, direction)
    assert name is not None, f"no {direction} message for {frame}"
    payload = doc["components"]["messages"][name]["payload"]
    validator = Draft202012Validator({**payload, "components": doc["components"]},
                                     format_checker=FormatChecker())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(frame)]
    assert not errors, (name, frame, errors)
    return name


async def test_every_frame_seen_on_real_sockets_fits_the_asyncapi_document(
        conveyor: App, asyncapi: dict[str, Any]) -> None:
    rec = Recorder()
    chat, alice, bob, a, b = await chat_of_two(conveyor)
    rec.attach(a)
    rec.attach(b)
    carol = user("carol")
    others_chat = await create_chat(conveyor.base_url, conveyor.token(carol), [user()])
    try:
        # Bob came online after Alice connected: she hears of it (presence).
        await a.expect(lambda f: f["type"] == "system" and f["event"] == "presence")
        # message, ack accepted / duplicate / rejected, receipt → system receipt
        cid = await a.chat(chat, "hello bob")
        first = await a.ack(cid)
        msg = await b.message(messageId=first["messageId"])
        await b.receipt([msg["messageId"]], "read")
        await a.expect(lambda f: f["type"] == "system" and f["event"] == "receipt")
        again = await a.ack(await a.chat(chat, "hello bob", client_id=cid))
        refused = await a.ack(await a.chat(others_chat, "not my chat"))
        # signal both ways of the socket
        signal_ack = await a.ack(await a.signal(bob, {"typing": True, "chatId": chat}))
        await b.expect(lambda f: f["type"] == "signal")
        # a signal to a user sharing no chat with Alice: acked rejected, forbidden
        stranger_ack = await a.ack(await a.signal(carol, {"typing": True}))
        # commands: edit and react, seen by Bob as command events
        edit = await a.ack(await a.command("edit", first["messageId"], body="hello Bob!"))
        react = await b.ack(await b.command("react", first["messageId"], emoji="👍"))
        await b.expect(lambda f: f["type"] == "command" and f["op"] == "edit")
        await a.expect(lambda f: f["type"] == "command" and f["op"] == "react")
        # sync (history over the socket), ping
        page = await b.sync(chat)
        await a.ping()
        # attachments: one accepted and posted, one refused (not the type it claims)
        async with httpx.AsyncClient(base_url=conveyor.base_url, headers=conveyor.auth(alice),
                                     timeout=60) as http:
            good = await a.ack(await a.attachment(chat, "cat.png", "image/png", len(PNG)))
            assert (await upload(http, good, PNG, "image/png")).status_code == 200
            posted = await b.expect(lambda f: f["type"] == "message" and f["kind"] == "attachment")
            bad = await a.ack(await a.attachment(chat, "fake.png", "image/png", len(NOT_PNG)))
            assert (await upload(http, bad, NOT_PNG, "image/png")).status_code == 422
            await a.expect(lambda f: f["type"] == "system" and f["event"] == "attachment_rejected")
        # errors: unknown type, not JSON, a frame over max_frame_bytes (refused unparsed)
        await a.send({"type": "teleport", "id": BAD_IDS[0]})
        await a.send("{not json")
        await a.send({"type": "chat", "id": BAD_IDS[1], "chatId": chat,
                      "body": "x" * (conveyor.settings.get("max_frame_bytes", 65536) + 1)})
        codes = set()
        for _ in range(3):
            err = await a.expect(lambda f: f["type"] == "error")
            codes.add(err["code"])
        assert codes == {"unknown_type", "bad_frame", "too_large"}
        # credits: a burst past the bucket (100) → credits_low, credits_exhausted, rejections
        c = rec.attach(await WsClient.connect(conveyor.ws_url, conveyor.token(carol)))
        try:
            ids = [await c.chat(others_chat, f"n{i}") for i in range(105)]
            burst = [await c.ack(i) for i in ids]
            await c.expect(lambda f: f["type"] == "system" and f["event"] == "credits_low")
            await c.expect(lambda f: f["type"] == "system" and f["event"] == "credits_exhausted")
        finally:
            await c.close()
    finally:
        await a.close()
        await b.close()

    assert (first["status"], again["status"], refused["status"]) == (
        "accepted", "duplicate", "rejected")
    assert refused["error"]["code"] == "forbidden" and signal_ack["status"] == "accepted"
    assert (stranger_ack["status"], stranger_ack["error"]["code"]) == ("rejected", "forbidden")
    assert edit["targetMessageId"] == react["targetMessageId"] == first["messageId"]
    assert [m["type"] for m in page["messages"]] == ["message", "command", "command"]
    assert posted["attachment"]["attachmentId"] == good["attachmentId"]
    assert any(x["error"]["code"] == "credits_exhausted" for x in burst
               if x["status"] == "rejected")

    seen_in: dict[str, int] = {}
    for frame in rec.received():
        name = validate_frame(asyncapi, frame, "server-to-client")
        seen_in[name] = seen_in.get(name, 0) + 1
    sent = [f for d, f in rec.frames if d == "out"]
    refused = [f for f in sent if f.get("id") in BAD_IDS or "raw" in f]
    seen_out = {validate_frame(asyncapi, f, "client-to-server") for f in sent if f not in refused}
    # The frames the server refused are refused by the document too.
    assert len(refused) == 3
    for frame in refused:
        with pytest.raises(AssertionError):
            validate_frame(asyncapi, frame, "client-to-server")
    assert set(seen_in) >= {
        "ack", "message", "serverSignal", "serverCommand", "serverSync", "error", "pong",
        "systemConnected", "systemPresence", "systemReceipt", "systemCreditsLow",
        "systemCreditsExhausted", "systemAttachmentRejected"}, seen_in
    assert seen_out >= {"clientChat", "clientSignal", "clientAttachment", "clientCommand",
                        "clientReceipt", "clientSync", "clientPing"}, seen_out


async def test_a_frame_outside_the_document_is_refused_by_it(asyncapi: dict[str, Any]) -> None:
    """The validation above can fail: an undocumented field, a wrong type, an unknown
    event are each refused."""
    ok = {"type": "ack", "id": "c-1", "status": "accepted", "messageId": "m", "chatId": "c",
          "seq": 1}
    validate_frame(asyncapi, ok, "server-to-client")
    for bad in ({**ok, "extra": 1}, {**ok, "seq": "1"}, {**ok, "status": "rejected"},
                {"type": "system", "event": "connected", "data": {"userId": "u"}}):
        with pytest.raises(AssertionError):
            validate_frame(asyncapi, bad, "server-to-client")
    assert message_for(asyncapi, {"type": "system", "event": "teleported"},
                       "server-to-client") is None
