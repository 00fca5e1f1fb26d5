"""``Directory`` and ``Contacts`` with a short per-process cache in front of the store's."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet

from stages.ports import Contacts, Directory


class CachedDirectory:
    """``Directory`` over the store with a short per-process cache (membership is read
    often and changes rarely; a change is seen within ``ttl_s``)."""

    def __init__(self, store: Directory, ttl_s: float = 5.0) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}

    async def members(self, chat_ids: Sequence[str]) -> Mapping[str, frozenset[str]]:
        now = time.monotonic()
        out: dict[str, frozenset[str]] = {}
        missing = []
        for c in chat_ids:
            hit = self._cache.get(c)
            if hit and now - hit[0] < self.ttl_s:
                out[c] = hit[1]
            else:
                missing.append(c)
        if missing:
            fresh = await self.store.members(missing)
            for c, users in fresh.items():
                self._cache[c] = (now, users)
                out[c] = users
            if len(self._cache) > 100_000:
                self._cache.clear()
        return out


class CachedContacts:
    """``Contacts`` over the store, with a short per-process cache of the pairs found
    sharing a chat (a signal's sender and recipient, a presence lookup's caller and the
    users asked): a typing indicator costs no query while the pair is cached. A pair found
    is trusted for ``ttl_s`` (a change of membership is seen within it, as with
    ``CachedDirectory``); a pair not found is asked of the store every time, so a chat
    created a moment ago counts at once and a refusal is never a stale answer. The pairs
    a call does not find cached go to the store in one query. ``contacts`` (everyone
    sharing a chat with a user, for presence frames) is read from the store each time."""

    def __init__(self, store: Contacts, ttl_s: float = 5.0, max_pairs: int = 100_000) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.max_pairs = max_pairs
        self._shared: dict[tuple[str, str], float] = {}

    async def contacts(self, user_ids: Sequence[str]) -> Mapping[str, frozenset[str]]:
        return await self.store.contacts(user_ids)

    async def share_chat(self, pairs: Sequence[tuple[str, str]]) -> AbstractSet[tuple[str, str]]:
        now = time.monotonic()
        found: set[tuple[str, str]] = set()
        ask: list[tuple[str, str]] = []
        for a, b in pairs:
            at = self._shared.get((a, b) if a <= b else (b, a))
            if at is not None and now - at < self.ttl_s:
                found.add((a, b))
            else:
                ask.append((a, b))
        if ask:
            fresh = await self.store.share_chat(ask)
            if len(self._shared) + len(fresh) > self.max_pairs:
                self._shared.clear()
            for a, b in fresh:
                self._shared[(a, b) if a <= b else (b, a)] = now
                found.add((a, b))
        return found
