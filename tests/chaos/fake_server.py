"""A small in-memory server of the wire protocol's chat subset, with bugs to switch on.

It speaks what the chaos load uses (``POST``/``GET /v1/chats``, ``GET
/v1/chats/{id}/messages``, and on ``/v1/ws``: ``chat``, ``receipt``, ``sync``), keeping
everything in memory, so the load harness and the history checker can be run end to end
without Ray. The token is the user id. :class:`Bugs` breaks a guarantee on purpose, to
show the checker catches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


@dataclass
class Bugs:
    forget_dedup: bool = False  # a resent client id is stored again under a new id
    gap_user: str | None = None  # this user misses every 4th live delivery (sync has them)
    hide_from: str | None = None  # this user gets nothing of others: live or by sync
    lose_ack_every: int = 0  # every Nth chat frame is stored but its ack never sent


@dataclass
class Chat:
    members: list[str]
    messages: list[dict[str, Any]] = field(default_factory=list)


class FakeServer:
    def __init__(self, bugs: Bugs | None = None) -> None:
        self.bugs = bugs or Bugs()
        self.chats: dict[str, Chat] = {}
        self.dedup: dict[tuple[str, str], dict[str, Any]] = {}
        self.sockets: dict[str, set[WebSocket]] = {}
        self.pointers: dict[tuple[str, str], list[int]] = {}
        self.frames = 0
        self.live_to_gap_user = 0
        self.app = Starlette(routes=[
            Route("/v1/chats", self.create_chat, methods=["POST"]),
            Route("/v1/chats", self.list_chats, methods=["GET"]),
            Route("/v1/chats/{chat_id}/messages", self.history, methods=["GET"]),
            WebSocketRoute("/v1/ws", self.ws),
        ])

    @staticmethod
    def _user(request: Request | WebSocket) -> str:
        auth = request.headers.get("authorization", "")
        return auth.removeprefix("Bearer ") or request.query_params.get("access_token", "")

    # --- HTTP ---------------------------------------------------------------------------
    async def create_chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        chat_id = uuid.uuid4().hex
        members = sorted({self._user(request), *body["members"]})
        self.chats[chat_id] = Chat(members)
        for m in members:
            self.pointers[(chat_id, m)] = [0, 0]
        return JSONResponse({"chatId": chat_id, "members": members, "title": None}, 201)

    async def list_chats(self, request: Request) -> JSONResponse:
        user = self._user(request)
        return JSONResponse({"chats": [
            {"chatId": cid, "lastSeq": len(c.messages), "deliveredSeq": self.pointers[(cid, user)][0],
             "readSeq": self.pointers[(cid, user)][1]}
            for cid, c in self.chats.items() if user in c.members]})

    def _page(self, user: str, chat_id: str, after: int, limit: int) -> tuple[list[Any], bool]:
        items = [m for m in self.chats[chat_id].messages[after:]
                 if not (self.bugs.hide_from == user and m["senderId"] != user)]
        return items[:limit], len(items) > limit

    async def history(self, request: Request) -> JSONResponse:
        q = request.query_params
        items, more = self._page(self._user(request), request.path_params["chat_id"],
                                 int(q.get("afterSeq", 0)), int(q.get("limit", 50)))
        return JSONResponse({"messages": items, "hasMore": more})

    # --- WebSocket ----------------------------------------------------------------------
    async def ws(self, ws: WebSocket) -> None:
        user = self._user(ws)
        await ws.accept()
        self.sockets.setdefault(user, set()).add(ws)
        await ws.send_text(orjson.dumps({"type": "system", "event": "connected", "data": {
            "userId": user, "connectionId": uuid.uuid4().hex}}).decode())
        try:
            while True:
                f = orjson.loads(await ws.receive_text())
                await self._frame(user, ws, f)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self.sockets[user].discard(ws)

    async def _send(self, ws: WebSocket, frame: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            await ws.send_text(orjson.dumps(frame).decode())

    async def _frame(self, user: str, ws: WebSocket, f: dict[str, Any]) -> None:
        if f["type"] == "chat":
            await self._chat(user, ws, f)
        elif f["type"] == "sync":
            items, more = self._page(user, f["chatId"], f["afterSeq"], f["limit"])
            await self._send(ws, {"type": "sync", "id": f["id"], "chatId": f["chatId"],
                                  "messages": items, "hasMore": more})
        elif f["type"] == "receipt":
            await self._receipt(user, f)

    async def _chat(self, user: str, ws: WebSocket, f: dict[str, Any]) -> None:
        self.frames += 1
        chat = self.chats[f["chatId"]]
        key = (user, f["id"])
        if key in self.dedup and not self.bugs.forget_dedup:
            m = self.dedup[key]
            await self._send(ws, {"type": "ack", "id": f["id"], "status": "duplicate",
                                  "messageId": m["messageId"], "chatId": m["chatId"], "seq": m["seq"]})
            return
        m = {"type": "message", "messageId": uuid.uuid4().hex, "chatId": f["chatId"],
             "seq": len(chat.messages) + 1, "senderId": user, "kind": "text", "body": f["body"]}
        chat.messages.append(m)
        self.dedup[key] = m
        if not (self.bugs.lose_ack_every and self.frames % self.bugs.lose_ack_every == 0):
            await self._send(ws, {"type": "ack", "id": f["id"], "status": "accepted",
                                  "messageId": m["messageId"], "chatId": m["chatId"], "seq": m["seq"]})
        for member in chat.members:
            if member == self.bugs.hide_from:
                continue
            if member == self.bugs.gap_user and member != user:
                self.live_to_gap_user += 1
                if self.live_to_gap_user % 4 == 0:
                    continue
            for other in list(self.sockets.get(member, ())):
                if other is not ws:
                    await self._send(other, m)

    async def _receipt(self, user: str, f: dict[str, Any]) -> None:
        status = 0 if f["status"] == "delivered" else 1
        for mid in f["messageIds"]:
            for cid, chat in self.chats.items():
                seq = next((m["seq"] for m in chat.messages if m["messageId"] == mid), None)
                if seq is None:
                    continue
                p = self.pointers[(cid, user)]
                if seq <= p[status]:
                    continue
                p[status] = seq
                for member in chat.members:
                    for other in list(self.sockets.get(member, ())) if member != user else ():
                        await self._send(other, {"type": "system", "event": "receipt", "data": {
                            "chatId": cid, "userId": user, "deliveredSeq": p[0], "readSeq": p[1]}})


@contextlib.asynccontextmanager
async def serving(server: FakeServer) -> AsyncIterator[tuple[str, str]]:
    """Serve ``server`` on a free loopback port; yields ``(base_url, ws_url)``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning",
                            ws="websockets-sansio", lifespan="off")
    uv = uvicorn.Server(config)
    task = asyncio.create_task(uv.serve())
    try:
        for _ in range(500):
            if uv.started:
                break
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/ws"
    finally:
        uv.should_exit = True
        await task
