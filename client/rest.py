"""The HTTP side of the protocol: chats and their history (``PROTOCOL.md``, "HTTP")."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx

from client.errors import ServerError

HISTORY_PAGE = 500


class HttpClient:
    """``/v1/chats`` for one user (a bearer token), over one pooled HTTP connection.

    Use as ``async with HttpClient(base_url, token) as http: ...``, or call
    :meth:`aclose`. A refused request raises :class:`ServerError` with the server's code.
    """

    def __init__(self, base_url: str, token: str, *, timeout: float = 30.0) -> None:
        self.http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout,
                                      headers={"Authorization": f"Bearer {token}"})

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def create_chat(self, members: list[str], title: str | None = None) -> dict[str, Any]:
        """``POST /v1/chats``: a chat of the caller and ``members``; returns
        ``{"chatId", "members", "title"}``."""
        return _json(await self.http.post("/v1/chats", json={"members": members, "title": title}))

    async def chats(self) -> list[dict[str, Any]]:
        """``GET /v1/chats``: the caller's chats."""
        return list(_json(await self.http.get("/v1/chats"))["chats"])

    async def history(self, chat_id: str, after_seq: int = 0, limit: int = 50) -> dict[str, Any]:
        """One page of ``GET /v1/chats/{chatId}/messages``: ``{"messages", "hasMore"}``,
        the items (messages and command events) in ``seq`` order after ``after_seq``."""
        return _json(await self.http.get(f"/v1/chats/{chat_id}/messages",
                                         params={"afterSeq": after_seq, "limit": limit}))

    async def history_all(self, chat_id: str, after_seq: int = 0, page: int = HISTORY_PAGE
                          ) -> list[dict[str, Any]]:
        """Every history item after ``after_seq``, page by page, in ``seq`` order."""
        out: list[dict[str, Any]] = []
        while True:
            got = await self.history(chat_id, after_seq, page)
            out.extend(got["messages"])
            if not got["hasMore"] or not got["messages"]:
                return out
            after_seq = got["messages"][-1]["seq"]


async def create_chat(base_url: str, token: str, members: list[str], title: str | None = None
                      ) -> str:
    """``POST /v1/chats`` as the token's user; returns the new chat's id."""
    async with HttpClient(base_url, token) as http:
        return str((await http.create_chat(members, title))["chatId"])


async def history(base_url: str, token: str, chat_id: str, after_seq: int = 0,
                  limit: int = 50) -> dict[str, Any]:
    """One page of a chat's history as the token's user (see :meth:`HttpClient.history`)."""
    async with HttpClient(base_url, token) as http:
        return await http.history(chat_id, after_seq, limit)


def _json(r: httpx.Response) -> dict[str, Any]:
    if r.is_success:
        body = r.json()
        if not isinstance(body, dict):
            raise ServerError("bad_response", f"expected a JSON object, got {type(body).__name__}",
                              status=r.status_code, detail=body)
        return body
    try:
        body = r.json()
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {}
    raise ServerError(str(err.get("code", "http_error")), str(err.get("message", r.reason_phrase)),
                      status=r.status_code, detail=r.text)
