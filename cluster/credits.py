"""The credit bank: per-user token buckets in sharded actors (users hashed onto shards).

A bucket holds up to ``capacity`` credits and gets ``refill`` credits back every
``interval_s`` (discrete refills, as the seed describes: "every 10 seconds"). A debit is
granted in full or refused; a refusal says when enough credits will be back. The
arithmetic is ``stages.buckets.TokenBuckets``, the same as the rate gates'.

If a shard actor dies it is restarted empty: its users' buckets start full again. That is
deliberate: the bank limits abuse, it is not a ledger, and losing it must not stop anyone
from talking. Gateways call one shard once per batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import ray

from cluster.sharding import named_actor, shard_of
from stages.buckets import Lease, TokenBuckets
from stages.ports import Debit

# The bank's per-user buckets: the shared token-bucket arithmetic, keyed by user.
Buckets = TokenBuckets


@ray.remote
class CreditShard:
    def __init__(self, capacity: int, refill: int, interval_s: float) -> None:
        self.buckets = TokenBuckets(capacity, refill, interval_s)
        self.granted = 0
        self.refused = 0
        self._swept = time.monotonic()

    async def debit(self, requests: Sequence[tuple[str, int]]) -> list[Debit]:
        now = time.monotonic()
        out = [self.buckets.debit(user, cost, now) for user, cost in requests]
        self.granted += sum(d.granted for d in out)
        self.refused += sum(not d.granted for d in out)
        if now - self._swept > 60:
            self._swept = now
            self.buckets.forget_idle(now)
        return out

    async def lease(self, requests: Sequence[tuple[str, int]]) -> list[Lease]:
        """Per (user, wanted): as many credits as the user's bucket holds, up to wanted."""
        now = time.monotonic()
        return [self.buckets.take(user, want, now) for user, want in requests]

    async def refund(self, returns: Sequence[tuple[str, int]]) -> None:
        """Credits leased and not spent come back (never above capacity)."""
        now = time.monotonic()
        for user, n in returns:
            self.buckets.give(user, n, now)

    async def stats(self) -> dict[str, int]:
        return {"users": len(self.buckets), "granted": self.granted, "refused": self.refused}


class CreditBankClient:
    """The ``CreditBank`` port over the shards: one call per shard per batch."""

    def __init__(self, shards: int, capacity: int, refill: int, interval_s: float,
                 prefix: str = "conveyor") -> None:
        self.n = max(1, shards)
        self.actors = [
            named_actor(CreditShard, f"{prefix}-credits-{i}", capacity, refill, interval_s)
            for i in range(self.n)
        ]

    async def debit(self, requests: Sequence[tuple[str, int]]) -> list[Debit]:
        return await self._sharded("debit", requests)

    async def lease(self, requests: Sequence[tuple[str, int]]) -> list[Lease]:
        """Per (user, wanted): up to that many credits, taken from the bank now."""
        return await self._sharded("lease", requests)

    async def refund(self, returns: Sequence[tuple[str, int]]) -> None:
        parts: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for user, n in returns:
            parts[shard_of(user, self.n)].append((user, n))
        await asyncio.gather(*(self.actors[s].refund.remote(r) for s, r in parts.items()))

    async def _sharded(self, method: str, requests: Sequence[tuple[str, int]]) -> list[Any]:
        """One call per shard; answers in the order of ``requests``."""
        parts: dict[int, list[int]] = defaultdict(list)
        for i, (user, _) in enumerate(requests):
            parts[shard_of(user, self.n)].append(i)
        calls = {s: getattr(self.actors[s], method).remote([requests[i] for i in idx])
                 for s, idx in parts.items()}
        results = dict(zip(calls, await asyncio.gather(*calls.values()), strict=True))
        out: list[Any] = [None] * len(requests)
        for s, idx in parts.items():
            for i, d in zip(idx, results[s], strict=True):
                out[i] = d
        return out
