"""Every example in the OpenAPI document is what the running application answers.

Each documented (operation, status, example) is reproduced against the session's app and
compared with the real answer, once server-made values are set aside: ids (UUIDs) and
times are replaced by placeholders on both sides, and the fresh users of this test are
named as the examples name them (``alice``, ``bob``). Answers the middleware writes on
any operation (500, 504) are compared with what its error writer produces for that path.
What cannot be provoked on the shared app is listed, with the reason, in
``NOT_REPRODUCED``; an example neither reproduced nor listed fails the test.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest

from client import WsClient
from deployments.middleware import error_body
from tests.client import user
from tests.conftest import WEBHOOK_SECRET, App
from tests.contract.flows import NOT_PNG, PNG, complete, upload

pytestmark = pytest.mark.e2e

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
NOT_REPRODUCED = {
    ("completeAttachment", "503"): "needs the virus scanner down; the session's scanner stays up",
    ("uploadObject", "403"): "the session's app uploads to S3; the embedded store's own "
                             "endpoints are tested by tests/e2e/test_attachments.py",
    ("uploadObject", "409"): "as above",
    ("uploadObject", "413"): "as above",
    ("downloadObject", "403"): "as above",
    ("devToken", "404"): "the session's app signs dev tokens (no JWKS issuer)",
    ("createNotifications", "409"): "needs a request with the same key still in flight",
}
Example = tuple[str, str, str]  # operationId, status, example name ("default": `example`)


def documented(doc: dict[str, Any]) -> dict[Example, tuple[str, Any]]:
    """(operationId, status, name) → (path, example value), for every response example."""
    out: dict[Example, tuple[str, Any]] = {}
    for path, item in doc["paths"].items():
        for op in item.values():
            for status, response in op["responses"].items():
                for media in response.get("content", {}).values():
                    if "example" in media:
                        out[(op["operationId"], status, "default")] = (path, media["example"])
                    for name, example in media.get("examples", {}).items():
                        out[(op["operationId"], status, name)] = (path, example["value"])
    return out


def normal(value: Any, names: dict[str, str]) -> Any:
    """``value`` with ids and times as placeholders and fresh user ids as the examples'."""
    text = orjson.dumps(value).decode()
    for real, shown in names.items():
        text = text.replace(real, shown)
    text = TIME.sub("<time>", UUID.sub("<uuid>", text))
    return json.loads(text)


class Scenario:
    """Fresh users and what they did; produces the real answer of each example."""

    def __init__(self, app: App, http: httpx.AsyncClient) -> None:
        self.app = app
        self.http = http
        self.alice, self.bob, self.carol = user("alice"), user("bob"), user("carol")
        self.names = {self.alice: "alice", self.bob: "bob"}
        self.answers: dict[Example, httpx.Response] = {}

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.app.token(who)}"}

    def got(self, example: Example, response: httpx.Response) -> None:
        assert example not in self.answers, example
        self.answers[example] = response

    async def chats(self) -> None:
        http, alice, bob = self.http, self.alice, self.bob
        created = await http.post("/v1/chats", json={"members": [bob], "title": "hello"},
                                  headers=self.auth(alice))
        self.got(("createChat", "201", "default"), created)
        chat = created.json()["chatId"]
        self.got(("createChat", "400", "default"),
                 await http.post("/v1/chats", json={"members": []}, headers=self.auth(alice)))
        self.got(("createChat", "413", "default"), await http.post(
            "/v1/chats", content=b" " * (self.app_max_body() + 1), headers=self.auth(alice)))
        # Alice writes, edits; Bob reads: the history and the chat list of the examples.
        a = await WsClient.connect(self.app.ws_url, self.app.token(alice))
        b = await WsClient.connect(self.app.ws_url, self.app.token(bob))
        try:
            first = await a.ack(await a.chat(chat, "hi Bob"))
            await a.ack(await a.command("edit", first["messageId"], body="hi Bob!"))
            msg = await b.message(messageId=first["messageId"])
            await b.receipt([msg["messageId"]], "read")
            await a.expect(lambda f: f["type"] == "system" and f["event"] == "receipt")
        finally:
            await a.close()
            await b.close()
        self.got(("getChatMessages", "200", "default"),
                 await http.get(f"/v1/chats/{chat}/messages", headers=self.auth(alice)))
        # The sender's own events reach her delivered pointer a moment after their acks.
        for _ in range(50):
            listed = await http.get("/v1/chats", headers=self.auth(alice))
            (mine,) = listed.json()["chats"]
            if mine["deliveredSeq"] == mine["lastSeq"]:
                break
            await asyncio.sleep(0.1)
        self.got(("listChats", "200", "default"), listed)
        self.got(("getChatMessages", "400", "default"), await http.get(
            f"/v1/chats/{chat}/messages?limit=0", headers=self.auth(alice)))
        self.got(("getChatMessages", "403", "default"), await http.get(
            f"/v1/chats/{chat}/messages", headers=self.auth(self.carol)))
        self.got(("getChatMessages", "404", "default"), await http.get(
            f"/v1/chats/{uuid.uuid4()}/messages", headers=self.auth(alice)))
        away = user("bob")
        self.names[away] = "bob"  # never connected: offline, never seen
        # Presence answers for contacts: Alice shares a chat with this Bob too.
        assert (await http.post("/v1/chats", json={"members": [away]},
                                headers=self.auth(alice))).status_code == 201
        self.got(("getPresence", "200", "default"), await http.get(
            f"/v1/presence?userId={away}", headers=self.auth(alice)))
        stranger = user("mallory")
        self.names[stranger] = "mallory"  # in no chat with Alice
        self.got(("getPresence", "403", "default"), await http.get(
            f"/v1/presence?userId={away},{stranger}", headers=self.auth(alice)))
        self.got(("getPresence", "400", "default"),
                 await http.get("/v1/presence", headers=self.auth(alice)))
        self.chat = chat

    def app_max_body(self) -> int:
        return int(self.app.settings.get("max_request_bytes", 1024 * 1024))

    async def attachments(self) -> None:
        http, chat = self.http, self.chat
        alice = self.auth(self.alice)
        a = await WsClient.connect(self.app.ws_url, self.app.token(self.alice))
        try:
            pending = await a.ack(await a.attachment(chat, "cat.png", "image/png", len(PNG)))
            self.got(("getAttachmentContent", "409", "default"), await http.get(
                f"/v1/attachments/{pending['attachmentId']}/content", headers=alice))
            self.got(("completeAttachment", "409", "default"),
                     await complete(http, pending, alice))
            self.got(("completeAttachment", "403", "default"), await http.post(
                f"/v1/attachments/{pending['attachmentId']}/complete",
                headers={**alice, "X-Upload-Token": "not-the-token"}))
            self.got(("completeAttachment", "200", "default"),
                     await upload(http, pending, PNG, "image/png", alice))
            refused = await a.ack(await a.attachment(chat, "fake.png", "image/png", len(NOT_PNG)))
            self.got(("completeAttachment", "422", "default"),
                     await upload(http, refused, NOT_PNG, "image/png", alice))
            # The posted file's message deleted: its content is gone, a late /complete too.
            posted = self.answers[("completeAttachment", "200", "default")].json()
            await a.ack(await a.command("delete", posted["messageId"]))
            self.got(("getAttachmentContent", "410", "default"), await http.get(
                f"/v1/attachments/{pending['attachmentId']}/content", headers=alice))
            self.got(("completeAttachment", "410", "default"),
                     await complete(http, pending, alice))
        finally:
            await a.close()
        nothing = uuid.uuid4()
        self.got(("completeAttachment", "404", "default"), await http.post(
            f"/v1/attachments/{nothing}/complete", headers={**alice, "X-Upload-Token": "x"}))
        self.got(("getAttachmentContent", "404", "default"), await http.get(
            f"/v1/attachments/{nothing}/content", headers=alice))
        self.got(("completeAttachment", "413", "default"), await http.post(
            f"/v1/attachments/{nothing}/complete", headers={**alice, "X-Upload-Token": "x"},
            content=b" " * (self.app_max_body() + 1)))
        hook = {"Authorization": f"Bearer {WEBHOOK_SECRET}"}
        self.got(("storageEvents", "200", "default"), await http.post(
            "/v1/storage/events", headers=hook, json={"Records": [{
                "eventName": "s3:ObjectCreated:Put", "s3": {"object": {"key": "nothing-here"}}}]}))
        self.got(("storageEvents", "400", "default"),
                 await http.post("/v1/storage/events", headers=hook, json={}))
        self.got(("storageEvents", "413", "default"), await http.post(
            "/v1/storage/events", headers=hook, content=b" " * (self.app_max_body() + 1)))
        self.got(("uploadObject", "404", "default"), await http.put(
            "/v1/uploads/some/key?expires=1&size=1&sig=x", content=b"x"))
        self.got(("downloadObject", "404", "default"),
                 await http.get("/v1/uploads/some/key?expires=1&size=1&sig=x"))

    async def unauthorized(self, doc: dict[str, Any]) -> None:
        """Each protected operation without a token (the notification API: an expired one,
        as its example shows; the storage webhook: a wrong secret)."""
        expired = {"Authorization": f"Bearer {self.app.token(self.alice, ttl_s=-60)}"}
        for path, item in doc["paths"].items():
            for method, op in item.items():
                if "401" not in op["responses"]:
                    continue
                concrete = path.replace("{chatId}", str(uuid.uuid4())).replace(
                    "{attachmentId}", str(uuid.uuid4())).replace("{id}", str(uuid.uuid4()))
                headers = {}
                if path.startswith("/v1/notifications"):
                    headers = expired
                elif op["operationId"] == "storageEvents":
                    headers = {"Authorization": "Bearer wrong"}
                r = await self.http.request(method.upper(), concrete, headers=headers, json={})
                self.got((op["operationId"], "401", "default"), r)

    async def notifications(self, doc: dict[str, Any]) -> None:
        op = doc["paths"]["/v1/notifications"]["post"]
        subject = {"Authorization": f"Bearer {self.app.token('user-123')}"}
        for name, example in op["requestBody"]["content"]["application/json"]["examples"].items():
            r = await self.http.post("/v1/notifications", json=example["value"], headers=subject)
            self.got(("createNotifications", str(r.status_code), name), r)
        no_role = {"Authorization": f"Bearer {self.app.token(self.alice, roles=[])}"}
        self.got(("createNotifications", "403", "default"), await self.http.post(
            "/v1/notifications", json={}, headers=no_role))
        self.got(("createNotifications", "413", "default"), await self.http.post(
            "/v1/notifications", content=b" " * (self.app_max_body() + 1),
            headers={**subject, "content-type": "application/json"}))
        key = {**subject, "Idempotency-Key": f"contract-{uuid.uuid4()}"}
        await self.http.post("/v1/notifications", json=[], headers=key)
        self.got(("createNotifications", "422", "default"), await self.http.post(
            "/v1/notifications", json={"message": ""}, headers=key))
        self.got(("getNotification", "404", "default"), await self.http.get(
            f"/v1/notifications/{uuid.uuid4()}", headers=subject))

    async def service(self) -> None:
        self.got(("live", "200", "default"), await self.http.get("/health/live"))
        self.got(("webClientConfig", "200", "default"), await self.http.get("/app/config.json"))
        self.got(("devToken", "400", "default"),
                 await self.http.post("/app/dev-token", json={"userId": "no spaces"}))
        self.got(("devToken", "413", "default"), await self.http.post(
            "/app/dev-token", content=b" " * (self.app_max_body() + 1)))
        self.got(("apiDocsAsset", "404", "default"), await self.http.get("/api-docs/nothing.js"))
        self.got(("webClientFile", "404", "default"), await self.http.get("/app/nothing.js"))


async def test_every_documented_example_is_what_the_server_answers(conveyor: App) -> None:
    async with httpx.AsyncClient(base_url=conveyor.base_url, timeout=60) as http:
        doc = (await http.get("/openapi.json")).json()
        scenario = Scenario(conveyor, http)
        steps: list[Callable[[], Awaitable[None]]] = [
            scenario.chats, scenario.attachments, lambda: scenario.unauthorized(doc),
            lambda: scenario.notifications(doc), scenario.service]
        for step in steps:
            await step()
    examples = documented(doc)
    compared = []
    differ = []
    for key, (path, example) in sorted(examples.items()):
        operation, status, _ = key
        if key in scenario.answers:
            real = scenario.answers[key]
            if str(real.status_code) != status:
                differ.append((key, real.status_code, real.text))
            elif normal(real.json(), scenario.names) != normal(example, {}):
                differ.append((key, normal(real.json(), scenario.names), normal(example, {})))
        elif status in ("500", "504"):
            # What the middleware writes for this path, as a real request there gets it.
            code = {"500": "internal", "504": "timeout"}[status]
            if orjson.loads(error_body(path, int(status), code)) != example:
                differ.append((key, "middleware", example))
        else:
            assert (operation, status) in NOT_REPRODUCED, f"example {key} is not checked"
            continue
        compared.append(key)
    assert differ == [], "\n".join(map(str, differ))
    # Nothing reproduced that the document does not show, nothing listed that it does.
    assert set(scenario.answers) <= set(examples), set(scenario.answers) - set(examples)
    assert {(o, s) for o, s, _ in examples} >= set(NOT_REPRODUCED)
    assert len(compared) >= 60
