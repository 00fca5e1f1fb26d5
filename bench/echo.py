"""The benchmark's baseline: a trivial in-memory relay behind the same Serve proxy.

It speaks just enough of the wire protocol for the chat benchmark's client code to run
unchanged: ``POST /v1/chats`` (kept in memory), ``GET /v1/chats`` (``lastSeq``), and on
``/v1/ws`` a ``connected`` frame, an ``ack`` for every ``chat`` frame and a ``message``
frame to the chat's other members connected to this replica. Receipts are read and
ignored. No authentication (the token is the user id), no pipeline, no database: what it
costs is the proxy, the sockets and JSON, which is the floor Conveyor's figures are
divided by. Run it with one replica (routing is in-process).
"""

from __future__ import annotations

import contextlib
import itertools
import time
import uuid
from typing import Any

import orjson
from ray import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


def _bearer(request: Request) -> str:
    return request.headers.get("authorization", "").removeprefix("Bearer ").strip()


class EchoState:
    """The relay itself: chats, sequence numbers and sockets, as a Starlette app."""

    def __init__(self) -> None:
        self.members: dict[str, list[str]] = {}
        self.seq: dict[str, int] = {}
        self.sockets: dict[str, set[WebSocket]] = {}
        self._ids = itertools.count(1)

    def __serve_build_asgi_app__(self) -> Starlette:
        routes: list[BaseRoute] = [
            WebSocketRoute("/v1/ws", self.ws_endpoint),
            Route("/v1/chats", self.create_chat, methods=["POST"]),
            Route("/v1/chats", self.list_chats, methods=["GET"]),
            Route("/health/ready", self.ready, methods=["GET"]),
        ]
        return Starlette(routes=routes)

    async def ready(self, request: Request) -> Response:
        return _json({"status": "ready"})

    async def create_chat(self, request: Request) -> Response:
        user = _bearer(request)
        body = orjson.loads(await request.body())
        chat_id = str(uuid.uuid4())
        self.members[chat_id] = sorted({user, *body["members"]})
        self.seq[chat_id] = 0
        return _json({"chatId": chat_id, "members": self.members[chat_id], "title": None}, 201)

    async def list_chats(self, request: Request) -> Response:
        user = _bearer(request)
        chats = [{"chatId": c, "members": m, "lastSeq": self.seq[c]}
                 for c, m in self.members.items() if user in m]
        return _json({"chats": chats})

    async def ws_endpoint(self, ws: WebSocket) -> None:
        user = ws.query_params.get("access_token", "")
        await ws.accept()
        self.sockets.setdefault(user, set()).add(ws)
        try:
            await ws.send_text(orjson.dumps(
                {"type": "system", "event": "connected",
                 "data": {"userId": user, "connectionId": str(uuid.uuid4())}}).decode())
            while True:
                frame = orjson.loads(await ws.receive_text())
                if frame.get("type") != "chat":
                    continue
                chat_id = frame["chatId"]
                self.seq[chat_id] += 1
                seq = self.seq[chat_id]
                message_id = f"e{next(self._ids)}"
                await ws.send_text(orjson.dumps(
                    {"type": "ack", "id": frame["id"], "status": "accepted",
                     "messageId": message_id, "chatId": chat_id, "seq": seq}).decode())
                out = orjson.dumps(
                    {"type": "message", "messageId": message_id, "chatId": chat_id, "seq": seq,
                     "senderId": user, "kind": "text", "body": frame["body"],
                     "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).decode()
                for member in self.members[chat_id]:
                    if member == user:
                        continue
                    for peer in list(self.sockets.get(member, ())):
                        with contextlib.suppress(Exception):
                            await peer.send_text(out)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            peers = self.sockets.get(user)
            if peers is not None:
                peers.discard(ws)
                if not peers:
                    del self.sockets[user]


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=2000)
@serve.ingress()
class EchoRelay(EchoState):
    """The relay as a Serve deployment, behind Serve's proxy."""


echo_app = EchoRelay.bind()


def main(argv: list[str] | None = None) -> None:
    """The same relay under plain uvicorn, without Ray Serve: ``python -m bench.echo
    --port P`` serves it on 127.0.0.1:P until stopped. The benchmark measures it beside
    the Serve-proxied one to put a figure on what the proxy costs per frame."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.echo")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    relay = EchoState()
    uvicorn.run(relay.__serve_build_asgi_app__(), host="127.0.0.1", port=args.port,
                log_level="warning", ws_per_message_deflate=False)


if __name__ == "__main__":
    main()
