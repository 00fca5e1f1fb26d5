"""HTTP resources of the messenger: chats (create, list), a chat's history, presence.
History is also what a ``sync`` frame reads (:meth:`ChatsApi.history`). With
``contacts``, presence answers only for the caller and the caller's contacts (users
sharing a chat with it); without, for anyone (``presence_scope``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from adapters.auth import Principal
from deployments.gateway.intake import rfc3339
from deployments.http import ApiError, error_response, json_response, query_int, storable
from stages.ports import ChatStore, ConnectionRegistry, Contacts, MessageStore

Guard = Callable[[Request], Awaitable[Principal]]
MAX_SEQ = 2**63 - 1  # seq is a PostgreSQL bigint


class ChatsApi:
    def __init__(self, chats: ChatStore, messages: MessageStore, hub: ConnectionRegistry,
                 guard: Guard, contacts: Contacts | None = None) -> None:
        self.chats = chats
        self.messages = messages
        self.hub = hub
        self.guard = guard
        self.contacts = contacts

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/chats", self.create_chat, methods=["POST"]),
            Route("/v1/chats", self.list_chats, methods=["GET"]),
            Route("/v1/chats/{chat_id}/messages", self.chat_messages, methods=["GET"]),
            Route("/v1/presence", self.presence, methods=["GET"]),
        ]

    async def history(self, user_id: str, chat_id: str, after: int, limit: int
                      ) -> tuple[list[dict[str, Any]], bool]:
        """A member's page of a chat: frames with seq > ``after``, and whether more follow."""
        if not 0 <= after <= MAX_SEQ or not 1 <= limit <= 500:
            raise ApiError(400, "invalid", "afterSeq must be >= 0 and limit 1..500")
        if not storable(chat_id):
            raise ApiError(404, "not_found", "no such chat")
        members = await self.chats.members([chat_id])
        if chat_id not in members:
            raise ApiError(404, "not_found", "no such chat")
        if user_id not in members[chat_id]:
            raise ApiError(403, "forbidden", "not a member of this chat")
        rows = await self.messages.messages_after(chat_id, after, limit + 1)
        return [m.frame() for m in rows[:limit]], len(rows) > limit

    async def create_chat(self, request: Request) -> Response:
        try:
            principal = await self.guard(request)
            try:
                body = orjson.loads(await request.body())
            except orjson.JSONDecodeError:
                raise ApiError(400, "invalid", "body is not valid JSON") from None
            members = body.get("members") if isinstance(body, dict) else None
            title = body.get("title") if isinstance(body, dict) else None
            if (not isinstance(members, list) or not 1 <= len(members) <= 1000
                    or not all(isinstance(m, str) and 0 < len(m) <= 128 and storable(m)
                               for m in members)):
                raise ApiError(400, "invalid", "'members' must be a list of 1..1000 user ids")
            if title is not None and (not isinstance(title, str) or len(title) > 200
                                      or not storable(title)):
                raise ApiError(400, "invalid", "'title' must be a string of at most 200 characters")
            chat_id = await self.chats.create_chat(principal.user_id, members, title)
            everyone = sorted({principal.user_id, *members})
            return json_response({"chatId": chat_id, "members": everyone, "title": title}, 201)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)

    async def list_chats(self, request: Request) -> Response:
        try:
            principal = await self.guard(request)
            return json_response({"chats": await self.chats.chats_of(principal.user_id)})
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)

    async def chat_messages(self, request: Request) -> Response:
        try:
            principal = await self.guard(request)
            after = query_int(request, "afterSeq", 0)
            limit = query_int(request, "limit", 50)
            messages, has_more = await self.history(
                principal.user_id, request.path_params["chat_id"], after, limit)
            return json_response({"messages": messages, "hasMore": has_more})
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)

    async def presence(self, request: Request) -> Response:
        try:
            principal = await self.guard(request)
            users = [u for item in request.query_params.getlist("userId") for u in item.split(",")]
            if not users or len(users) > 500 or not all(u and storable(u) for u in users):
                raise ApiError(400, "invalid", "give 1..500 userId values")
            if self.contacts is not None:
                await self.only_contacts(principal.user_id, users, self.contacts)
            found = await self.hub.presence(users)
            out = []
            for user, online, seen in found:
                last = rfc3339(seen) if seen is not None else None
                out.append({"userId": user, "online": online, "lastSeen": last})
            return json_response({"users": out})
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)

    @staticmethod
    async def only_contacts(caller: str, users: list[str], contacts: Contacts) -> None:
        """Refuses (403 ``forbidden``, naming them in the order asked) the users asked for
        who are neither the caller nor share a chat with the caller."""
        others = list(dict.fromkeys(u for u in users if u != caller))
        if not others:
            return
        shared = await contacts.share_chat([(caller, u) for u in others])
        strangers = [u for u in others if (caller, u) not in shared]
        if strangers:
            raise ApiError(403, "forbidden",
                           f"not contacts of the caller (no chat shared): {', '.join(strangers)}")
