"""``Directory`` with a short per-process cache in front of any other ``Directory``."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from stages.ports import Directory


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
