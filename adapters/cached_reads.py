"""Reads through the chat cache, with PostgreSQL behind it (the composition root wraps the
stores in these when ``redis_url`` is set).

- ``CachedMessages`` (a ``MessageStore``): ``messages_after`` — history pages, ``sync``,
  a connection's gap fill — answers from the cache when its window covers the range, else
  reads PostgreSQL and, when that read reached the chat's end, fills a cold chat;
  ``apply_receipts`` moves the members' unread counters after the store moved their read
  pointers. ``persist`` is the store's (the ``cache_chat`` stage writes the cache).
- ``CachedChats`` (a ``ChatStore``): the chat list without the per-chat unread count
  query when every counter is cached and not behind the list's own read; else the full
  query, whose counts then fill the cache.

Redis unreachable or slow (``CacheUnavailable``, within the adapter's timeout): the read
goes to PostgreSQL and ``CacheHealth`` records it (a metric and ``/health/ready`` say so).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adapters.postgres.chats import PostgresChats
from stages.bus import CacheUnavailable, ChatCache
from stages.ports import MessageStore, PointerMove, Receipt, Stored, StoredMessage
from stages.ports.chat import ChatDraft, Pointer

log = logging.getLogger("conveyor.redis")


@dataclass
class CacheHealth:
    """What this process saw of the cache: reads served from it, from PostgreSQL, and
    calls that failed because it was unreachable (running totals)."""

    available: bool = True
    hits: int = 0
    retry_s: float = 1.0  # while unreachable, try it again at most this often
    misses: int = 0
    unavailable: int = 0
    last_error: str | None = None
    since: float = 0.0

    def worth_trying(self) -> bool:
        """Reachable, or unreachable long enough ago to look again (a down Redis costs a
        read nothing most of the time)."""
        return self.available or time.time() - self.since >= self.retry_s

    def ok(self) -> None:
        if not self.available:
            log.info("chat cache reachable again")
            self.available, self.since = True, time.time()

    def failed(self, exc: BaseException) -> None:
        self.unavailable += 1
        self.last_error = str(exc)[:200]
        if self.available:
            log.warning("chat cache unreachable, reading PostgreSQL: %s", exc)
        self.available, self.since = False, time.time()


class CachedMessages:
    def __init__(self, store: MessageStore, cache: ChatCache, health: CacheHealth) -> None:
        self.store = store
        self.cache = cache
        self.health = health

    async def persist(self, drafts: Sequence[ChatDraft]) -> list[Stored]:
        return await self.store.persist(drafts)

    async def messages_after(self, chat_id: str, after_seq: int, limit: int
                             ) -> list[StoredMessage]:
        cached: list[StoredMessage] | None = None
        if self.health.worth_trying():
            try:
                cached = await self.cache.recent(chat_id, after_seq, limit)
                self.health.ok()
            except CacheUnavailable as exc:
                self.health.failed(exc)
        if cached is not None:
            self.health.hits += 1
            return cached
        self.health.misses += 1
        rows = await self.store.messages_after(chat_id, after_seq, limit)
        if self.health.available and rows and len(rows) < limit:  # read to the chat's end
            try:
                await self.cache.fill(chat_id, rows)
            except CacheUnavailable as exc:
                self.health.failed(exc)
        return rows

    async def apply_receipts(self, receipts: Sequence[Receipt]) -> list[PointerMove]:
        moved = await self.store.apply_receipts(receipts)
        if not moved:
            return moved
        try:
            for m in moved:
                await self.cache.mark_read(m.chat_id, m.user_id, m.read_seq)
        except CacheUnavailable as exc:  # the adapter drops the chat: it is cold now
            self.health.failed(exc)
        return moved


class CachedChats:
    """``PostgresChats`` with the chat list's unread counts from the cache when warm."""

    def __init__(self, chats: PostgresChats, cache: ChatCache, health: CacheHealth) -> None:
        self.chats = chats
        self.cache = cache
        self.health = health

    # Every other ChatStore (and Contacts) method is the store's.
    async def ping(self) -> None:
        await self.chats.ping()

    async def members(self, chat_ids: Sequence[str]) -> dict[str, frozenset[str]]:
        return await self.chats.members(chat_ids)

    async def pointers(self, user_id: str, chat_id: str | None = None) -> list[Pointer]:
        return await self.chats.pointers(user_id, chat_id)

    async def create_chat(self, creator: str, members: Sequence[str], title: str | None) -> str:
        return await self.chats.create_chat(creator, members, title)

    async def delivery_backlog(self) -> tuple[int, float]:
        return await self.chats.delivery_backlog()

    async def contacts(self, user_ids: Sequence[str]) -> dict[str, frozenset[str]]:
        return await self.chats.contacts(user_ids)

    async def share_chat(self, pairs: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        return await self.chats.share_chat(pairs)

    async def chats_of(self, user_id: str) -> list[dict[str, Any]]:
        if self.health.available:
            light = await self.chats.chats_of(user_id, unread=False)
            ids = [c["chatId"] for c in light]
            counts: dict[str, int] | None = None
            try:
                counts = await self.cache.unread(
                    user_id, ids, {c["chatId"]: (c["lastSeq"], c["readSeq"]) for c in light})
                self.health.ok()
            except CacheUnavailable as exc:
                self.health.failed(exc)
            if counts is not None:
                self.health.hits += 1
                for c in light:
                    c["unreadCount"] = counts[c["chatId"]]
                return light
        self.health.misses += 1
        full = await self.chats.chats_of(user_id)
        if full and self.health.worth_trying():
            try:
                await self.cache.fill_unread(user_id, full)
                self.health.ok()
            except CacheUnavailable as exc:
                self.health.failed(exc)
        return full
