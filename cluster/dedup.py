"""The dedup window for never-stored types (signals): keys remembered for ``ttl_s``.

Sharded by key. A lost shard forgets its keys (see ``stages.ports.DedupWindow``), and a
shard that cannot be reached answers "first seen" for its keys: dedup is lost for a
moment, signals are not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence

import ray

from cluster.sharding import named_actor, shard_of

log = logging.getLogger("conveyor.dedup")


class Window:
    def __init__(self, ttl_s: float, max_keys: int = 1_000_000) -> None:
        self.ttl_s = ttl_s
        self.max_keys = max_keys
        self._keys: OrderedDict[str, float] = OrderedDict()  # key -> expiry, oldest first

    def first_seen(self, keys: Sequence[str], now: float) -> list[bool]:
        while self._keys:
            key, expiry = next(iter(self._keys.items()))
            if expiry > now and len(self._keys) <= self.max_keys:
                break
            self._keys.popitem(last=False)
        out = []
        for key in keys:
            if key in self._keys:
                out.append(False)
            else:
                self._keys[key] = now + self.ttl_s
                out.append(True)
        return out


@ray.remote
class DedupShard:
    def __init__(self, ttl_s: float) -> None:
        self.window = Window(ttl_s)

    async def first_seen(self, keys: Sequence[str]) -> list[bool | None]:
        return self.window.first_seen(keys, time.monotonic())


class DedupClient:
    def __init__(self, shards: int, ttl_s: float, prefix: str = "conveyor") -> None:
        self.n = max(1, shards)
        self.actors = [named_actor(DedupShard, f"{prefix}-dedup-{i}", ttl_s) for i in range(self.n)]

    async def first_seen(self, keys: Sequence[str]) -> list[bool | None]:
        parts: dict[int, list[int]] = defaultdict(list)
        for i, k in enumerate(keys):
            parts[shard_of(k, self.n)].append(i)
        calls = {s: self.actors[s].first_seen.remote([keys[i] for i in idx]) for s, idx in parts.items()}
        answers = await asyncio.gather(*calls.values(), return_exceptions=True)
        out: list[bool | None] = [None] * len(keys)
        for s, answer in zip(calls, answers, strict=True):
            if isinstance(answer, BaseException):
                # A shard that cannot answer: its keys are unchecked (None), and the
                # caller lets them through as first seen.
                log.warning("dedup shard %d unreachable (%r): %d keys pass unchecked",
                            s, answer, len(parts[s]))
                continue
            for i, v in zip(parts[s], answer, strict=True):
                out[i] = v
        return out
