"""A small WebSocket client for tests and benchmarks, speaking PROTOCOL.md."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import websockets

if TYPE_CHECKING:
    from tests.conftest import App

_ids = itertools.count(1)


def user(prefix: str = "u") -> str:
    """A fresh, unique user id."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class WsClient:
    def __init__(self, ws: Any, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.hello = hello
        self.user_id: str = hello["data"]["userId"]
        self.connection_id: str = hello["data"]["connectionId"]
        self.gateway: str = hello["data"].get("gateway", "")
        self.inbox: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, ws_url: str, token: str) -> WsClient:
        ws = await websockets.connect(f"{ws_url}?access_token={token}", max_size=2**22)
        hello = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        assert hello["type"] == "system" and hello["event"] == "connected", hello
        return cls(ws, hello)

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else orjson.dumps(frame).decode())

    async def chat(self, chat_id: str, body: str, client_id: str | None = None) -> str:
        cid = client_id or f"m{next(_ids)}"
        await self.send({"type": "chat", "id": cid, "chatId": chat_id, "body": body})
        return cid

    async def expect(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0
                     ) -> dict[str, Any]:
        """The first frame (already received or arriving) that satisfies pred."""
        for i, f in enumerate(self.inbox):
            if pred(f):
                return self.inbox.pop(i)
        async with asyncio.timeout(timeout):
            while True:
                f = orjson.loads(await self.ws.recv())
                if pred(f):
                    return f
                self.inbox.append(f)

    async def ack(self, client_id: str, timeout: float = 10.0) -> dict[str, Any]:
        return await self.expect(lambda f: f["type"] == "ack" and f.get("id") == client_id, timeout)

    async def message(self, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        return await self.expect(
            lambda f: f["type"] == "message" and all(f.get(k) == v for k, v in match.items()),
            timeout)

    async def drain(self, seconds: float) -> list[dict[str, Any]]:
        """Everything that arrives within ``seconds`` (plus what was already buffered)."""
        out, self.inbox = self.inbox, []
        try:
            async with asyncio.timeout(seconds):
                while True:
                    out.append(orjson.loads(await self.ws.recv()))
        except TimeoutError:
            pass
        return out

    async def receipt(self, message_ids: list[str], status: str = "delivered") -> None:
        await self.send({"type": "receipt", "messageIds": message_ids, "status": status})

    async def close(self) -> None:
        await self.ws.close()


async def create_chat(base_url: str, token: str, members: list[str], title: str | None = None
                      ) -> str:
    async with httpx.AsyncClient(base_url=base_url) as http:
        r = await http.post("/v1/chats", json={"members": members, "title": title},
                            headers={"Authorization": f"Bearer {token}"})
        r.raise_for_status()
        return str(r.json()["chatId"])


async def chat_of_two(app: App) -> tuple[str, str, str, WsClient, WsClient]:
    """Two fresh users, a chat Alice creates with Bob, and both connected (Alice first).

    Returns ``(chat, alice, bob, alice_client, bob_client)``; the caller closes the clients.
    """
    alice, bob = user(), user()
    chat = await create_chat(app.base_url, app.token(alice), [bob])
    a = await WsClient.connect(app.ws_url, app.token(alice))
    b = await WsClient.connect(app.ws_url, app.token(bob))
    return chat, alice, bob, a, b
