"""The caching stage: rows ``persist`` just committed go to the chat cache (Redis).

``cache_chat`` runs right after ``persist_chat`` / ``persist_command``, in the same
stage-host call, so it costs no extra hop. The cache is never the source of truth: when
it cannot be reached the stage reports the outage and lets the batch go on (reads fall
back to PostgreSQL; the adapter drops what a failed write may have left stale).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from stages.bus import CacheUnavailable, ChatCache
from stages.model import Envelope, Outcome
from stages.ports import COMMAND_KINDS, Outages, StoredMessage

log = logging.getLogger("conveyor.stages")


def stored_row(env: Envelope) -> StoredMessage | None:
    """The row persist wrote for ``env``, as ``messages_after`` returns it right after the
    commit; None for a duplicate or an item persist did not number."""
    meta = env.meta
    if meta.get("duplicate") or not meta.get("messageId") or not meta.get("seq"):
        return None
    if env.type == "command":
        op = str(env.fields.get("op"))
        if op not in COMMAND_KINDS:
            return None
        return StoredMessage(
            message_id=meta["messageId"], chat_id=meta["chatId"], seq=int(meta["seq"]),
            sender_id=env.sender, kind=op,
            body=env.fields.get("body") if op == "edit" else None,
            created_at=meta["createdAt"], target=env.fields.get("messageId"),
            data=meta.get("commandData"))
    return StoredMessage(
        message_id=meta["messageId"], chat_id=meta["chatId"], seq=int(meta["seq"]),
        sender_id=env.sender, kind=meta.get("kind", "text"), body=env.fields.get("body", ""),
        created_at=meta["createdAt"], attachment=meta.get("attachment"))


class CacheChat:
    """Appends the batch's new rows to the chat cache; never fails the batch. Without a
    cache (``redis_url`` unset) it passes every item on untouched."""

    name = "cache_chat"

    def __init__(self, cache: ChatCache | None, outages: Outages | None = None) -> None:
        self.cache = cache
        self.outages = outages

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        if self.cache is None:
            return [Outcome.ok(e) for e in batch]
        rows = [r for e in batch if (r := stored_row(e)) is not None]
        if rows:
            try:
                await self.cache.append(rows)
            except CacheUnavailable as exc:
                log.debug("chat cache unavailable: %s", exc)
                if self.outages is not None:
                    self.outages.unavailable("redis", self.name, len(rows))
        return [Outcome.ok(e) for e in batch]
